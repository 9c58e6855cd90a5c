//! The trial's report: one row per node, the origin's figures and the checks, printed as a
//! table and written as `report.json` and `report.md`, with the charts of `charts.rs`.
//!
//! Bytes are raw counts in JSON; the table shows MiB. `MB/s` is the object's size in
//! 10^6 bytes over the node's read time. Every figure comes from a boundary: the client's
//! own stream (time, digest), the node's `/metrics` (bytes by source, read before and
//! after the reads, so the row shows the difference), and the counting proxy (origin egress).
//! Rates are bits per second in JSON (`link_rate`, `network.*_rate`) and `200Mbit` style in
//! the table. The Kumar-Ross figure stands beside the measured fleet time when the links
//! were emulated with rates; it is reported, never checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::charts;
use crate::cpu::MachineCpu;
use crate::links::LinksReport;
use crate::network::NetworkReport;
use crate::proxy::ProxyFigures;
use crate::shaping::{KumarRoss, Rate};

/// Bytes (or counts) by the tier a chunk came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BySource {
    /// The node's own store.
    pub local: u64,
    /// Another node that held it.
    pub peer: u64,
    /// The chunk's home node (which fetched it from the origin for the DC).
    pub home: u64,
    /// The origin directly.
    pub origin: u64,
}

/// One node's row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeRow {
    /// The node's index.
    pub node: usize,
    /// Its DC.
    pub dc: String,
    /// Its node id.
    pub node_id: String,
    /// Its link rate, each way (None: unshaped or loopback without rates).
    pub link_rate: Option<Rate>,
    /// What the scenario made it do (`put`, `faulty`, `killed`, ...), empty for a plain reader.
    pub role: String,
    /// `ok`, `wrong bytes`, `failed`, `killed`, or `-` when it did not read.
    pub result: String,
    /// The read's error, when it failed.
    pub error: Option<String>,
    /// Seconds from the common start to the last byte.
    pub seconds: Option<f64>,
    /// Seconds from the common start to the first byte.
    pub first_byte_seconds: Option<f64>,
    /// Bytes received by the client.
    pub bytes_received: u64,
    /// BLAKE3 of the bytes received.
    pub blake3: Option<String>,
    /// Whether length and BLAKE3 match what was put.
    pub bytes_match: Option<bool>,
    /// Object size / seconds, in 10^6 bytes per second.
    pub mb_per_second: Option<f64>,
    /// The read's progress: `[seconds from the common start, bytes received so far]` pairs,
    /// from the first byte to the last (at most `PROGRESS_SAMPLES_MAX`; empty when no byte came).
    pub progress: Vec<(f64, u64)>,
    /// `cachemesh_bytes_served_total` by source, during the reads (with `--pin`,
    /// `cachemesh_bytes_warmed_total`: where the pin took the bytes from).
    pub bytes_served: Option<BySource>,
    /// `cachemesh_chunk_fetches_total` by source, during the reads.
    pub chunk_fetches: Option<BySource>,
    /// `cachemesh_verify_failures_total{source="peer"}` during the reads.
    pub verify_failures_peer: Option<u64>,
    /// Chunk bytes it sent to peers on the data plane during the reads
    /// (`cachemesh_peer_upload_bytes_total`): how much it took part in the swarm.
    pub sent_to_peers: Option<u64>,
    /// What the origin (the node's counting proxy) served this node over the whole trial.
    pub origin: ProxyFigures,
    /// Every counter that changed during the reads.
    pub counter_deltas: BTreeMap<String, f64>,
}

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// A short name.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What was expected and what was seen.
    pub detail: String,
}

impl Check {
    /// A check.
    pub fn new(name: &str, passed: bool, detail: impl Into<String>) -> Self {
        Self { name: name.to_string(), passed, detail: detail.into() }
    }
}

/// The trial's parameters, enough to repeat it.
#[derive(Debug, Clone, Serialize)]
pub struct Parameters {
    /// The scenario.
    pub scenario: String,
    /// Nodes.
    pub nodes: usize,
    /// Object size in bytes.
    pub object_size: u64,
    /// The seed (data, and which node is killed or faulty).
    pub seed: u64,
    /// `--upload-limit` given to every node.
    pub upload_limit: Option<String>,
    /// `--net` as given.
    pub net: String,
    /// `--host-rate`.
    pub host_rate: Option<Rate>,
    /// `--origin-rate`.
    pub origin_rate: Option<Rate>,
    /// `--slow-hosts` (a fraction of the nodes).
    pub slow_hosts: Option<f64>,
    /// `--slow-rate`.
    pub slow_rate: Option<Rate>,
    /// Seconds each put and read phase may take.
    pub timeout_seconds: u64,
    /// Where the binaries came from.
    pub bin_dir: String,
    /// The command line that repeats this trial.
    pub repeat: String,
}

/// Origin egress.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OriginReport {
    /// Chunk GET bytes the origin served, all nodes, whole trial.
    pub chunk_get_bytes: u64,
    /// `chunk_get_bytes / object_size`.
    pub egress_ratio: f64,
    /// Chunk GET bytes per DC.
    pub chunk_get_bytes_per_dc: BTreeMap<String, u64>,
    /// All proxies' counts summed.
    pub totals: ProxyFigures,
}

/// The measured fleet time beside the Kumar-Ross minimum for the emulated rates.
#[derive(Debug, Clone, Serialize)]
pub struct KumarRossReport {
    /// The file size F, in bytes.
    pub file_bytes: u64,
    /// Who holds the file at the start (their uploads are `u_seeds`).
    pub seeds: String,
    /// How many nodes had to download it (N).
    pub downloaders: usize,
    /// The minimum and its terms.
    pub minimum: KumarRoss,
    /// Seconds from the common start until the last downloader had every byte.
    pub measured_seconds: f64,
    /// `measured_seconds / minimum.seconds`: 1.0 is as fast as the links allow.
    pub ratio: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The testnet's version.
    pub testnet_version: String,
    /// Parameters.
    pub parameters: Parameters,
    /// What the scenario is for.
    pub goal: String,
    /// The object's id, once put.
    pub object_id: Option<String>,
    /// Seconds the put took.
    pub put_seconds: Option<f64>,
    /// Seconds from the first node's start until every node saw its whole DC.
    pub mesh_formed_seconds: Option<f64>,
    /// The network the trial ran on.
    pub network: NetworkReport,
    /// The measured time beside the least the emulated rates allow (cold-start on an
    /// emulated network with rates set; None otherwise).
    pub kumar_ross: Option<KumarRossReport>,
    /// How busy the machine's CPUs were during cold-start's reads (None: other scenarios,
    /// or no /proc/stat).
    pub machine_cpu: Option<MachineCpu>,
    /// What each emulated link carried during cold-start's reads (None: other scenarios,
    /// or loopback).
    pub links: Option<LinksReport>,
    /// Per node.
    pub rows: Vec<NodeRow>,
    /// Origin egress.
    pub origin: OriginReport,
    /// The checks.
    pub checks: Vec<Check>,
    /// Things seen that are not checks.
    pub notes: Vec<String>,
    /// Why the trial could not run to its end, if it could not.
    pub error: Option<String>,
    /// Whether every check passed and nothing failed.
    pub passed: bool,
}

impl Report {
    /// Sets `passed` from the checks and the error.
    pub fn finish(&mut self) {
        self.passed = self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|check| check.passed);
    }

    /// The table, as plain text (`markdown == false`) or a markdown table.
    pub fn table(&self, markdown: bool) -> String {
        let header = [
            "node",
            "dc",
            "role",
            "link",
            "result",
            "seconds",
            "local MiB",
            "peer MiB",
            "home MiB",
            "origin MiB",
            "MB/s",
            "origin GET MiB",
            "sent to peers MiB",
        ];
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                let served = row.bytes_served;
                let mib = |pick: fn(&BySource) -> u64| served.map_or("-".to_string(), |s| format_mib(pick(&s)));
                vec![
                    row.node.to_string(),
                    row.dc.clone(),
                    if row.role.is_empty() { "-".into() } else { row.role.clone() },
                    row.link_rate.map_or("-".into(), |rate| rate.to_string()),
                    row.result.clone(),
                    row.seconds.map_or("-".into(), |s| format!("{s:.3}")),
                    mib(|s| s.local),
                    mib(|s| s.peer),
                    mib(|s| s.home),
                    mib(|s| s.origin),
                    row.mb_per_second.map_or("-".into(), |rate| format!("{rate:.0}")),
                    format_mib(row.origin.chunk_get_bytes),
                    row.sent_to_peers.map_or("-".into(), format_mib),
                ]
            })
            .collect();
        let mut out = String::new();
        if markdown {
            let _ = writeln!(out, "| {} |", header.join(" | "));
            let _ = writeln!(out, "|{}", header.iter().map(|_| "---|").collect::<String>());
            for row in &rows {
                let _ = writeln!(out, "| {} |", row.join(" | "));
            }
        } else {
            let mut widths: Vec<usize> = header.iter().map(|name| name.len()).collect();
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.len());
                }
            }
            let line = |cells: Vec<String>| {
                cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:>width$}")).collect::<Vec<_>>().join("  ")
            };
            let _ = writeln!(out, "{}", line(header.iter().map(|name| name.to_string()).collect()));
            for row in rows {
                let _ = writeln!(out, "{}", line(row));
            }
        }
        out
    }

    /// The summary lines under the table.
    pub fn summary(&self, markdown: bool) -> String {
        let bullet = if markdown { "- " } else { "" };
        let mut out = String::new();
        let size = self.parameters.object_size;
        let mtu = self.network.mtu.map(|mtu| format!("; MTU {mtu}")).unwrap_or_default();
        let _ = writeln!(out, "{bullet}network: {}{mtu}; latency {}", self.network.summary, self.network.latency);
        if let Some(figure) = &self.kumar_ross {
            let _ = writeln!(
                out,
                "{bullet}Kumar-Ross minimum {:.3} s (bound by {}), measured {:.3} s = {:.2} x the minimum",
                figure.minimum.seconds, figure.minimum.bound_by, figure.measured_seconds, figure.ratio
            );
        }
        let _ = writeln!(
            out,
            "{bullet}origin egress: {} MiB of chunks for a {} MiB object = {:.3} x the object size",
            format_mib(self.origin.chunk_get_bytes),
            format_mib(size),
            self.origin.egress_ratio
        );
        if self.origin.chunk_get_bytes_per_dc.len() > 1 {
            for (dc, bytes) in &self.origin.chunk_get_bytes_per_dc {
                let ratio = if size == 0 { 0.0 } else { *bytes as f64 / size as f64 };
                let _ = writeln!(out, "{bullet}origin egress of {dc}: {} MiB = {ratio:.3} x", format_mib(*bytes));
            }
        }
        let _ = writeln!(
            out,
            "{bullet}origin requests: {} ({} chunk GETs, {} PUTs, {} upstream errors)",
            self.origin.totals.requests,
            self.origin.totals.chunk_gets,
            self.origin.totals.puts,
            self.origin.totals.upstream_errors
        );
        if let Some(seconds) = self.mesh_formed_seconds {
            let _ = writeln!(out, "{bullet}mesh formed in {seconds:.2} s");
        }
        if let Some(seconds) = self.put_seconds {
            let rate = if seconds > 0.0 { size as f64 / seconds / 1e6 } else { 0.0 };
            let _ = writeln!(out, "{bullet}put took {seconds:.3} s ({rate:.0} MB/s)");
        }
        if let Some(cpu) = &self.machine_cpu {
            let _ = writeln!(
                out,
                "{bullet}machine CPU during the reads: {:.0}% busy ({:.2} of {} cores)",
                cpu.busy_fraction * 100.0,
                cpu.busy_fraction * cpu.cores as f64,
                cpu.cores
            );
        }
        if let Some(line) = self.links.as_ref().and_then(LinksReport::summary_line) {
            let _ = writeln!(out, "{bullet}{line}");
        }
        let fleet: Vec<f64> = self.rows.iter().filter_map(|row| row.seconds).collect();
        if let Some(slowest) = fleet.iter().copied().reduce(f64::max) {
            let _ = writeln!(
                out,
                "{bullet}fleet: {} reads done, slowest {slowest:.3} s, {:.0} MB/s aggregate",
                fleet.len(),
                size as f64 * fleet.len() as f64 / slowest.max(f64::MIN_POSITIVE) / 1e6
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "{bullet}note: {note}");
        }
        if let Some(error) = &self.error {
            let _ = writeln!(out, "{bullet}ERROR: {error}");
        }
        out
    }

    /// The Kumar-Ross table (markdown) or lines (text); empty when there is no figure.
    pub fn kumar_ross_text(&self, markdown: bool) -> String {
        let Some(figure) = &self.kumar_ross else {
            return String::new();
        };
        let minimum = &figure.minimum;
        let cells = [
            format!("{:.3}", figure.measured_seconds),
            format!("{:.3}", minimum.seconds),
            format!("{:.2}", figure.ratio),
            minimum.bound_by.to_string(),
            format!("{:.3}", minimum.seeds_upload_seconds),
            format!("{:.3}", minimum.slowest_download_seconds),
            format!("{:.3}", minimum.aggregate_upload_seconds),
        ];
        let header = [
            "measured s",
            "Kumar-Ross min s",
            "measured / min",
            "bound by",
            "F/u_seeds s",
            "F/d_min s",
            "N*F/sum(u) s",
        ];
        let mut out = String::new();
        if markdown {
            let _ = writeln!(out, "| {} |", header.join(" | "));
            let _ = writeln!(out, "|{}", header.iter().map(|_| "---|").collect::<String>());
            let _ = writeln!(out, "| {} |", cells.join(" | "));
            let _ = writeln!(
                out,
                "\nF = {} bytes, N = {} downloaders, seeds: {}.",
                figure.file_bytes, figure.downloaders, figure.seeds
            );
        } else {
            for (name, cell) in header.iter().zip(&cells) {
                let _ = writeln!(out, "{name}: {cell}");
            }
        }
        out
    }

    /// The checks, one line each.
    pub fn checks_text(&self, markdown: bool) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let verdict = if check.passed { "PASS" } else { "FAIL" };
            if markdown {
                let _ = writeln!(out, "- **{verdict}** `{}`: {}", check.name, check.detail);
            } else {
                let _ = writeln!(out, "{verdict}  {}: {}", check.name, check.detail);
            }
        }
        out
    }

    /// The whole text for the terminal.
    pub fn text(&self) -> String {
        let p = &self.parameters;
        format!(
            "scenario {} with {} nodes, object {} bytes ({} MiB), seed {}\n\n{}\n{}\n{}{}\n{}\nrepeat with: {}\n",
            p.scenario,
            p.nodes,
            p.object_size,
            format_mib(p.object_size),
            p.seed,
            self.table(false),
            self.summary(false),
            self.kumar_ross_text(false),
            self.checks_text(false),
            if self.passed { "ALL CHECKS PASSED" } else { "SOME CHECKS FAILED" },
            p.repeat
        )
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let p = &self.parameters;
        format!(
            "# cachemesh testnet: {}\n\n{}\n\n- nodes: {}\n- object size: {} bytes ({} MiB)\n- seed: {}\n- network: {}\n- rates (each way): host {}, origin {}, slow hosts {}\n- latency: {}\n- upload limit: {}\n- object id: {}\n- repeat with: `{}`\n\n## Nodes\n\n{}\n{}\n{}## Checks\n\n{}\n**{}**\n",
            p.scenario,
            self.goal,
            p.nodes,
            p.object_size,
            format_mib(p.object_size),
            p.seed,
            self.network.summary,
            rate_text(self.network.host_rate),
            rate_text(self.network.origin_rate),
            if self.network.slow_hosts == 0 {
                "none".to_string()
            } else {
                format!("{} at {}", self.network.slow_hosts, rate_text(self.network.slow_rate))
            },
            self.network.latency,
            p.upload_limit.as_deref().unwrap_or("none"),
            self.object_id.as_deref().unwrap_or("-"),
            p.repeat,
            self.table(true),
            self.summary(true),
            if self.kumar_ross.is_some() {
                format!("## Against the Kumar-Ross minimum\n\n{}\n", self.kumar_ross_text(true))
            } else {
                String::new()
            } + &self.links.as_ref().map(LinksReport::markdown).unwrap_or_default(),
            self.checks_text(true),
            if self.passed { "All checks passed." } else { "Some checks failed." }
        ) + "\n"
            + &charts::markdown()
    }

    /// Writes `report.json`, `report.md` and the charts `report.md` shows into `dir`
    /// (the charts last, so that a chart that cannot be drawn costs no figures).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json + "\n")?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        for chart in charts::render(self).map_err(std::io::Error::other)? {
            std::fs::write(dir.join(chart.file), chart.svg)?;
        }
        Ok(())
    }
}

/// A rate, or `unshaped`.
fn rate_text(rate: Option<Rate>) -> String {
    rate.map_or("unshaped".to_string(), |rate| rate.to_string())
}

/// Bytes as MiB with one decimal (or more for small values).
pub fn format_mib(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if bytes == 0 {
        "0".into()
    } else if mib < 0.1 {
        format!("{mib:.3}")
    } else {
        format!("{mib:.1}")
    }
}

/// A report with these rows and plain parameters, for the tests of this crate's modules.
#[cfg(test)]
pub(crate) fn test_report(rows: Vec<NodeRow>) -> Report {
    Report {
        testnet_version: "0".into(),
        parameters: Parameters {
            scenario: "cold-start".into(),
            nodes: rows.len(),
            object_size: 4 << 20,
            seed: 9,
            upload_limit: None,
            net: "auto".into(),
            host_rate: None,
            origin_rate: None,
            slow_hosts: None,
            slow_rate: None,
            timeout_seconds: 60,
            bin_dir: "/x".into(),
            repeat: "cachemesh-testnet run cold-start".into(),
        },
        goal: "goal".into(),
        object_id: None,
        put_seconds: None,
        mesh_formed_seconds: None,
        network: NetworkReport::default(),
        kumar_ross: None,
        machine_cpu: None,
        links: None,
        rows,
        origin: OriginReport::default(),
        checks: Vec::new(),
        notes: Vec::new(),
        error: None,
        passed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let row = NodeRow {
            node: 0,
            dc: "dc-a".into(),
            role: "put".into(),
            result: "ok".into(),
            seconds: Some(1.5),
            bytes_served: Some(BySource { local: 3 << 20, peer: 1 << 20, home: 0, origin: 0 }),
            mb_per_second: Some(2.8),
            ..NodeRow::default()
        };
        let mut report = test_report(vec![row]);
        report.put_seconds = Some(0.5);
        report.checks = vec![Check::new("identical_bytes", true, "1 of 1")];
        report
    }

    #[test]
    fn kumar_ross_figure_is_shown_beside_the_measured_time() {
        // Goal: when there is a Kumar-Ross figure, the text, markdown and JSON carry it.
        let mut report = sample();
        let minimum = crate::shaping::KumarRoss {
            seconds: 2.0,
            seeds_upload_seconds: 1.0,
            slowest_download_seconds: 2.0,
            aggregate_upload_seconds: 0.5,
            bound_by: "slowest_download",
        };
        report.kumar_ross = Some(KumarRossReport {
            file_bytes: 4 << 20,
            seeds: "origin, node 0".into(),
            downloaders: 3,
            minimum,
            measured_seconds: 3.0,
            ratio: 1.5,
        });
        let markdown = report.markdown();
        assert!(markdown.contains("| 3.000 | 2.000 | 1.50 | slowest_download | 1.000 | 2.000 | 0.500 |"), "{markdown}");
        assert!(report.text().contains("= 1.50 x the minimum"), "{}", report.text());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["kumar_ross"]["ratio"], 1.5);
        assert_eq!(json["kumar_ross"]["minimum"]["bound_by"], "slowest_download");
    }

    #[test]
    fn tables_have_a_row_per_node_and_the_verdict_follows_the_checks() {
        // Goal: the text and markdown tables carry every row; `finish` fails on any
        // failed check or error and on an empty check list.
        let mut report = sample();
        report.finish();
        assert!(report.passed);
        let text = report.table(false);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("3.0") && text.contains("dc-a"), "{text}");
        let markdown = report.markdown();
        assert!(markdown.contains("| 0 | dc-a | put | - | ok | 1.500 | 3.0 | 1.0 | 0 | 0 | 3 | 0 | - |"), "{markdown}");
        report.checks.push(Check::new("x", false, "no"));
        report.finish();
        assert!(!report.passed);
        report.checks.clear();
        report.finish();
        assert!(!report.passed);
    }
}
