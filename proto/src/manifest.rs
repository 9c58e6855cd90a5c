//! The object manifest: an object's length, its chunk size and its chunks, in order.
//!
//! Encoding (version 1), all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CMMF` |
//! | 4 | 1 | version, `1` |
//! | 5 | 3 | reserved, zero |
//! | 8 | 4 | chunk size in bytes, a power of two in [`CHUNK_BYTES_MIN`], [`CHUNK_BYTES_MAX`] |
//! | 12 | 8 | object length in bytes, at most [`OBJECT_BYTES_MAX`] |
//! | 20 | 4 | chunk count, exactly `ceil(length / chunk size)` |
//! | 24 | 32 x count | chunk ids |
//!
//! Every chunk but the last is exactly the chunk size; the last holds the rest. Nothing may
//! follow the ids. These rules make the encoding canonical, so [`ObjectId`] (the BLAKE3 of
//! the encoding) names exactly one manifest.

use std::ops::Range;

use crate::limits::{
    CHUNK_BYTES_MAX, CHUNK_BYTES_MIN, ID_BYTES, MANIFEST_BYTES_MAX, MANIFEST_HEADER_BYTES, OBJECT_BYTES_MAX,
    OBJECT_CHUNKS_MAX,
};
use crate::{ChunkId, ObjectId};

const MAGIC: [u8; 4] = *b"CMMF";
const VERSION: u8 = 1;

/// Why bytes are not a manifest, or why a manifest cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Fewer bytes than the header or the ids it announces.
    #[error("manifest truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the encoding needs.
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// More than [`MANIFEST_BYTES_MAX`] bytes.
    #[error("manifest has {0} bytes, more than MANIFEST_BYTES_MAX")]
    TooLarge(usize),
    /// Bytes after the last id.
    #[error("manifest has {actual} bytes, expected exactly {expected}")]
    TrailingBytes {
        /// Bytes the header announces.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The first four bytes are not `CMMF`.
    #[error("not a manifest (bad magic)")]
    BadMagic,
    /// A version this build does not know.
    #[error("manifest version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u8),
    /// Reserved bytes are not zero.
    #[error("manifest reserved bytes are not zero")]
    ReservedNotZero,
    /// The chunk size is out of range or not a power of two.
    #[error("manifest chunk size {0} is not a power of two between CHUNK_BYTES_MIN and CHUNK_BYTES_MAX")]
    BadChunkSize(u32),
    /// The object is larger than [`OBJECT_BYTES_MAX`].
    #[error("object length {0} exceeds OBJECT_BYTES_MAX")]
    ObjectTooLarge(u64),
    /// More chunks than [`OBJECT_CHUNKS_MAX`] (an object cut into small chunks).
    #[error("object needs {0} chunks, more than OBJECT_CHUNKS_MAX")]
    TooManyChunks(u64),
    /// The chunk count does not match the length and chunk size.
    #[error("manifest lists {actual} chunks, but its length needs {expected}")]
    ChunkCountMismatch {
        /// Chunks the length implies.
        expected: u64,
        /// Chunks listed.
        actual: u64,
    },
}

/// An object's description: its length, chunk size and chunk ids in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    length: u64,
    chunk_bytes: u32,
    chunks: Vec<ChunkId>,
}

fn chunk_count_for(length: u64, chunk_bytes: u32) -> u64 {
    length.div_ceil(u64::from(chunk_bytes))
}

fn check_chunk_bytes(chunk_bytes: u32) -> Result<(), ManifestError> {
    if !chunk_bytes.is_power_of_two() || !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&chunk_bytes) {
        return Err(ManifestError::BadChunkSize(chunk_bytes));
    }
    Ok(())
}

impl Manifest {
    /// A manifest for an object of `length` bytes cut into `chunk_bytes` chunks.
    pub fn new(length: u64, chunk_bytes: u32, chunks: Vec<ChunkId>) -> Result<Self, ManifestError> {
        check_chunk_bytes(chunk_bytes)?;
        if length > OBJECT_BYTES_MAX {
            return Err(ManifestError::ObjectTooLarge(length));
        }
        let expected = chunk_count_for(length, chunk_bytes);
        if expected > u64::from(OBJECT_CHUNKS_MAX) {
            return Err(ManifestError::TooManyChunks(expected));
        }
        if expected != chunks.len() as u64 {
            return Err(ManifestError::ChunkCountMismatch { expected, actual: chunks.len() as u64 });
        }
        Ok(Self { length, chunk_bytes, chunks })
    }

    /// The object's length in bytes.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The chunk size in bytes (every chunk but the last has exactly this size).
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// The chunk ids in order.
    pub fn chunks(&self) -> &[ChunkId] {
        &self.chunks
    }

    /// The byte range of the object that chunk `index` holds, or `None` past the end.
    pub fn chunk_range(&self, index: usize) -> Option<Range<u64>> {
        if index >= self.chunks.len() {
            return None;
        }
        let start = index as u64 * u64::from(self.chunk_bytes);
        let end = (start + u64::from(self.chunk_bytes)).min(self.length);
        Some(start..end)
    }

    /// The chunk indexes that hold any byte of `range` (empty when `range` is empty).
    pub fn chunks_covering(&self, range: &Range<u64>) -> Range<usize> {
        let end = range.end.min(self.length);
        if range.start >= end {
            return 0..0;
        }
        let chunk_bytes = u64::from(self.chunk_bytes);
        let first = (range.start / chunk_bytes) as usize;
        let last = (end - 1) / chunk_bytes;
        first..last as usize + 1
    }

    /// Encoded size of this manifest in bytes.
    pub fn encoded_len(&self) -> usize {
        MANIFEST_HEADER_BYTES + self.chunks.len() * ID_BYTES
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        // `new` and `decode` bound the count by OBJECT_CHUNKS_MAX, which fits u32.
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(chunk.as_bytes());
        }
        out
    }

    /// The object id: BLAKE3 of the canonical encoding.
    pub fn object_id(&self) -> ObjectId {
        ObjectId::of(&self.encode())
    }

    /// Decodes a whole manifest; every header field is checked before the ids are read.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() < MANIFEST_HEADER_BYTES {
            return Err(ManifestError::Truncated { needed: MANIFEST_HEADER_BYTES, available: bytes.len() });
        }
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let (header, ids) = bytes.split_at(MANIFEST_HEADER_BYTES);
        let field = |range: Range<usize>| &header[range];
        if field(0..4) != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        if header[4] != VERSION {
            return Err(ManifestError::UnsupportedVersion(header[4]));
        }
        if field(5..8) != [0, 0, 0] {
            return Err(ManifestError::ReservedNotZero);
        }
        let chunk_bytes = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let mut length_bytes = [0u8; 8];
        length_bytes.copy_from_slice(field(12..20));
        let length = u64::from_le_bytes(length_bytes);
        let count = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
        check_chunk_bytes(chunk_bytes)?;
        if length > OBJECT_BYTES_MAX {
            return Err(ManifestError::ObjectTooLarge(length));
        }
        let expected = chunk_count_for(length, chunk_bytes);
        if expected > u64::from(OBJECT_CHUNKS_MAX) {
            return Err(ManifestError::TooManyChunks(expected));
        }
        if expected != u64::from(count) {
            return Err(ManifestError::ChunkCountMismatch { expected, actual: u64::from(count) });
        }
        // count <= OBJECT_CHUNKS_MAX, checked above, so ids_len <= MANIFEST_BYTES_MAX.
        let ids_len = count as usize * ID_BYTES;
        if ids.len() < ids_len {
            return Err(ManifestError::Truncated { needed: MANIFEST_HEADER_BYTES + ids_len, available: bytes.len() });
        }
        if ids.len() > ids_len {
            return Err(ManifestError::TrailingBytes {
                expected: MANIFEST_HEADER_BYTES + ids_len,
                actual: bytes.len(),
            });
        }
        let chunks = ids
            .chunks_exact(ID_BYTES)
            .map(|id| {
                let mut raw = [0u8; ID_BYTES];
                raw.copy_from_slice(id);
                ChunkId::from_bytes(raw)
            })
            .collect();
        Ok(Self { length, chunk_bytes, chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest_strategy() -> impl Strategy<Value = Manifest> {
        (0u32..=6, 0u64..(40 * u64::from(CHUNK_BYTES_MIN)), any::<u64>()).prop_map(|(shift, length, seed)| {
            let chunk_bytes = CHUNK_BYTES_MIN << shift.min(6);
            let count = chunk_count_for(length, chunk_bytes);
            let chunks = (0..count).map(|i| ChunkId::of(&(seed ^ i).to_le_bytes())).collect();
            Manifest::new(length, chunk_bytes, chunks).unwrap()
        })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(manifest in manifest_strategy()) {
            let bytes = manifest.encode();
            prop_assert_eq!(bytes.len(), manifest.encoded_len());
            let decoded = Manifest::decode(&bytes).unwrap();
            prop_assert_eq!(decoded.object_id(), manifest.object_id());
            prop_assert_eq!(decoded, manifest);
        }

        #[test]
        fn decode_is_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            // Goal: anything that decodes re-encodes to the very same bytes.
            if let Ok(manifest) = Manifest::decode(&bytes) {
                prop_assert_eq!(manifest.encode(), bytes);
            }
        }

        #[test]
        fn mutated_encoding_decodes_canonically_or_errors(
            manifest in manifest_strategy(), position in any::<prop::sample::Index>(), flip in 1u8..=255
        ) {
            let mut bytes = manifest.encode();
            let at = position.index(bytes.len());
            bytes[at] ^= flip;
            if let Ok(decoded) = Manifest::decode(&bytes) {
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }

        #[test]
        fn chunk_ranges_tile_the_object(manifest in manifest_strategy(), start in any::<u64>(), len in any::<u64>()) {
            let mut next = 0;
            for index in 0..manifest.chunks().len() {
                let range = manifest.chunk_range(index).unwrap();
                prop_assert_eq!(range.start, next);
                prop_assert!(range.end > range.start);
                next = range.end;
            }
            prop_assert_eq!(next, manifest.length());
            let length = manifest.length().max(1);
            let start = start % length;
            let range = start..start.saturating_add(len % length);
            let covering = manifest.chunks_covering(&range);
            for index in covering.clone() {
                let chunk = manifest.chunk_range(index).unwrap();
                prop_assert!(chunk.start < range.end && chunk.end > range.start);
            }
            if range.start < range.end.min(manifest.length()) {
                prop_assert!(!covering.is_empty());
            }
        }
    }

    #[test]
    fn each_header_error_is_reported() {
        // Goal: each broken header field gives its own error before any id is read.
        let good = Manifest::new(10, CHUNK_BYTES_MAX, vec![ChunkId::of(b"x")]).unwrap().encode();
        let broken = |at: usize, value: u8| {
            let mut bytes = good.clone();
            bytes[at] = value;
            Manifest::decode(&bytes)
        };
        assert_eq!(broken(0, b'X'), Err(ManifestError::BadMagic));
        assert_eq!(broken(4, 2), Err(ManifestError::UnsupportedVersion(2)));
        assert_eq!(broken(6, 1), Err(ManifestError::ReservedNotZero));
        assert!(matches!(broken(9, 0x41), Err(ManifestError::BadChunkSize(_))));
        assert!(matches!(broken(20, 2), Err(ManifestError::ChunkCountMismatch { .. })));
        assert!(matches!(Manifest::decode(&good[..30]), Err(ManifestError::Truncated { .. })));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(Manifest::decode(&long), Err(ManifestError::TrailingBytes { .. })));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&(OBJECT_BYTES_MAX + 1).to_le_bytes());
        assert_eq!(Manifest::decode(&huge), Err(ManifestError::ObjectTooLarge(OBJECT_BYTES_MAX + 1)));
    }

    #[test]
    fn header_announcing_huge_count_is_refused_without_allocating() {
        // Goal: a short input claiming the largest legal object is "truncated", not an OOM.
        let mut bytes = Manifest::new(0, CHUNK_BYTES_MAX, vec![]).unwrap().encode();
        bytes[12..20].copy_from_slice(&OBJECT_BYTES_MAX.to_le_bytes());
        bytes[20..24].copy_from_slice(&OBJECT_CHUNKS_MAX.to_le_bytes());
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::Truncated { .. })));
        // The same length in the smallest chunks would need more ids than any manifest holds.
        bytes[8..12].copy_from_slice(&CHUNK_BYTES_MIN.to_le_bytes());
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::TooManyChunks(_))));
    }

    #[test]
    fn empty_object_has_no_chunks() {
        let manifest = Manifest::new(0, CHUNK_BYTES_MAX, vec![]).unwrap();
        assert_eq!(manifest.chunks_covering(&(0..10)), 0..0);
        assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
    }
}
