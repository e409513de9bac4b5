//! How a benchmark of `tests/benches/` runs: at full size under
//! `cargo bench`, and at a small size as a test (`cargo test`, which runs
//! them too), so CI checks that every benchmark still works end to end in
//! a minute or so, in the debug build the tests already have.

/// The size a benchmark runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchSize {
    /// `cargo bench` (it passes `--bench`): the sizes docs/BENCHMARKS.md reports.
    Full,
    /// Run as a test: the same checks on a few agents and little data.
    Small,
    /// Run as a test with a name filter that does not match this benchmark
    /// (`cargo test --workspace some_test`): nothing to do.
    Skip,
}

/// The size benchmark `name` runs at, from its command line: `--bench`
/// (added by `cargo bench`) is full size; without it, a word that is not a
/// flag nor a number is a test name filter, and the benchmark runs (small)
/// only when its name contains it.
pub fn bench_size(name: &str) -> BenchSize {
    size_of(name, std::env::args().skip(1))
}

fn size_of(name: &str, args: impl Iterator<Item = String>) -> BenchSize {
    let args: Vec<String> = args.collect();
    if args.iter().any(|a| a == "--bench") {
        return BenchSize::Full;
    }
    let filters: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
        .collect();
    if filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())) {
        BenchSize::Small
    } else {
        BenchSize::Skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(args: &[&str]) -> BenchSize {
        size_of("exec_latency", args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn cargo_bench_is_full_size_and_a_test_run_small_or_filtered_out() {
        assert_eq!(size(&["--bench"]), BenchSize::Full);
        assert_eq!(size(&["1000", "3000", "--bench"]), BenchSize::Full);
        assert_eq!(size(&[]), BenchSize::Small);
        assert_eq!(size(&["--nocapture"]), BenchSize::Small);
        assert_eq!(size(&["latency"]), BenchSize::Small);
        assert_eq!(size(&["monit", "--nocapture"]), BenchSize::Skip);
    }
}
