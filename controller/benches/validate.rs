//! Benchmark: validating a cf-v170 plan of 1,000 nodes and 14 components
//! (JSON parsing, every check, and rendering every instance's templates).
//! Run with `cargo bench -p de-controller --bench validate`; the figure is
//! recorded in docs/BENCHMARKS.md. Not part of `cargo test`.

use std::time::{Duration, Instant};

use de_common::{Hardware, Usage};
use de_controller::{Cardinality, Catalogs, NodeView, validate_plan};

const NODES: usize = 1000;
const RUNS: usize = 15;

/// Addresses from 198.18.0.0/15, the range set aside for benchmarks; nothing is sent anywhere.
fn ip(i: usize) -> String {
    format!("198.18.{}.{}", i / 250, i % 250 + 1)
}

fn nodes() -> Vec<NodeView> {
    (0..NODES)
        .map(|i| NodeView {
            id: format!("n-{i:016x}"),
            hostname: format!("node{i}"),
            ips: vec![ip(i)],
            hardware: Hardware {
                cpus: 4,
                ram_mb: 16_384,
                disk_mb: 100_000,
            },
            usage: Usage::default(),
            online: true,
            last_seen: None,
            agent_version: "bench".to_owned(),
            enrolled_at: "2026-01-01T00:00:00Z".to_owned(),
            revoked: false,
            root: "/".to_owned(),
            components: Vec::new(),
            clock_skew_secs: None,
            allow_nat: false,
            source_ip: None,
            ip_mismatch: None,
            cert_not_after: None,
            identity_conflict: None,
        })
        .collect()
}

/// Each `one` component on a node of its own, the other 994 nodes spread
/// round robin over the 8 `many` components: 1,000 instances on 1,000 nodes.
fn plan(catalogs: &Catalogs, offset: usize) -> String {
    let cf = catalogs.get("cf-v170").expect("cf-v170 is built in");
    let (ones, manys): (Vec<_>, Vec<_>) = cf
        .components()
        .partition(|c| c.cardinality == Cardinality::One);
    let mut components = serde_json::Map::new();
    for (i, c) in ones.iter().enumerate() {
        components.insert(c.name.clone(), serde_json::json!([ip(i + offset)]));
    }
    let mut lists: Vec<Vec<String>> = vec![Vec::new(); manys.len()];
    for i in ones.len()..NODES {
        lists[i % manys.len()].push(ip(i + offset));
    }
    for (c, list) in manys.iter().zip(lists) {
        components.insert(c.name.clone(), serde_json::json!(list));
    }
    serde_json::json!({
        "components": components,
        "properties": {
            "domain": "cf.bench", "disksize": 15, "checkdisk": 1, "adduser": 1,
            "user": "vcap", "password": "password", "root": "123456", "home": "198.19.0.1"
        }
    })
    .to_string()
}

fn time(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let mut all: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    all.sort();
    (all[0], all[all.len() / 2])
}

fn main() {
    let catalogs = Catalogs::builtin().expect("built-in catalogs");
    let nodes = nodes();
    let valid = plan(&catalogs, 0);
    let valid_plan = validate_plan(
        valid.as_bytes(),
        &catalogs,
        &nodes,
        None,
        &Default::default(),
    )
    .expect("the plan is valid");
    assert_eq!(valid_plan.nodes.len(), NODES);
    assert_eq!(valid_plan.plan.components.len(), 14);

    let (min, median) = time(RUNS, || {
        let v = validate_plan(
            valid.as_bytes(),
            &catalogs,
            &nodes,
            None,
            &Default::default(),
        );
        assert!(v.is_ok());
    });
    println!(
        "valid plan, {NODES} nodes, 14 components, {} bytes: median {:.1} ms, min {:.1} ms ({RUNS} runs)",
        valid.len(),
        median.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3
    );

    // Every IP unknown: 1,000 problems to build and report.
    let unknown = plan(&catalogs, 2000);
    let (min, median) = time(RUNS, || {
        let v = validate_plan(
            unknown.as_bytes(),
            &catalogs,
            &nodes,
            None,
            &Default::default(),
        );
        assert_eq!(v.map_err(|p| p.len()).err(), Some(NODES));
    });
    println!(
        "invalid plan, {NODES} unknown nodes: median {:.1} ms, min {:.1} ms ({RUNS} runs)",
        median.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3
    );
}
