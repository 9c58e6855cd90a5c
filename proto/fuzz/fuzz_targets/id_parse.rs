//! `ChunkId` / `ObjectId` parsing (`FromStr`) on arbitrary UTF-8.
//!
//! Checks: parsing never panics; an accepted string is canonical (its `to_string` is the
//! input itself) and parses back to the same id; both id types accept the same strings.
#![no_main]

use cachemesh_proto::{ChunkId, ObjectId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let chunk = text.parse::<ChunkId>();
    let object = text.parse::<ObjectId>();
    assert_eq!(chunk.is_ok(), object.is_ok(), "ChunkId and ObjectId disagree on {text:?}");
    if let (Ok(chunk), Ok(object)) = (chunk, object) {
        let shown = chunk.to_string();
        assert_eq!(shown, text, "accepted id text is not canonical");
        assert_eq!(shown.parse::<ChunkId>(), Ok(chunk));
        assert_eq!(chunk.as_bytes(), object.as_bytes());
        assert_eq!(object.to_string(), text);
    }
});
