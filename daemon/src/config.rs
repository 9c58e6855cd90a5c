//! Daemon settings: command-line flags, `CACHEMESH_*` environment variables, a TOML file,
//! and defaults that work with no setup. Precedence: flag > environment > file > default.
//!
//! Default paths follow who runs the daemon:
//! - root (a system service): config `/etc/cachemesh/cachemeshd.toml`, data
//!   `/var/lib/cachemesh`, socket `/run/cachemesh/api.sock`, origin
//!   `/var/lib/cachemesh/origin`;
//! - a normal user: config `$XDG_CONFIG_HOME/cachemesh/cachemeshd.toml`, data
//!   `$XDG_CACHE_HOME/cachemesh`, socket `$XDG_RUNTIME_DIR/cachemesh/api.sock` (or
//!   `<data>/api.sock`), origin `$XDG_DATA_HOME/cachemesh/origin`.
//!
//! The default config file is read only if it exists; a file named with `--config` must.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::IoBackendChoice;

/// Default chunk cache budget.
pub const CACHE_SIZE_DEFAULT_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// Smallest budget accepted: two chunks, so that a read and a write can both be resident.
pub const CACHE_SIZE_MIN_BYTES: u64 = 2 * cachemesh_proto::limits::CHUNK_BYTES_MAX as u64;

/// A byte size given as `64GiB`, `512MB`, `4096` and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.trim()
            .parse::<bytesize::ByteSize>()
            .map(|size| Self(size.as_u64()))
            .map_err(|error| format!("{text:?} is not a size like 64GiB, 500MB or 1048576: {error}"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(bytes) => Ok(Self(bytes)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Settings that can come from flags, the environment or the file; `None` means unset.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory for the chunk store and its index.
    #[arg(long, global = true, env = "CACHEMESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Unix socket of the local API.
    #[arg(long, global = true, env = "CACHEMESH_API_SOCKET", value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Origin object store: file:///DIR, /DIR or s3://BUCKET/PREFIX.
    #[arg(long, global = true, env = "CACHEMESH_ORIGIN", value_name = "URL")]
    pub origin: Option<String>,
    /// Byte budget of the chunk cache, e.g. 64GiB.
    #[arg(long, global = true, env = "CACHEMESH_CACHE_SIZE", value_name = "BYTES")]
    pub cache_size: Option<ByteSize>,
    /// Address to serve Prometheus metrics on over TCP (they are always on the API socket at /metrics).
    #[arg(long, global = true, env = "CACHEMESH_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Chunk I/O backend.
    #[arg(long, global = true, env = "CACHEMESH_IO_BACKEND", value_enum)]
    pub io_backend: Option<IoBackendChoice>,
    /// Write full chunks past the page cache (O_DIRECT) when the filesystem takes it.
    #[arg(long, global = true, env = "CACHEMESH_DIRECT_WRITES", value_name = "BOOL")]
    pub direct_writes: Option<bool>,
    /// Hash-check every chunk read from the local disk before serving it.
    #[arg(long, global = true, env = "CACHEMESH_VERIFY_READS", value_name = "BOOL")]
    pub verify_reads: Option<bool>,
    /// Most origin requests in flight.
    #[arg(long, global = true, env = "CACHEMESH_ORIGIN_CONCURRENCY", value_name = "N")]
    pub origin_concurrency: Option<usize>,
    /// Log format: text or json.
    #[arg(long, global = true, env = "CACHEMESH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Cluster credential file (from `cachemesh cluster-key new`); setting it turns the mesh on.
    #[arg(long, global = true, env = "CACHEMESH_CLUSTER_KEY", value_name = "FILE")]
    pub cluster_key: Option<PathBuf>,
    /// Datacenter name: nodes of different DCs never join each other's DHT nor fetch from each other.
    #[arg(long, global = true, env = "CACHEMESH_DC", value_name = "NAME")]
    pub dc: Option<String>,
    /// Address for the DHT and membership (libp2p over TCP): host:port or a multiaddr.
    #[arg(long, global = true, env = "CACHEMESH_P2P_LISTEN", value_name = "ADDR")]
    pub p2p_listen: Option<String>,
    /// UDP address of the QUIC data plane.
    #[arg(long, global = true, env = "CACHEMESH_DATA_LISTEN", value_name = "ADDR")]
    pub data_listen: Option<SocketAddr>,
    /// Peers to join through: host:port of their p2p listener, or a full multiaddr.
    #[arg(long, global = true, env = "CACHEMESH_BOOTSTRAP", value_name = "ADDR", value_delimiter = ',', num_args = 1..)]
    pub bootstrap: Option<Vec<String>>,
    /// Upload budget for serving peers, e.g. 500MiB (per second); unlimited by default.
    #[arg(long, global = true, env = "CACHEMESH_UPLOAD_LIMIT", value_name = "RATE")]
    pub upload_limit: Option<ByteRate>,
    /// This host's network rate each way, e.g. 12500000 or 100MiB (bytes per second). Announced to the
    /// DC, which makes homes of fewer chunks of hosts with slower links; unset, the host counts as
    /// fast as the fastest that set one. Set, the host also sends peers more chunks at once while its
    /// uploads leave the link idle, and asks no second holder for a slow chunk while its downlink is full.
    #[arg(long, global = true, env = "CACHEMESH_LINK_RATE", value_name = "RATE")]
    pub link_rate: Option<ByteRate>,
    /// Records between volume snapshots in the origin (a writer that appends a multiple of it writes one).
    #[arg(long, global = true, env = "CACHEMESH_VOLUME_SNAPSHOT_INTERVAL", value_name = "RECORDS")]
    pub volume_snapshot_interval: Option<u64>,
    /// Test-only fault: serve peers corrupt chunks (only in builds with the test-faults feature).
    #[cfg(feature = "test-faults")]
    #[arg(long, global = true, hide = true, value_name = "BOOL")]
    pub fault_corrupt_served_chunks: Option<bool>,
    /// Test-only fault: wait this many milliseconds before serving each chunk to a peer.
    #[cfg(feature = "test-faults")]
    #[arg(long, global = true, hide = true, value_name = "MS")]
    pub fault_slow_served_chunks_ms: Option<u64>,
}

/// A rate in bytes per second, written `500MiB`, `500MiB/s` or `1GB/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub u64);

impl std::str::FromStr for ByteRate {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let size = text.trim().strip_suffix("/s").unwrap_or(text.trim());
        let size: ByteSize = size.parse()?;
        if size.0 == 0 {
            return Err("a rate must be above zero".to_string());
        }
        Ok(Self(size.0))
    }
}

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let size = ByteSize::deserialize(deserializer)?;
        if size.0 == 0 {
            return Err(serde::de::Error::custom("a rate must be above zero"));
        }
        Ok(Self(size.0))
    }
}

/// Default datacenter name.
pub const DC_DEFAULT: &str = "default";
/// Default p2p (DHT, membership) listen address in mesh mode.
pub const P2P_LISTEN_DEFAULT: &str = "0.0.0.0:7946";
/// Default data-plane listen address in mesh mode.
pub const DATA_LISTEN_DEFAULT: &str = "0.0.0.0:7947";

/// Mesh settings; present when a cluster key is configured.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The cluster credential file.
    pub cluster_key: PathBuf,
    /// Datacenter name.
    pub dc: String,
    /// p2p listen address (host:port or multiaddr).
    pub p2p_listen: String,
    /// Data-plane listen address.
    pub data_listen: SocketAddr,
    /// Bootstrap peers.
    pub bootstrap: Vec<String>,
    /// Upload budget in bytes per second.
    pub upload_limit_bytes_per_second: Option<u64>,
    /// This host's link rate in bytes per second, announced for home placement and used to
    /// tune the upload line.
    pub link_rate_bytes_per_second: Option<u64>,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The daemon's resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// API socket path.
    pub api_socket: PathBuf,
    /// Origin URL.
    pub origin: String,
    /// Cache budget in bytes.
    pub cache_size_bytes: u64,
    /// Metrics TCP listener.
    pub metrics_listen: Option<SocketAddr>,
    /// I/O backend choice.
    pub io_backend: IoBackendChoice,
    /// Direct writes wanted (used when the filesystem takes them).
    pub direct_writes: bool,
    /// Verify reads.
    pub verify_reads: bool,
    /// Origin concurrency.
    pub origin_concurrency: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// The mesh, when enabled.
    pub mesh: Option<MeshConfig>,
    /// Records between volume snapshots.
    pub volume_snapshot_interval_records: u64,
    /// Test-only fault switch; always false unless built with `test-faults`.
    pub fault_corrupt_served_chunks: bool,
    /// Test-only fault: delay before each chunk served to a peer; zero unless built with
    /// `test-faults`.
    pub fault_slow_served_chunks: std::time::Duration,
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("config file {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user; this avoids unsafe FFI.
    std::fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
}

fn xdg(variable: &str, fallback: &str) -> PathBuf {
    std::env::var_os(variable).filter(|value| !value.is_empty()).map_or_else(|| home().join(fallback), PathBuf::from)
}

/// The default config file for whoever runs the daemon.
pub fn default_config_file() -> PathBuf {
    if is_root() {
        PathBuf::from("/etc/cachemesh/cachemeshd.toml")
    } else {
        xdg("XDG_CONFIG_HOME", ".config").join("cachemesh/cachemeshd.toml")
    }
}

/// The default data directory.
pub fn default_data_dir() -> PathBuf {
    if is_root() { PathBuf::from("/var/lib/cachemesh") } else { xdg("XDG_CACHE_HOME", ".cache").join("cachemesh") }
}

/// The default API socket: the same rule for the daemon and the CLI.
pub fn default_api_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/cachemesh/api.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|value| !value.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("cachemesh/api.sock"),
        None => default_data_dir().join("api.sock"),
    }
}

fn default_origin() -> String {
    let dir = if is_root() {
        PathBuf::from("/var/lib/cachemesh/origin")
    } else {
        xdg("XDG_DATA_HOME", ".local/share").join("cachemesh/origin")
    };
    format!("file://{}", dir.display())
}

fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse { path: path.to_path_buf(), detail: error.to_string() })
}

impl Config {
    fn resolve_mesh(flags: &Settings, file: &Settings) -> Result<Option<MeshConfig>, ConfigError> {
        let dc = flags.dc.clone().or_else(|| file.dc.clone());
        let p2p_listen = flags.p2p_listen.clone().or_else(|| file.p2p_listen.clone());
        let data_listen = flags.data_listen.or(file.data_listen);
        let bootstrap = flags.bootstrap.clone().or_else(|| file.bootstrap.clone());
        let upload_limit = flags.upload_limit.or(file.upload_limit);
        let link_rate = flags.link_rate.or(file.link_rate);
        let Some(cluster_key) = flags.cluster_key.clone().or_else(|| file.cluster_key.clone()) else {
            if p2p_listen.is_some() || data_listen.is_some() || bootstrap.is_some() || dc.is_some() {
                return Err(ConfigError::Invalid(
                    "mesh settings (dc, p2p_listen, data_listen, bootstrap) need a cluster key: \
                     create one with `cachemesh cluster-key new FILE` and pass --cluster-key FILE"
                        .to_string(),
                ));
            }
            return Ok(None);
        };
        let dc = dc.unwrap_or_else(|| DC_DEFAULT.to_string());
        let valid_dc = !dc.is_empty()
            && dc.len() <= cachemesh_proto::limits::DC_NAME_BYTES_MAX
            && dc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_dc {
            return Err(ConfigError::Invalid(format!(
                "dc name {dc:?} must be 1 to {} letters, digits, '-', '_' or '.'",
                cachemesh_proto::limits::DC_NAME_BYTES_MAX
            )));
        }
        let default_data_listen: SocketAddr =
            DATA_LISTEN_DEFAULT.parse().map_err(|_| ConfigError::Invalid("bad built-in data listen".to_string()))?;
        Ok(Some(MeshConfig {
            cluster_key,
            dc,
            p2p_listen: p2p_listen.unwrap_or_else(|| P2P_LISTEN_DEFAULT.to_string()),
            data_listen: data_listen.unwrap_or(default_data_listen),
            bootstrap: bootstrap.unwrap_or_default(),
            upload_limit_bytes_per_second: upload_limit.map(|rate| rate.0),
            link_rate_bytes_per_second: link_rate.map(|rate| rate.0),
        }))
    }

    /// Resolves flags and environment (already merged by clap) over the config file and
    /// the defaults.
    pub fn resolve(config_file: Option<&Path>, flags: Settings) -> Result<Self, ConfigError> {
        let (file, config_file) = match config_file {
            Some(path) => (read_file(path)?, Some(path.to_path_buf())),
            None => {
                let path = default_config_file();
                if path.exists() { (read_file(&path)?, Some(path)) } else { (Settings::default(), None) }
            }
        };
        let cache_size_bytes = flags.cache_size.or(file.cache_size).map_or(CACHE_SIZE_DEFAULT_BYTES, |size| size.0);
        if cache_size_bytes < CACHE_SIZE_MIN_BYTES {
            return Err(ConfigError::Invalid(format!(
                "cache size {cache_size_bytes} bytes is below the minimum of {CACHE_SIZE_MIN_BYTES} bytes (two chunks)"
            )));
        }
        let mesh = Self::resolve_mesh(&flags, &file)?;
        let volume_snapshot_interval_records = flags
            .volume_snapshot_interval
            .or(file.volume_snapshot_interval)
            .unwrap_or(crate::volume::VOLUME_SNAPSHOT_INTERVAL_RECORDS_DEFAULT);
        if volume_snapshot_interval_records == 0 {
            return Err(ConfigError::Invalid("volume_snapshot_interval must be at least 1 record".to_string()));
        }
        let data_dir = flags.data_dir.or(file.data_dir).unwrap_or_else(default_data_dir);
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        #[cfg(feature = "test-faults")]
        let fault_corrupt_served_chunks = flags.fault_corrupt_served_chunks.unwrap_or(false);
        #[cfg(not(feature = "test-faults"))]
        let fault_corrupt_served_chunks = false;
        #[cfg(feature = "test-faults")]
        let fault_slow_served_chunks = std::time::Duration::from_millis(flags.fault_slow_served_chunks_ms.unwrap_or(0));
        #[cfg(not(feature = "test-faults"))]
        let fault_slow_served_chunks = std::time::Duration::ZERO;
        Ok(Self {
            mesh,
            fault_corrupt_served_chunks,
            volume_snapshot_interval_records,
            fault_slow_served_chunks,
            api_socket: flags.api_socket.or(file.api_socket).unwrap_or_else(default_api_socket),
            origin: flags.origin.or(file.origin).unwrap_or_else(default_origin),
            cache_size_bytes,
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            io_backend: flags.io_backend.or(file.io_backend).unwrap_or(IoBackendChoice::Auto),
            direct_writes: flags.direct_writes.or(file.direct_writes).unwrap_or(true),
            verify_reads: flags.verify_reads.or(file.verify_reads).unwrap_or(true),
            origin_concurrency: flags
                .origin_concurrency
                .or(file.origin_concurrency)
                .unwrap_or(crate::origin::ORIGIN_CONCURRENCY_DEFAULT),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            data_dir,
            config_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_the_forms_users_write() {
        // Goal: sizes accept binary and decimal units and plain bytes; garbage is refused.
        assert_eq!("64GiB".parse::<ByteSize>(), Ok(ByteSize(64 << 30)));
        assert_eq!("512 MiB".parse::<ByteSize>(), Ok(ByteSize(512 << 20)));
        assert_eq!("1MB".parse::<ByteSize>(), Ok(ByteSize(1_000_000)));
        assert_eq!("4096".parse::<ByteSize>(), Ok(ByteSize(4096)));
        assert!("lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn flags_override_file() {
        // Goal: a flag wins over the file; the file wins over the default.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "cache_size = \"1GiB\"\norigin = \"file:///srv/o\"\nverify_reads = false\n").unwrap();
        let flags = Settings { cache_size: Some(ByteSize(2 << 30)), ..Settings::default() };
        let config = Config::resolve(Some(&path), flags).unwrap();
        assert_eq!(config.cache_size_bytes, 2 << 30);
        assert_eq!(config.origin, "file:///srv/o");
        assert!(!config.verify_reads);
    }

    #[test]
    fn mesh_needs_a_cluster_key_and_a_sane_dc() {
        // Goal: mesh flags without a key are refused with a hint; a key turns the mesh on with
        // defaults; dc names that could break protocol names are refused.
        let flags = Settings { bootstrap: Some(vec!["10.0.0.1:7946".into()]), ..Settings::default() };
        let error = Config::resolve(Some(Path::new("/dev/null")), flags).unwrap_err().to_string();
        assert!(error.contains("cluster-key new"), "{error}");
        let flags = Settings { cluster_key: Some("/k".into()), ..Settings::default() };
        let mesh = Config::resolve(Some(Path::new("/dev/null")), flags).unwrap().mesh.unwrap();
        assert_eq!(mesh.dc, DC_DEFAULT);
        assert_eq!(mesh.p2p_listen, P2P_LISTEN_DEFAULT);
        let flags = Settings { cluster_key: Some("/k".into()), dc: Some("eu/1".into()), ..Settings::default() };
        assert!(Config::resolve(Some(Path::new("/dev/null")), flags).is_err());
        assert_eq!("100MiB/s".parse::<ByteRate>(), Ok(ByteRate(100 << 20)));
        assert!("0/s".parse::<ByteRate>().is_err());
    }

    #[test]
    fn link_rate_comes_from_the_file_or_a_flag() {
        // Goal: the link rate announced for home placement is read like the other mesh
        // settings: a flag wins over the file; unset, none is announced.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "cluster_key = \"/k\"\nlink_rate = \"100MiB\"\n").unwrap();
        let mesh = Config::resolve(Some(&path), Settings::default()).unwrap().mesh.unwrap();
        assert_eq!(mesh.link_rate_bytes_per_second, Some(100 << 20));
        let flags = Settings { link_rate: Some(ByteRate(3_125_000)), ..Settings::default() };
        let mesh = Config::resolve(Some(&path), flags).unwrap().mesh.unwrap();
        assert_eq!(mesh.link_rate_bytes_per_second, Some(3_125_000));
        let flags = Settings { cluster_key: Some("/k".into()), ..Settings::default() };
        let mesh = Config::resolve(Some(Path::new("/dev/null")), flags).unwrap().mesh.unwrap();
        assert_eq!(mesh.link_rate_bytes_per_second, None);
        // A zero rate would mean "not set" on the wire: it is refused where it is written.
        std::fs::write(&path, "cluster_key = \"/k\"\nlink_rate = 0\n").unwrap();
        let error = Config::resolve(Some(&path), Settings::default()).unwrap_err().to_string();
        assert!(error.contains("above zero"), "{error}");
        assert!("0".parse::<ByteRate>().is_err());
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        // Goal: a typo in the config file is reported, not silently ignored.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "cache_sise = 5\n").unwrap();
        assert!(matches!(Config::resolve(Some(&path), Settings::default()), Err(ConfigError::Parse { .. })));
    }
}
