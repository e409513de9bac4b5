//! Benchmark: plan-to-done time of a deployment on N real agents (10 and 30,
//! on loopback addresses, private monit each): a catalog of two components
//! (`base` on every node with a script, a monit check and a monit start;
//! `app` after it on every node with two scripts), so 5 steps per node in two
//! ordered groups. Measures `GET /deployment-engine/deploy` until the
//! deployment is `succeeded`. Run with
//! `cargo bench -p de-tests --bench deploy_plan`; figures in docs/BENCHMARKS.md.
//! As a test (`cargo test`): 2 nodes.

use std::time::{Duration, Instant};

use anyhow::Result;
use de_common::api::DeployState;
use de_tests::{
    BenchSize, TestAgent, TestController, bench_size, supervised_sleeper, wait_until, write_catalog,
};

const APP: &str = r#"
description = "app"
cardinality = "many"
after = ["base"]
monit_check = '''
check process app with pidfile {{ path("run/app.pid") }}
'''
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1
[[install]]
action = "script"
run = 'echo app one'
[[install]]
action = "script"
run = 'echo app two'
"#;

fn run(n: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(
        &data,
        "bench",
        "description = \"bench\"\nentry = \"app\"\n",
        &[("base", &supervised_sleeper("base")), ("app", APP)],
    )?;
    let ctl = TestController::start(&data)?;
    let code = ctl.new_code(None)?;
    let mut agents = Vec::new();
    let mut ips = Vec::new();
    for i in 0..n {
        let ip = format!("127.0.{}.{}", 80 + i / 200, 1 + i % 200);
        let mut a = TestAgent::new(dir.path(), &ip)?.with_private_monit();
        let out = a.enroll(&ctl.quic, &code)?;
        anyhow::ensure!(out.status.success(), "enrol {ip}: {}", out.stderr);
        a.start(5)?;
        agents.push(a);
        ips.push(ip);
    }
    wait_until(Duration::from_secs(120), "all agents online", || {
        ctl.nodes()
            .ok()
            .filter(|ns| ns.iter().filter(|x| x.online).count() == n)
    })?;
    let plan = serde_json::json!({
        "components": {"base": ips, "app": ips},
        "properties": {"domain": "bench.test", "catalog": "bench"},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "{}", a.body);
    let t = Instant::now();
    let id = ctl.deploy()?.id;
    let d = ctl.finished(&id, Duration::from_secs(600))?;
    let took = t.elapsed();
    anyhow::ensure!(d.state == DeployState::Succeeded, "{:?}", d.error);
    println!(
        "plan to done, {n:>2} nodes, {} steps: {:>7.2} s ({:.1} steps/s)",
        d.steps_total,
        took.as_secs_f64(),
        d.steps_total as f64 / took.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let sizes: &[usize] = match bench_size("deploy_plan") {
        BenchSize::Full => &[10, 30],
        BenchSize::Small => &[2],
        BenchSize::Skip => return Ok(()),
    };
    for &n in sizes {
        run(n)?;
    }
    Ok(())
}
