//! Prometheus metrics through the `metrics` crate.
//!
//! The registry is rendered on the API socket at `/metrics` and, when `--metrics-listen`
//! is set, over TCP at `http://ADDR/metrics`. Every metric is described here, so this is
//! the one list of names (also in `docs/api.md`).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Histogram buckets in seconds: from a page-cache hit to a slow origin.
const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// How often histogram storage is compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global recorder and describes every metric.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS_SECONDS)?.install_recorder()?;
    describe();
    crate::discovery::describe_metrics();
    crate::transport::describe_metrics();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "cachemesh_bytes_served_total",
        Unit::Bytes,
        "Object bytes sent to API clients, by the tier the chunk came from (source)."
    );
    describe_counter!(
        "cachemesh_bytes_warmed_total",
        Unit::Bytes,
        "Chunk bytes pin and prefetch brought into the cache (or found there), by source."
    );
    describe_counter!("cachemesh_chunk_fetches_total", "Chunks obtained for reads, by source.");
    describe_histogram!(
        "cachemesh_chunk_fetch_seconds",
        Unit::Seconds,
        "Time to obtain one chunk for a read, by source."
    );
    describe_gauge!("cachemesh_cache_used_bytes", Unit::Bytes, "Bytes of chunks held by the local store.");
    describe_gauge!("cachemesh_cache_budget_bytes", Unit::Bytes, "The local store's byte budget.");
    describe_gauge!("cachemesh_cache_chunks", "Chunks held by the local store.");
    describe_counter!("cachemesh_evicted_chunks_total", "Chunks evicted to keep the budget.");
    describe_counter!(
        "cachemesh_verify_failures_total",
        "Chunks or manifests whose bytes did not match their id, by source."
    );
    describe_counter!("cachemesh_store_write_errors_total", "Fetched chunks the local store could not keep.");
    describe_counter!("cachemesh_store_direct_writes_total", "Chunk files written past the page cache (O_DIRECT).");
    describe_counter!("cachemesh_origin_requests_total", "Requests to the origin, by op (get, put, head).");
    describe_counter!("cachemesh_origin_errors_total", "Failed origin requests, by op.");
    describe_counter!("cachemesh_origin_bytes_total", Unit::Bytes, "Bytes moved to or from the origin, by direction.");
    describe_counter!(
        "cachemesh_origin_stall_resumes_total",
        "Origin reads whose body stalled and were asked afresh for the rest."
    );
    describe_histogram!("cachemesh_origin_request_seconds", Unit::Seconds, "Origin request latency, by op.");
    describe_counter!("cachemesh_api_errors_total", "Error answers of the local API, by code.");
    describe_counter!("cachemesh_have_set_requests_total", "Have-set requests sent to holders.");
    describe_counter!(
        "cachemesh_hedged_requests_total",
        "Chunk requests sent to a second holder because the first was slower than the hedge delay."
    );
    describe_counter!("cachemesh_hedge_wins_total", "Hedged chunk requests that answered first.");
}

/// Runs histogram upkeep until shutdown.
pub async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => handle.run_upkeep(),
        }
    }
}

/// Serves `/metrics` over TCP on `listener` until shutdown.
pub async fn serve_tcp(listener: tokio::net::TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let served = axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(error) = served {
        tracing::warn!(%error, "metrics listener stopped");
    }
}

/// Binds the metrics TCP listener.
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}
