//! The mesh through real daemons on loopback: chunks move host to host, only admitted
//! nodes of the same datacenter take part.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cachemesh_proto::api::PeersResponse;
use cachemesh_tests::support::{POLL_INTERVAL, binary};
use cachemesh_tests::*;
use http::Method;

/// How long a mesh may take to form or to show that it will not.
const MESH_DEADLINE: Duration = Duration::from_secs(30);
/// How long an outsider is watched: several membership announcement intervals.
const OUTSIDER_WATCH: Duration = Duration::from_secs(8);

fn cluster_key(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let output = std::process::Command::new(binary("cachemesh"))
        .args(["cluster-key", "new"])
        .arg(&path)
        .output()
        .expect("running cachemesh cluster-key new");
    assert!(output.status.success(), "cluster-key new failed: {}", String::from_utf8_lossy(&output.stderr));
    path.display().to_string()
}

fn mesh_options(origin: &str, key: &str, dc: &str, bootstrap: Option<&str>) -> DaemonOptions {
    let mut args =
        vec!["--cluster-key", key, "--dc", dc, "--p2p-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"];
    if let Some(bootstrap) = bootstrap {
        args.extend(["--bootstrap", bootstrap]);
    }
    DaemonOptions::default().with_origin_url(origin).with_args(&args)
}

/// `127.0.0.1:PORT` of a running node's p2p listener, from its status.
async fn p2p_address(daemon: &Daemon) -> String {
    let status = daemon.status().await;
    let mesh = status.mesh.expect("a node started with a cluster key reports its mesh");
    let listen = mesh.p2p_listen.first().expect("a p2p listen address");
    let port = listen.split('/').nth(4).expect("a /ip4/HOST/tcp/PORT multiaddr");
    format!("127.0.0.1:{port}")
}

/// Bytes the nodes downloaded from the origin stay below one chunk: manifests only.
async fn assert_no_chunk_left_the_origin(nodes: &[&Daemon]) {
    for node in nodes {
        let metrics = node.metrics().await;
        let downloaded = metrics.sum("cachemesh_origin_bytes_total", &[("direction", "download")]);
        assert!(downloaded < (CHUNK / 4) as f64, "{downloaded} bytes downloaded from the origin\n{}", metrics.text);
    }
}

async fn members(daemon: &Daemon) -> u64 {
    daemon.status().await.mesh.map_or(0, |mesh| mesh.members)
}

async fn wait_members(nodes: &[&Daemon], expected: u64) {
    for node in nodes {
        poll_until("the mesh to form", MESH_DEADLINE, || async { (members(node).await == expected).then_some(()) })
            .await;
    }
}

/// Three nodes of dc-a sharing one `file://` origin and cluster key, the last two
/// bootstrapped from the first, all seeing each other.
struct ThreeNodes {
    /// Holds the origin and the key file; removed when dropped.
    shared: tempfile::TempDir,
    origin: String,
    key: String,
    /// The first node's p2p address.
    bootstrap: String,
    nodes: [Daemon; 3],
}

async fn three_node_mesh() -> ThreeNodes {
    let shared = tempfile::tempdir().unwrap();
    let origin = format!("file://{}", shared.path().join("origin").display());
    let key = cluster_key(shared.path(), "cluster.key");
    let first = Daemon::start_with(mesh_options(&origin, &key, "dc-a", None)).await;
    let bootstrap = p2p_address(&first).await;
    let second = Daemon::start_with(mesh_options(&origin, &key, "dc-a", Some(&bootstrap))).await;
    let third = Daemon::start_with(mesh_options(&origin, &key, "dc-a", Some(&bootstrap))).await;
    wait_members(&[&first, &second, &third], 2).await;
    ThreeNodes { shared, origin, key, bootstrap, nodes: [first, second, third] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_spread_peer_to_peer_and_outsiders_get_nothing() {
    // Goal: three nodes of one DC form a mesh; an object put on the first is read by the
    // others from peers (bytes identical, served by source peer/home, the origin serving no
    // chunk to them); an intruder with another cluster key and a node of another DC, both
    // bootstrapping from the first node, never become members of anyone; the intruder
    // (which shares the origin) can read the
    // object only from the origin, never from a peer or home node.
    let seed = test_seed();
    let ThreeNodes { shared, origin, key, bootstrap, nodes: [first, second, third] } = three_node_mesh().await;

    let (id, digest) = put_checked(&first.client(), Pattern::new(seed), 5 * CHUNK + 4321).await;
    for reader in [&second, &third] {
        assert_reads_back(&reader.client(), &id, &digest).await;
        let metrics = reader.metrics().await;
        let origin_chunks = metrics.sum("cachemesh_bytes_served_total", &[("source", "origin")]);
        assert_eq!(origin_chunks, 0.0, "chunks read from the origin\n{}", metrics.text);
    }
    // Every chunk moved host to host: none left the origin (only manifests did), whether
    // a reader took it from a holder, from its home node, or held it already as the home
    // another reader asked.
    assert_no_chunk_left_the_origin(&[&first, &second, &third]).await;

    let intruder_key = cluster_key(shared.path(), "intruder.key");
    let intruder = Daemon::start_with(mesh_options(&origin, &intruder_key, "dc-a", Some(&bootstrap))).await;
    let other_dc = Daemon::start_with(mesh_options(&origin, &key, "dc-b", Some(&bootstrap))).await;
    let watch_until = tokio::time::Instant::now() + OUTSIDER_WATCH;
    while tokio::time::Instant::now() < watch_until {
        for (name, node) in [("first", &first), ("second", &second), ("third", &third)] {
            assert_eq!(members(node).await, 2, "{name} counts an outsider among its members");
        }
        assert_eq!(members(&intruder).await, 0, "the intruder joined a mesh");
        assert_eq!(members(&other_dc).await, 0, "the dc-b node joined dc-a's mesh");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    assert_reads_back(&intruder.client(), &id, &digest).await;
    let metrics = intruder.metrics().await;
    let from_mesh = metrics.sum("cachemesh_bytes_served_total", &[("source", "peer")])
        + metrics.sum("cachemesh_bytes_served_total", &[("source", "home")]);
    assert_eq!(from_mesh, 0.0, "the intruder got bytes through the mesh\n{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_rates_are_announced_to_the_dc() {
    // Goal: a node started with --link-rate announces it, and its peers list it in
    // /v1/peers (the rate that weights its share of homes); a node without one shows none.
    let shared = tempfile::tempdir().unwrap();
    let origin = format!("file://{}", shared.path().join("origin").display());
    let key = cluster_key(shared.path(), "cluster.key");
    let first = Daemon::start_with(mesh_options(&origin, &key, "dc-a", None)).await;
    let bootstrap = p2p_address(&first).await;
    let second = Daemon::start_with(
        mesh_options(&origin, &key, "dc-a", Some(&bootstrap)).with_args(&["--link-rate", "3125000"]),
    )
    .await;
    wait_members(&[&first, &second], 1).await;
    let second_id = second.status().await.mesh.unwrap().node_id;
    let seen_by_first = first.client().peers().await.unwrap().peers;
    assert_eq!(seen_by_first.len(), 1);
    assert_eq!(seen_by_first[0].node_id, second_id);
    assert_eq!(seen_by_first[0].link_rate, Some(3_125_000));
    let seen_by_second = second.client().peers().await.unwrap().peers;
    assert_eq!(seen_by_second.len(), 1);
    assert_eq!(seen_by_second[0].link_rate, None);

    // The CLI shows the same: `peers --json` is the API's answer, `peers` a table with the
    // peer and its rate, `status` this node's mesh.
    let json = first.cli(&["peers", "--json"]).await;
    assert!(json.status.success(), "peers --json: {}", String::from_utf8_lossy(&json.stderr));
    let listed: PeersResponse = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(listed.peers.len(), 1);
    assert_eq!((listed.peers[0].node_id.as_str(), listed.peers[0].link_rate), (second_id.as_str(), Some(3_125_000)));
    let table = first.cli(&["peers"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    let row = table.lines().find(|line| line.starts_with(&second_id)).unwrap_or_else(|| panic!("{table}"));
    assert!(row.ends_with("MiB/s"), "{row}");
    let status = first.cli(&["status"]).await;
    let status = String::from_utf8_lossy(&status.stdout);
    let first_id = first.status().await.mesh.unwrap().node_id;
    assert!(status.contains(&format!("node id:     {first_id}")), "{status}");
    assert!(status.contains("members:     1 other nodes"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_holder_is_hedged_by_a_fast_one() {
    // Goal: when a holder is slower than the hedge delay, the reader asks another holder
    // as well and takes the first verified answer: the third node, with a slow holder
    // (every chunk served after SLOW_SERVING) and a fast one, wins hedges, reads every byte
    // right, and nothing comes from the origin.
    const SLOW_SERVING: &str = "2000";
    let seed = test_seed();
    let shared = tempfile::tempdir().unwrap();
    let origin = format!("file://{}", shared.path().join("origin").display());
    let key = cluster_key(shared.path(), "cluster.key");
    let slow = Daemon::start_with(
        mesh_options(&origin, &key, "dc-a", None).with_args(&["--fault-slow-served-chunks-ms", SLOW_SERVING]),
    )
    .await;
    let bootstrap = p2p_address(&slow).await;
    let fast = Daemon::start_with(mesh_options(&origin, &key, "dc-a", Some(&bootstrap))).await;
    wait_members(&[&slow, &fast], 1).await;

    let (id, digest) = put_checked(&slow.client(), Pattern::new(seed), 6 * CHUNK).await;
    // The fast node gets its copy first (from the slow one: its only holder). The reader
    // joins only then, so that it is nobody's home node for this object before it reads
    // (a home keeps what it fetched for others, and would read those chunks locally).
    assert_reads_back(&fast.client(), &id, &digest).await;
    let reader = Daemon::start_with(mesh_options(&origin, &key, "dc-a", Some(&bootstrap))).await;
    wait_members(&[&slow, &fast, &reader], 2).await;
    assert_reads_back(&reader.client(), &id, &digest).await;
    assert_no_chunk_left_the_origin(&[&slow, &fast, &reader]).await;
    let metrics = reader.metrics().await;
    assert!(
        metrics.sum("cachemesh_hedge_wins_total", &[]) >= 1.0,
        "no hedge won against a holder {SLOW_SERVING} ms slow\n{}",
        metrics.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_writes_are_announced_and_followers_catch_up_without_a_read() {
    // Goal: in a mesh, a node that appends to a volume announces the volume's new head to
    // its DC. A node that follows the volume (it read it once, while it was empty, so its
    // poll skips it) catches up on the announcement alone, with no read asking, and then
    // lists the file; a node that never used the volume ignores the announcements and
    // folds nothing.
    let seed = test_seed();
    let ThreeNodes { shared: _shared, nodes: [writer, follower, bystander], .. } = three_node_mesh().await;

    let missing = follower.client().stat_file("team", "models/w").await;
    assert!(missing.is_err(), "an empty volume has no files: {missing:?}");

    let mut written = 0u64;
    poll_until("the follower to fold a record announced by the writer", MESH_DEADLINE, || {
        written += 1;
        let path = format!("models/w{written}");
        let (body, producer) =
            pattern_body(Pattern::new(seed.wrapping_add(written)), 1000, PatternBodyOptions::default());
        let writer = writer.client();
        let follower = &follower;
        async move {
            writer.put_file("team", &path, body).await.unwrap();
            producer.await.unwrap().unwrap();
            (follower.metrics().await.sum("cachemesh_volume_records_folded_total", &[]) >= 1.0).then_some(())
        }
    })
    .await;

    let listed = follower.client().list_all_files("team", "models").await.unwrap();
    assert!(!listed.is_empty(), "the follower lists what it caught up to");
    let follower_metrics = follower.metrics().await;
    assert!(
        follower_metrics.sum("cachemesh_volume_nudges_total", &[("outcome", "caught_up")]) >= 1.0,
        "the follower caught up without a nudge\n{}",
        follower_metrics.text
    );
    let writer_metrics = writer.metrics().await;
    assert!(
        writer_metrics.sum("cachemesh_volume_heads_sent_total", &[("outcome", "sent")]) >= 1.0,
        "the writer sent no announcement\n{}",
        writer_metrics.text
    );
    let bystander_metrics = bystander.metrics().await;
    assert!(
        bystander_metrics.sum("cachemesh_volume_nudges_total", &[("outcome", "not_followed")]) >= 1.0,
        "the bystander heard no announcement\n{}",
        bystander_metrics.text
    );
    assert_eq!(
        bystander_metrics.sum("cachemesh_volume_records_folded_total", &[]),
        0.0,
        "the bystander followed a volume it never used\n{}",
        bystander_metrics.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_fresh_object_take_each_chunk_from_its_only_holder_about_once() {
    // Goal: when two nodes read an object that only the node that put it holds, each chunk
    // leaves that node about once: a reader asks the chunk's home node, which fetches it
    // once for the DC (or, when the reader is the home, the other reader joins its fetch),
    // and readers that got a chunk serve it to each other. Without that, both readers
    // would take the whole object from the seed: twice its size. All bytes are right and no
    // chunk leaves the origin.
    const CHUNKS: u64 = 24;
    let seed = test_seed();
    let ThreeNodes { shared: _shared, nodes: [seeder, first, second], .. } = three_node_mesh().await;

    let (id, digest) = put_checked(&seeder.client(), Pattern::new(seed), CHUNKS * CHUNK).await;
    let (a, b) = (first.client(), second.client());
    tokio::join!(assert_reads_back(&a, &id, &digest), assert_reads_back(&b, &id, &digest));
    assert_no_chunk_left_the_origin(&[&seeder, &first, &second]).await;
    let metrics = seeder.metrics().await;
    let uploaded = metrics.sum("cachemesh_peer_upload_bytes_total", &[]);
    let object = digest.length() as f64;
    eprintln!("the seed uploaded {:.2} x the object", uploaded / object);
    assert!(uploaded >= object * 0.5, "the readers took little from the only holder: {uploaded}\n{}", metrics.text);
    assert!(uploaded <= object * 1.25, "the seed sent {uploaded} bytes for a {object}-byte object\n{}", metrics.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_take_chunks_in_stripes_and_a_relayer_of_corrupt_stripes_is_caught() {
    // Goal: five hosts reading at once an object only the origin holds (a node outside the
    // mesh put it) take its chunks in stripes, each relayed by one of them, and every reader
    // still gets the exact bytes
    // when one of them sends corrupt bytes for everything it serves: a chunk assembled
    // from its stripes fails its check, the reader gets the chunk whole from its home and
    // avoids the relayer. Upload budgets stretch the reads over a few seconds.
    const CHUNKS: u64 = 48;
    const UPLOAD: &str = "40MiB";
    let seed = test_seed();
    let shared = tempfile::tempdir().unwrap();
    let origin = format!("file://{}", shared.path().join("origin").display());
    let key = cluster_key(shared.path(), "cluster.key");
    // Outside the mesh: the readers know no host holding the whole object (with one they
    // do not stripe).
    let seeder = Daemon::start_with(DaemonOptions::default().with_origin_url(&origin)).await;
    let mut readers: Vec<Daemon> = Vec::new();
    for index in 0..5 {
        let bootstrap = match readers.first() {
            Some(first) => Some(p2p_address(first).await),
            None => None,
        };
        let mut options =
            mesh_options(&origin, &key, "dc-a", bootstrap.as_deref()).with_args(&["--upload-limit", UPLOAD]);
        if index == 0 {
            options = options.with_args(&["--fault-corrupt-served-chunks", "true"]);
        }
        readers.push(Daemon::start_with(options).await);
    }
    let everyone: Vec<&Daemon> = readers.iter().collect();
    wait_members(&everyone, 4).await;

    let (id, digest) = put_checked(&seeder.client(), Pattern::new(seed), CHUNKS * CHUNK).await;
    let clients: Vec<_> = readers.iter().map(Daemon::client).collect();
    tokio::join!(
        assert_reads_back(&clients[0], &id, &digest),
        assert_reads_back(&clients[1], &id, &digest),
        assert_reads_back(&clients[2], &id, &digest),
        assert_reads_back(&clients[3], &id, &digest),
        assert_reads_back(&clients[4], &id, &digest),
    );

    let (mut assembled, mut failed) = (0.0, 0.0);
    for reader in &readers[1..] {
        let metrics = reader.metrics().await;
        assembled += metrics.sum("cachemesh_stripes_total", &[("outcome", "assembled")]);
        failed += metrics.sum("cachemesh_verify_failures_total", &[("source", "stripes")]);
    }
    assert!(assembled > 0.0, "no chunk was taken in stripes");
    assert!(failed > 0.0, "no chunk assembled with the corrupt relayer's stripe failed its check");
    let faulty = readers[0].status().await.mesh.expect("a mesh").node_id;
    let mut caught = false;
    for reader in &readers[1..] {
        let (status, body) = reader.client().send_bytes(Method::GET, "/v1/peers", Bytes::new()).await.unwrap();
        assert!(status.is_success(), "/v1/peers: {status}");
        let listed: PeersResponse = serde_json::from_slice(&body).unwrap();
        caught |= listed.peers.iter().any(|peer| peer.node_id == faulty && peer.corrupt_chunks > 0);
    }
    assert!(caught, "no reader counted corrupt chunks against the faulty node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_pinning_a_fresh_object_at_once_warm_it_from_each_other() {
    // Goal: two nodes pin an object only its putter holds, at the same time. Each warms its
    // cache in its own order (chunks the other already holds first, and a couple of fresh
    // ones at a time from the putter through their homes); both end with every chunk, read
    // back exactly, the putter uploads about one copy, and the two took chunks from each
    // other, not only from the putter.
    const CHUNKS: u64 = 24;
    let seed = test_seed();
    let ThreeNodes { shared: _shared, nodes: [seeder, first, second], .. } = three_node_mesh().await;

    let (id, digest) = put_checked(&seeder.client(), Pattern::new(seed), CHUNKS * CHUNK).await;
    let pin = |node: &Daemon| {
        let client = node.client();
        async move {
            let (status, body) =
                client.send_bytes(Method::PUT, &format!("/v1/objects/{id}/pin"), Bytes::new()).await.unwrap();
            assert!(status.is_success(), "pin: {status} {body:?}");
        }
    };
    tokio::join!(pin(&first), pin(&second));
    let object = digest.length() as f64;
    for node in [&first, &second] {
        let metrics = node.metrics().await;
        let warmed = metrics.sum("cachemesh_bytes_warmed_total", &[]);
        assert_eq!(warmed, object, "a pin warms every byte once\n{}", metrics.text);
        assert_eq!(metrics.sum("cachemesh_bytes_warmed_total", &[("source", "origin")]), 0.0, "{}", metrics.text);
        assert_reads_back(&node.client(), &id, &digest).await;
        let after = node.metrics().await;
        let local = after.sum("cachemesh_bytes_served_total", &[("source", "local")]);
        assert_eq!(local, object, "the read after the pin came from the cache\n{}", after.text);
    }
    assert_no_chunk_left_the_origin(&[&seeder, &first, &second]).await;
    let uploaded = seeder.metrics().await.sum("cachemesh_peer_upload_bytes_total", &[]);
    eprintln!("the seed uploaded {:.2} x the object", uploaded / object);
    assert!(uploaded <= object * 1.25, "the seed sent {uploaded} bytes for a {object}-byte object");
    for (name, node) in [("first", &first), ("second", &second)] {
        let sent = node.metrics().await.sum("cachemesh_peer_upload_bytes_total", &[]);
        assert!(sent > 0.0, "the {name} pinning node served nothing to the other");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_is_dropped_when_its_connection_breaks_and_rejoins_after_restart() {
    // Goal: a member whose process is SIGKILLed sends no leave; the others still drop it
    // because its connection broke (counted as lost, which neither a leave nor expiry
    // counts), and it is a member again once restarted with the same identity.
    let ThreeNodes { shared: _shared, nodes: [first, second, mut victim], .. } = three_node_mesh().await;

    victim.kill9();
    for node in [&first, &second] {
        poll_until("the killed member to be dropped as lost", MESH_DEADLINE, || async {
            let lost = node.metrics().await.sum("cachemesh_members_lost_total", &[]);
            (lost >= 1.0 && members(node).await == 1).then_some(())
        })
        .await;
    }
    victim.start_again().await;
    wait_members(&[&first, &second, &victim], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_from_a_peer_are_written_past_the_page_cache() {
    // Goal: a node storing full chunks it took from a peer writes them with O_DIRECT (on a
    // filesystem that takes it: the build's disk), the short last chunk through the page
    // cache, and serves the object from its disk after a restart.
    let disk = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let shared = tempfile::tempdir_in(&disk).unwrap();
    let origin = format!("file://{}", shared.path().join("origin").display());
    let key = cluster_key(shared.path(), "cluster.key");
    let holder = Daemon::start_with(mesh_options(&origin, &key, "dc-a", None).in_dir(&disk)).await;
    let bootstrap = p2p_address(&holder).await;
    let mut reader = Daemon::start_with(mesh_options(&origin, &key, "dc-a", Some(&bootstrap)).in_dir(&disk)).await;
    wait_members(&[&holder, &reader], 1).await;
    let (id, digest) = put_checked(&holder.client(), Pattern::new(test_seed()), 3 * CHUNK + 5).await;
    assert_reads_back(&reader.client(), &id, &digest).await;
    assert_no_chunk_left_the_origin(&[&reader]).await;
    poll_until("the four fetched chunks to be stored", MESH_DEADLINE, || async {
        (reader.status().await.store.chunk_count == 4).then_some(())
    })
    .await;
    let store = reader.status().await.store;
    assert!(store.direct_writes, "direct writes: {}", store.direct_writes_reason);
    let metrics = reader.metrics().await;
    assert_eq!(metrics.sum("cachemesh_store_direct_writes_total", &[]), 3.0, "{}", metrics.text);
    reader.restart().await;
    assert_reads_back(&reader.client(), &id, &digest).await;
    let metrics = reader.metrics().await;
    let elsewhere = metrics.sum("cachemesh_bytes_served_total", &[])
        - metrics.sum("cachemesh_bytes_served_total", &[("source", "local")]);
    assert_eq!(elsewhere, 0.0, "{}", metrics.text);
}
