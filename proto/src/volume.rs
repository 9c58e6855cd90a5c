//! Volumes: names, paths, and the encodings of a volume's log records and snapshots.
//!
//! A volume is a namespace of paths, each naming an immutable object. Its path table lives
//! in the origin as an append-only log of [`Record`]s (put, rename, delete), one per
//! sequence number, plus occasional [`Snapshot`]s of the whole table; this module holds
//! their canonical binary encodings and the validation of [`VolumeName`] and
//! [`VolumePath`]. Where the records live and how they are appended is the daemon's
//! business.
//!
//! Record encoding (version 1), all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CMVR` |
//! | 4 | 1 | version, `1` |
//! | 5 | 1 | op: `1` put, `2` rename, `3` delete |
//! | 6 | 2 | reserved, zero |
//! | 8 | 8 | sequence number (at least 1; the record's place in the log) |
//! | 16 | 8 | written at, milliseconds since the Unix epoch (the writer's clock) |
//! | 24 | 8 | nonce chosen by the writer (tells its own record from another's) |
//! | 32 | .. | put: path, object id (32), size (8); rename: from path, to path; delete: path |
//!
//! A path is a 2-byte length then that many bytes of a valid [`VolumePath`]. A put's size
//! is at most [`OBJECT_BYTES_MAX`]. Nothing may follow the op.
//!
//! Snapshot encoding (version 1):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CMVS` |
//! | 4 | 1 | version, `1` |
//! | 5 | 3 | reserved, zero |
//! | 8 | 8 | sequence number of the last record folded in (at least 1) |
//! | 16 | 4 | entry count, at most [`VOLUME_FILES_MAX`] |
//! | 20 | .. | entries: path, object id (32), size (8), modified at ms (8), sequence (8) |
//!
//! Entries are in strictly increasing byte order of their paths, and each entry's sequence
//! is between 1 and the snapshot's. Both encodings are canonical: anything that decodes
//! re-encodes to the same bytes.
//!
//! Head announcement encoding (version 1), what a node tells its datacenter after it
//! appended a record, so that other nodes catch up at once instead of at their next poll:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CMVH` |
//! | 4 | 1 | version, `1` |
//! | 5 | 1 | name length `n`, 1 to [`VOLUME_NAME_BYTES_MAX`] |
//! | 6 | n | the [`VolumeName`] |
//! | 6 + n | 8 | sequence number of the record appended (at least 1) |
//!
//! An announcement is only a hint: a receiver reads the records themselves from the origin.

use std::fmt;
use std::str::FromStr;

use crate::ObjectId;
use crate::limits::{
    ID_BYTES, OBJECT_BYTES_MAX, VOLUME_FILES_MAX, VOLUME_HEAD_BYTES_MAX, VOLUME_NAME_BYTES_MAX, VOLUME_PATH_BYTES_MAX,
    VOLUME_PATH_SEGMENT_BYTES_MAX, VOLUME_RECORD_BYTES_MAX, VOLUME_RECORD_HEADER_BYTES, VOLUME_SNAPSHOT_BYTES_MAX,
    VOLUME_SNAPSHOT_HEADER_BYTES,
};

const RECORD_MAGIC: [u8; 4] = *b"CMVR";
const SNAPSHOT_MAGIC: [u8; 4] = *b"CMVS";
const HEAD_MAGIC: [u8; 4] = *b"CMVH";
const VERSION: u8 = 1;
const OP_PUT: u8 = 1;
const OP_RENAME: u8 = 2;
const OP_DELETE: u8 = 3;
/// Smallest encoded snapshot entry: a one-byte path.
const SNAPSHOT_ENTRY_BYTES_MIN: usize = 2 + 1 + ID_BYTES + 3 * 8;

/// Why a string is not a volume name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeNameError {
    /// The name is empty.
    #[error("a volume name is not empty")]
    Empty,
    /// The name is longer than [`VOLUME_NAME_BYTES_MAX`].
    #[error("a volume name has at most {max} bytes, got {actual}", max = VOLUME_NAME_BYTES_MAX)]
    TooLong {
        /// Bytes given.
        actual: usize,
    },
    /// A character outside `a-z`, `0-9`, `.`, `_`, `-`, or a first character that is not a
    /// letter or digit.
    #[error(
        "a volume name is lowercase letters, digits, '.', '_' and '-', starting with a letter or digit; found {found:?} at {position}"
    )]
    Character {
        /// The offending character.
        found: char,
        /// Its byte position.
        position: usize,
    },
}

/// A volume's name: 1 to [`VOLUME_NAME_BYTES_MAX`] bytes of `[a-z0-9][a-z0-9._-]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    /// Checks `text` and makes it a name.
    pub fn parse(text: &str) -> Result<Self, VolumeNameError> {
        if text.is_empty() {
            return Err(VolumeNameError::Empty);
        }
        if text.len() > VOLUME_NAME_BYTES_MAX {
            return Err(VolumeNameError::TooLong { actual: text.len() });
        }
        for (position, found) in text.char_indices() {
            let allowed = match found {
                'a'..='z' | '0'..='9' => true,
                '.' | '_' | '-' => position > 0,
                _ => false,
            };
            if !allowed {
                return Err(VolumeNameError::Character { found, position });
            }
        }
        Ok(Self(text.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VolumeName {
    type Err = VolumeNameError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Why a string is not a volume path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumePathError {
    /// The path is empty.
    #[error("a path is not empty")]
    Empty,
    /// The path is longer than [`VOLUME_PATH_BYTES_MAX`].
    #[error("a path has at most {max} bytes, got {actual}", max = VOLUME_PATH_BYTES_MAX)]
    TooLong {
        /// Bytes given.
        actual: usize,
    },
    /// A segment is longer than [`VOLUME_PATH_SEGMENT_BYTES_MAX`].
    #[error("a path segment has at most {max} bytes; segment {index} has {actual}", max = VOLUME_PATH_SEGMENT_BYTES_MAX)]
    SegmentTooLong {
        /// Which segment (from 0).
        index: usize,
        /// Its length.
        actual: usize,
    },
    /// An empty segment: a leading or trailing `/`, or `//`.
    #[error("a path has no empty segments (no leading or trailing '/', no '//'); segment {index} is empty")]
    EmptySegment {
        /// Which segment (from 0).
        index: usize,
    },
    /// A `.` or `..` segment.
    #[error("a path has no '.' or '..' segments; segment {index} is {segment:?}")]
    DotSegment {
        /// Which segment (from 0).
        index: usize,
        /// `.` or `..`.
        segment: String,
    },
    /// A NUL or another control character.
    #[error("a path has no NUL or other control characters; found {found:?} at byte {position}")]
    ControlCharacter {
        /// The character.
        found: char,
        /// Its byte position.
        position: usize,
    },
    /// The bytes are not UTF-8 (only when decoding).
    #[error("a path is UTF-8")]
    NotUtf8,
}

/// A path inside a volume: relative, `/`-separated segments, none empty, `.` or `..`, no
/// NUL or control characters, each at most [`VOLUME_PATH_SEGMENT_BYTES_MAX`] bytes and all
/// at most [`VOLUME_PATH_BYTES_MAX`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumePath(String);

impl VolumePath {
    /// Checks `text` and makes it a path.
    pub fn parse(text: &str) -> Result<Self, VolumePathError> {
        if text.is_empty() {
            return Err(VolumePathError::Empty);
        }
        if text.len() > VOLUME_PATH_BYTES_MAX {
            return Err(VolumePathError::TooLong { actual: text.len() });
        }
        if let Some((position, found)) = text.char_indices().find(|(_, c)| c.is_control()) {
            return Err(VolumePathError::ControlCharacter { found, position });
        }
        for (index, segment) in text.split('/').enumerate() {
            if segment.is_empty() {
                return Err(VolumePathError::EmptySegment { index });
            }
            if segment == "." || segment == ".." {
                return Err(VolumePathError::DotSegment { index, segment: segment.to_string() });
            }
            if segment.len() > VOLUME_PATH_SEGMENT_BYTES_MAX {
                return Err(VolumePathError::SegmentTooLong { index, actual: segment.len() });
            }
        }
        Ok(Self(text.to_string()))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The proper ancestors of this path, nearest last: `a`, `a/b` for `a/b/c`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.match_indices('/').map(|(at, _)| &self.0[..at])
    }
}

impl fmt::Display for VolumePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VolumePath {
    type Err = VolumePathError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// One change to a volume's path table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `path` now names `object`, of `size` bytes (created or replaced).
    Put {
        /// The path.
        path: VolumePath,
        /// The object.
        object: ObjectId,
        /// Its length in bytes.
        size: u64,
    },
    /// The file at `from` moves to `to`, replacing whatever `to` named.
    Rename {
        /// Source path (must exist).
        from: VolumePath,
        /// Target path.
        to: VolumePath,
    },
    /// `path` no longer names anything.
    Delete {
        /// The path (must exist).
        path: VolumePath,
    },
}

/// One entry of a volume's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's place in the log, from 1, dense.
    pub seq: u64,
    /// When the writer wrote it, in milliseconds since the Unix epoch (its own clock).
    pub written_at_ms: u64,
    /// A value the writer chose, so that it recognises its own record.
    pub nonce: u64,
    /// The change.
    pub op: Op,
}

/// What a path names in a [`Snapshot`] (and in a node's view of a volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// The object.
    pub object: ObjectId,
    /// Its length in bytes.
    pub size: u64,
    /// When the put that created the object's entry was written (kept across renames).
    pub modified_at_ms: u64,
    /// The sequence number of the record that last changed this path.
    pub seq: u64,
}

/// The whole path table of a volume as of record `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last record folded in.
    pub seq: u64,
    /// Every file, in strictly increasing byte order of path.
    pub entries: Vec<(VolumePath, FileInfo)>,
}

/// Why bytes are not a record or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeCodecError {
    /// Fewer bytes than the encoding needs.
    #[error("volume {what} truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// `record` or `snapshot`.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// More bytes than the limit for this kind.
    #[error("volume {what} has {actual} bytes, over its limit")]
    TooLarge {
        /// `record` or `snapshot`.
        what: &'static str,
        /// Bytes given.
        actual: usize,
    },
    /// Bytes after the encoding's end.
    #[error("volume {what} has {trailing} bytes after its end")]
    TrailingBytes {
        /// `record` or `snapshot`.
        what: &'static str,
        /// How many.
        trailing: usize,
    },
    /// Wrong magic.
    #[error("not a volume {0} (bad magic)")]
    BadMagic(&'static str),
    /// A version this build does not read.
    #[error("volume format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u8),
    /// Reserved bytes are not zero.
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
    /// Unknown op code.
    #[error("unknown volume op {0}")]
    UnknownOp(u8),
    /// Sequence number 0.
    #[error("sequence numbers start at 1")]
    ZeroSeq,
    /// The volume name inside is not valid.
    #[error("bad volume name: {0}")]
    BadName(#[from] VolumeNameError),
    /// The volume name inside is not UTF-8.
    #[error("a volume name is not UTF-8")]
    NameNotUtf8,
    /// A path inside is not a valid path.
    #[error("bad path in a volume record: {0}")]
    BadPath(#[from] VolumePathError),
    /// A put's size is over [`OBJECT_BYTES_MAX`].
    #[error("object size {0} exceeds OBJECT_BYTES_MAX")]
    SizeTooLarge(u64),
    /// A snapshot claims more than [`VOLUME_FILES_MAX`] entries.
    #[error("snapshot claims {0} entries, more than VOLUME_FILES_MAX")]
    TooManyEntries(u32),
    /// Snapshot entries are not in strictly increasing path order.
    #[error("snapshot entries are not in strictly increasing path order at entry {0}")]
    Unordered(usize),
    /// A snapshot entry's sequence is 0 or after the snapshot's.
    #[error("snapshot entry {index} has sequence {entry_seq}, outside 1..={snapshot_seq}")]
    EntrySeq {
        /// The entry.
        index: usize,
        /// Its sequence.
        entry_seq: u64,
        /// The snapshot's.
        snapshot_seq: u64,
    },
}

/// A cursor over input that reports truncation with the whole input's size.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], VolumeCodecError> {
        let end =
            self.at.checked_add(count).filter(|end| *end <= self.bytes.len()).ok_or(VolumeCodecError::Truncated {
                what: self.what,
                needed: self.at.saturating_add(count),
                available: self.bytes.len(),
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, VolumeCodecError> {
        let raw = self.take(2)?;
        Ok(u16::from_le_bytes([raw[0], raw[1]]))
    }

    fn u32(&mut self) -> Result<u32, VolumeCodecError> {
        let raw = self.take(4)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    fn u64(&mut self) -> Result<u64, VolumeCodecError> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(raw))
    }

    fn id(&mut self) -> Result<ObjectId, VolumeCodecError> {
        let mut raw = [0u8; ID_BYTES];
        raw.copy_from_slice(self.take(ID_BYTES)?);
        Ok(ObjectId::from_bytes(raw))
    }

    fn path(&mut self) -> Result<VolumePath, VolumeCodecError> {
        let length = usize::from(self.u16()?);
        if length > VOLUME_PATH_BYTES_MAX {
            return Err(VolumePathError::TooLong { actual: length }.into());
        }
        let raw = self.take(length)?;
        let text = std::str::from_utf8(raw).map_err(|_| VolumePathError::NotUtf8)?;
        Ok(VolumePath::parse(text)?)
    }

    fn finish(&self) -> Result<(), VolumeCodecError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            trailing => Err(VolumeCodecError::TrailingBytes { what: self.what, trailing }),
        }
    }
}

fn put_path(out: &mut Vec<u8>, path: &VolumePath) {
    // A VolumePath is at most VOLUME_PATH_BYTES_MAX bytes, which fits u16 (checked in limits).
    out.extend_from_slice(&(path.as_str().len() as u16).to_le_bytes());
    out.extend_from_slice(path.as_str().as_bytes());
}

impl Record {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VOLUME_RECORD_HEADER_BYTES + 64);
        out.extend_from_slice(&RECORD_MAGIC);
        out.push(VERSION);
        out.push(match self.op {
            Op::Put { .. } => OP_PUT,
            Op::Rename { .. } => OP_RENAME,
            Op::Delete { .. } => OP_DELETE,
        });
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.written_at_ms.to_le_bytes());
        out.extend_from_slice(&self.nonce.to_le_bytes());
        match &self.op {
            Op::Put { path, object, size } => {
                put_path(&mut out, path);
                out.extend_from_slice(object.as_bytes());
                out.extend_from_slice(&size.to_le_bytes());
            }
            Op::Rename { from, to } => {
                put_path(&mut out, from);
                put_path(&mut out, to);
            }
            Op::Delete { path } => put_path(&mut out, path),
        }
        out
    }

    /// Decodes a whole record; the length is checked against [`VOLUME_RECORD_BYTES_MAX`]
    /// first and every path is validated.
    pub fn decode(bytes: &[u8]) -> Result<Self, VolumeCodecError> {
        if bytes.len() > VOLUME_RECORD_BYTES_MAX {
            return Err(VolumeCodecError::TooLarge { what: "record", actual: bytes.len() });
        }
        let mut reader = Reader { bytes, at: 0, what: "record" };
        let header = reader.take(VOLUME_RECORD_HEADER_BYTES)?;
        if header[0..4] != RECORD_MAGIC {
            return Err(VolumeCodecError::BadMagic("record"));
        }
        if header[4] != VERSION {
            return Err(VolumeCodecError::UnsupportedVersion(header[4]));
        }
        if header[6..8] != [0, 0] {
            return Err(VolumeCodecError::ReservedNotZero);
        }
        let op_code = header[5];
        let mut fields = Reader { bytes: header, at: 8, what: "record" };
        let seq = fields.u64()?;
        let written_at_ms = fields.u64()?;
        let nonce = fields.u64()?;
        if seq == 0 {
            return Err(VolumeCodecError::ZeroSeq);
        }
        let op = match op_code {
            OP_PUT => {
                let path = reader.path()?;
                let object = reader.id()?;
                let size = reader.u64()?;
                if size > OBJECT_BYTES_MAX {
                    return Err(VolumeCodecError::SizeTooLarge(size));
                }
                Op::Put { path, object, size }
            }
            OP_RENAME => Op::Rename { from: reader.path()?, to: reader.path()? },
            OP_DELETE => Op::Delete { path: reader.path()? },
            other => return Err(VolumeCodecError::UnknownOp(other)),
        };
        reader.finish()?;
        Ok(Self { seq, written_at_ms, nonce, op })
    }
}

impl Snapshot {
    /// The canonical encoding. The caller keeps the entries sorted and within
    /// [`VOLUME_FILES_MAX`] (the daemon builds them from its ordered view).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VOLUME_SNAPSHOT_HEADER_BYTES + self.entries.len() * 96);
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (path, info) in &self.entries {
            put_path(&mut out, path);
            out.extend_from_slice(info.object.as_bytes());
            out.extend_from_slice(&info.size.to_le_bytes());
            out.extend_from_slice(&info.modified_at_ms.to_le_bytes());
            out.extend_from_slice(&info.seq.to_le_bytes());
        }
        out
    }

    /// Decodes a whole snapshot. The length is checked against [`VOLUME_SNAPSHOT_BYTES_MAX`]
    /// and the entry count against [`VOLUME_FILES_MAX`] and the bytes present before
    /// anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Self, VolumeCodecError> {
        if bytes.len() > VOLUME_SNAPSHOT_BYTES_MAX {
            return Err(VolumeCodecError::TooLarge { what: "snapshot", actual: bytes.len() });
        }
        let mut reader = Reader { bytes, at: 0, what: "snapshot" };
        let header = reader.take(VOLUME_SNAPSHOT_HEADER_BYTES)?;
        if header[0..4] != SNAPSHOT_MAGIC {
            return Err(VolumeCodecError::BadMagic("snapshot"));
        }
        if header[4] != VERSION {
            return Err(VolumeCodecError::UnsupportedVersion(header[4]));
        }
        if header[5..8] != [0, 0, 0] {
            return Err(VolumeCodecError::ReservedNotZero);
        }
        let mut fields = Reader { bytes: header, at: 8, what: "snapshot" };
        let seq = fields.u64()?;
        let count = fields.u32()?;
        if seq == 0 {
            return Err(VolumeCodecError::ZeroSeq);
        }
        if count > VOLUME_FILES_MAX {
            return Err(VolumeCodecError::TooManyEntries(count));
        }
        let count = count as usize;
        let remaining = bytes.len() - VOLUME_SNAPSHOT_HEADER_BYTES;
        if count.saturating_mul(SNAPSHOT_ENTRY_BYTES_MIN) > remaining {
            return Err(VolumeCodecError::Truncated {
                what: "snapshot",
                needed: VOLUME_SNAPSHOT_HEADER_BYTES + count * SNAPSHOT_ENTRY_BYTES_MIN,
                available: bytes.len(),
            });
        }
        let mut entries: Vec<(VolumePath, FileInfo)> = Vec::with_capacity(count);
        for index in 0..count {
            let path = reader.path()?;
            let object = reader.id()?;
            let size = reader.u64()?;
            let modified_at_ms = reader.u64()?;
            let entry_seq = reader.u64()?;
            if size > OBJECT_BYTES_MAX {
                return Err(VolumeCodecError::SizeTooLarge(size));
            }
            if entry_seq == 0 || entry_seq > seq {
                return Err(VolumeCodecError::EntrySeq { index, entry_seq, snapshot_seq: seq });
            }
            if let Some((previous, _)) = entries.last()
                && previous.as_str().as_bytes() >= path.as_str().as_bytes()
            {
                return Err(VolumeCodecError::Unordered(index));
            }
            entries.push((path, FileInfo { object, size, modified_at_ms, seq: entry_seq }));
        }
        reader.finish()?;
        Ok(Self { seq, entries })
    }
}

/// A node's announcement that `volume`'s log has a record at `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHead {
    /// The volume.
    pub volume: VolumeName,
    /// The sequence number of the record appended.
    pub seq: u64,
}

impl VolumeHead {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.volume.as_str().as_bytes();
        let mut out = Vec::with_capacity(VOLUME_HEAD_BYTES_MAX);
        out.extend_from_slice(&HEAD_MAGIC);
        out.push(VERSION);
        // A VolumeName is at most VOLUME_NAME_BYTES_MAX (63) bytes.
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out
    }

    /// Decodes a whole announcement; the length is checked against
    /// [`VOLUME_HEAD_BYTES_MAX`] first and the name is validated.
    pub fn decode(bytes: &[u8]) -> Result<Self, VolumeCodecError> {
        const WHAT: &str = "head";
        if bytes.len() > VOLUME_HEAD_BYTES_MAX {
            return Err(VolumeCodecError::TooLarge { what: WHAT, actual: bytes.len() });
        }
        let mut reader = Reader { bytes, at: 0, what: WHAT };
        if reader.take(4)? != HEAD_MAGIC {
            return Err(VolumeCodecError::BadMagic(WHAT));
        }
        let version = reader.take(1)?[0];
        if version != VERSION {
            return Err(VolumeCodecError::UnsupportedVersion(version));
        }
        let length = usize::from(reader.take(1)?[0]);
        let raw = reader.take(length)?;
        let text = std::str::from_utf8(raw).map_err(|_| VolumeCodecError::NameNotUtf8)?;
        let volume = VolumeName::parse(text)?;
        let seq = reader.u64()?;
        if seq == 0 {
            return Err(VolumeCodecError::ZeroSeq);
        }
        reader.finish()?;
        Ok(Self { volume, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_.-]{1,12}".prop_filter("not a dot segment", |s| s != "." && s != ".."),
            "[^/\\x00-\\x1f\\x7f]{1,6}"
                .prop_filter("not a dot segment", |s| { s != "." && s != ".." && !s.chars().any(char::is_control) }),
        ]
    }

    fn path() -> impl Strategy<Value = VolumePath> {
        proptest::collection::vec(segment(), 1..5).prop_map(|segments| VolumePath::parse(&segments.join("/")).unwrap())
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (path(), any::<[u8; 32]>(), 0..=OBJECT_BYTES_MAX).prop_map(|(path, id, size)| Op::Put {
                path,
                object: ObjectId::from_bytes(id),
                size
            }),
            (path(), path()).prop_map(|(from, to)| Op::Rename { from, to }),
            path().prop_map(|path| Op::Delete { path }),
        ]
    }

    fn record() -> impl Strategy<Value = Record> {
        (1..u64::MAX, any::<u64>(), any::<u64>(), op()).prop_map(|(seq, written_at_ms, nonce, op)| Record {
            seq,
            written_at_ms,
            nonce,
            op,
        })
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (1u64..1_000_000, proptest::collection::btree_map(path(), (any::<[u8; 32]>(), any::<u64>()), 0..20)).prop_map(
            |(seq, map)| Snapshot {
                seq,
                entries: map
                    .into_iter()
                    .enumerate()
                    .map(|(i, (path, (id, time)))| {
                        let info = FileInfo {
                            object: ObjectId::from_bytes(id),
                            size: time % OBJECT_BYTES_MAX,
                            modified_at_ms: time,
                            seq: 1 + (i as u64 % seq),
                        };
                        (path, info)
                    })
                    .collect(),
            },
        )
    }

    proptest! {
        #[test]
        fn records_round_trip(record in record()) {
            let bytes = record.encode();
            prop_assert!(bytes.len() <= VOLUME_RECORD_BYTES_MAX);
            prop_assert_eq!(Record::decode(&bytes).unwrap(), record);
        }

        #[test]
        fn heads_round_trip(name in "[a-z0-9][a-z0-9._-]{0,62}", seq in 1u64..) {
            let head = VolumeHead { volume: VolumeName::parse(&name).unwrap(), seq };
            let bytes = head.encode();
            prop_assert!(bytes.len() <= VOLUME_HEAD_BYTES_MAX);
            prop_assert_eq!(VolumeHead::decode(&bytes).unwrap(), head);
        }

        #[test]
        fn head_decoder_never_panics_and_is_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            if let Ok(head) = VolumeHead::decode(&bytes) {
                prop_assert_eq!(head.encode(), bytes);
            }
        }

        #[test]
        fn snapshots_round_trip(snapshot in snapshot()) {
            let bytes = snapshot.encode();
            prop_assert_eq!(Snapshot::decode(&bytes).unwrap(), snapshot);
        }

        #[test]
        fn decoders_are_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Goal: anything that decodes re-encodes to the very same bytes.
            if let Ok(record) = Record::decode(&bytes) {
                prop_assert_eq!(record.encode(), bytes.clone());
            }
            if let Ok(snapshot) = Snapshot::decode(&bytes) {
                prop_assert_eq!(snapshot.encode(), bytes);
            }
        }

        #[test]
        fn mutated_records_decode_canonically_or_error(
            record in record(), position in any::<prop::sample::Index>(), flip in 1u8..=255
        ) {
            let mut bytes = record.encode();
            let at = position.index(bytes.len());
            bytes[at] ^= flip;
            if let Ok(decoded) = Record::decode(&bytes) {
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }

        #[test]
        fn valid_paths_parse_to_themselves(path in path()) {
            prop_assert_eq!(&VolumePath::parse(path.as_str()).unwrap(), &path);
            let ancestors: Vec<&str> = path.ancestors().collect();
            prop_assert_eq!(ancestors.len(), path.as_str().matches('/').count());
            for ancestor in ancestors {
                prop_assert!(VolumePath::parse(ancestor).is_ok());
            }
        }
    }

    #[test]
    fn bad_paths_are_refused_with_their_reason() {
        // Goal: each kind of bad path gives its own error.
        let err = |text: &str| VolumePath::parse(text).unwrap_err();
        assert_eq!(err(""), VolumePathError::Empty);
        assert!(matches!(err("/a"), VolumePathError::EmptySegment { index: 0 }));
        assert!(matches!(err("a/"), VolumePathError::EmptySegment { index: 1 }));
        assert!(matches!(err("a//b"), VolumePathError::EmptySegment { index: 1 }));
        assert!(matches!(err("a/./b"), VolumePathError::DotSegment { index: 1, .. }));
        assert!(matches!(err(".."), VolumePathError::DotSegment { index: 0, .. }));
        assert!(matches!(err("a/../b"), VolumePathError::DotSegment { .. }));
        assert!(matches!(err("a\0b"), VolumePathError::ControlCharacter { position: 1, .. }));
        assert!(matches!(err("a\nb"), VolumePathError::ControlCharacter { .. }));
        assert!(matches!(err(&"x".repeat(256)), VolumePathError::SegmentTooLong { index: 0, actual: 256 }));
        let long = vec!["y".repeat(200); 6].join("/");
        assert!(matches!(err(&long), VolumePathError::TooLong { .. }));
        assert!(VolumePath::parse("a/..b/.c/c..").is_ok());
        assert!(VolumePath::parse(&"x".repeat(255)).is_ok());
        assert_eq!(VolumePath::parse("a/b/c").unwrap().ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
    }

    #[test]
    fn malformed_heads_are_refused_with_the_reason() {
        let good = VolumeHead { volume: VolumeName::parse("team-a").unwrap(), seq: 7 }.encode();
        assert_eq!(VolumeHead::decode(&good).unwrap().seq, 7);
        assert!(matches!(VolumeHead::decode(&good[..good.len() - 1]), Err(VolumeCodecError::Truncated { .. })));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(VolumeHead::decode(&trailing), Err(VolumeCodecError::TrailingBytes { .. })));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(VolumeHead::decode(&magic), Err(VolumeCodecError::BadMagic("head")));
        let mut version = good.clone();
        version[4] = 2;
        assert_eq!(VolumeHead::decode(&version), Err(VolumeCodecError::UnsupportedVersion(2)));
        let mut name = good.clone();
        name[6] = b'/';
        assert!(matches!(VolumeHead::decode(&name), Err(VolumeCodecError::BadName(_))));
        let mut utf8 = good.clone();
        utf8[6] = 0xff;
        assert_eq!(VolumeHead::decode(&utf8), Err(VolumeCodecError::NameNotUtf8));
        let mut zero = good.clone();
        let at = zero.len() - 8;
        zero[at..].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(VolumeHead::decode(&zero), Err(VolumeCodecError::ZeroSeq));
        assert!(matches!(VolumeHead::decode(&[0; 200]), Err(VolumeCodecError::TooLarge { .. })));
    }

    #[test]
    fn volume_names_follow_the_grammar() {
        // Goal: names are [a-z0-9][a-z0-9._-]{0,62}; everything else is refused.
        for good in ["a", "0", "data", "team-a.models_v2", &"a".repeat(VOLUME_NAME_BYTES_MAX)] {
            assert!(VolumeName::parse(good).is_ok(), "{good}");
        }
        assert_eq!(VolumeName::parse(""), Err(VolumeNameError::Empty));
        assert!(matches!(VolumeName::parse(&"a".repeat(64)), Err(VolumeNameError::TooLong { actual: 64 })));
        for bad in ["A", "-a", ".a", "..", "a/b", "a b", "é", "a\0"] {
            assert!(matches!(VolumeName::parse(bad), Err(VolumeNameError::Character { .. })), "{bad}");
        }
    }

    #[test]
    fn each_record_error_is_reported() {
        // Goal: broken headers and bodies give their own errors, before any path is read.
        let path = VolumePath::parse("a/b").unwrap();
        let good = Record { seq: 7, written_at_ms: 1, nonce: 2, op: Op::Delete { path } }.encode();
        let broken = |at: usize, value: u8| {
            let mut bytes = good.clone();
            bytes[at] = value;
            Record::decode(&bytes)
        };
        assert_eq!(broken(0, b'X'), Err(VolumeCodecError::BadMagic("record")));
        assert_eq!(broken(4, 2), Err(VolumeCodecError::UnsupportedVersion(2)));
        assert_eq!(broken(5, 9), Err(VolumeCodecError::UnknownOp(9)));
        assert_eq!(broken(7, 1), Err(VolumeCodecError::ReservedNotZero));
        assert!(matches!(broken(33, b'/'), Err(VolumeCodecError::BadPath(_))));
        assert!(matches!(broken(32, 200), Err(VolumeCodecError::Truncated { .. })));
        let mut zero = good.clone();
        zero[8..16].fill(0);
        assert_eq!(Record::decode(&zero), Err(VolumeCodecError::ZeroSeq));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(Record::decode(&long), Err(VolumeCodecError::TrailingBytes { trailing: 1, .. })));
        assert!(matches!(
            Record::decode(&vec![0; VOLUME_RECORD_BYTES_MAX + 1]),
            Err(VolumeCodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn snapshot_claiming_many_entries_is_refused_without_allocating() {
        // Goal: a short snapshot announcing the most entries is truncated, not an allocation;
        // more than VOLUME_FILES_MAX is refused outright; disorder is refused.
        let mut bytes = Snapshot { seq: 3, entries: vec![] }.encode();
        bytes[16..20].copy_from_slice(&VOLUME_FILES_MAX.to_le_bytes());
        assert!(matches!(Snapshot::decode(&bytes), Err(VolumeCodecError::Truncated { .. })));
        bytes[16..20].copy_from_slice(&(VOLUME_FILES_MAX + 1).to_le_bytes());
        assert_eq!(Snapshot::decode(&bytes), Err(VolumeCodecError::TooManyEntries(VOLUME_FILES_MAX + 1)));
        let info = FileInfo { object: ObjectId::of(b"x"), size: 1, modified_at_ms: 1, seq: 1 };
        let unordered = Snapshot {
            seq: 3,
            entries: vec![(VolumePath::parse("b").unwrap(), info), (VolumePath::parse("a").unwrap(), info)],
        };
        assert_eq!(Snapshot::decode(&unordered.encode()), Err(VolumeCodecError::Unordered(1)));
        let late = Snapshot { seq: 3, entries: vec![(VolumePath::parse("a").unwrap(), FileInfo { seq: 4, ..info })] };
        assert!(matches!(Snapshot::decode(&late.encode()), Err(VolumeCodecError::EntrySeq { .. })));
    }
}
