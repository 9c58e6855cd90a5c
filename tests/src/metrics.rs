//! A reader of the Prometheus text the daemon serves on `GET /metrics`.
//!
//! Only what tests need: series as (name, labels, value), and sums over label subsets. A
//! counter that was never incremented may be absent; [`Metrics::sum`] reads it as 0.

use std::collections::BTreeMap;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`/`_sum`/`_count` for histograms).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The raw text, for failure messages.
    pub text: String,
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus text format (comments skipped; panics on a line it cannot read).
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, rest) = match line.find('{') {
                Some(_) => {
                    let close = line.rfind('}').unwrap_or_else(|| panic!("unbalanced labels in {line:?}"));
                    (&line[..close + 1], line[close + 1..].trim())
                }
                None => {
                    let space = line.find(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
                    (&line[..space], line[space..].trim())
                }
            };
            let value_text = rest.split_whitespace().next().unwrap_or_else(|| panic!("no value in {line:?}"));
            let value = match value_text {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                text => text.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.find('{') {
                Some(open) => (&series[..open], parse_labels(&series[open + 1..series.len() - 1])),
                None => (series, BTreeMap::new()),
            };
            samples.push(Sample { name: name.to_string(), labels, value });
        }
        Self { text: text.to_string(), samples }
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

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|sample| sample.name == name)
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let equals = rest.find('=').unwrap_or_else(|| panic!("bad labels {text:?}"));
        let key = rest[..equals].trim().to_string();
        let after = rest[equals + 1..].trim_start();
        assert!(after.starts_with('"'), "bad labels {text:?}");
        let mut value = String::new();
        let mut chars = after[1..].char_indices();
        let mut end = None;
        while let Some((index, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(index + 1);
                    break;
                }
                other => value.push(other),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated label value in {text:?}"));
        labels.insert(key, value);
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim_start();
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_histograms_and_absent_series() {
        // Goal: the parser reads labelled and bare samples, and absent series sum to 0.
        let text = "# TYPE a counter\na_total{source=\"local\"} 12\na_total{source=\"origin\",x=\"a,b\"} 3\nb 4.5\nh_bucket{le=\"+Inf\"} 2\n";
        let metrics = Metrics::parse(text);
        assert_eq!(metrics.sum("a_total", &[("source", "local")]), 12.0);
        assert_eq!(metrics.sum("a_total", &[]), 15.0);
        assert_eq!(metrics.sum("a_total", &[("x", "a,b")]), 3.0);
        assert_eq!(metrics.sum("b", &[]), 4.5);
        assert_eq!(metrics.sum("h_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(metrics.sum("missing_total", &[]), 0.0);
    }
}
