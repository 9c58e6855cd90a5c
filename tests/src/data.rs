//! Deterministic test data and the digests tests compare it by.
//!
//! [`Pattern`] is a seeded, random-access byte stream (BLAKE3 in XOF mode keyed by the
//! seed), so a test can regenerate any byte range of a multi-GiB object without keeping it.
//! [`StreamDigest`] hashes a stream on the fly the way the daemon names it: BLAKE3 of the
//! whole stream plus the object id (chunk ids over `CHUNK_BYTES_MAX` pieces, then the
//! manifest's id), so tests never hold whole objects in memory.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use cachemesh_proto::limits::CHUNK_BYTES_MAX;
use cachemesh_proto::{ChunkId, Manifest, ObjectId};

/// Bytes generated per step when streaming a pattern.
pub const PIECE_BYTES: usize = 1024 * 1024;

/// The chunk size every object uses, as a `u64`.
pub const CHUNK: u64 = CHUNK_BYTES_MAX as u64;

/// A seeded, random-access stream of pseudo-random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    seed: u64,
}

impl Pattern {
    /// The pattern of this seed.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Fills `buffer` with the pattern's bytes starting at `offset`.
    pub fn fill(&self, offset: u64, buffer: &mut [u8]) {
        let key = blake3::derive_key("cachemesh-tests pattern v1", &self.seed.to_le_bytes());
        let mut reader = blake3::Hasher::new_keyed(&key).finalize_xof();
        reader.set_position(offset);
        reader.fill(buffer);
    }

    /// The bytes in `range` (for small ranges).
    pub fn bytes(&self, range: Range<u64>) -> Vec<u8> {
        let mut out = vec![0; usize::try_from(range.end - range.start).unwrap()];
        self.fill(range.start, &mut out);
        out
    }

    /// The digest of the first `length` bytes, as the daemon would name them.
    pub fn digest(&self, length: u64) -> StreamDigest {
        let mut digest = StreamDigest::new();
        let mut buffer = vec![0; PIECE_BYTES];
        let mut offset = 0;
        while offset < length {
            let piece = (length - offset).min(PIECE_BYTES as u64) as usize;
            self.fill(offset, &mut buffer[..piece]);
            digest.update(&buffer[..piece]);
            offset += piece as u64;
        }
        digest
    }

    /// Writes the first `length` bytes to a new file at `path`; returns their digest.
    pub fn write_file(&self, path: &Path, length: u64) -> StreamDigest {
        let mut file = std::io::BufWriter::with_capacity(PIECE_BYTES, std::fs::File::create(path).unwrap());
        let mut digest = StreamDigest::new();
        let mut buffer = vec![0; PIECE_BYTES];
        let mut offset = 0;
        while offset < length {
            let piece = (length - offset).min(PIECE_BYTES as u64) as usize;
            self.fill(offset, &mut buffer[..piece]);
            digest.update(&buffer[..piece]);
            file.write_all(&buffer[..piece]).unwrap();
            offset += piece as u64;
        }
        file.flush().unwrap();
        digest
    }
}

/// Hashes a stream as it passes: whole-stream BLAKE3 and the chunk ids of its
/// `CHUNK_BYTES_MAX` pieces.
#[derive(Debug, Clone)]
pub struct StreamDigest {
    whole: blake3::Hasher,
    chunk: blake3::Hasher,
    chunk_filled: u64,
    chunks: Vec<ChunkId>,
    length: u64,
}

impl Default for StreamDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self {
            whole: blake3::Hasher::new(),
            chunk: blake3::Hasher::new(),
            chunk_filled: 0,
            chunks: Vec::new(),
            length: 0,
        }
    }

    /// Adds the next bytes of the stream.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.whole.update(bytes);
        self.length += bytes.len() as u64;
        while !bytes.is_empty() {
            let room = (CHUNK - self.chunk_filled) as usize;
            let take = room.min(bytes.len());
            self.chunk.update(&bytes[..take]);
            self.chunk_filled += take as u64;
            bytes = &bytes[take..];
            if self.chunk_filled == CHUNK {
                self.chunks.push(ChunkId::from(self.chunk.finalize()));
                self.chunk.reset();
                self.chunk_filled = 0;
            }
        }
    }

    /// Bytes seen.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// BLAKE3 of everything seen.
    pub fn hash(&self) -> blake3::Hash {
        self.whole.finalize()
    }

    /// Chunk ids of the stream so far (the last partial chunk included).
    pub fn chunks(&self) -> Vec<ChunkId> {
        let mut chunks = self.chunks.clone();
        if self.chunk_filled > 0 {
            chunks.push(ChunkId::from(self.chunk.finalize()));
        }
        chunks
    }

    /// The manifest the daemon would write for the stream so far.
    pub fn manifest(&self) -> Manifest {
        Manifest::new(self.length, CHUNK_BYTES_MAX, self.chunks()).unwrap()
    }

    /// The object id of the stream so far.
    pub fn object_id(&self) -> ObjectId {
        self.manifest().object_id()
    }
}

/// Path of a chunk file in a data dir: `DATA/chunks/<first two hex>/<id>`.
pub fn chunk_path(data_dir: &Path, chunk: &ChunkId) -> std::path::PathBuf {
    let hex = chunk.to_string();
    data_dir.join("chunks").join(&hex[..2]).join(hex)
}

/// Every regular file under `dir`, recursively (empty when `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}
