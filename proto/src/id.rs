//! Content ids: BLAKE3-256 hashes, shown as 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use crate::limits::ID_BYTES;

/// Why a string is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The string is not exactly 64 characters long.
    #[error("an id is {expected} hex digits, got {actual} characters")]
    Length {
        /// Characters expected.
        expected: usize,
        /// Characters given.
        actual: usize,
    },
    /// A character is not a lowercase hex digit.
    #[error("an id holds only lowercase hex digits; found {found:?} at {position}")]
    Character {
        /// The offending character.
        found: char,
        /// Its position.
        position: usize,
    },
}

fn parse_hex32(text: &str) -> Result<[u8; ID_BYTES], IdParseError> {
    if text.len() != ID_BYTES * 2 {
        return Err(IdParseError::Length { expected: ID_BYTES * 2, actual: text.chars().count() });
    }
    let mut out = [0u8; ID_BYTES];
    let bytes = text.as_bytes();
    for (position, &byte) in bytes.iter().enumerate() {
        let nibble = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => {
                let found = text[position..].chars().next().unwrap_or('\u{fffd}');
                return Err(IdParseError::Character { found, position });
            }
        };
        out[position / 2] |= if position % 2 == 0 { nibble << 4 } else { nibble };
    }
    Ok(out)
}

fn write_hex(bytes: &[u8; ID_BYTES], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; ID_BYTES * 2];
    for (i, byte) in bytes.iter().enumerate() {
        text[2 * i] = DIGITS[usize::from(byte >> 4)];
        text[2 * i + 1] = DIGITS[usize::from(byte & 0xf)];
    }
    // Every byte written above is ASCII.
    f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; ID_BYTES]);

        impl $name {
            /// The id made of these hash bytes.
            pub const fn from_bytes(bytes: [u8; ID_BYTES]) -> Self {
                Self(bytes)
            }

            /// The hash bytes.
            pub const fn as_bytes(&self) -> &[u8; ID_BYTES] {
                &self.0
            }

            /// The id of `data`: its BLAKE3-256 hash.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }

            /// Whether `data` hashes to this id.
            pub fn matches(&self, data: &[u8]) -> bool {
                // blake3::Hash compares in constant time; speed is not the point, habit is.
                blake3::Hash::from_bytes(self.0) == blake3::hash(data)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                write_hex(&self.0, f)?;
                f.write_str(")")
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                parse_hex32(text).map(Self)
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(hash: blake3::Hash) -> Self {
                Self(*hash.as_bytes())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Names a chunk: the BLAKE3-256 hash of its bytes.
    ChunkId
);
id_type!(
    /// Names an object: the BLAKE3-256 hash of its manifest's canonical encoding.
    ObjectId
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_hash_round_trips_through_text() {
        // Goal: the text form is BLAKE3's own hex, and parses back to the same id.
        let id = ChunkId::of(b"abc");
        assert_eq!(id.to_string(), blake3::hash(b"abc").to_hex().as_str());
        assert_eq!(id.to_string().parse::<ChunkId>(), Ok(id));
        assert!(id.matches(b"abc"));
        assert!(!id.matches(b"abd"));
    }

    #[test]
    fn rejects_bad_text_with_position() {
        // Goal: each way a string can fail to be an id has its own error.
        assert!(matches!("".parse::<ObjectId>(), Err(IdParseError::Length { actual: 0, .. })));
        let upper = "A".repeat(64);
        assert_eq!(upper.parse::<ObjectId>(), Err(IdParseError::Character { found: 'A', position: 0 }));
        let mut multibyte = "0".repeat(62);
        multibyte.push('é');
        assert!(matches!(multibyte.parse::<ObjectId>(), Err(IdParseError::Character { found: 'é', .. })));
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(bytes in any::<[u8; 32]>()) {
            let id = ObjectId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<ObjectId>(), Ok(id));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<ObjectId>(&json).unwrap(), id);
        }

        #[test]
        fn any_text_parses_or_errors(text in ".{0,80}") {
            let _ = text.parse::<ChunkId>();
        }
    }
}
