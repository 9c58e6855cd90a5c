//! What each emulated link carried during cold-start's reads, from the kernel's byte
//! counters of the bridge's ports (`/sys/class/net/<port>/statistics`), read every
//! [`SAMPLE_INTERVAL`].
//!
//! Why: a read's time says how long a host took, not whether the links were busy while it
//! ran. The Kumar-Ross minimum assumes the links it is bound by stay full from start to
//! finish; the counters show how full they were. They count every byte on the wire (QUIC,
//! TCP and HTTP overhead, retransmissions, chunks fetched twice), so a link's use is an
//! upper bound on its goodput, and the gap between the two is overhead.
//!
//! A bridge port's transmit counter is what its end received (a host's download), its
//! receive counter what its end sent (a host's upload). Node `i`'s port is `<prefix>h<i>`,
//! the origin's `<prefix>ob` (`crate::network`).

use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the counters are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// An interval counts as one in which the origin sent when its upload was at least this
/// share of its rate.
pub const ORIGIN_SENDING_SHARE: f64 = 0.5;

/// A link's two byte counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes its end received (the bridge port's transmit counter).
    pub down: u64,
    /// Bytes its end sent (the bridge port's receive counter).
    pub up: u64,
}

/// Every link's counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Seconds since the sampler started.
    pub seconds: f64,
    /// The origin's link (None: could not be read).
    pub origin: Option<Counters>,
    /// Each node's link, by index.
    pub nodes: Vec<Option<Counters>>,
}

/// Reads the counters of a run's links every [`SAMPLE_INTERVAL`] until finished (the
/// readings are bounded by the run's `--timeout`: one per second).
pub struct LinkSampler {
    stop: CancellationToken,
    task: JoinHandle<Vec<Reading>>,
}

impl LinkSampler {
    /// Starts reading the links of the emulated network named `prefix`, with `nodes` nodes.
    pub fn start(prefix: &str, nodes: usize) -> Self {
        let origin_port = format!("{prefix}ob");
        let node_ports: Vec<String> = (0..nodes).map(|index| format!("{prefix}h{index}")).collect();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let read = || Reading {
                seconds: started.elapsed().as_secs_f64(),
                origin: read_counters(&origin_port),
                nodes: node_ports.iter().map(|port| read_counters(port)).collect(),
            };
            let mut readings = vec![read()];
            let mut ticks = tokio::time::interval_at(started + SAMPLE_INTERVAL, SAMPLE_INTERVAL);
            loop {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    _ = ticks.tick() => readings.push(read()),
                }
            }
            readings.push(read());
            readings
        });
        Self { stop, task }
    }

    /// Stops and returns every reading, the first taken at the start and the last now.
    pub async fn finish(self) -> Vec<Reading> {
        self.stop.cancel();
        self.task.await.unwrap_or_else(|error| {
            eprintln!("cachemesh-testnet: the link counter sampler failed ({error}); the report has no link figures");
            Vec::new()
        })
    }
}

/// The counters of network device `device` (None: no such device, or unreadable).
pub fn read_counters(device: &str) -> Option<Counters> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{device}/statistics/{name}")).ok()?.trim().parse().ok()
    };
    Some(Counters { down: read("tx_bytes")?, up: read("rx_bytes")? })
}

/// What the links carried over the reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinksReport {
    /// Seconds between readings.
    pub interval_seconds: f64,
    /// The origin's link, over the whole reads (until the slowest read ended).
    pub origin: Option<LinkUse>,
    /// Each node's link, over its own read (None: its port could not be read, or it did
    /// not finish).
    pub nodes: Vec<Option<LinkUse>>,
    /// Per interval between two readings: the origin's upload and each node's download
    /// and upload.
    pub timeline: Vec<LinkRates>,
    /// Readers' upload as a share of their rate, averaged over the intervals in which the
    /// origin sent (at least [`ORIGIN_SENDING_SHARE`] of its rate) and each reader was
    /// still reading. None: the origin or no reader has a rate, or the origin never sent.
    ///
    /// Why: when every chunk comes from the origin through its home, each reader's link
    /// is needed both ways for the fleet to keep pace with the origin; uplink left idle
    /// then is capacity lost for good.
    pub readers_up_while_origin_sent: Option<f64>,
}

/// One link's bytes over a stretch of the reads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkUse {
    /// Whether the stretch is the node's own read (false: the whole reads, for a node that
    /// held the object from the start and only served it, or the origin).
    pub reader: bool,
    /// Seconds between the readings the bytes are counted between.
    pub seconds: f64,
    /// Bytes its end received.
    pub down_bytes: u64,
    /// Bytes its end sent.
    pub up_bytes: u64,
    /// The link's rate each way in bytes per second (None: unshaped).
    pub rate_bytes_per_second: Option<u64>,
    /// Download over the stretch as a share of the link's rate (None: unshaped).
    pub down_fraction: Option<f64>,
    /// Upload over the stretch as a share of the link's rate (None: unshaped).
    pub up_fraction: Option<f64>,
}

/// Rates over one interval, in bytes per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkRates {
    /// Seconds since the reads began, at the interval's end.
    pub seconds: f64,
    /// What the origin sent (None: its link could not be read).
    pub origin_up: Option<f64>,
    /// What each node received.
    pub nodes_down: Vec<Option<f64>>,
    /// What each node sent.
    pub nodes_up: Vec<Option<f64>>,
}

/// Sums `readings` up: each node over its own read (`read_seconds[i]`, from the first
/// reading to the first one taken at or after its end), except the `seeds`, which held
/// the object from the start, and the origin, both until the slowest read ended; each at
/// its rate (`node_rates`, `origin_rate`, bytes per second).
pub fn summarise(
    readings: &[Reading],
    read_seconds: &[Option<f64>],
    seeds: &[usize],
    node_rates: &[Option<u64>],
    origin_rate: Option<u64>,
) -> Option<LinksReport> {
    let first = readings.first()?;
    let until = |seconds: f64| readings.iter().find(|reading| reading.seconds >= seconds).or(readings.last());
    let slowest = read_seconds.iter().flatten().copied().reduce(f64::max)?;
    let origin = until(slowest)
        .and_then(|last| use_between(first.origin, last.origin, last.seconds - first.seconds, origin_rate, false));
    let nodes = (0..first.nodes.len())
        .map(|index| {
            let reader = !seeds.contains(&index);
            let seconds = if reader { read_seconds.get(index).copied().flatten()? } else { slowest };
            let last = until(seconds)?;
            let rate = node_rates.get(index).copied().flatten();
            let (from, to) = (first.nodes[index], last.nodes.get(index).copied().flatten());
            use_between(from, to, last.seconds - first.seconds, rate, reader)
        })
        .collect();
    let timeline = readings
        .windows(2)
        .filter(|pair| pair[1].seconds > pair[0].seconds)
        .map(|pair| {
            let span = pair[1].seconds - pair[0].seconds;
            let rate = |from: Option<Counters>, to: Option<Counters>, field: fn(Counters) -> u64| {
                Some(field(to?).saturating_sub(field(from?)) as f64 / span)
            };
            LinkRates {
                seconds: pair[1].seconds,
                origin_up: rate(pair[0].origin, pair[1].origin, |c| c.up),
                nodes_down: (0..pair[1].nodes.len())
                    .map(|index| rate(pair[0].nodes.get(index).copied().flatten(), pair[1].nodes[index], |c| c.down))
                    .collect(),
                nodes_up: (0..pair[1].nodes.len())
                    .map(|index| rate(pair[0].nodes.get(index).copied().flatten(), pair[1].nodes[index], |c| c.up))
                    .collect(),
            }
        })
        .collect::<Vec<_>>();
    let readers_up_while_origin_sent = upload_share(&timeline, read_seconds, seeds, node_rates, origin_rate);
    Some(LinksReport {
        interval_seconds: SAMPLE_INTERVAL.as_secs_f64(),
        origin,
        nodes,
        timeline,
        readers_up_while_origin_sent,
    })
}

/// See [`LinksReport::readers_up_while_origin_sent`]: an interval is within a read when
/// it ended before the read did.
fn upload_share(
    timeline: &[LinkRates],
    read_seconds: &[Option<f64>],
    seeds: &[usize],
    node_rates: &[Option<u64>],
    origin_rate: Option<u64>,
) -> Option<f64> {
    let origin_rate = origin_rate.filter(|rate| *rate > 0)? as f64;
    let (mut shares, mut counted) = (0.0, 0usize);
    for rates in
        timeline.iter().filter(|rates| rates.origin_up.is_some_and(|up| up >= ORIGIN_SENDING_SHARE * origin_rate))
    {
        for (index, up) in rates.nodes_up.iter().enumerate() {
            let (Some(up), Some(Some(rate)), Some(Some(end))) =
                (up, node_rates.get(index).filter(|_| !seeds.contains(&index)), read_seconds.get(index))
            else {
                continue;
            };
            if *rate == 0 || rates.seconds > *end {
                continue;
            }
            counted += 1;
            shares += up / *rate as f64;
        }
    }
    (counted > 0).then(|| shares / counted as f64)
}

impl LinksReport {
    /// One line for the summary: hosts' downlinks and the origin's uplink as shares of
    /// their rates (None: no link has a rate).
    pub fn summary_line(&self) -> Option<String> {
        let mut shares: Vec<f64> =
            self.nodes.iter().flatten().filter(|node| node.reader).filter_map(|node| node.down_fraction).collect();
        shares.sort_by(f64::total_cmp);
        let seeds: Vec<(usize, f64)> = (self.nodes.iter().enumerate())
            .filter_map(|(index, node)| node.filter(|node| !node.reader)?.up_fraction.map(|share| (index, share)))
            .collect();
        let origin = self.origin.and_then(|origin| origin.up_fraction);
        if shares.is_empty() && seeds.is_empty() && origin.is_none() {
            return None;
        }
        let mut parts = Vec::new();
        if let (Some(least), Some(median)) = (shares.first(), shares.get(shares.len() / 2)) {
            parts.push(format!(
                "readers' downlinks {:.0}% of their rate over their reads (median; least {:.0}%)",
                median * 100.0,
                least * 100.0
            ));
        }
        for (index, share) in seeds {
            parts.push(format!(
                "node {index}'s uplink (it held the object) {:.0}% until the slowest read ended",
                share * 100.0
            ));
        }
        if let Some(origin) = origin {
            parts.push(format!("the origin's uplink {:.0}% until the slowest read ended", origin * 100.0));
        }
        if let Some(share) = self.readers_up_while_origin_sent {
            parts.push(format!("readers' uplinks {:.0}% of their rate while the origin sent (mean)", share * 100.0));
        }
        Some(format!("links (every byte on the wire): {}", parts.join(", ")))
    }

    /// The report's section: a row per link.
    pub fn markdown(&self) -> String {
        let mib = |bytes: u64| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0));
        let share = |fraction: Option<f64>| fraction.map_or("-".to_string(), |fraction| format!("{:.2}", fraction));
        let row = |name: String, link: Option<LinkUse>| match link {
            Some(link) => format!(
                "| {name} | {:.0} | {} | {} | {} | {} |\n",
                link.seconds,
                mib(link.down_bytes),
                share(link.down_fraction),
                mib(link.up_bytes),
                share(link.up_fraction)
            ),
            None => format!("| {name} | - | - | - | - | - |\n"),
        };
        let mut out = format!(
            "## Links\n\nBytes each emulated link carried during the reads, from the kernel's counters read every \
             {:.0} s: a reader's link over its own read; the origin's, and that of a node that held the object from \
             the start, until the slowest read ended. They count every \
             byte on the wire (protocol overhead, retransmissions, chunks fetched twice), so a share of the rate is \
             an upper bound on goodput.\n\n\
             | link | seconds | received MiB | received / rate | sent MiB | sent / rate |\n|---|---|---|---|---|---|\n",
            self.interval_seconds
        );
        out += &row("origin".into(), self.origin);
        for (index, node) in self.nodes.iter().enumerate() {
            let seed = if node.is_some_and(|node| !node.reader) { " (held the object)" } else { "" };
            out += &row(format!("node {index}{seed}"), *node);
        }
        out + "\n"
    }
}

fn use_between(
    from: Option<Counters>,
    to: Option<Counters>,
    seconds: f64,
    rate: Option<u64>,
    reader: bool,
) -> Option<LinkUse> {
    let (from, to) = (from?, to?);
    let down_bytes = to.down.saturating_sub(from.down);
    let up_bytes = to.up.saturating_sub(from.up);
    let fraction =
        |bytes: u64| rate.filter(|rate| *rate > 0 && seconds > 0.0).map(|rate| bytes as f64 / (rate as f64 * seconds));
    Some(LinkUse {
        reader,
        seconds,
        down_bytes,
        up_bytes,
        rate_bytes_per_second: rate,
        down_fraction: fraction(down_bytes),
        up_fraction: fraction(up_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seconds: f64, origin_up: u64, nodes_down: &[u64]) -> Reading {
        Reading {
            seconds,
            origin: Some(Counters { down: 0, up: origin_up }),
            nodes: nodes_down.iter().map(|down| Some(Counters { down: *down, up: down / 2 })).collect(),
        }
    }

    #[test]
    fn each_node_is_counted_over_its_own_read_and_the_origin_until_the_slowest() {
        let readings = [
            reading(0.0, 1_000, &[500, 0]),
            reading(1.0, 101_000, &[100_500, 50_000]),
            reading(2.0, 201_000, &[150_500, 150_000]),
            reading(3.0, 201_000, &[150_500, 250_000]),
        ];
        let report = summarise(&readings, &[Some(1.5), Some(2.5)], &[], &[Some(100_000), None], Some(200_000)).unwrap();
        // Node 0 ended at 1.5 s: counted until the reading at 2 s.
        let node = report.nodes[0].unwrap();
        assert_eq!((node.seconds, node.down_bytes, node.up_bytes), (2.0, 150_000, 75_000));
        assert_eq!(node.down_fraction, Some(0.75));
        // Node 1's link has no rate: bytes, but no share of a rate.
        let node = report.nodes[1].unwrap();
        assert_eq!((node.seconds, node.down_bytes, node.down_fraction), (3.0, 250_000, None));
        // The origin until the slowest read's end (2.5 s: the reading at 3 s).
        let origin = report.origin.unwrap();
        assert_eq!((origin.up_bytes, origin.up_fraction), (200_000, Some(200_000.0 / 600_000.0)));
        let rates: Vec<(f64, Option<f64>, Option<f64>)> =
            report.timeline.iter().map(|rates| (rates.seconds, rates.origin_up, rates.nodes_down[1])).collect();
        assert_eq!(
            rates,
            [
                (1.0, Some(100_000.0), Some(50_000.0)),
                (2.0, Some(100_000.0), Some(100_000.0)),
                (3.0, Some(0.0), Some(100_000.0))
            ]
        );
    }

    #[test]
    fn readers_uplinks_are_averaged_over_the_seconds_the_origin_sent_within_each_read() {
        // Goal: how full readers' uplinks were while the origin sent, so a report shows
        // when homes had nothing to pass on.
        let node = |down: u64, up: u64| Some(Counters { down, up });
        let at = |seconds: f64, origin_up: u64, nodes: [Option<Counters>; 3]| Reading {
            seconds,
            origin: Some(Counters { down: 0, up: origin_up }),
            nodes: nodes.to_vec(),
        };
        let readings = [
            at(0.0, 0, [node(0, 0), node(0, 0), node(0, 0)]),
            // The origin sends; node 0 sends 5% of its rate, node 1 50%.
            at(1.0, 100, [node(10, 5), node(10, 50), node(0, 0)]),
            // The origin sends; node 1 sends nothing, and node 0's read has ended.
            at(2.0, 200, [node(20, 15), node(20, 50), node(0, 0)]),
            // The origin sends under half its rate: not counted.
            at(3.0, 240, [node(30, 15), node(30, 140), node(0, 0)]),
        ];
        // Node 2 held the object: not a reader, not counted.
        let report =
            summarise(&readings, &[Some(1.0), Some(3.0), Some(0.5)], &[2], &[Some(100); 3], Some(100)).unwrap();
        assert_eq!(report.timeline[0].nodes_up, [Some(5.0), Some(50.0), Some(0.0)]);
        // Counted: node 0 at 1 s (5%), node 1 at 1 s (50%) and 2 s (0%).
        let share = report.readers_up_while_origin_sent.unwrap();
        assert!((share - 0.55 / 3.0).abs() < 1e-9, "{share}");
        let line = report.summary_line().unwrap();
        assert!(line.contains("readers' uplinks 18% of their rate while the origin sent (mean)"), "{line}");
        // Without the origin's rate (unshaped), there is no telling when it sent.
        let report = summarise(&readings, &[Some(1.0), Some(3.0), Some(0.5)], &[2], &[Some(100); 3], None).unwrap();
        assert_eq!(report.readers_up_while_origin_sent, None);
    }

    #[test]
    fn a_node_without_a_finished_read_or_readable_port_has_no_figures() {
        let mut readings = vec![reading(0.0, 0, &[0, 0]), reading(1.0, 10, &[10, 10])];
        readings[1].nodes[1] = None;
        let report = summarise(&readings, &[None, Some(1.0)], &[], &[None, None], None).unwrap();
        assert_eq!(report.nodes, [None, None]);
        assert!(summarise(&readings, &[None, None], &[], &[None, None], None).is_none(), "no read finished");
        assert!(summarise(&[], &[Some(1.0)], &[], &[None], None).is_none(), "no readings");
    }

    #[test]
    fn a_node_that_held_the_object_is_counted_over_the_whole_reads_apart_from_the_readers() {
        let readings = [reading(0.0, 0, &[0, 0]), reading(1.0, 0, &[10, 800_000]), reading(4.0, 0, &[10, 3_200_000])];
        // Node 0 held the object: its read took 0.1 s, its link counts until the slowest
        // read ended (4 s).
        let report = summarise(&readings, &[Some(0.1), Some(4.0)], &[0], &[Some(1_000_000); 2], None).unwrap();
        let seed = report.nodes[0].unwrap();
        assert!(!seed.reader);
        assert_eq!((seed.seconds, seed.down_bytes, seed.up_bytes), (4.0, 10, 5));
        let line = report.summary_line().unwrap();
        assert!(line.contains("readers' downlinks 80% of their rate over their reads (median; least 80%)"), "{line}");
        assert!(line.contains("node 0's uplink (it held the object) 0%"), "{line}");
        let markdown = report.markdown();
        assert!(markdown.contains("| node 0 (held the object) | 4 |"), "{markdown}");
    }

    #[test]
    fn the_loopback_device_has_counters() {
        // Every network namespace has `lo`; a device that does not exist has none.
        assert!(read_counters("lo").is_some());
        assert!(read_counters("no-such-device-here").is_none());
    }

    #[tokio::test]
    async fn a_sampler_reads_at_its_start_and_its_end() {
        let sampler = LinkSampler::start("no-such-prefix-", 2);
        let readings = sampler.finish().await;
        assert!(readings.len() >= 2);
        assert!(readings.iter().all(|reading| reading.origin.is_none() && reading.nodes == [None, None]));
    }
}
