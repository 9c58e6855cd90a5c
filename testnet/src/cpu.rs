//! How busy the machine's CPUs were over a stretch of a trial, from `/proc/stat`.
//!
//! Why: every daemon, moto, the testnet and the kernel's emulated links share the machine.
//! When its cores are nearly all busy during the reads, the measured time says as much about
//! the machine as about the links and the protocol, and the report should say so.

use serde::Serialize;

/// Above this share of the machine's CPU time busy, the report notes that the CPU, not only
/// the links, may have set the pace.
pub const BUSY_NOTE_AT: f64 = 0.9;

/// Aggregate CPU time counters of the machine (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Ticks spent working (user, nice, system, irq, softirq, steal).
    busy: u64,
    /// Ticks in total (busy plus idle and iowait).
    total: u64,
    /// Online CPUs (the `cpuN` lines).
    cores: usize,
}

/// The machine's CPU use over a stretch of the trial.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MachineCpu {
    /// CPUs the machine has.
    pub cores: usize,
    /// Share of all cores' time that was busy (0 to 1).
    pub busy_fraction: f64,
}

impl CpuTimes {
    /// Reads `/proc/stat` now (None where it cannot be read, e.g. not Linux).
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Parses the text of `/proc/stat`.
    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let first = lines.next()?;
        let mut fields = first.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let values: Vec<u64> = fields.map(str::parse).collect::<Result<_, _>>().ok()?;
        let at = |index: usize| values.get(index).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
        let total = busy + at(3) + at(4);
        let cores = text
            .lines()
            .filter(|line| line.strip_prefix("cpu").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())))
            .count();
        Some(Self { busy, total, cores })
    }

    /// The machine's CPU use from `self` until `later`.
    pub fn until(self, later: Self) -> Option<MachineCpu> {
        let total = later.total.checked_sub(self.total).filter(|&total| total > 0)?;
        let busy = later.busy.saturating_sub(self.busy);
        Some(MachineCpu { cores: later.cores, busy_fraction: (busy as f64 / total as f64).min(1.0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1 2 3\nctxt 99\n";
    const AFTER: &str = "cpu  250 10 100 880 50 5 5 30 0 0\ncpu0 120 5 50 440 25 2 3 15 0 0\ncpu1 130 5 50 440 25 3 2 15 0 0\nintr 1 2 3\n";

    #[test]
    fn busy_share_counts_user_system_interrupts_and_steal_against_idle() {
        let (before, after) = (CpuTimes::parse(BEFORE).unwrap(), CpuTimes::parse(AFTER).unwrap());
        assert_eq!(before.cores, 2);
        let cpu = before.until(after).unwrap();
        // busy: 150 + 10 + 50 + 5 + 5 + 30 = 250 ticks; idle 80, iowait 0: 250 of 330.
        assert_eq!(cpu.cores, 2);
        assert!((cpu.busy_fraction - 250.0 / 330.0).abs() < 1e-9, "{cpu:?}");
    }

    #[test]
    fn no_figure_from_nonsense_or_from_no_time_passing() {
        assert!(CpuTimes::parse("").is_none());
        assert!(CpuTimes::parse("intr 1 2\n").is_none());
        assert!(CpuTimes::parse("cpu a b c\n").is_none());
        let same = CpuTimes::parse(BEFORE).unwrap();
        assert!(same.until(same).is_none(), "no ticks passed: no share");
    }
}
