//! The node's materialised view of the volumes it follows: a redb database
//! (`<data dir>/volumes.redb`) holding, per volume, the last record folded in and the path
//! table as of that record.
//!
//! Tables: `volume_heads`: volume -> (applied sequence, file count); `volume_files`:
//! (volume, path) -> (object id, size, modified at ms, sequence).
//!
//! Invariants:
//! - Records are folded in strictly in sequence order, each batch in one write transaction
//!   that also moves the head, so after a crash the view is exactly the state at its head
//!   and catching up resumes from there.
//! - Every method is blocking (redb); the async side calls them on the blocking pool.

use std::path::Path;

use cachemesh_proto::ObjectId;
use cachemesh_proto::volume::{FileInfo, Op, Record, Snapshot, VolumePath};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::table::{self, PathLookup, PathTable, Rejection};

const HEADS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("volume_heads");
/// (volume, path): both keys of a file row.
type FileKey = (&'static str, &'static str);
/// (object id, size, modified at ms, sequence).
type FileValue = ([u8; 32], u64, u64, u64);

const FILES: TableDefinition<FileKey, FileValue> = TableDefinition::new("volume_files");

/// Errors of the view database.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// redb failed.
    #[error("volume view database: {0}")]
    Database(#[from] redb::Error),
    /// The head moved under a caller that expected it not to (our own invariant broken).
    #[error("volume {volume}: view head is {actual}, expected {expected}")]
    HeadMoved {
        /// The volume.
        volume: String,
        /// The head the caller expected.
        expected: u64,
        /// The head found.
        actual: u64,
    },
    /// A path stored in the view is not a valid path (the file was tampered with).
    #[error("volume {volume}: stored path {path:?} is not valid")]
    BadStoredPath {
        /// The volume.
        volume: String,
        /// The path.
        path: String,
    },
}

fn db_error(error: impl Into<redb::Error>) -> ViewError {
    ViewError::Database(error.into())
}

fn to_info(value: FileValue) -> FileInfo {
    FileInfo { object: ObjectId::from_bytes(value.0), size: value.1, modified_at_ms: value.2, seq: value.3 }
}

fn to_value(info: &FileInfo) -> FileValue {
    (*info.object.as_bytes(), info.size, info.modified_at_ms, info.seq)
}

/// One volume's files in a redb table, read-only or writable.
struct VolumeTable<'v, T> {
    files: T,
    volume: &'v str,
    count: u64,
}

impl<T: ReadableTable<FileKey, FileValue>> PathLookup for VolumeTable<'_, T> {
    type Error = ViewError;

    fn file(&self, path: &str) -> Result<Option<FileInfo>, ViewError> {
        Ok(self.files.get((self.volume, path)).map_err(db_error)?.map(|value| to_info(value.value())))
    }

    fn has_files_under(&self, directory: &str) -> Result<bool, ViewError> {
        let prefix = format!("{directory}/");
        let mut range = self.files.range((self.volume, prefix.as_str())..).map_err(db_error)?;
        match range.next() {
            Some(item) => {
                let (key, _) = item.map_err(db_error)?;
                let (volume, path) = key.value();
                Ok(volume == self.volume && path.starts_with(&prefix))
            }
            None => Ok(false),
        }
    }

    fn file_count(&self) -> u64 {
        self.count
    }
}

impl PathTable for VolumeTable<'_, redb::Table<'_, FileKey, FileValue>> {
    fn insert(&mut self, path: &str, info: FileInfo) -> Result<(), ViewError> {
        let previous = self.files.insert((self.volume, path), to_value(&info)).map_err(db_error)?;
        if previous.is_none() {
            self.count += 1;
        }
        Ok(())
    }

    fn remove(&mut self, path: &str) -> Result<Option<FileInfo>, ViewError> {
        let previous = self.files.remove((self.volume, path)).map_err(db_error)?.map(|value| to_info(value.value()));
        if previous.is_some() {
            self.count = self.count.saturating_sub(1);
        }
        Ok(previous)
    }
}

/// What folding a batch of records did.
#[derive(Debug, Clone, Default)]
pub struct Folded {
    /// The head after the batch.
    pub head: u64,
    /// Records skipped by the rules (never written by a writer that checked first).
    pub skipped: Vec<(u64, Rejection)>,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Files, in byte order of path.
    pub entries: Vec<(String, FileInfo)>,
    /// Whether more files match after the last entry.
    pub more: bool,
}

/// The view database.
#[derive(Debug)]
pub struct View {
    db: redb::Database,
}

impl View {
    /// Opens (or creates) the view at `path`.
    pub fn open(path: &Path) -> Result<Self, ViewError> {
        let db = redb::Database::create(path).map_err(db_error)?;
        let transaction = db.begin_write().map_err(db_error)?;
        transaction.open_table(HEADS).map_err(db_error)?;
        transaction.open_table(FILES).map_err(db_error)?;
        transaction.commit().map_err(db_error)?;
        Ok(Self { db })
    }

    /// Every volume the view holds, with its head.
    pub fn volumes(&self) -> Result<Vec<(String, u64)>, ViewError> {
        let transaction = self.db.begin_read().map_err(db_error)?;
        let heads = transaction.open_table(HEADS).map_err(db_error)?;
        let mut out = Vec::new();
        for item in heads.iter().map_err(db_error)? {
            let (name, head) = item.map_err(db_error)?;
            out.push((name.value().to_string(), head.value().0));
        }
        Ok(out)
    }

    /// The head of `volume` (0 when the view has nothing of it).
    pub fn head(&self, volume: &str) -> Result<u64, ViewError> {
        let transaction = self.db.begin_read().map_err(db_error)?;
        let heads = transaction.open_table(HEADS).map_err(db_error)?;
        Ok(heads.get(volume).map_err(db_error)?.map_or(0, |head| head.value().0))
    }

    fn read_table<R>(
        &self,
        volume: &str,
        read: impl FnOnce(&VolumeTable<'_, redb::ReadOnlyTable<FileKey, FileValue>>, u64) -> R,
    ) -> Result<R, ViewError> {
        let transaction = self.db.begin_read().map_err(db_error)?;
        let heads = transaction.open_table(HEADS).map_err(db_error)?;
        let (head, count) = heads.get(volume).map_err(db_error)?.map_or((0, 0), |head| head.value());
        let files = transaction.open_table(FILES).map_err(db_error)?;
        Ok(read(&VolumeTable { files, volume, count }, head))
    }

    /// The file at `path` of `volume`.
    pub fn file(&self, volume: &str, path: &str) -> Result<Option<FileInfo>, ViewError> {
        self.read_table(volume, |table, _| table.file(path))?
    }

    /// Whether `op` may be appended now (the view being at the log's head).
    pub fn check(&self, volume: &str, op: &Op) -> Result<Result<(), Rejection>, ViewError> {
        self.read_table(volume, |table, _| table::check(table, op))?
    }

    /// Up to `limit` files of `volume` whose paths start with `prefix`, after `after`.
    /// Returns the head too, so the answer says which state it shows.
    pub fn list(
        &self,
        volume: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(u64, Page), ViewError> {
        self.read_table(volume, |table, head| {
            let start = match after {
                Some(after) if after > prefix => after,
                _ => prefix,
            };
            let mut page = Page::default();
            for item in table.files.range((volume, start)..).map_err(db_error)? {
                let (key, value) = item.map_err(db_error)?;
                let (key_volume, path) = key.value();
                if key_volume != volume || !path.starts_with(prefix) {
                    break;
                }
                if after == Some(path) {
                    continue;
                }
                if page.entries.len() == limit {
                    page.more = true;
                    break;
                }
                page.entries.push((path.to_string(), to_info(value.value())));
            }
            Ok((head, page))
        })?
    }

    /// Folds `records` (consecutive, starting at `expected_head + 1`) into `volume` in one
    /// transaction.
    pub fn fold(&self, volume: &str, expected_head: u64, records: &[Record]) -> Result<Folded, ViewError> {
        let transaction = self.db.begin_write().map_err(db_error)?;
        let mut folded = Folded::default();
        {
            let mut heads = transaction.open_table(HEADS).map_err(db_error)?;
            let (head, count) = heads.get(volume).map_err(db_error)?.map_or((0, 0), |head| head.value());
            if head != expected_head {
                return Err(ViewError::HeadMoved { volume: volume.to_string(), expected: expected_head, actual: head });
            }
            let files = transaction.open_table(FILES).map_err(db_error)?;
            let mut table = VolumeTable { files, volume, count };
            let mut head = head;
            for record in records {
                if record.seq != head + 1 {
                    return Err(ViewError::HeadMoved {
                        volume: volume.to_string(),
                        expected: head + 1,
                        actual: record.seq,
                    });
                }
                if let Err(rejection) = table::apply(&mut table, record)? {
                    folded.skipped.push((record.seq, rejection));
                }
                head = record.seq;
            }
            heads.insert(volume, (head, table.count)).map_err(db_error)?;
            folded.head = head;
        }
        transaction.commit().map_err(db_error)?;
        Ok(folded)
    }

    /// The whole path table of `volume` as a snapshot at its head (`None` at head 0).
    pub fn snapshot(&self, volume: &str) -> Result<Option<Snapshot>, ViewError> {
        self.read_table(volume, |table, head| {
            if head == 0 {
                return Ok(None);
            }
            let mut entries = Vec::new();
            for item in table.files.range((volume, "")..).map_err(db_error)? {
                let (key, value) = item.map_err(db_error)?;
                let (key_volume, path) = key.value();
                if key_volume != volume {
                    break;
                }
                let path = VolumePath::parse(path)
                    .map_err(|_| ViewError::BadStoredPath { volume: volume.to_string(), path: path.to_string() })?;
                entries.push((path, to_info(value.value())));
            }
            Ok(Some(Snapshot { seq: head, entries }))
        })?
    }

    /// Replaces everything the view holds of `volume` with `snapshot`, in one transaction.
    pub fn load_snapshot(&self, volume: &str, snapshot: &Snapshot) -> Result<(), ViewError> {
        let transaction = self.db.begin_write().map_err(db_error)?;
        {
            let mut files = transaction.open_table(FILES).map_err(db_error)?;
            let mut old = Vec::new();
            for item in files.range((volume, "")..).map_err(db_error)? {
                let (key, _) = item.map_err(db_error)?;
                let (key_volume, path) = key.value();
                if key_volume != volume {
                    break;
                }
                old.push(path.to_string());
            }
            for path in &old {
                files.remove((volume, path.as_str())).map_err(db_error)?;
            }
            for (path, info) in &snapshot.entries {
                files.insert((volume, path.as_str()), to_value(info)).map_err(db_error)?;
            }
            let mut heads = transaction.open_table(HEADS).map_err(db_error)?;
            heads.insert(volume, (snapshot.seq, snapshot.entries.len() as u64)).map_err(db_error)?;
        }
        transaction.commit().map_err(db_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(seq: u64, path: &str) -> Record {
        let op = Op::Put { path: VolumePath::parse(path).unwrap(), object: ObjectId::of(path.as_bytes()), size: 1 };
        Record { seq, written_at_ms: seq, nonce: 0, op }
    }

    #[test]
    fn fold_list_snapshot_and_reload_agree() {
        // Goal: records folded into the view list back in path order, per volume, with paging;
        // a snapshot loaded into another view gives the same listing; heads must be
        // consecutive.
        let dir = tempfile::tempdir().unwrap();
        let view = View::open(&dir.path().join("a.redb")).unwrap();
        let records: Vec<Record> =
            ["d/b", "d/a", "e", "d/c"].iter().enumerate().map(|(i, p)| put(i as u64 + 1, p)).collect();
        assert_eq!(view.fold("v", 0, &records).unwrap().head, 4);
        view.fold("w", 0, &[put(1, "d/z")]).unwrap();
        assert!(matches!(view.fold("v", 3, &[put(4, "x")]), Err(ViewError::HeadMoved { .. })));
        let (head, page) = view.list("v", "d/", None, 2).unwrap();
        assert_eq!(head, 4);
        let names: Vec<&str> = page.entries.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!((names, page.more), (vec!["d/a", "d/b"], true));
        let (_, rest) = view.list("v", "d/", Some("d/b"), 2).unwrap();
        assert_eq!(rest.entries.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["d/c"]);
        assert!(!rest.more);

        let snapshot = view.snapshot("v").unwrap().unwrap();
        assert_eq!(snapshot.seq, 4);
        let other = View::open(&dir.path().join("b.redb")).unwrap();
        other.fold("v", 0, &[put(1, "stale")]).unwrap();
        other.load_snapshot("v", &snapshot).unwrap();
        assert_eq!(other.list("v", "", None, 100).unwrap().1.entries, view.list("v", "", None, 100).unwrap().1.entries);
        assert_eq!(other.head("v").unwrap(), 4);
        assert_eq!(view.volumes().unwrap(), vec![("v".to_string(), 4), ("w".to_string(), 1)]);
    }
}
