//! Every limit of the formats and the local API, as a named constant (unit last).
//!
//! Documentation elsewhere names these constants rather than repeating their values.

/// Largest chunk, and the chunk size every object written by cachemesh uses.
pub const CHUNK_BYTES_MAX: u32 = 4 * 1024 * 1024;

/// Smallest chunk size a manifest may declare (a floor that keeps manifests bounded).
pub const CHUNK_BYTES_MIN: u32 = 64 * 1024;

/// Largest object a manifest may describe: 1 TiB.
pub const OBJECT_BYTES_MAX: u64 = 1024 * 1024 * 1024 * 1024;

/// Most chunks one manifest may list (an object of [`OBJECT_BYTES_MAX`] in
/// [`CHUNK_BYTES_MAX`] chunks).
pub const OBJECT_CHUNKS_MAX: u32 = (OBJECT_BYTES_MAX / CHUNK_BYTES_MAX as u64) as u32;

/// Length of a BLAKE3-256 id in bytes.
pub const ID_BYTES: usize = 32;

/// Length of a manifest's fixed header in bytes.
pub const MANIFEST_HEADER_BYTES: usize = 24;

/// Largest encoded manifest: the header plus [`OBJECT_CHUNKS_MAX`] ids.
pub const MANIFEST_BYTES_MAX: usize = MANIFEST_HEADER_BYTES + OBJECT_CHUNKS_MAX as usize * ID_BYTES;

/// Largest request head (request line plus headers) the local API accepts; larger heads
/// are answered 431 `headers_too_large`.
pub const API_HEADER_BYTES_MAX: usize = 16 * 1024;

/// The HTTP layer's read buffer on API connections. It bounds how much of a body one read
/// takes (16 KiB made a 1 GiB put cost 65,536 reads) and the memory a head can occupy
/// before it is parsed and checked against `API_HEADER_BYTES_MAX`.
pub const API_READ_BUFFER_BYTES: usize = 256 * 1024;
const _: () = assert!(API_HEADER_BYTES_MAX <= API_READ_BUFFER_BYTES);

/// Socket buffer asked for on API connections, both ways (the kernel caps it at
/// `net.core.wmem_max` / `rmem_max`).
pub const API_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Longest `Range` header value the API parses.
pub const RANGE_HEADER_BYTES_MAX: usize = 256;

const _: () = assert!(CHUNK_BYTES_MIN <= CHUNK_BYTES_MAX);
const _: () = assert!(CHUNK_BYTES_MAX.is_power_of_two() && CHUNK_BYTES_MIN.is_power_of_two());
const _: () = assert!(OBJECT_BYTES_MAX.is_multiple_of(CHUNK_BYTES_MAX as u64));
// The chunk count field is a u32.
const _: () = assert!(OBJECT_CHUNKS_MAX as u64 == OBJECT_BYTES_MAX / CHUNK_BYTES_MAX as u64);

/// Longest datacenter name, in bytes.
pub const DC_NAME_BYTES_MAX: usize = 64;

/// Longest error message in a data-plane answer, in bytes.
pub const FRAME_MESSAGE_BYTES_MAX: usize = 256;

/// Largest have-set bitmap: one bit per chunk of the largest object.
pub const HAVE_SET_BYTES_MAX: usize = (OBJECT_CHUNKS_MAX as usize).div_ceil(8);

const _: () = assert!(DC_NAME_BYTES_MAX < 256, "dc length is one byte on the wire");
const _: () = assert!(FRAME_MESSAGE_BYTES_MAX <= u16::MAX as usize);

/// Longest volume name, in bytes (`[a-z0-9][a-z0-9._-]*`).
pub const VOLUME_NAME_BYTES_MAX: usize = 63;

/// Longest path inside a volume, in bytes (segments and the `/` between them).
pub const VOLUME_PATH_BYTES_MAX: usize = 1024;

/// Longest segment of a volume path, in bytes.
pub const VOLUME_PATH_SEGMENT_BYTES_MAX: usize = 255;

/// Most files one volume holds; a put of a new path past it is refused (`volume_full`).
pub const VOLUME_FILES_MAX: u32 = 250_000;

/// Length of a volume log record's fixed header in bytes.
pub const VOLUME_RECORD_HEADER_BYTES: usize = 32;

/// Largest encoded volume log record: a header plus a rename of two longest paths (larger
/// than a put: one path, an id and a size).
pub const VOLUME_RECORD_BYTES_MAX: usize = VOLUME_RECORD_HEADER_BYTES + 2 * (2 + VOLUME_PATH_BYTES_MAX);

/// Length of a volume snapshot's fixed header in bytes.
pub const VOLUME_SNAPSHOT_HEADER_BYTES: usize = 20;

/// Largest encoded snapshot entry: a longest path, an object id, size, time and sequence.
pub const VOLUME_SNAPSHOT_ENTRY_BYTES_MAX: usize = 2 + VOLUME_PATH_BYTES_MAX + ID_BYTES + 3 * 8;

/// Largest encoded volume snapshot: [`VOLUME_FILES_MAX`] longest entries.
pub const VOLUME_SNAPSHOT_BYTES_MAX: usize =
    VOLUME_SNAPSHOT_HEADER_BYTES + VOLUME_FILES_MAX as usize * VOLUME_SNAPSHOT_ENTRY_BYTES_MAX;

/// Most entries one answer of a volume listing holds (`limit` is capped at it).
pub const VOLUME_LIST_ENTRIES_MAX: usize = 1000;

/// Most paths one prefetch request names.
pub const VOLUME_PREFETCH_PATHS_MAX: usize = 256;

/// Bytes of an encoded volume head announcement: magic, version, name length, the longest
/// name, sequence.
pub const VOLUME_HEAD_BYTES_MAX: usize = 4 + 1 + 1 + VOLUME_NAME_BYTES_MAX + 8;

/// Largest JSON request body of the volume routes (rename, prefetch).
pub const VOLUME_REQUEST_BODY_BYTES_MAX: usize = 2 * 1024 * 1024;

const _: () = assert!(VOLUME_PATH_SEGMENT_BYTES_MAX <= VOLUME_PATH_BYTES_MAX);
const _: () = assert!(VOLUME_PATH_BYTES_MAX <= u16::MAX as usize, "path length is a u16 in records");
const _: () = assert!(VOLUME_RECORD_BYTES_MAX >= VOLUME_RECORD_HEADER_BYTES + 2 + VOLUME_PATH_BYTES_MAX + ID_BYTES + 8);
// A prefetch body of the most paths, each longest and fully escaped (`\u00XX`), fits.
const _: () =
    assert!(VOLUME_PREFETCH_PATHS_MAX * (6 * VOLUME_PATH_BYTES_MAX + 8) + 64 <= VOLUME_REQUEST_BODY_BYTES_MAX);
// A volume path fits a request head even when every byte is percent-encoded.
const _: () = assert!(3 * VOLUME_PATH_BYTES_MAX + 3 * VOLUME_NAME_BYTES_MAX + 256 <= API_HEADER_BYTES_MAX);
