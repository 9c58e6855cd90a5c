//! Link rates of a trial and the least time the chosen rates allow: plain values, no I/O.
//!
//! Rates are bits per second with SI prefixes (`200Mbit`, `1.5Gbit`, `800kbit`, an
//! optional `/s`), the unit `tc` and network people use; byte units are refused with a
//! message, so that `100MB` cannot be read as either. Every link is symmetric: a host
//! shaped at R uploads and downloads at R each way.
//!
//! [`host_rates`] says which hosts are slow (the last `round(fraction * N)` indices, so the
//! put node 0 stays a full-rate host unless every host is slow) and [`kumar_ross`] computes
//! the minimum distribution time of Kumar and Ross (2006) for one file from seeds to
//! downloaders: `max{F / u_seeds, F / d_min, N F / (u_seeds + sum u_i)}`. An unshaped link
//! counts as infinitely fast (its term is zero).
//!
//! Non-goals: applying the rates (that is `network.rs` with `tc`, or the daemons'
//! `--upload-limit` on loopback), and latency.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The largest rate accepted, in bits per second (1 Tbit/s): more is a typo.
pub const RATE_BITS_PER_SECOND_MAX: u64 = 1_000_000_000_000;
/// The smallest rate accepted, in bits per second: below it a trial would never end.
pub const RATE_BITS_PER_SECOND_MIN: u64 = 8_000;

/// A link rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Rate {
    bits_per_second: u64,
}

impl Rate {
    /// A rate of `bits_per_second`.
    #[cfg(test)]
    pub fn from_bits_per_second(bits_per_second: u64) -> Self {
        Self { bits_per_second }
    }

    /// Bits per second.
    pub fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    /// Bytes per second (bits / 8, rounded down, at least 1).
    pub fn bytes_per_second(self) -> u64 {
        (self.bits_per_second / 8).max(1)
    }

    /// The rate as `tc` takes it (`NNNbit`, exact).
    pub fn tc(self) -> String {
        format!("{}bit", self.bits_per_second)
    }
}

impl fmt::Display for Rate {
    /// `200Mbit` style, with the largest prefix that keeps the value whole where possible.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits_per_second;
        for (unit, scale) in
            [("Tbit", 1_000_000_000_000u64), ("Gbit", 1_000_000_000), ("Mbit", 1_000_000), ("kbit", 1_000)]
        {
            if bits >= scale {
                return if bits.is_multiple_of(scale) {
                    write!(f, "{}{unit}", bits / scale)
                } else {
                    write!(f, "{}{unit}", bits as f64 / scale as f64)
                };
            }
        }
        write!(f, "{bits}bit")
    }
}

/// Why a rate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// No number, no unit, or a unit that is not a bit rate.
    #[error("{text:?} is not a rate: give bits per second with a unit, e.g. 200Mbit, 1Gbit, 1.5Gbit, 800kbit{hint}")]
    Malformed {
        /// The text given.
        text: String,
        /// A hint for byte units.
        hint: &'static str,
    },
    /// Outside the accepted range.
    #[error("{text:?} is outside {RATE_BITS_PER_SECOND_MIN}bit..={RATE_BITS_PER_SECOND_MAX}bit")]
    OutOfRange {
        /// The text given.
        text: String,
    },
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let body = trimmed.strip_suffix("/s").unwrap_or(trimmed);
        let split = body.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(body.len());
        let (number, unit) = body.split_at(split);
        let malformed = |hint| RateError::Malformed { text: text.to_string(), hint };
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "bit" | "bps" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "tbit" => 1e12,
            "b" | "kb" | "mb" | "gb" | "tb" | "kib" | "mib" | "gib" | "tib" | "byte" | "bytes" => {
                return Err(malformed(" (rates are in bits: 100MB/s is 800Mbit)"));
            }
            _ => return Err(malformed("")),
        };
        let value: f64 = number.parse().map_err(|_| malformed(""))?;
        let bits = value * scale;
        if !bits.is_finite() || bits < RATE_BITS_PER_SECOND_MIN as f64 || bits > RATE_BITS_PER_SECOND_MAX as f64 {
            return Err(RateError::OutOfRange { text: text.to_string() });
        }
        Ok(Self { bits_per_second: bits.round() as u64 })
    }
}

/// The rates asked for on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RatePlan {
    /// Every host's link, each way (None: unshaped).
    pub host: Option<Rate>,
    /// The origin's link, each way (None: unshaped).
    pub origin: Option<Rate>,
    /// The fraction of hosts that are slow (0 when none).
    pub slow_hosts_fraction: f64,
    /// The slow hosts' link, each way.
    pub slow: Option<Rate>,
}

impl RatePlan {
    /// Whether any rate is set.
    pub fn any(&self) -> bool {
        self.host.is_some() || self.origin.is_some() || (self.slow.is_some() && self.slow_hosts_fraction > 0.0)
    }
}

/// How many of `nodes` hosts are slow: `round(fraction * nodes)`.
pub fn slow_host_count(fraction: f64, nodes: usize) -> usize {
    ((fraction.clamp(0.0, 1.0) * nodes as f64).round() as usize).min(nodes)
}

/// Each host's link rate (None: unshaped): the last [`slow_host_count`] hosts get the slow
/// rate, the others the host rate.
pub fn host_rates(plan: &RatePlan, nodes: usize) -> Vec<Option<Rate>> {
    let slow = if plan.slow.is_some() { slow_host_count(plan.slow_hosts_fraction, nodes) } else { 0 };
    (0..nodes).map(|index| if index >= nodes - slow { plan.slow } else { plan.host }).collect()
}

/// The Kumar-Ross minimum and its three terms, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KumarRoss {
    /// The minimum: the largest of the three terms.
    pub seconds: f64,
    /// `F / u_seeds`: every byte must leave a seed at least once.
    pub seeds_upload_seconds: f64,
    /// `F / d_min`: the slowest downloader must receive every byte.
    pub slowest_download_seconds: f64,
    /// `N F / (u_seeds + sum u_i)`: N copies must cross the sum of all uploads.
    pub aggregate_upload_seconds: f64,
    /// Which term is the largest: `seeds_upload`, `slowest_download` or `aggregate_upload`.
    pub bound_by: &'static str,
}

/// A term of the Kumar-Ross minimum at least this share of the largest counts as binding
/// too ([`KumarRoss::also_binding`]).
pub const BINDING_TERM_SHARE: f64 = 0.9;

impl KumarRoss {
    /// Another term within [`BINDING_TERM_SHARE`] of the minimum, by name and seconds: the
    /// largest such one, if any.
    ///
    /// Why: when two terms are (nearly) equal, no link has slack. With hosts' links as fast as
    /// the origin's, for example, the minimum is reached only if the origin sends and every
    /// host receives at full rate from the first second to the last, and a host that falls
    /// behind cannot catch up: the new bytes it lacks arrive no faster than its link. Measured
    /// ratios are then well above those of links with room to spare (docs/testnet.md).
    pub fn also_binding(&self) -> Option<(&'static str, f64)> {
        [
            ("seeds_upload", self.seeds_upload_seconds),
            ("slowest_download", self.slowest_download_seconds),
            ("aggregate_upload", self.aggregate_upload_seconds),
        ]
        .into_iter()
        .filter(|(name, seconds)| *name != self.bound_by && *seconds >= BINDING_TERM_SHARE * self.seconds)
        .fold(None, |best: Option<(&'static str, f64)>, term| match best {
            Some(best) if best.1 >= term.1 => Some(best),
            _ => Some(term),
        })
    }
}

/// One host that must download the file: its link rates, None when unshaped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Downloader {
    /// Its upload rate.
    pub upload: Option<Rate>,
    /// Its download rate.
    pub download: Option<Rate>,
}

/// Bytes per second, infinite when unshaped.
fn bytes_per_second(rate: Option<Rate>) -> f64 {
    rate.map_or(f64::INFINITY, |rate| rate.bits_per_second() as f64 / 8.0)
}

/// The Kumar-Ross minimum time to get `file_bytes` from the seeds (which hold it all at the
/// start: the origin, and the node that put it) to every downloader. None when there is no
/// downloader or no finite term (nothing shaped).
pub fn kumar_ross(file_bytes: u64, seeds: &[Option<Rate>], downloaders: &[Downloader]) -> Option<KumarRoss> {
    if downloaders.is_empty() || seeds.is_empty() {
        return None;
    }
    let file = file_bytes as f64;
    let seeds_upload: f64 = seeds.iter().map(|rate| bytes_per_second(*rate)).sum();
    let download_min = downloaders.iter().map(|host| bytes_per_second(host.download)).fold(f64::INFINITY, f64::min);
    let uploads: f64 = seeds_upload + downloaders.iter().map(|host| bytes_per_second(host.upload)).sum::<f64>();
    let terms = [
        ("seeds_upload", file / seeds_upload),
        ("slowest_download", file / download_min),
        ("aggregate_upload", downloaders.len() as f64 * file / uploads),
    ];
    let (bound_by, seconds) =
        terms.iter().copied().fold(("", 0.0), |best, term| if term.1 > best.1 { term } else { best });
    if seconds <= 0.0 || !seconds.is_finite() {
        return None;
    }
    Some(KumarRoss {
        seconds,
        seeds_upload_seconds: terms[0].1,
        slowest_download_seconds: terms[1].1,
        aggregate_upload_seconds: terms[2].1,
        bound_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(text: &str) -> Rate {
        text.parse().unwrap()
    }

    #[test]
    fn parses_bit_rates_and_refuses_byte_units() {
        // Goal: rates read as bits per second with SI prefixes; bytes are refused, not guessed.
        assert_eq!(rate("200Mbit").bits_per_second(), 200_000_000);
        assert_eq!(rate("1Gbit/s").bits_per_second(), 1_000_000_000);
        assert_eq!(rate("1.5gbit").bits_per_second(), 1_500_000_000);
        assert_eq!(rate(" 800kbit ").bits_per_second(), 800_000);
        assert_eq!(rate("200Mbit").bytes_per_second(), 25_000_000);
        assert_eq!(rate("200Mbit").tc(), "200000000bit");
        assert_eq!(rate("200Mbit").to_string(), "200Mbit");
        assert_eq!(rate("1.5Gbit").to_string(), "1.5Gbit");
        let error = "100MB/s".parse::<Rate>().unwrap_err().to_string();
        assert!(error.contains("rates are in bits"), "{error}");
        assert!("100".parse::<Rate>().is_err());
        assert!("Mbit".parse::<Rate>().is_err());
        assert!("fastMbit".parse::<Rate>().is_err());
        assert!(matches!("2Tbit".parse::<Rate>(), Err(RateError::OutOfRange { .. })));
        assert!(matches!("1bit".parse::<Rate>(), Err(RateError::OutOfRange { .. })));
    }

    #[test]
    fn slow_hosts_are_the_last_ones() {
        // Goal: half of 4 hosts slow means hosts 2 and 3; node 0 keeps the host rate.
        let plan =
            RatePlan { host: Some(rate("1Gbit")), origin: None, slow_hosts_fraction: 0.5, slow: Some(rate("250Mbit")) };
        let rates = host_rates(&plan, 4);
        assert_eq!(rates, vec![plan.host, plan.host, plan.slow, plan.slow]);
        assert_eq!(host_rates(&RatePlan { slow: None, ..plan }, 3), vec![plan.host; 3]);
        assert_eq!(slow_host_count(0.25, 1), 0);
        assert_eq!(slow_host_count(1.0, 5), 5);
    }

    #[test]
    fn kumar_ross_takes_the_largest_term() {
        // Goal: each of the three terms can be the bound, and unshaped links count as infinite.
        let mbit = |n: u64| Some(Rate::from_bits_per_second(n * 1_000_000));
        let host = |n| Downloader { upload: mbit(n), download: mbit(n) };
        let file = 100_000_000; // 100 MB = 800 Mbit
        // A slow origin alone: 800 Mbit / 100 Mbit/s = 8 s.
        let only_origin = kumar_ross(file, &[mbit(100)], &[host(1000)]).unwrap();
        assert_eq!(only_origin.bound_by, "seeds_upload");
        assert!((only_origin.seconds - 8.0).abs() < 1e-9);
        // A slow downloader: 800 Mbit / 200 Mbit/s = 4 s.
        let slow = kumar_ross(file, &[mbit(1000)], &[host(1000), host(200)]).unwrap();
        assert_eq!(slow.bound_by, "slowest_download");
        assert!((slow.seconds - 4.0).abs() < 1e-9);
        // Eight hosts uploading at 100 Mbit/s (downloading at 1 Gbit/s) and a 200 Mbit/s
        // origin: 8 x 800 Mbit / 1000 Mbit/s = 6.4 s, above 800 / 200 = 4 s.
        let asymmetric = Downloader { upload: mbit(100), download: mbit(1000) };
        let swarm = kumar_ross(file, &[mbit(200)], &[asymmetric; 8]).unwrap();
        assert_eq!(swarm.bound_by, "aggregate_upload");
        assert!((swarm.seconds - 6.4).abs() < 1e-9);
        assert!((swarm.seeds_upload_seconds - 4.0).abs() < 1e-9);
        // Unshaped everything: no bound.
        assert_eq!(kumar_ross(file, &[None], &[Downloader { upload: None, download: None }]), None);
        assert_eq!(kumar_ross(file, &[mbit(100)], &[]), None);
    }

    #[test]
    fn terms_within_a_tenth_of_the_minimum_also_bind() {
        // Goal: hosts as fast as the origin leave no slack (two terms equal); hosts twice as
        // fast leave room; hosts 5% faster than the origin leave too little to count.
        let mbit = |n: u64| Some(Rate::from_bits_per_second(n * 1_000_000));
        let host = |n| Downloader { upload: mbit(n), download: mbit(n) };
        let file = 100_000_000;
        let equal = kumar_ross(file, &[mbit(100)], &[host(100); 16]).unwrap();
        assert_eq!(equal.bound_by, "seeds_upload");
        assert_eq!(equal.also_binding(), Some(("slowest_download", equal.seconds)));
        let faster_hosts = kumar_ross(file, &[mbit(100)], &[host(200); 16]).unwrap();
        assert_eq!(faster_hosts.bound_by, "seeds_upload");
        assert_eq!(faster_hosts.also_binding(), None);
        // 8 hosts at 105 Mbit/s: F / d_min is 0.95 of F / u_seeds (binding); the aggregate
        // term, 8 x 8 s / (100 + 840) Mbit/s = 6.8 s, is not.
        let close = kumar_ross(file, &[mbit(100)], &[host(105); 8]).unwrap();
        let (name, seconds) = close.also_binding().unwrap();
        assert_eq!(name, "slowest_download");
        assert!((seconds - 800.0 / 105.0).abs() < 1e-9);
    }
}
