//! Starting and stopping one node: wires store, origin, fetcher and API together.
//!
//! Shutdown is explicit: a `CancellationToken` stops accepting, open connections get
//! [`SHUTDOWN_GRACE`] to finish, recency is written back and the socket is removed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cachemesh_proto::volume::VolumeHead;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::config::MeshConfig;
use crate::discovery::BootstrapAddr;
use crate::fetch::Fetcher;
use crate::identity::{ClusterKey, NodeIdentity};
use crate::mesh::{Mesh, MeshSettings, parse_listen_addr};
use crate::objects::Objects;
use crate::origin::Origin;
use crate::store::{Store, StoreConfig};
use crate::volume::{VolumeSettings, Volumes};

/// How long open API connections may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often last-use times are written back to the index.
pub const RECENCY_FLUSH_INTERVAL: Duration = Duration::from_secs(30);

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    let metrics = crate::metrics::install().context("installing the metrics recorder")?;
    let origin = Arc::new(Origin::open(&config.origin, config.origin_concurrency)?);
    let store = Store::open(StoreConfig {
        data_dir: config.data_dir.clone(),
        budget_bytes: config.cache_size_bytes,
        verify_reads: config.verify_reads,
        io_backend: config.io_backend,
        direct_writes: config.direct_writes,
    })
    .await
    .with_context(|| format!("opening the chunk store in {}", config.data_dir.display()))?;
    let fetcher = Fetcher::new(store.clone(), origin.clone());
    let mesh = match &config.mesh {
        Some(mesh_config) => {
            let settings = mesh_settings(&config, mesh_config)?;
            Some(Mesh::start(settings, fetcher.clone(), shutdown.clone()).await.context("starting the mesh")?)
        }
        None => None,
    };
    let objects = Objects::new(fetcher.clone());
    crate::volume::describe_metrics();
    let volumes = Volumes::open(
        &config.data_dir,
        origin.clone(),
        objects.clone(),
        VolumeSettings { snapshot_interval_records: config.volume_snapshot_interval_records },
    )
    .await
    .with_context(|| format!("opening the volume views in {}", config.data_dir.display()))?;
    let listener = api::bind_socket(&config.api_socket)
        .with_context(|| format!("binding the API socket {}", config.api_socket.display()))?;
    let tracker = TaskTracker::new();
    tracker.spawn(crate::metrics::upkeep(metrics.clone(), shutdown.clone()));
    if let Some(address) = config.metrics_listen {
        let listener =
            crate::metrics::bind(address).await.with_context(|| format!("binding the metrics listener {address}"))?;
        tracing::info!(address = %listener.local_addr().unwrap_or(address), "serving metrics over TCP");
        tracker.spawn(crate::metrics::serve_tcp(listener, metrics.clone(), shutdown.clone()));
    }
    tracker.spawn(flush_recency_periodically(store.clone(), shutdown.clone()));
    tracker.spawn(volumes.clone().run_tailer(shutdown.clone()));
    if let Some(mesh) = &mesh {
        let discovery = mesh.discovery().clone();
        volumes.set_announcer(Arc::new(move |volume, seq| {
            discovery.announce_volume_head(VolumeHead { volume: volume.clone(), seq });
        }));
        tracker.spawn(follow_volume_heads(mesh.discovery().volume_heads(), volumes.clone(), shutdown.clone()));
    }
    let state = ApiState { objects, volumes, started, metrics, shutdown: shutdown.clone() };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        api_socket = %config.api_socket.display(),
        data_dir = %config.data_dir.display(),
        origin = origin.description(),
        cache_size_bytes = config.cache_size_bytes,
        io_backend = store.io_backend().name(),
        "cachemeshd ready"
    );
    api::serve(listener, api::router(state), shutdown.clone(), tracker.clone()).await;
    tracing::info!("shutting down");
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("some API connections did not finish within the shutdown grace period");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, fetcher.flush_pending_writes()).await.is_err() {
        tracing::warn!("some fetched chunks were not written to the store within the shutdown grace period");
    }
    if let Err(error) = store.flush_recency().await {
        tracing::warn!(%error, "could not write back last-use times");
    }
    let _ = std::fs::remove_file(&config.api_socket);
    Ok(())
}

fn mesh_settings(config: &Config, mesh: &MeshConfig) -> anyhow::Result<MeshSettings> {
    let identity =
        NodeIdentity::load_or_create(&config.data_dir.join("node.key")).context("loading the node identity")?;
    let cluster_key = ClusterKey::load(&mesh.cluster_key).context("loading the cluster key")?;
    tracing::info!(fingerprint = %cluster_key.fingerprint(), "cluster key loaded");
    let bootstrap = mesh
        .bootstrap
        .iter()
        .map(|entry| BootstrapAddr::parse(entry).map_err(|error| anyhow::anyhow!("bootstrap {entry:?}: {error}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(MeshSettings {
        dc: mesh.dc.clone(),
        identity,
        cluster_key,
        p2p_listen: vec![
            parse_listen_addr(&mesh.p2p_listen)
                .map_err(|error| anyhow::anyhow!("p2p listen {:?}: {error}", mesh.p2p_listen))?,
        ],
        data_listen: mesh.data_listen,
        bootstrap,
        upload_limit_bytes_per_second: mesh.upload_limit_bytes_per_second,
        link_rate_bytes_per_second: mesh.link_rate_bytes_per_second.unwrap_or(0),
        corrupt_served_chunks: config.fault_corrupt_served_chunks,
        slow_served_chunks: config.fault_slow_served_chunks,
    })
}

async fn flush_recency_periodically(store: Store, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(RECENCY_FLUSH_INTERVAL);
    interval.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {
                if let Err(error) = store.flush_recency().await {
                    tracing::warn!(%error, "could not write back last-use times");
                }
            }
        }
    }
}

/// Passes volume heads announced by other nodes of the DC to the volumes, until shutdown.
async fn follow_volume_heads(
    mut heads: broadcast::Receiver<VolumeHead>,
    volumes: Volumes,
    shutdown: CancellationToken,
) {
    loop {
        let head = tokio::select! {
            () = shutdown.cancelled() => return,
            head = heads.recv() => head,
        };
        match head {
            Ok(head) => volumes.nudge(&head.volume, head.seq),
            // Missed heads are caught up by the poll.
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "volume head announcements dropped behind a slow reader");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
