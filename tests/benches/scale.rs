//! Benchmark: one release controller under N simulated agents (`de-sim`,
//! one process, each agent on its own loopback address 127.30.x.y, 5 s
//! heartbeats). Measures, per N: enrolment until all are online; the
//! controller's RSS and CPU over 60 s idle; `dectl exec 'echo hi'` to all,
//! whole process, with the UDP datagrams it took per node; a deployment of 5 steps on each of up to 1,000 nodes
//! (steps/s); and the controller SIGKILLed and restarted until all are
//! back online. Run with
//! `DE_QUIET_LOGS=1 cargo bench -p de-tests --bench scale -- 1000 10000`
//! (default 1000; `DE_SCALE_DIR=DIR` keeps the enrolled cluster for the
//! next run); figures in docs/BENCHMARKS.md. As a test (`cargo test`): 20
//! agents, 3 s idle.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use de_common::api::DeployState;
use de_tests::{
    BenchSize, TestController, bench_size, bin, command, spawn, wait_until, write_catalog,
};

/// The nodes a deployment is planned on, at most.
const DEPLOY_NODES: usize = 1000;

/// Five script steps per node.
const APP: &str = r#"
description = "five steps"
cardinality = "many"
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
run = 'echo one'
[[install]]
action = "script"
run = 'echo two'
[[install]]
action = "script"
run = 'echo three'
[[install]]
action = "script"
run = 'echo four'
[[install]]
action = "script"
run = 'echo five'
"#;

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which ends with the last ')').
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks()? as f64)
}

fn clock_ticks() -> Result<u64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// A line of /proc/PID/status in MiB (VmRSS, VmHWM).
fn status_mib(pid: u32, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
}

fn online(ctl: &TestController) -> usize {
    ctl.nodes()
        .map(|ns| ns.iter().filter(|n| n.online).count())
        .unwrap_or(0)
}

/// This machine's UDP counters (`/proc/net/snmp`): datagrams delivered to
/// a socket, and those dropped because a socket's receive buffer was full.
/// Only this bench's processes talk UDP on loopback meanwhile, so the
/// change over an exec is that exec's traffic, both ways.
fn udp_counters() -> Option<(u64, u64)> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let field = |name: &str| {
        let at = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(at)?.parse::<u64>().ok()
    };
    Some((field("InDatagrams")?, field("RcvbufErrors")?))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn run(n: usize, idle: Duration) -> Result<()> {
    let wait = Duration::from_secs(120 + n as u64 / 10);
    // `DE_SCALE_DIR=DIR` keeps the controller's data and de-sim's
    // identities in DIR/N: a second run starts from an enrolled cluster
    // (the agents reconnect instead of enrolling), which makes the steps
    // after enrolment quick to measure again at 10,000.
    let tmp;
    let (root, ports) = match std::env::var_os("DE_SCALE_DIR") {
        Some(d) => {
            let root = std::path::PathBuf::from(d).join(n.to_string());
            std::fs::create_dir_all(&root)?;
            // Fixed ports: the saved identities name this controller.
            (root, ("127.0.31.1:50310", "127.0.31.1:50311"))
        }
        None => {
            tmp = tempfile::tempdir()?;
            (tmp.path().to_owned(), ("127.0.31.1:0", "127.0.31.1:0"))
        }
    };
    let data = root.join("data");
    let again = data.join("admin.token").exists();
    write_catalog(
        &data,
        "bench",
        "description = \"bench\"\nentry = \"app\"\n",
        &[("app", APP)],
    )?;
    let ctl = TestController::start_on(&data, ports.0, ports.1)?;
    let code = ctl.new_code(None)?;
    println!(
        "== {n} simulated agents{} (load average at start: {})",
        if again {
            ", enrolled by an earlier run: they reconnect"
        } else {
            ""
        },
        loadavg()
    );

    let t = Instant::now();
    let mut cmd = command("de-sim");
    cmd.args([
        "--controller",
        &ctl.quic.to_string(),
        "--code",
        &code,
        "--agents",
        &n.to_string(),
        "--first-ip",
        "127.30.0.1",
        "--heartbeat-secs",
        "5",
        "--state-dir",
    ])
    .arg(root.join("sim"));
    let (sim, lines) = spawn("de-sim", cmd, &root.join("sim.log"))?;
    let want = format!("all {n} agents online");
    loop {
        let left = wait.saturating_sub(t.elapsed());
        if lines
            .recv_timeout(left)
            .context("de-sim never said all are online")?
            == want
        {
            break;
        }
    }
    let sim_said = t.elapsed();
    wait_until(wait, "every node online", || {
        (online(&ctl) == n).then_some(())
    })?;
    println!(
        "enrolled and online: {:.1} s ({:.1} s until de-sim saw the last Welcome; {:.0} enrolments/s)",
        t.elapsed().as_secs_f64(),
        sim_said.as_secs_f64(),
        n as f64 / sim_said.as_secs_f64()
    );

    // Idle: let the enrolment burst settle, then `idle` of heartbeats
    // (measuring idle cost is this bench's point: the sleeps are the measurement).
    std::thread::sleep(idle / 6);
    let (c0, s0, t0) = (
        cpu_secs(ctl.proc.pid())?,
        cpu_secs(sim.pid())?,
        Instant::now(),
    );
    std::thread::sleep(idle);
    let secs = t0.elapsed().as_secs_f64();
    let ctl_cpu = (cpu_secs(ctl.proc.pid())? - c0) / secs * 100.0;
    let sim_cpu = (cpu_secs(sim.pid())? - s0) / secs * 100.0;
    println!(
        "idle {} s, 5 s heartbeats: controller CPU {ctl_cpu:.1} % of a core, RSS {:.1} MiB (peak {:.1} MiB); de-sim CPU {sim_cpu:.1} %, RSS {:.1} MiB; {} online",
        idle.as_secs(),
        status_mib(ctl.proc.pid(), "VmRSS:").unwrap_or(0.0),
        status_mib(ctl.proc.pid(), "VmHWM:").unwrap_or(0.0),
        status_mib(sim.pid(), "VmRSS:").unwrap_or(0.0),
        online(&ctl),
    );

    // dectl exec to all, whole process.
    let token = data.join("admin.token");
    let mut times = Vec::new();
    for _ in 0..3 {
        let udp = udp_counters();
        let t = Instant::now();
        let out = Command::new(bin("dectl"))
            .arg("--controller")
            .arg(ctl.base_url())
            .arg("--token-file")
            .arg(&token)
            .args(["exec", "echo hi"])
            .output()?;
        let took = t.elapsed();
        // Datagrams per node (probe timeouts show up here: a quiet exec
        // moves 6 to 7 per node) and receive-buffer drops.
        let traffic = udp.zip(udp_counters()).map_or_else(String::new, |(a, b)| {
            format!(
                " ({:.1} datagrams per node, {} dropped)",
                b.0.saturating_sub(a.0) as f64 / n as f64,
                b.1.saturating_sub(a.1)
            )
        });
        times.push(format!("{:.0} ms{traffic}", took.as_secs_f64() * 1e3));
        let answered = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("== ") && l.contains(": exit 0"))
            .count();
        ensure!(
            out.status.success() && answered == n,
            "dectl exec: {answered} of {n} answered exit 0: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "dectl exec 'echo hi' to all {n}, whole process: {}",
        times.join(", ")
    );

    // A deployment: 5 steps on each of (at most) 1,000 nodes, the issue's
    // scenario; at 10,000 agents the other 9,000 stay linked meanwhile.
    let mut ips: Vec<String> = ctl.nodes()?.into_iter().flat_map(|x| x.ips).collect();
    ips.truncate(DEPLOY_NODES);
    let plan = serde_json::json!({
        "components": {"app": ips},
        "properties": {"domain": "bench.test", "catalog": "bench"},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    ensure!(a.status == 201, "plan: {}", a.body);
    let t = Instant::now();
    let id = ctl.deploy()?.id;
    let d = ctl.finished(&id, Duration::from_secs(3600))?;
    let took = t.elapsed();
    ensure!(d.state == DeployState::Succeeded, "{:?}", d.error);
    println!(
        "deployment, {} of the {n} nodes, {} steps: {:.1} s ({:.0} steps/s)",
        ips.len(),
        d.steps_total,
        took.as_secs_f64(),
        d.steps_total as f64 / took.as_secs_f64()
    );

    // SIGKILL and restart on the same ports and data.
    let (api, quic) = (ctl.api.to_string(), ctl.quic.to_string());
    let t = Instant::now();
    drop(ctl);
    let ctl = TestController::start_on(&data, &api, &quic)?;
    let serving = t.elapsed();
    wait_until(wait, "every node online after the restart", || {
        (online(&ctl) == n).then_some(())
    })?;
    println!(
        "controller SIGKILLed and restarted: all {n} online again after {:.1} s (serving after {:.1} s); load average {}",
        t.elapsed().as_secs_f64(),
        serving.as_secs_f64(),
        loadavg()
    );
    drop(sim);
    Ok(())
}

fn main() -> Result<()> {
    let (sizes, idle) = match bench_size("scale") {
        BenchSize::Full => {
            let asked: Vec<usize> = std::env::args()
                .skip(1)
                .filter_map(|a| a.parse().ok())
                .collect();
            let sizes = if asked.is_empty() { vec![1000] } else { asked };
            (sizes, Duration::from_secs(60))
        }
        // Numbers on a test run's command line are the harness's
        // (`--test-threads 1`), not sizes.
        BenchSize::Small => (vec![20], Duration::from_secs(3)),
        BenchSize::Skip => return Ok(()),
    };
    for n in sizes {
        run(n, idle)?;
    }
    Ok(())
}
