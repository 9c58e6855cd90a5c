//! The rules of a volume's path table, as plain functions over a [`PathTable`].
//!
//! [`check`] says whether an op may be appended to the log given the table as of the log's
//! head; [`apply`] folds one record into the table. Both are pure: the table is anything
//! that implements [`PathLookup`] / [`PathTable`] (the node's redb view, or a `BTreeMap` in
//! the tests), so the rules are tested without I/O.
//!
//! Invariants:
//! - `apply` is total and deterministic: every node folding the same records in the same
//!   order ends with the same table. A record that breaks the rules (which a writer that
//!   called `check` at the same head never writes) is skipped the same way everywhere.
//! - The table is a file tree: no file is an ancestor of another file (`a` and `a/b` are
//!   never both files), and it holds at most `VOLUME_FILES_MAX` files.
//! - A rename replaces its target, like POSIX `rename(2)`, and keeps the file's object,
//!   size and modification time.

use cachemesh_proto::limits::VOLUME_FILES_MAX;
use cachemesh_proto::volume::{FileInfo, Op, Record, VolumePath};

/// Reading a volume's path table.
pub trait PathLookup {
    /// What reading the table can fail with.
    type Error;
    /// The file at `path`, if any.
    fn file(&self, path: &str) -> Result<Option<FileInfo>, Self::Error>;
    /// Whether any file's path starts with `directory` + `/`.
    fn has_files_under(&self, directory: &str) -> Result<bool, Self::Error>;
    /// How many files the table holds.
    fn file_count(&self) -> u64;
}

/// Changing a volume's path table.
pub trait PathTable: PathLookup {
    /// Sets `path` to `info`.
    fn insert(&mut self, path: &str, info: FileInfo) -> Result<(), Self::Error>;
    /// Removes `path`, returning what it named.
    fn remove(&mut self, path: &str) -> Result<Option<FileInfo>, Self::Error>;
}

/// Why an op may not be appended (or a record was skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The op needs a file at this path and there is none.
    NotFound(VolumePath),
    /// `path` cannot be a file because `file`, one of its ancestors, is one.
    FileInTheWay {
        /// The path the op writes.
        path: VolumePath,
        /// The ancestor that is a file.
        file: String,
    },
    /// `path` is a directory: files exist under it.
    IsDirectory(VolumePath),
    /// A new file would exceed `VOLUME_FILES_MAX`.
    Full,
}

/// Whether `target` may become a file (as a put's path or a rename's target).
fn check_target<T: PathLookup>(table: &T, target: &VolumePath, creates: bool) -> Result<Option<Rejection>, T::Error> {
    for ancestor in target.ancestors() {
        if table.file(ancestor)?.is_some() {
            return Ok(Some(Rejection::FileInTheWay { path: target.clone(), file: ancestor.to_string() }));
        }
    }
    if table.has_files_under(target.as_str())? {
        return Ok(Some(Rejection::IsDirectory(target.clone())));
    }
    if creates && table.file_count() >= u64::from(VOLUME_FILES_MAX) && table.file(target.as_str())?.is_none() {
        return Ok(Some(Rejection::Full));
    }
    Ok(None)
}

/// Whether `op` may be appended to a log whose head state is `table`.
pub fn check<T: PathLookup>(table: &T, op: &Op) -> Result<Result<(), Rejection>, T::Error> {
    let rejection = match op {
        Op::Put { path, .. } => check_target(table, path, true)?,
        Op::Rename { from, to } => {
            if table.file(from.as_str())?.is_none() {
                Some(Rejection::NotFound(from.clone()))
            } else if from == to {
                None
            } else {
                check_target(table, to, false)?
            }
        }
        Op::Delete { path } => table.file(path.as_str())?.is_none().then(|| Rejection::NotFound(path.clone())),
    };
    Ok(rejection.map_or(Ok(()), Err))
}

/// Folds `record` into `table`: applied, or skipped (unchanged table) with the reason.
pub fn apply<T: PathTable>(table: &mut T, record: &Record) -> Result<Result<(), Rejection>, T::Error> {
    if let Err(rejection) = check(table, &record.op)? {
        return Ok(Err(rejection));
    }
    match &record.op {
        Op::Put { path, object, size } => {
            let info = FileInfo { object: *object, size: *size, modified_at_ms: record.written_at_ms, seq: record.seq };
            table.insert(path.as_str(), info)?;
        }
        Op::Rename { from, to } => {
            if let Some(info) = table.remove(from.as_str())? {
                table.insert(to.as_str(), FileInfo { seq: record.seq, ..info })?;
            }
        }
        Op::Delete { path } => {
            table.remove(path.as_str())?;
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    use cachemesh_proto::ObjectId;

    use super::*;

    #[derive(Default)]
    struct MemoryTable(BTreeMap<String, FileInfo>);

    impl PathLookup for MemoryTable {
        type Error = Infallible;
        fn file(&self, path: &str) -> Result<Option<FileInfo>, Infallible> {
            Ok(self.0.get(path).copied())
        }
        fn has_files_under(&self, directory: &str) -> Result<bool, Infallible> {
            let prefix = format!("{directory}/");
            Ok(self.0.range(prefix.clone()..).next().is_some_and(|(path, _)| path.starts_with(&prefix)))
        }
        fn file_count(&self) -> u64 {
            self.0.len() as u64
        }
    }

    impl PathTable for MemoryTable {
        fn insert(&mut self, path: &str, info: FileInfo) -> Result<(), Infallible> {
            self.0.insert(path.to_string(), info);
            Ok(())
        }
        fn remove(&mut self, path: &str) -> Result<Option<FileInfo>, Infallible> {
            Ok(self.0.remove(path))
        }
    }

    fn p(text: &str) -> VolumePath {
        VolumePath::parse(text).unwrap()
    }

    fn put(seq: u64, path: &str, content: &[u8]) -> Record {
        let op = Op::Put { path: p(path), object: ObjectId::of(content), size: content.len() as u64 };
        Record { seq, written_at_ms: 1000 + seq, nonce: 0, op }
    }

    fn rename(seq: u64, from: &str, to: &str) -> Record {
        Record { seq, written_at_ms: 1000 + seq, nonce: 0, op: Op::Rename { from: p(from), to: p(to) } }
    }

    fn delete(seq: u64, path: &str) -> Record {
        Record { seq, written_at_ms: 1000 + seq, nonce: 0, op: Op::Delete { path: p(path) } }
    }

    fn fold(records: &[Record]) -> (MemoryTable, Vec<Result<(), Rejection>>) {
        let mut table = MemoryTable::default();
        let outcomes = records.iter().map(|record| apply(&mut table, record).unwrap()).collect();
        (table, outcomes)
    }

    #[test]
    fn rename_replaces_the_target_and_keeps_the_content() {
        // Goal: rename moves the object and its modification time, takes the record's
        // sequence, and replaces whatever the target named.
        let (table, outcomes) = fold(&[put(1, "a", b"one"), put(2, "b", b"two"), rename(3, "a", "b")]);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(table.0.len(), 1);
        let b = table.0["b"];
        assert_eq!((b.object, b.size, b.modified_at_ms, b.seq), (ObjectId::of(b"one"), 3, 1001, 3));
    }

    #[test]
    fn missing_sources_and_deletes_are_rejected_and_skipped() {
        // Goal: rename of a missing file and delete of a missing file are NotFound in
        // `check`, and the same records in a log are skipped without changing the table.
        let (table, outcomes) = fold(&[put(1, "a", b"x"), rename(2, "nope", "b"), delete(3, "gone"), delete(4, "a")]);
        assert_eq!(outcomes[1], Err(Rejection::NotFound(p("nope"))));
        assert_eq!(outcomes[2], Err(Rejection::NotFound(p("gone"))));
        assert_eq!(outcomes[3], Ok(()));
        assert!(table.0.is_empty());
    }

    #[test]
    fn files_and_directories_do_not_overlap() {
        // Goal: a file cannot be put under another file, nor over a directory, and a rename
        // target obeys the same rules; renaming a file onto itself is a no-op.
        let (mut table, _) = fold(&[put(1, "a/b", b"x"), put(2, "f", b"y")]);
        let check_op = |table: &MemoryTable, op: Op| check(table, &op).unwrap();
        let object = ObjectId::of(b"z");
        assert_eq!(
            check_op(&table, Op::Put { path: p("f/g"), object, size: 1 }),
            Err(Rejection::FileInTheWay { path: p("f/g"), file: "f".into() })
        );
        assert_eq!(check_op(&table, Op::Put { path: p("a"), object, size: 1 }), Err(Rejection::IsDirectory(p("a"))));
        assert_eq!(check_op(&table, Op::Rename { from: p("f"), to: p("a") }), Err(Rejection::IsDirectory(p("a"))));
        assert_eq!(
            check_op(&table, Op::Rename { from: p("f"), to: p("f/x") }),
            Err(Rejection::FileInTheWay { path: p("f/x"), file: "f".into() })
        );
        assert_eq!(check_op(&table, Op::Put { path: p("a/c"), object, size: 1 }), Ok(()));
        assert_eq!(check_op(&table, Op::Put { path: p("ab"), object, size: 1 }), Ok(()));
        assert_eq!(apply(&mut table, &rename(3, "f", "f")).unwrap(), Ok(()));
        assert_eq!(table.0["f"].seq, 3);
        assert_eq!(table.0.len(), 2);
    }

    #[test]
    fn replaying_the_same_log_gives_the_same_table() {
        // Goal: folding is deterministic, so two nodes replaying one log agree, rejected
        // records included.
        let log = [
            put(1, "m/w1", b"1"),
            put(2, "m/w2", b"2"),
            rename(3, "m/w1", "m/w2"),
            put(4, "m", b"conflict"),
            delete(5, "m/w1"),
            put(6, "n/x", b"3"),
            rename(7, "n/x", "m/w3"),
        ];
        let (first, first_outcomes) = fold(&log);
        let (second, second_outcomes) = fold(&log);
        assert_eq!(first.0, second.0);
        assert_eq!(first_outcomes, second_outcomes);
        assert_eq!(first.0.keys().collect::<Vec<_>>(), ["m/w2", "m/w3"]);
    }
}
