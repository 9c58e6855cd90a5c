//! cachemesh node daemon (`cachemeshd`) and the `cachemesh` command line.
//!
//! One module per concern; see `docs/architecture.md` for the code map and invariants.
//! I/O lives at the edges (`store`, `origin`, `api`); decisions are plain structs
//! (`store::residency`).

pub mod api;
pub mod chunk;
pub mod client;
pub mod config;
pub mod discovery;
pub mod downlink;
pub mod fetch;
pub mod hedge;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod objects;
pub mod origin;
pub mod output;
pub mod picker;
pub mod placement;
pub mod relay;
pub mod stall;
pub mod store;
pub mod stripe;
pub mod transport;
pub mod upload_line;
pub mod volume;
pub mod window;
