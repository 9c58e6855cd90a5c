//! The single-range subset of HTTP `Range: bytes=...` that the local API serves.
//!
//! Accepted: `bytes=FIRST-LAST`, `bytes=FIRST-`, `bytes=-SUFFIX` (RFC 9110 section 14.1.2).
//! Non-goal: multiple ranges (`multipart/byteranges`); a list is refused with
//! [`RangeError::MultipleRanges`] rather than silently reading the first.

use std::ops::Range;

use crate::limits::RANGE_HEADER_BYTES_MAX;

/// A parsed `Range` header, not yet applied to an object length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRangeSpec {
    /// `bytes=FIRST-LAST` (inclusive) or `bytes=FIRST-` (`last` is `None`).
    FromTo {
        /// First byte offset.
        first: u64,
        /// Last byte offset, inclusive.
        last: Option<u64>,
    },
    /// `bytes=-N`: the last N bytes.
    Suffix(u64),
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not of the `bytes=` grammar.
    #[error("malformed Range header: {0}")]
    Malformed(&'static str),
    /// Longer than [`RANGE_HEADER_BYTES_MAX`].
    #[error("Range header longer than RANGE_HEADER_BYTES_MAX")]
    TooLong,
    /// More than one range.
    #[error("only a single byte range is supported")]
    MultipleRanges,
    /// Well formed, but no byte of the object lies in it.
    #[error("range does not overlap an object of {length} bytes")]
    Unsatisfiable {
        /// The object's length.
        length: u64,
    },
}

fn parse_offset(text: &str) -> Result<u64, RangeError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Malformed("offsets are decimal digits"));
    }
    text.parse().map_err(|_| RangeError::Malformed("offset does not fit 64 bits"))
}

impl ByteRangeSpec {
    /// Parses a `Range` header value.
    pub fn parse(value: &str) -> Result<Self, RangeError> {
        if value.len() > RANGE_HEADER_BYTES_MAX {
            return Err(RangeError::TooLong);
        }
        let set = value.trim().strip_prefix("bytes=").ok_or(RangeError::Malformed("unit must be bytes"))?;
        if set.contains(',') {
            return Err(RangeError::MultipleRanges);
        }
        let (first, last) = set.trim().split_once('-').ok_or(RangeError::Malformed("missing '-'"))?;
        match (first.is_empty(), last.is_empty()) {
            (true, true) => Err(RangeError::Malformed("empty range")),
            (true, false) => Ok(Self::Suffix(parse_offset(last)?)),
            (false, true) => Ok(Self::FromTo { first: parse_offset(first)?, last: None }),
            (false, false) => {
                let (first, last) = (parse_offset(first)?, parse_offset(last)?);
                if last < first {
                    return Err(RangeError::Malformed("last byte before first byte"));
                }
                Ok(Self::FromTo { first, last: Some(last) })
            }
        }
    }

    /// The half-open byte range this spec selects from an object of `length` bytes.
    pub fn resolve(self, length: u64) -> Result<Range<u64>, RangeError> {
        let range = match self {
            Self::FromTo { first, last } => {
                let end = last.map_or(length, |last| last.saturating_add(1).min(length));
                first..end
            }
            Self::Suffix(count) => length.saturating_sub(count)..length,
        };
        if range.start >= range.end {
            return Err(RangeError::Unsatisfiable { length });
        }
        Ok(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms_resolve_like_rfc_9110() {
        // Goal: the three accepted forms give the byte ranges RFC 9110's examples give.
        let resolve = |value: &str, length| ByteRangeSpec::parse(value).and_then(|s| s.resolve(length));
        assert_eq!(resolve("bytes=0-499", 10_000), Ok(0..500));
        assert_eq!(resolve("bytes=500-999", 10_000), Ok(500..1000));
        assert_eq!(resolve("bytes=-500", 10_000), Ok(9500..10_000));
        assert_eq!(resolve("bytes=9500-", 10_000), Ok(9500..10_000));
        assert_eq!(resolve("bytes=0-99999", 10), Ok(0..10));
        assert_eq!(resolve("bytes=-99999", 10), Ok(0..10));
        assert_eq!(resolve("bytes=10-", 10), Err(RangeError::Unsatisfiable { length: 10 }));
        assert_eq!(resolve("bytes=-0", 10), Err(RangeError::Unsatisfiable { length: 10 }));
        assert_eq!(resolve("bytes=0-0", 0), Err(RangeError::Unsatisfiable { length: 0 }));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=+1-2",
            "bytes=99999999999999999999-",
        ] {
            assert!(matches!(ByteRangeSpec::parse(bad), Err(RangeError::Malformed(_))), "{bad:?}");
        }
        assert_eq!(ByteRangeSpec::parse("bytes=0-1,4-5"), Err(RangeError::MultipleRanges));
        assert_eq!(ByteRangeSpec::parse(&format!("bytes=0-{}", "1".repeat(300))), Err(RangeError::TooLong));
    }

    proptest! {
        #[test]
        fn resolved_ranges_lie_inside_the_object(value in "bytes=[0-9]{0,5}-[0-9]{0,5}", length in 0u64..100_000) {
            if let Ok(range) = ByteRangeSpec::parse(&value).and_then(|spec| spec.resolve(length)) {
                prop_assert!(range.start < range.end && range.end <= length);
            }
        }

        #[test]
        fn any_text_parses_or_errors(value in ".{0,300}") {
            let _ = ByteRangeSpec::parse(&value);
        }
    }
}
