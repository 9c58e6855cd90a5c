//! A reader of the Prometheus text a node serves on `GET /metrics`.
//!
//! Only what the report needs: samples as (name, labels, value), sums over label subsets,
//! and differences between two readings. A counter never incremented may be absent and
//! reads as 0. A line it cannot read is an error naming the line, not a panic: the
//! exposition is input from a process under test.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample.
    pub samples: Vec<Sample>,
}

/// A line of the exposition that is not valid Prometheus text.
#[derive(Debug, thiserror::Error)]
#[error("cannot read metrics line {line:?}: {reason}")]
pub struct MetricsError {
    line: String,
    reason: &'static str,
}

impl Metrics {
    /// Parses Prometheus text format (comments and blank lines skipped).
    pub fn parse(text: &str) -> Result<Self, MetricsError> {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason| MetricsError { line: line.to_string(), reason };
            let (name, labels, rest) = match line.find('{') {
                Some(open) => {
                    let close = line.rfind('}').ok_or_else(|| error("unbalanced labels"))?;
                    if close < open {
                        return Err(error("unbalanced labels"));
                    }
                    let labels = parse_labels(&line[open + 1..close]).ok_or_else(|| error("bad labels"))?;
                    (&line[..open], labels, &line[close + 1..])
                }
                None => {
                    let space = line.find(' ').ok_or_else(|| error("no value"))?;
                    (&line[..space], BTreeMap::new(), &line[space..])
                }
            };
            let value = match rest.split_whitespace().next().ok_or_else(|| error("no value"))? {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                text => text.parse().map_err(|_| error("bad value"))?,
            };
            samples.push(Sample { name: name.to_string(), labels, value });
        }
        Ok(Self { samples })
    }

    /// Sum of the samples named `name` whose labels include all of `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|sample| sample.name == name)
            .filter(|sample| {
                labels.iter().all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|sample| sample.value)
            .sum()
    }

    /// `sum` as a whole count (counters of bytes and events).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.sum(name, labels).max(0.0) as u64
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|sample| sample.name == name)
    }

    /// Every counter (`*_total`) as `name{labels}` -> value, for diffs in the report.
    pub fn counters(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for sample in self.samples.iter().filter(|sample| sample.name.ends_with("_total")) {
            let labels: Vec<String> = sample.labels.iter().map(|(key, value)| format!("{key}=\"{value}\"")).collect();
            let key = if labels.is_empty() {
                sample.name.clone()
            } else {
                format!("{}{{{}}}", sample.name, labels.join(","))
            };
            *out.entry(key).or_insert(0.0) += sample.value;
        }
        out
    }
}

/// `after - before` for every counter of `after` that changed.
pub fn counter_deltas(before: &Metrics, after: &Metrics) -> BTreeMap<String, f64> {
    let before = before.counters();
    after
        .counters()
        .into_iter()
        .map(|(key, value)| {
            let delta = value - before.get(&key).copied().unwrap_or(0.0);
            (key, delta)
        })
        .filter(|(_, delta)| *delta != 0.0)
        .collect()
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let equals = rest.find('=')?;
        let key = rest[..equals].trim().to_string();
        let after = rest[equals + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((index, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(index);
                    break;
                }
                other => value.push(other),
            }
        }
        labels.insert(key, value);
        rest = after[end? + 1..].trim_start().trim_start_matches(',').trim_start();
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_labelled_bare_and_absent_series_and_diffs_them() {
        // Goal: labelled and bare samples parse, absent series sum to 0, and counter deltas
        // list only what changed.
        let before = Metrics::parse("a_total{source=\"local\"} 12\nb 4.5\n").unwrap();
        let text = "# TYPE a counter\na_total{source=\"local\"} 12\na_total{source=\"peer\",x=\"a,b\"} 3\nb 4.5\nh_bucket{le=\"+Inf\"} 2\n";
        let after = Metrics::parse(text).unwrap();
        assert_eq!(after.sum("a_total", &[("source", "local")]), 12.0);
        assert_eq!(after.sum("a_total", &[]), 15.0);
        assert_eq!(after.count("a_total", &[("x", "a,b")]), 3);
        assert_eq!(after.sum("h_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(after.sum("missing_total", &[]), 0.0);
        let deltas = counter_deltas(&before, &after);
        assert_eq!(deltas.len(), 1, "{deltas:?}");
        assert_eq!(deltas.get("a_total{source=\"peer\",x=\"a,b\"}"), Some(&3.0));
    }

    #[test]
    fn refuses_lines_it_cannot_read() {
        // Goal: malformed input is an error, not a panic.
        assert!(Metrics::parse("a_total{source=\"x\" 1").is_err());
        assert!(Metrics::parse("a_total").is_err());
        assert!(Metrics::parse("a_total{source=x} 1").is_err());
        assert!(Metrics::parse("a_total 1.x").is_err());
    }
}
