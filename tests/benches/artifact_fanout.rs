//! Benchmark: a 100 MB artifact to 10 real agents (127.0.70.x) through a
//! `fetch` step, against the machine's own limits and against `scp`.
//!
//! Run with `cargo bench -p de-tests --bench artifact_fanout` (release
//! build); figures go to docs/BENCHMARKS.md. It prints, for the same 10
//! copies of 100 MB:
//! - the deployment (upload excluded): wall time, the controller's CPU
//!   seconds and peak RSS;
//! - the second deployment (every agent's cache hits): wall time;
//! - the loopback ceiling: 10 TCP streams from memory to memory in this
//!   process, no TLS, no disk;
//! - `scp` to the same 10 addresses, in parallel, when `/usr/sbin/sshd`
//!   exists (Debian's openssh-server; started on 127.0.70.254:2222 with a
//!   throwaway host key, as root with a throwaway client key), else skipped.
//!
//! As a test (`cargo test`): 1 MiB to 2 agents, without `scp`.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use de_common::api::DeployState;
use de_tests::{
    BenchSize, Proc, TestController, bench_size, cluster, noise, run_bounded, spawn, wait_until,
    write_catalog,
};
use serde_json::json;

/// Bytes of the artifact and agents at full size.
const SIZE: usize = 100 << 20;
const NODES: usize = 10;
/// The same, run as a test.
const SMALL_SIZE: usize = 1 << 20;
const SMALL_NODES: usize = 2;

/// CPU seconds (user + system) and peak RSS (KiB) of `pid`.
fn usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit(')').next().context("stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks / 100.0, hwm))
}

fn deploy(ctl: &TestController, ips: &[String], tag: &str) -> Result<Duration> {
    let plan = json!({"components": {"blob": ips},
        "properties": {"domain": "bench.test", "catalog": "bench", "tag": tag}});
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan: {}", a.body);
    let t = Instant::now();
    let id = ctl.deploy()?.id;
    let d = ctl.finished(&id, Duration::from_secs(900))?;
    anyhow::ensure!(d.state == DeployState::Succeeded, "{:?}", d.error);
    Ok(t.elapsed())
}

/// `nodes` TCP streams of `bytes` over loopback, memory to memory.
fn loopback_ceiling(bytes: &[u8], nodes: usize) -> Result<Duration> {
    let listener = std::net::TcpListener::bind("127.0.70.253:0")?;
    let addr = listener.local_addr()?;
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut readers = Vec::new();
        for _ in 0..nodes {
            readers.push(s.spawn(move || -> Result<usize> {
                let mut c = std::net::TcpStream::connect(addr)?;
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0;
                loop {
                    let k = c.read(&mut buf)?;
                    if k == 0 {
                        return Ok(n);
                    }
                    n += k;
                }
            }));
        }
        let mut writers = Vec::new();
        for _ in 0..nodes {
            let (mut c, _) = listener.accept()?;
            writers.push(s.spawn(move || -> Result<()> {
                c.write_all(bytes)?;
                Ok(())
            }));
        }
        for w in writers {
            w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        for r in readers {
            let n = r.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
            anyhow::ensure!(n == bytes.len(), "short read {n}");
        }
        Ok(())
    })?;
    Ok(t.elapsed())
}

/// `scp` of `file` to the 10 addresses at once, if sshd is installed.
fn scp(dir: &std::path::Path, file: &std::path::Path, ips: &[String]) -> Result<Option<Duration>> {
    let sshd = std::path::Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        return Ok(None);
    }
    let keygen = |path: &std::path::Path| -> Result<()> {
        let s = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()?;
        anyhow::ensure!(s.success(), "ssh-keygen");
        Ok(())
    };
    let (host, client) = (dir.join("host_key"), dir.join("client_key"));
    keygen(&host)?;
    keygen(&client)?;
    let auth = dir.join("authorized_keys");
    std::fs::copy(client.with_extension("pub"), &auth)?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port 2222\nListenAddress 127.0.70.254\nHostKey {}\nPermitRootLogin prohibit-password\n\
             AuthorizedKeysFile {}\nPasswordAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\n\
             Subsystem sftp internal-sftp\n",
            host.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    std::fs::create_dir_all("/run/sshd")?;
    let mut cmd = Command::new(sshd);
    cmd.arg("-D").arg("-e").arg("-f").arg(&cfg);
    let (_sshd, _rx): (Proc, _) = spawn("sshd", cmd, &dir.join("sshd.log"))?;
    wait_until(Duration::from_secs(10), "sshd listening", || {
        std::net::TcpStream::connect("127.0.70.254:2222").ok()
    })?;
    let t = Instant::now();
    let children: Vec<_> = ips
        .iter()
        .enumerate()
        .map(|(i, _ip)| {
            Command::new("scp")
                .args([
                    "-q",
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-P",
                    "2222",
                    "-i",
                ])
                .arg(&client)
                .arg(file)
                .arg(format!(
                    "root@127.0.70.254:{}",
                    dir.join(format!("scp-{i}")).display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for mut c in children {
        anyhow::ensure!(c.wait()?.success(), "scp failed");
    }
    Ok(Some(t.elapsed()))
}

fn main() -> Result<()> {
    let (size, nodes) = match bench_size("artifact_fanout") {
        BenchSize::Full => (SIZE, NODES),
        BenchSize::Small => (SMALL_SIZE, SMALL_NODES),
        BenchSize::Skip => return Ok(()),
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(
        &data,
        "bench",
        "description = \"bench\"\nentry = \"blob\"\n[properties]\ntag = \"a\"\n",
        &[(
            "blob",
            r#"
description = "100 MB from the controller"
cardinality = "many"
monit_check = """
check process blob with pidfile {{ path("run/blob.pid") }}
"""
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1
[[install]]
action = "fetch"
artifact = "blob.bin"
path = '{{ path("opt/blob.bin") }}'
[[install]]
action = "write_file"
path = '{{ path("opt/tag") }}'
contents = "{{ properties.tag }}"
"#,
        )],
    )?;
    let ips: Vec<String> = (1..=nodes).map(|i| format!("127.0.70.{i}")).collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let (ctl, _agents) = cluster(dir.path(), &refs, false)?;
    let bytes = noise(size);
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &bytes)?;
    let t = Instant::now();
    let mut c = Command::new("curl");
    c.args(["-fsS", "-o", "/dev/null", "-H"])
        .arg(format!("Authorization: Bearer {}", ctl.token))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{}/api/v1/artifacts?name=blob.bin", ctl.base_url()));
    let o = run_bounded(c, Duration::from_secs(300))?;
    anyhow::ensure!(o.status.success(), "upload: {o:?}");
    let upload = t.elapsed();

    let pid = ctl.proc.pid();
    let (cpu0, _) = usage(pid)?;
    let cold = deploy(&ctl, &ips, "cold")?;
    let (cpu1, hwm) = usage(pid)?;
    let warm = deploy(&ctl, &ips, "warm")?;
    let ceiling = loopback_ceiling(&bytes, nodes)?;
    let scp = if size == SIZE {
        scp(dir.path(), &file, &ips)?
    } else {
        None
    };

    let total = (size * nodes) as f64 / (1 << 20) as f64;
    let rate = |d: Duration| total / d.as_secs_f64();
    println!(
        "{} MiB to {nodes} agents ({total:.0} MiB in all):",
        size >> 20
    );
    println!(
        "  upload (curl, one copy)            {:>8.2} s",
        upload.as_secs_f64()
    );
    println!(
        "  deployment, cold caches            {:>8.2} s  {:>7.0} MiB/s  controller CPU {:.2} s, peak RSS {} MiB",
        cold.as_secs_f64(),
        rate(cold),
        cpu1 - cpu0,
        hwm / 1024
    );
    println!(
        "  deployment, warm caches            {:>8.2} s",
        warm.as_secs_f64()
    );
    println!(
        "  loopback TCP ceiling (memory)      {:>8.2} s  {:>7.0} MiB/s",
        ceiling.as_secs_f64(),
        rate(ceiling)
    );
    match scp {
        Some(d) => println!(
            "  scp, {nodes} in parallel                {:>8.2} s  {:>7.0} MiB/s",
            d.as_secs_f64(),
            rate(d)
        ),
        None => println!(
            "  scp: skipped (it runs at full size when /usr/sbin/sshd is installed: apt-get install openssh-server)"
        ),
    }
    Ok(())
}
