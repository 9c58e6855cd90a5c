//! The report's charts, as SVG files beside `report.md`: when each reader finished
//! ([`COMPLETION_CDF_FILE`]), where each node's bytes came from ([`BYTES_BY_SOURCE_FILE`]),
//! and how fast the fleet received over time ([`THROUGHPUT_FILE`]).
//!
//! Drawn with plotters' SVG backend and no font feature: text is written as SVG `<text>`
//! and laid out by whatever shows the file; plotters only estimates text sizes (no font
//! files, no bitmaps, no system libraries), which is enough to place ticks and labels.
//!
//! What it deliberately does not do: measure anything. Every figure comes from the
//! [`Report`] (rows, their progress series, the Kumar-Ross figure), so a chart can be
//! redrawn from `report.json` and never disagrees with the table.
//!
//! Invariants: every chart is drawn whatever the report holds (no rows, one node, no
//! completed read, every time zero); when there is nothing to plot the chart says so where
//! the plot would be. Rates are 10^6 bytes per second (as the table's `MB/s`); bytes are
//! MiB (as the table's columns); times are seconds from the common start.

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::links::LinksReport;
use crate::report::{BySource, NodeRow, Report};
use crate::transfer::PROGRESS_SAMPLE_INTERVAL;

/// The completion-time CDF.
pub const COMPLETION_CDF_FILE: &str = "completion-cdf.svg";
/// Bytes by source per node.
pub const BYTES_BY_SOURCE_FILE: &str = "bytes-by-source.svg";
/// Aggregate throughput over time.
pub const THROUGHPUT_FILE: &str = "throughput.svg";
/// The origin's upload and each host's download over time, from the links' counters.
pub const LINKS_FILE: &str = "links.svg";

/// Every chart's size.
const CHART_WIDTH_PIXELS: u32 = 960;
const CHART_HEIGHT_PIXELS: u32 = 560;
/// The most time bins of the throughput chart; bins are never narrower than the progress
/// series' own interval ([`PROGRESS_SAMPLE_INTERVAL`]), so short reads get fewer.
const THROUGHPUT_BINS_MAX: usize = 200;
/// Per-node throughput lines are drawn (faintly) up to this many nodes; beyond, only the
/// aggregate, so that the file stays small and the chart readable.
const THROUGHPUT_NODE_LINES_MAX: usize = 32;
/// The time axis never spans less than this, so that a run whose times are all zero still
/// has an axis.
const AXIS_SECONDS_MIN: f64 = 0.001;
/// Room right of the last time and above the highest value, as a fraction of the span.
const AXIS_HEADROOM_FRACTION: f64 = 0.06;
/// Room above the highest value where the legend sits at the top (bars of equal height fill
/// the width, so the legend needs space of its own).
const LEGEND_HEADROOM_FRACTION: f64 = 0.4;
/// The most node labels under the bars; with more nodes every k-th is labelled.
const NODE_LABELS_MAX: u32 = 40;
/// One node's width on the bars' x axis, and the gap between two bars in the same units.
const SLOT_UNITS: u32 = 20;
const BAR_GAP_UNITS: u32 = 6;
const _: () = assert!(NODE_LABELS_MAX >= 1 && BAR_GAP_UNITS < SLOT_UNITS && SLOT_UNITS.is_multiple_of(2));
const _: () = assert!(THROUGHPUT_BINS_MAX >= 10 && THROUGHPUT_NODE_LINES_MAX >= 1);

const FONT: &str = "sans-serif";
const TITLE_FONT_SIZE: u32 = 24;
const LABEL_FONT_SIZE: u32 = 17;
const MESSAGE_FONT_SIZE: u32 = 22;

/// Okabe-Ito colours, told apart with any colour vision.
const LOCAL_COLOR: RGBColor = RGBColor(0x00, 0x9E, 0x73);
const PEER_COLOR: RGBColor = RGBColor(0x00, 0x72, 0xB2);
const HOME_COLOR: RGBColor = RGBColor(0xE6, 0x9F, 0x00);
const ORIGIN_COLOR: RGBColor = RGBColor(0xD5, 0x5E, 0x00);
const MINIMUM_COLOR: RGBColor = RGBColor(0xCC, 0x79, 0xA7);
/// Grid lines: there to read values off, not to be looked at.
const GRID_BOLD: RGBAColor = RGBAColor(0, 0, 0, 0.15);
const GRID_LIGHT: RGBAColor = RGBAColor(0, 0, 0, 0.04);

/// One chart: where it goes and what it is.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name inside the report's directory.
    pub file: &'static str,
    /// The SVG document.
    pub svg: String,
}

/// Every chart's file and the alt text `report.md` gives it, in the order it shows them.
const CHARTS: [(&str, &str); 4] = [
    (COMPLETION_CDF_FILE, "completion CDF"),
    (BYTES_BY_SOURCE_FILE, "bytes by source"),
    (THROUGHPUT_FILE, "throughput"),
    (LINKS_FILE, "link use"),
];

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {file}: {detail}")]
pub struct ChartError {
    /// The chart.
    pub file: &'static str,
    /// What plotters said.
    pub detail: String,
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Draws every chart of `report`, in [`CHARTS`] order.
pub fn render(report: &Report) -> Result<Vec<Chart>, ChartError> {
    Ok(vec![
        Chart { file: COMPLETION_CDF_FILE, svg: draw(COMPLETION_CDF_FILE, |root| completion_cdf(report, root))? },
        Chart {
            file: BYTES_BY_SOURCE_FILE,
            svg: draw(BYTES_BY_SOURCE_FILE, |root| bytes_by_source(&report.rows, root))?,
        },
        Chart { file: THROUGHPUT_FILE, svg: draw(THROUGHPUT_FILE, |root| throughput(report, root))? },
        Chart { file: LINKS_FILE, svg: draw(LINKS_FILE, |root| link_use(report.links.as_ref(), root))? },
    ])
}

/// The markdown that shows the charts (their files sit beside `report.md`).
pub fn markdown() -> String {
    let mut out = "## Charts\n".to_string();
    for (file, alt) in CHARTS {
        out.push_str(&format!("\n![{alt}]({file})\n"));
    }
    out
}

fn draw(
    file: &'static str,
    plot: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> DrawResult,
) -> Result<String, ChartError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH_PIXELS, CHART_HEIGHT_PIXELS)).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| plot(&root))
            .and_then(|()| root.present())
            .map_err(|error| ChartError { file, detail: error.to_string() })?;
    }
    Ok(svg)
}

/// The completion-time CDF's data.
#[derive(Debug, Clone, PartialEq)]
struct Completions {
    /// Completed reads' seconds, ascending.
    seconds: Vec<f64>,
    /// Rows that read (completed, failed or killed).
    readers: usize,
}

impl Completions {
    /// Readers are rows that read (result other than `-`); completed are those with a time
    /// that were not killed.
    fn of(rows: &[NodeRow]) -> Self {
        let readers: Vec<&NodeRow> = rows.iter().filter(|row| row.result != "-").collect();
        let mut seconds: Vec<f64> = readers
            .iter()
            .filter(|row| row.result != "killed")
            .filter_map(|row| row.seconds)
            .filter(|seconds| seconds.is_finite())
            .collect();
        seconds.sort_by(f64::total_cmp);
        Self { seconds, readers: readers.len() }
    }

    /// The step line: from (0, 0), up by 1/readers at each completion, on to `until`.
    fn steps(&self, until: f64) -> Vec<(f64, f64)> {
        let total = self.readers.max(1) as f64;
        let mut points = vec![(0.0, 0.0)];
        for (done, &seconds) in self.seconds.iter().enumerate() {
            points.push((seconds, done as f64 / total));
            points.push((seconds, (done + 1) as f64 / total));
        }
        let last = points[points.len() - 1].1;
        points.push((until.max(points[points.len() - 1].0), last));
        points
    }
}

fn completion_cdf(report: &Report, root: &DrawingArea<SVGBackend, Shift>) -> DrawResult {
    let completions = Completions::of(&report.rows);
    let done = completions.seconds.len();
    let minimum = report.kumar_ross.as_ref().map(|figure| figure.minimum.seconds).filter(|s| s.is_finite());
    let latest = completions.seconds.last().copied().unwrap_or(0.0).max(minimum.unwrap_or(0.0));
    let x_max = axis_max(latest, if done == 0 { 1.0 } else { AXIS_SECONDS_MIN });
    let mut title = format!("Read completion: {done} of {} reads done", completions.readers);
    if done < completions.readers {
        title.push_str(&format!(" ({} failed or killed, not shown)", completions.readers - done));
    }
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, TITLE_FONT_SIZE))
        .margin(20)
        .x_label_area_size(56)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    let decimals = tick_decimals(x_max);
    chart
        .configure_mesh()
        .x_desc("seconds from the common start (s)")
        .y_desc("fraction of readers done")
        .x_label_formatter(&|seconds| tick_label(*seconds, decimals))
        .y_label_formatter(&|fraction| format!("{fraction:.1}"))
        .axis_desc_style((FONT, LABEL_FONT_SIZE))
        .label_style((FONT, LABEL_FONT_SIZE - 2))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .draw()?;
    if done == 0 {
        return message(&chart, x_max / 2.0, 0.5, "no completed reads");
    }
    let total = completions.readers.max(1) as f64;
    chart
        .draw_series(LineSeries::new(completions.steps(x_max), PEER_COLOR.stroke_width(3)))?
        .label(format!("readers done ({done})"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], PEER_COLOR.stroke_width(3)));
    chart.draw_series(
        completions
            .seconds
            .iter()
            .enumerate()
            .map(|(index, &seconds)| Circle::new((seconds, (index + 1) as f64 / total), 4, PEER_COLOR.filled())),
    )?;
    if let Some(minimum) = minimum {
        chart
            .draw_series(DashedLineSeries::new([(minimum, 0.0), (minimum, 1.0)], 10, 6, MINIMUM_COLOR.stroke_width(2)))?
            .label(format!("Kumar-Ross minimum ({minimum:.3} s)"))
            .legend(|(x, y)| DashedPathElement::new([(x, y), (x + 20, y)], 5, 3, MINIMUM_COLOR.stroke_width(2)));
    }
    // Reads finish late rather than early, so the upper left is the emptiest corner.
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// The sources in the order their segments stack, bottom up.
const SOURCES: [(&str, RGBColor); 4] =
    [("local", LOCAL_COLOR), ("peer", PEER_COLOR), ("home", HOME_COLOR), ("origin", ORIGIN_COLOR)];

/// One node's bar segments in MiB, in [`SOURCES`] order.
fn mib_by_source(served: &BySource) -> [f64; 4] {
    [served.local, served.peer, served.home, served.origin].map(|bytes| bytes as f64 / (1024.0 * 1024.0))
}

fn bytes_by_source(rows: &[NodeRow], root: &DrawingArea<SVGBackend, Shift>) -> DrawResult {
    let without = rows.iter().filter(|row| row.bytes_served.is_none()).count();
    let highest = rows
        .iter()
        .filter_map(|row| row.bytes_served.as_ref())
        .map(|served| mib_by_source(served).iter().sum::<f64>())
        .fold(0.0, f64::max);
    let mut title = "Bytes served to each node's client, by source".to_string();
    if without > 0 {
        title.push_str(&format!(" ({without} of {} without metrics)", rows.len()));
    }
    // Row i's bar stands on [i, i + 1) of the x axis, counted in SLOT_UNITS (an integer axis,
    // so that the ticks can be placed: plotters formats no ticks of its own for it); its
    // label sits in the middle.
    let slots = rows.len().max(1) as u32;
    let every = slots.div_ceil(NODE_LABELS_MAX);
    let label_points: Vec<u32> =
        (0..slots).step_by(every as usize).map(|slot| slot * SLOT_UNITS + SLOT_UNITS / 2).collect();
    let y_max = axis_max_with(highest, 1.0, LEGEND_HEADROOM_FRACTION);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, TITLE_FONT_SIZE))
        .margin(20)
        .x_label_area_size(56)
        .y_label_area_size(72)
        .build_cartesian_2d((0..slots * SLOT_UNITS).with_key_points(label_points), 0.0..y_max)?;
    let label = |units: &u32| rows.get((units / SLOT_UNITS) as usize).map_or(String::new(), |row| row.node.to_string());
    let decimals = tick_decimals(y_max);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("node")
        .y_desc("MiB (2^20 bytes)")
        .x_label_formatter(&label)
        .y_label_formatter(&|mib| tick_label(*mib, decimals))
        .axis_desc_style((FONT, LABEL_FONT_SIZE))
        .label_style((FONT, LABEL_FONT_SIZE - 2))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .draw()?;
    if rows.iter().all(|row| row.bytes_served.is_none()) {
        return message(&chart, slots * SLOT_UNITS / 2, y_max / 2.0, "no byte counts");
    }
    let note = (FONT, LABEL_FONT_SIZE - 4).into_font().color(&BLACK.mix(0.6)).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (slot, _) in rows.iter().enumerate().filter(|(_, row)| row.bytes_served.is_none()) {
        let middle = slot as u32 * SLOT_UNITS + SLOT_UNITS / 2;
        chart.plotting_area().draw(&Text::new("n/a", (middle, 0.0), note.clone()))?;
    }
    for (layer, (name, color)) in SOURCES.into_iter().enumerate() {
        let bars = rows.iter().enumerate().filter_map(|(slot, row)| {
            let segments = mib_by_source(row.bytes_served.as_ref()?);
            let bottom: f64 = segments[..layer].iter().sum();
            let height = segments[layer];
            let left = slot as u32 * SLOT_UNITS + BAR_GAP_UNITS / 2;
            let right = (slot as u32 + 1) * SLOT_UNITS - BAR_GAP_UNITS / 2;
            (height > 0.0).then(|| Rectangle::new([(left, bottom), (right, bottom + height)], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The throughput chart's data: bytes per time bin, for all readers and for each.
#[derive(Debug, Clone, PartialEq)]
struct Throughput {
    /// Each bin's width.
    bin_seconds: f64,
    /// Bytes received in each bin by all readers.
    total: Vec<f64>,
    /// Bytes received in each bin, per row that has a progress series: (node, bins).
    per_node: Vec<(usize, Vec<f64>)>,
}

impl Throughput {
    /// Bins every row's progress series. The bytes between two samples are spread evenly
    /// over the time between them; the first sample's bytes fall in its own bin. None when
    /// no row has a sample.
    fn of(rows: &[NodeRow]) -> Option<Self> {
        let series: Vec<(usize, &[(f64, u64)])> =
            rows.iter().filter(|row| !row.progress.is_empty()).map(|row| (row.node, row.progress.as_slice())).collect();
        let end =
            series.iter().flat_map(|(_, samples)| samples.iter().map(|(seconds, _)| *seconds)).reduce(f64::max)?;
        let end = if end.is_finite() { end.max(0.0) } else { 0.0 };
        let bin_seconds = bin_seconds(end);
        let bins = ((end / bin_seconds).floor() as usize + 1).min(THROUGHPUT_BINS_MAX + 1);
        let mut total = vec![0.0; bins];
        let per_node: Vec<(usize, Vec<f64>)> = series
            .into_iter()
            .map(|(node, samples)| {
                let mut own = vec![0.0; bins];
                let bin_of = |seconds: f64| ((seconds.max(0.0) / bin_seconds) as usize).min(bins - 1);
                let mut previous: Option<(f64, u64)> = None;
                for &(seconds, bytes) in samples {
                    match previous {
                        None => own[bin_of(seconds)] += bytes as f64,
                        Some((from, before)) => {
                            spread(&mut own, bin_seconds, from, seconds, bytes.saturating_sub(before) as f64)
                        }
                    }
                    previous = Some((seconds, bytes));
                }
                for (sum, bytes) in total.iter_mut().zip(&own) {
                    *sum += bytes;
                }
                (node, own)
            })
            .collect();
        Some(Self { bin_seconds, total, per_node })
    }

    /// A step line through `bins`, in 10^6 bytes per second.
    fn steps(&self, bins: &[f64]) -> Vec<(f64, f64)> {
        let mut points = Vec::with_capacity(bins.len() * 2);
        for (index, bytes) in bins.iter().enumerate() {
            let rate = bytes / self.bin_seconds / 1e6;
            points.push((index as f64 * self.bin_seconds, rate));
            points.push(((index + 1) as f64 * self.bin_seconds, rate));
        }
        points
    }
}

/// The narrowest round bin width (1, 2, 2.5 or 5 x 10^k seconds) that covers `end` in at
/// most THROUGHPUT_BINS_MAX bins, and no narrower than the progress samples' interval.
fn bin_seconds(end: f64) -> f64 {
    let floor = PROGRESS_SAMPLE_INTERVAL.as_secs_f64();
    let wanted = (end / THROUGHPUT_BINS_MAX as f64).max(floor);
    let mut decade = 10f64.powi(wanted.log10().floor() as i32);
    loop {
        for step in [1.0, 2.0, 2.5, 5.0] {
            let width = step * decade;
            if width >= wanted * (1.0 - 1e-9) {
                return width;
            }
        }
        decade *= 10.0;
    }
}

/// Adds `bytes`, received evenly from `from` to `to`, to the bins they overlap.
fn spread(bins: &mut [f64], bin_seconds: f64, from: f64, to: f64, bytes: f64) {
    let last = bins.len() - 1;
    let bin_of = |seconds: f64| ((seconds.max(0.0) / bin_seconds) as usize).min(last);
    if to <= from {
        bins[bin_of(to)] += bytes;
        return;
    }
    let (first_bin, last_bin) = (bin_of(from), bin_of(to));
    for (bin, sum) in bins.iter_mut().enumerate().take(last_bin + 1).skip(first_bin) {
        let start = (bin as f64 * bin_seconds).max(from);
        let end = if bin == last { to } else { ((bin + 1) as f64 * bin_seconds).min(to) };
        if end > start {
            *sum += bytes * (end - start) / (to - from);
        }
    }
}

fn throughput(report: &Report, root: &DrawingArea<SVGBackend, Shift>) -> DrawResult {
    let Some(throughput) = Throughput::of(&report.rows) else {
        let mut chart = ChartBuilder::on(root)
            .caption("Throughput: no bytes received", (FONT, TITLE_FONT_SIZE))
            .margin(20)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("seconds from the common start (s)")
            .y_desc("MB/s (10^6 bytes per second)")
            .axis_desc_style((FONT, LABEL_FONT_SIZE))
            .label_style((FONT, LABEL_FONT_SIZE - 2))
            .light_line_style(GRID_LIGHT)
            .bold_line_style(GRID_BOLD)
            .draw()?;
        return message(&chart, 0.5, 0.5, "no completed reads and no bytes received");
    };
    let total = throughput.steps(&throughput.total);
    let lines = throughput.per_node.len() <= THROUGHPUT_NODE_LINES_MAX;
    let per_node: Vec<Vec<(f64, f64)>> =
        if lines { throughput.per_node.iter().map(|(_, bins)| throughput.steps(bins)).collect() } else { Vec::new() };
    let highest = total.iter().map(|(_, rate)| *rate).fold(0.0, f64::max);
    let x_max = axis_max(total.last().map_or(0.0, |(seconds, _)| *seconds), AXIS_SECONDS_MIN);
    let readers = throughput.per_node.len();
    let mut title = format!(
        "Throughput received by {readers} reader{}, {} s bins",
        if readers == 1 { "" } else { "s" },
        tick_label(throughput.bin_seconds, 3)
    );
    if !lines {
        title.push_str(&format!(" (no per-reader lines above {THROUGHPUT_NODE_LINES_MAX})"));
    }
    let y_max = axis_max_with(highest, 1.0, LEGEND_HEADROOM_FRACTION);
    let mut chart = rate_chart(root, title, x_max, y_max)?;
    faint_lines(&mut chart, per_node, "each reader")?;
    chart
        .draw_series(LineSeries::new(total, BLACK.stroke_width(2)))?
        .label("all readers")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The origin's upload and each host's download per counter interval, with the hosts'
/// link rate when all share one: how full the links were, moment by moment.
fn link_use(links: Option<&LinksReport>, root: &DrawingArea<SVGBackend, Shift>) -> DrawResult {
    let timeline = links.map(|links| links.timeline.as_slice()).unwrap_or_default();
    let megabytes = |rate: f64| rate / 1e6;
    let origin: Vec<(f64, f64)> =
        timeline.iter().filter_map(|rates| Some((rates.seconds, megabytes(rates.origin_up?)))).collect();
    let hosts = timeline.first().map_or(0, |rates| rates.nodes_down.len());
    let per_host: Vec<Vec<(f64, f64)>> = (0..hosts)
        .map(|index| {
            timeline
                .iter()
                .filter_map(|rates| Some((rates.seconds, megabytes(rates.nodes_down.get(index).copied().flatten()?))))
                .collect()
        })
        .collect();
    let host_rates: Vec<u64> = links
        .map(|links| links.nodes.iter().flatten().filter_map(|node| node.rate_bytes_per_second).collect())
        .unwrap_or_default();
    let host_rate = host_rates
        .first()
        .filter(|rate| host_rates.iter().all(|other| other == *rate))
        .map(|rate| megabytes(*rate as f64));
    let highest =
        origin.iter().chain(per_host.iter().flatten()).map(|(_, rate)| *rate).chain(host_rate).fold(0.0, f64::max);
    let x_max = axis_max(timeline.last().map_or(0.0, |rates| rates.seconds), AXIS_SECONDS_MIN);
    let y_max = axis_max_with(highest, 1.0, LEGEND_HEADROOM_FRACTION);
    let interval = links.map_or(0.0, |links| links.interval_seconds);
    let title = if timeline.is_empty() {
        "Link use: not measured".to_string()
    } else {
        format!("Link use from the links' byte counters, {} s steps", tick_label(interval, 3))
    };
    let mut chart = rate_chart(root, title, x_max, y_max)?;
    if timeline.is_empty() {
        return message(&chart, x_max / 2.0, y_max / 2.0, "links are counted on an emulated network only");
    }
    if let Some(rate) = host_rate {
        let style = MINIMUM_COLOR.stroke_width(2);
        chart
            .draw_series(LineSeries::new([(0.0, rate), (x_max, rate)], style))?
            .label(format!("host link rate ({} MB/s)", tick_label(rate, 2)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    faint_lines(&mut chart, per_host, "each host download")?;
    if !origin.is_empty() {
        let style = ORIGIN_COLOR.stroke_width(2);
        chart
            .draw_series(LineSeries::new(origin, style))?
            .label("origin upload")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

type RateChart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart of MB/s against seconds from the common start, titled and with its axes drawn.
fn rate_chart<'a>(
    root: &DrawingArea<SVGBackend<'a>, Shift>,
    title: String,
    x_max: f64,
    y_max: f64,
) -> Result<RateChart<'a>, DrawingAreaErrorKind<std::io::Error>> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, TITLE_FONT_SIZE))
        .margin(20)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    let (x_decimals, y_decimals) = (tick_decimals(x_max), tick_decimals(y_max));
    chart
        .configure_mesh()
        .x_desc("seconds from the common start (s)")
        .y_desc("MB/s (10^6 bytes per second)")
        .x_label_formatter(&|seconds| tick_label(*seconds, x_decimals))
        .y_label_formatter(&|rate| tick_label(*rate, y_decimals))
        .axis_desc_style((FONT, LABEL_FONT_SIZE))
        .label_style((FONT, LABEL_FONT_SIZE - 2))
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .draw()?;
    Ok(chart)
}

/// One faint line per node, with one legend entry for them all.
fn faint_lines(chart: &mut RateChart<'_>, lines: Vec<Vec<(f64, f64)>>, label: &str) -> DrawResult {
    let faint = PEER_COLOR.mix(0.45).stroke_width(1);
    for (index, points) in lines.into_iter().enumerate() {
        let series = chart.draw_series(LineSeries::new(points, faint))?;
        if index == 0 {
            series.label(label).legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], faint));
        }
    }
    Ok(())
}

/// Writes `text` centred at (`x`, `y`) of the chart's plot, where nothing else could be drawn.
fn message<X, Y>(
    chart: &ChartContext<SVGBackend, Cartesian2d<X, Y>>,
    x: X::ValueType,
    y: Y::ValueType,
    text: &str,
) -> DrawResult
where
    X: Ranged,
    Y: Ranged,
{
    let style = (FONT, MESSAGE_FONT_SIZE).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
    chart.plotting_area().draw(&Text::new(text.to_string(), (x, y), style))
}

fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> DrawResult
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, LABEL_FONT_SIZE - 2))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .draw()
}

/// `value` plus the usual headroom, never below `least`.
fn axis_max(value: f64, least: f64) -> f64 {
    axis_max_with(value, least, AXIS_HEADROOM_FRACTION)
}

fn axis_max_with(value: f64, least: f64, headroom_fraction: f64) -> f64 {
    if value.is_finite() { (value * (1.0 + headroom_fraction)).max(least) } else { least }
}

/// Decimals for the tick labels of an axis from 0 to `axis_max` (ticks come about a tenth
/// of the span apart), so that no two ticks read the same.
fn tick_decimals(axis_max: f64) -> usize {
    let spacing = axis_max / 10.0;
    if spacing.is_finite() && spacing > 0.0 { (-spacing.log10()).ceil().clamp(0.0, 6.0) as usize } else { 0 }
}

/// `value` with at most `decimals` decimals and no trailing zeros: `0.25`, `1`, `2.5`.
fn tick_label(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_string() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::report::KumarRossReport;
    use crate::shaping::KumarRoss;

    const MIB: u64 = 1 << 20;

    fn row(node: usize, result: &str, seconds: Option<f64>, served: Option<BySource>) -> NodeRow {
        let progress = match seconds {
            Some(seconds) => (0..=10).map(|step| (seconds * step as f64 / 10.0, 4 * MIB * step.max(1) / 10)).collect(),
            None => Vec::new(),
        };
        NodeRow {
            node,
            dc: "dc-a".into(),
            result: result.into(),
            seconds,
            bytes_served: served,
            bytes_received: if seconds.is_some() { 4 * MIB } else { 0 },
            progress,
            ..NodeRow::default()
        }
    }

    fn report(rows: Vec<NodeRow>) -> Report {
        crate::report::test_report(rows)
    }

    fn four_nodes() -> Report {
        let served = |local, peer, home, origin| Some(BySource { local, peer, home, origin });
        report(vec![
            row(0, "ok", Some(0.2), served(4 * MIB, 0, 0, 0)),
            row(1, "ok", Some(1.5), served(0, 3 * MIB, MIB, 0)),
            row(2, "failed", None, None),
            row(3, "ok", Some(1.1), served(0, 2 * MIB, MIB, MIB)),
        ])
    }

    fn chart<'a>(charts: &'a [Chart], file: &str) -> &'a str {
        &charts.iter().find(|chart| chart.file == file).expect("the chart is drawn").svg
    }

    /// The text of every `<text>` element.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|tail| Some(tail.split_once('>')?.1.split_once("</text>")?.0.trim()))
            .collect()
    }

    /// Well-formed enough: one svg element, every text closed, nothing left unescaped.
    fn assert_svg(svg: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"), "{}", &svg[svg.len().saturating_sub(200)..]);
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn every_chart_has_title_axes_and_legend() {
        // Goal: the three charts are drawn for a small fleet, each with its title, axis
        // titles with units, tick labels and legend.
        let charts = render(&four_nodes()).unwrap();
        assert_eq!(charts.len(), 4);
        for chart in &charts {
            assert_svg(&chart.svg);
        }
        let cdf = chart(&charts, COMPLETION_CDF_FILE);
        assert!(cdf.contains("3 of 4 reads done (1 failed or killed, not shown)"), "{cdf}");
        assert!(cdf.contains("seconds from the common start (s)") && cdf.contains("fraction of readers done"));
        assert!(texts(cdf).contains(&"0.5") && texts(cdf).contains(&"readers done (3)"), "{cdf}");
        let bars = chart(&charts, BYTES_BY_SOURCE_FILE);
        assert!(texts(bars).contains(&"MiB (2^20 bytes)") && texts(bars).contains(&"node"), "{bars}");
        for source in ["local", "peer", "home", "origin"] {
            assert!(texts(bars).contains(&source), "legend lacks {source}: {bars}");
        }
        assert!(bars.contains("1 of 4 without metrics"), "{bars}");
        let rates = chart(&charts, THROUGHPUT_FILE);
        assert!(rates.contains("MB/s (10^6 bytes per second)") && rates.contains("all readers"), "{rates}");
        assert!(rates.contains("each reader") && rates.contains("by 3 readers"), "{rates}");
        let links = chart(&charts, LINKS_FILE);
        assert!(links.contains("Link use: not measured"), "{links}");
        assert!(links.contains("links are counted on an emulated network only"), "{links}");
    }

    #[test]
    fn the_link_chart_draws_the_origin_each_host_and_their_rate() {
        // Goal: with counters read, one line for the origin's upload, one per host's
        // download, and the hosts' common rate as a flat line, all in the legend.
        let mut report = four_nodes();
        let readings: Vec<crate::links::Reading> = (0..4)
            .map(|step| crate::links::Reading {
                seconds: step as f64,
                origin: Some(crate::links::Counters { down: 0, up: step * 2_000_000 }),
                nodes: vec![Some(crate::links::Counters { down: step * 1_000_000, up: 0 }); 2],
            })
            .collect();
        report.links =
            crate::links::summarise(&readings, &[Some(2.0), Some(3.0)], &[], &[Some(1_250_000), Some(1_250_000)], None);
        let charts = render(&report).unwrap();
        let links = chart(&charts, LINKS_FILE);
        assert_svg(links);
        for label in ["origin upload", "each host download", "host link rate (1.25 MB/s)"] {
            assert!(texts(links).contains(&label), "legend lacks {label}: {links}");
        }
        assert!(links.contains("1 s steps"), "{links}");
        // Each line once in the plot and once in the legend; the hosts' lines share one
        // legend entry.
        let lines =
            |color: &str| links.matches(&format!("<polyline fill=\"none\" opacity=\"1\" stroke=\"{color}\"")).count();
        assert_eq!(lines("#D55E00"), 2, "origin: {links}");
        assert_eq!(lines("#CC79A7"), 2, "rate: {links}");
        assert_eq!(links.matches("stroke=\"#0072B2\"").count(), 3, "two hosts and their legend entry: {links}");
    }

    #[test]
    fn the_cdf_steps_once_per_completed_read_and_shows_the_minimum() {
        // Goal: one step (and one marker) per completed read, in time order, reaching the
        // fraction done rather than 1 when reads failed; a Kumar-Ross figure adds its line.
        let mut report = four_nodes();
        let completions = Completions::of(&report.rows);
        assert_eq!(completions, Completions { seconds: vec![0.2, 1.1, 1.5], readers: 4 });
        let steps = completions.steps(2.0);
        assert_eq!(steps.len(), 2 + 2 * 3);
        assert_eq!(steps[steps.len() - 1], (2.0, 0.75));
        assert!(steps.windows(2).all(|pair| pair[0].0 <= pair[1].0 && pair[0].1 <= pair[1].1));
        let minimum = KumarRoss {
            seconds: 0.9,
            seeds_upload_seconds: 0.3,
            slowest_download_seconds: 0.9,
            aggregate_upload_seconds: 0.5,
            bound_by: "slowest_download",
        };
        report.kumar_ross = Some(KumarRossReport {
            file_bytes: 4 * MIB,
            seeds: "origin, node 0".into(),
            downloaders: 3,
            minimum,
            measured_seconds: 1.5,
            ratio: 1.67,
        });
        let charts = render(&report).unwrap();
        let cdf = chart(&charts, COMPLETION_CDF_FILE);
        assert_eq!(cdf.matches("<circle").count(), 3, "{cdf}");
        assert!(cdf.contains("Kumar-Ross minimum (0.900 s)"), "{cdf}");
    }

    #[test]
    fn one_bar_per_node_with_metrics_stacked_by_source() {
        // Goal: each node with byte counts gets one bar, its segments stacked bottom up in
        // local, peer, home, origin order; zero segments are not drawn.
        let charts = render(&four_nodes()).unwrap();
        let bars = chart(&charts, BYTES_BY_SOURCE_FILE);
        let filled = |color: &str| bars.matches(&format!("fill=\"{color}\"")).count();
        // Bars plus the legend's swatch.
        assert_eq!(filled("#009E73"), 1 + 1, "local: {bars}");
        assert_eq!(filled("#0072B2"), 2 + 1, "peer: {bars}");
        assert_eq!(filled("#E69F00"), 2 + 1, "home: {bars}");
        assert_eq!(filled("#D55E00"), 1 + 1, "origin: {bars}");
        for node in ["0", "1", "2", "3"] {
            assert!(texts(bars).contains(&node), "no label for node {node}: {bars}");
        }
    }

    #[test]
    fn throughput_bins_add_up_to_the_bytes_received() {
        // Goal: binning keeps every byte, bins are round and never narrower than the
        // samples' interval, and there are no more than THROUGHPUT_BINS_MAX of them.
        let report = four_nodes();
        let throughput = Throughput::of(&report.rows).unwrap();
        assert_eq!(throughput.per_node.len(), 3);
        let received: f64 = throughput.total.iter().sum();
        assert!((received - 3.0 * 4.0 * MIB as f64).abs() < 1.0, "{received}");
        assert_eq!(throughput.bin_seconds, 0.05);
        assert_eq!(throughput.total.len(), 31);
        for (node, bins) in &throughput.per_node {
            let own: f64 = bins.iter().sum();
            assert!((own - 4.0 * MIB as f64).abs() < 1.0, "node {node}: {own}");
        }
        assert_eq!(bin_seconds(10.0), 0.05);
        assert_eq!(bin_seconds(30.0), 0.2);
        assert_eq!(bin_seconds(45.0), 0.25);
        assert_eq!(bin_seconds(600.0), 5.0);
        assert_eq!(bin_seconds(0.0), 0.05);
        let long = report_with_end(599.0);
        assert!(Throughput::of(&long.rows).unwrap().total.len() <= THROUGHPUT_BINS_MAX + 1);
    }

    fn report_with_end(seconds: f64) -> Report {
        report(vec![row(1, "ok", Some(seconds), None)])
    }

    #[test]
    fn empty_and_degenerate_reports_still_give_readable_charts() {
        // Goal: no rows, no completed reads, one node, and times of zero each give three
        // valid charts that say what is missing instead of failing.
        let empty = render(&report(Vec::new())).unwrap();
        for chart in &empty {
            assert_svg(&chart.svg);
        }
        assert!(chart(&empty, COMPLETION_CDF_FILE).contains("no completed reads"));
        assert!(chart(&empty, BYTES_BY_SOURCE_FILE).contains("no byte counts"));
        assert!(chart(&empty, THROUGHPUT_FILE).contains("no bytes received"));

        let all_failed =
            render(&report(vec![row(1, "failed", None, None), row(2, "killed", Some(1.0), None)])).unwrap();
        let cdf = chart(&all_failed, COMPLETION_CDF_FILE);
        assert!(cdf.contains("0 of 2 reads done") && cdf.contains("no completed reads"), "{cdf}");

        let one = render(&report(vec![row(0, "ok", Some(0.5), Some(BySource { local: MIB, ..BySource::default() }))]))
            .unwrap();
        for chart in &one {
            assert_svg(&chart.svg);
        }
        assert_eq!(chart(&one, COMPLETION_CDF_FILE).matches("<circle").count(), 1);

        let instant = render(&report(vec![row(0, "ok", Some(0.0), None), row(1, "ok", Some(0.0), None)])).unwrap();
        for chart in &instant {
            assert_svg(&chart.svg);
        }
        assert!(chart(&instant, COMPLETION_CDF_FILE).contains("2 of 2 reads done"));
    }

    #[test]
    fn the_markdown_shows_every_chart_written() {
        // Goal: report.md shows each chart written beside it, and only those.
        let markdown = markdown();
        let charts = render(&four_nodes()).unwrap();
        assert_eq!(markdown.matches("![").count(), charts.len(), "{markdown}");
        for chart in &charts {
            assert!(markdown.contains(&format!("]({})", chart.file)), "{markdown}");
        }
        assert!(markdown.contains("![completion CDF](completion-cdf.svg)"), "{markdown}");
    }
}
