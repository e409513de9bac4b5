//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! lock-free counters and histograms for the hot paths, and [`Text`], which
//! writes families (`# HELP`, `# TYPE`, samples) with their labels escaped.
//!
//! Invariant: a histogram's buckets are cumulative, end with `le="+Inf"`,
//! and its `_count` equals that last bucket, even while observations race
//! with a scrape (the count is taken as the sum of the buckets read).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of a scrape.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonic count: one relaxed atomic add per event.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Durations counted into fixed buckets: one relaxed add to a bucket and
/// one to the sum per observation, no lock.
#[derive(Debug)]
pub(crate) struct Histogram {
    /// Upper bounds in seconds, ascending; `+Inf` is implied.
    bounds: &'static [f64],
    /// Per bucket (not cumulative), one more than `bounds` for `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            bounds: self.bounds,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram's values at one moment; also built directly for a
/// distribution computed at scrape time (the nodes' heartbeat ages).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds`.
    pub(crate) counts: Vec<u64>,
    pub(crate) sum: f64,
}

impl Snapshot {
    pub(crate) fn empty(bounds: &'static [f64]) -> Snapshot {
        Snapshot {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Counts one value (in seconds).
    pub(crate) fn add(&mut self, secs: f64) {
        let i = self.bounds.partition_point(|b| *b < secs);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += secs;
    }
}

/// What a family is, as `# TYPE` says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A scrape being written.
#[derive(Debug, Default)]
pub(crate) struct Text {
    out: String,
}

impl Text {
    /// Starts family `name`: its help line and its type.
    pub(crate) fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
    }

    /// One sample of the current family.
    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<f64>) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", number(value.into()));
    }

    /// The `_bucket`, `_sum` and `_count` samples of histogram `name`.
    pub(crate) fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Snapshot) {
        let mut cumulative = 0u64;
        for (i, c) in h.counts.iter().enumerate() {
            cumulative += c;
            let le = h.bounds.get(i).map_or("+Inf".to_owned(), |b| number(*b));
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", number(h.sum));
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            for ch in v.chars() {
                match ch {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

/// A value as the format writes it: integers without a fraction, `+Inf`.
fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.is_nan() {
        "NaN".to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.1, 1.0];

    #[test]
    fn a_histogram_counts_into_cumulative_buckets_with_its_sum() {
        let h = Histogram::new(BOUNDS);
        for ms in [50, 100, 500, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut t = Text::default();
        t.family("x_seconds", Kind::Histogram, "x");
        t.histogram("x_seconds", &[("lane", "deploy")], &h.snapshot());
        assert_eq!(
            t.finish(),
            "# HELP x_seconds x\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{lane=\"deploy\",le=\"0.1\"} 2\n\
             x_seconds_bucket{lane=\"deploy\",le=\"1\"} 3\n\
             x_seconds_bucket{lane=\"deploy\",le=\"+Inf\"} 4\n\
             x_seconds_sum{lane=\"deploy\"} 2.65\n\
             x_seconds_count{lane=\"deploy\"} 4\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut t = Text::default();
        t.family("v", Kind::Gauge, "a \\ b\nc");
        t.sample("v", &[("version", "1\"2\\3\n4")], 1u32);
        assert_eq!(
            t.finish(),
            "# HELP v a \\\\ b\\nc\n# TYPE v gauge\nv{version=\"1\\\"2\\\\3\\n4\"} 1\n"
        );
    }
}
