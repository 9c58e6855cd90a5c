//! `ByteRangeSpec::parse` then `resolve` on arbitrary input.
//!
//! Input layout: the first 8 bytes are the object length (little-endian u64), the rest is
//! the `Range` header value (must be UTF-8, as the HTTP layer hands the parser a `&str`).
//!
//! Checks: neither step panics; a resolved range is non-empty and lies inside the object;
//! it selects what the spec says (FROM-TO starts at FROM, a suffix takes the last bytes).
#![no_main]

use cachemesh_proto::limits::RANGE_HEADER_BYTES_MAX;
use cachemesh_proto::range::{ByteRangeSpec, RangeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((length, value)) = data.split_first_chunk::<8>() else {
        return;
    };
    let length = u64::from_le_bytes(*length);
    let Ok(value) = std::str::from_utf8(value) else {
        return;
    };
    let spec = match ByteRangeSpec::parse(value) {
        Ok(spec) => spec,
        Err(RangeError::Unsatisfiable { .. }) => panic!("parse must not judge satisfiability"),
        Err(_) => return,
    };
    assert!(value.len() <= RANGE_HEADER_BYTES_MAX, "accepted a header longer than the limit");
    let Ok(range) = spec.resolve(length) else {
        return;
    };
    assert!(range.start < range.end, "resolved range {range:?} is empty");
    assert!(range.end <= length, "resolved range {range:?} ends past object length {length}");
    match spec {
        ByteRangeSpec::FromTo { first, last } => {
            assert_eq!(range.start, first);
            if let Some(last) = last {
                assert!(range.end - 1 <= last);
            }
        }
        ByteRangeSpec::Suffix(count) => {
            assert_eq!(range.end, length);
            assert_eq!(range.end - range.start, count.min(length));
        }
    }
});
