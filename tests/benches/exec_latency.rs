//! Benchmark: round-trip latency of `POST /api/v1/exec` (queue a signed step,
//! agents long-poll it, run `true`, report back) on 1, 10 and 50 real agents
//! on loopback addresses. Run with `cargo bench -p de-tests --bench exec_latency`;
//! figures go to docs/BENCHMARKS.md. As a test (`cargo test`): 1 and 3
//! agents, 3 rounds.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use de_tests::{BenchSize, TestAgent, TestController, bench_size, wait_until};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run(n: usize, rounds: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let code = ctl.new_code(None)?;
    let mut agents = Vec::new();
    for i in 0..n {
        let ip = format!("127.0.{}.{}", 60 + i / 200, 1 + i % 200);
        let mut a = TestAgent::new(dir.path(), &ip)?;
        let out = a.enroll(&ctl.quic, &code)?;
        anyhow::ensure!(out.status.success(), "enrol {ip}: {}", out.stderr);
        a.start(5)?;
        agents.push(a);
    }
    wait_until(Duration::from_secs(120), "all agents online", || {
        ctl.nodes()
            .ok()
            .filter(|ns| ns.iter().filter(|n| n.online).count() == n)
    })?;
    let body = r#"{"script": "true", "timeout_secs": 30}"#;
    // One warm-up round.
    ctl.api("POST", "/api/v1/exec", Some(body))?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let a = ctl.api("POST", "/api/v1/exec", Some(body))?;
        times.push(t.elapsed());
        let ok = a
            .body
            .as_array()
            .context("array")?
            .iter()
            .filter(|r| r["exit_code"] == 0)
            .count();
        anyhow::ensure!(ok == n, "only {ok} of {n} agents answered: {}", a.body);
    }
    times.sort();
    println!(
        "exec round trip, {n:>2} agents, {rounds} rounds: p50 {:>7.1} ms  p95 {:>7.1} ms  max {:>7.1} ms",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.95).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    Ok(())
}

fn main() -> Result<()> {
    let (sizes, rounds): (&[usize], usize) = match bench_size("exec_latency") {
        BenchSize::Full => (&[1, 10, 50], 30),
        BenchSize::Small => (&[1, 3], 3),
        BenchSize::Skip => return Ok(()),
    };
    for &n in sizes {
        run(n, rounds)?;
    }
    Ok(())
}
