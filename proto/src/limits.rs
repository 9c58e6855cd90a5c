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
