//! cachemesh wire and on-disk formats, and nothing else.
//!
//! This crate holds the ids ([`ChunkId`], [`ObjectId`]), the object [`Manifest`] and its
//! canonical binary encoding, the local API's request/response/error types ([`api`]), the
//! HTTP `Range` grammar the API accepts ([`range`]), volume names, paths, log records
//! and snapshots ([`volume`]), and every limit as a named constant
//! ([`limits`]).
//!
//! Non-goals: sockets, files, clocks, async runtimes. Everything here is pure encode and
//! decode, so it can be fuzzed and property-tested in isolation.
//!
//! Invariants:
//! - Decoders check lengths against the named limits *before* allocating.
//! - Every decoder returns a typed error; no input can make it panic.
//! - Encodings are canonical: `decode(b)` succeeds only if `encode(decode(b)) == b`, so an
//!   id computed over an encoding names exactly one value.
#![deny(missing_docs)]

pub mod api;
pub mod frames;
mod id;
pub mod limits;
mod manifest;
pub mod range;
pub mod volume;

pub use id::{ChunkId, IdParseError, ObjectId};
pub use manifest::{Manifest, ManifestError};
