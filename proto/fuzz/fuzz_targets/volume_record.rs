//! `volume::Record::decode`, `volume::Snapshot::decode` and `volume::VolumeHead::decode` on
//! arbitrary bytes, and the
//! volume name and path parsers on the same bytes as text.
//!
//! Checks: nothing panics; a decoded record or snapshot re-encodes to exactly the input
//! (the encodings are canonical) and decodes again to the same value; every path inside
//! is a valid `VolumePath`; snapshot entries are strictly ordered; an accepted name or path
//! is within its limits and parses back to itself.
#![no_main]

use cachemesh_proto::limits::{VOLUME_HEAD_BYTES_MAX, VOLUME_NAME_BYTES_MAX, VOLUME_PATH_BYTES_MAX, VOLUME_RECORD_BYTES_MAX};
use cachemesh_proto::volume::{Op, Record, Snapshot, VolumeHead, VolumeName, VolumePath};
use libfuzzer_sys::fuzz_target;

fn check_path(path: &VolumePath) {
    assert_eq!(VolumePath::parse(path.as_str()).as_ref(), Ok(path), "a decoded path must parse back");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(data) {
        assert!(data.len() <= VOLUME_RECORD_BYTES_MAX);
        assert_eq!(record.encode(), data, "decode accepted a non-canonical record");
        assert_eq!(Record::decode(&record.encode()).as_ref(), Ok(&record));
        assert!(record.seq >= 1);
        match &record.op {
            Op::Put { path, .. } | Op::Delete { path } => check_path(path),
            Op::Rename { from, to } => {
                check_path(from);
                check_path(to);
            }
        }
    }
    if let Ok(snapshot) = Snapshot::decode(data) {
        assert_eq!(snapshot.encode(), data, "decode accepted a non-canonical snapshot");
        for pair in snapshot.entries.windows(2) {
            assert!(pair[0].0.as_str().as_bytes() < pair[1].0.as_str().as_bytes());
        }
        for (path, info) in &snapshot.entries {
            check_path(path);
            assert!(info.seq >= 1 && info.seq <= snapshot.seq);
        }
    }
    if let Ok(head) = VolumeHead::decode(data) {
        assert!(data.len() <= VOLUME_HEAD_BYTES_MAX);
        assert_eq!(head.encode(), data, "decode accepted a non-canonical head announcement");
        assert!(head.seq >= 1);
        assert_eq!(VolumeName::parse(head.volume.as_str()).as_ref(), Ok(&head.volume));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(path) = VolumePath::parse(text) {
            assert!(text.len() <= VOLUME_PATH_BYTES_MAX);
            assert_eq!(path.as_str(), text);
            for ancestor in path.ancestors() {
                assert!(VolumePath::parse(ancestor).is_ok(), "an ancestor of a valid path is valid");
            }
        }
        if let Ok(name) = VolumeName::parse(text) {
            assert!(!text.is_empty() && text.len() <= VOLUME_NAME_BYTES_MAX);
            assert_eq!(name.as_str(), text);
        }
    }
});
