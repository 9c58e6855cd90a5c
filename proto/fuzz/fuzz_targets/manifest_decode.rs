//! `Manifest::decode` on arbitrary bytes.
//!
//! Checks: decoding never panics; a decoded manifest re-encodes to exactly the input (the
//! encoding is canonical); its object id is the BLAKE3 of the input and does not change
//! when the manifest is decoded again; the accessors agree with the header.
#![no_main]

use cachemesh_proto::{Manifest, ObjectId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::decode(data) else {
        return;
    };
    let encoded = manifest.encode();
    assert_eq!(encoded, data, "decode accepted a non-canonical encoding");
    assert_eq!(manifest.encoded_len(), data.len());

    let id = manifest.object_id();
    assert_eq!(id, ObjectId::of(data), "object id is not the hash of the encoding");
    assert_eq!(id, manifest.object_id(), "object id is not stable");
    let again = Manifest::decode(&encoded).expect("re-encoded manifest must decode");
    assert_eq!(again, manifest);
    assert_eq!(again.object_id(), id);

    // The chunks tile the object: each but the last is exactly chunk_bytes long.
    let chunk_bytes = u64::from(manifest.chunk_bytes());
    let mut next = 0u64;
    for index in 0..manifest.chunks().len() {
        let range = manifest.chunk_range(index).expect("index is in bounds");
        assert_eq!(range.start, next);
        assert!(range.start < range.end && range.end - range.start <= chunk_bytes);
        next = range.end;
    }
    assert_eq!(next, manifest.length());
    assert!(manifest.chunk_range(manifest.chunks().len()).is_none());
});
