//! Artifacts through the real binaries (127.0.23.x): a 100 MB artifact
//! uploaded with `dectl` reaches three agents over their QUIC links, each
//! copy verified; a second deployment takes it from the agents' caches; a
//! corrupted cache entry is found and fetched again; a transfer cut short
//! resumes from the bytes on disk; a plan needing an artifact the
//! controller lacks is refused, naming it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{ArtifactView, DeployState, DeploymentView};
use de_tests::{TestController, bin, cluster, noise, run_bounded, sha256_hex, write_catalog};
use serde_json::json;

const SIZE: usize = 100 << 20;
const WAIT: Duration = Duration::from_secs(300);

const CATALOG: &str = r#"
description = "one artifact on every node"
entry = "blob"
[properties]
greeting = "hello"
"#;

const BLOB: &str = r#"
description = "a big file from the controller"
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
path = '{{ path("opt/blob/blob.bin") }}'
mode = 0o640
[[install]]
action = "write_file"
path = '{{ path("opt/blob/greeting") }}'
contents = "{{ properties.greeting }}"
"#;

fn deploy(ctl: &TestController, ips: &[&str], greeting: &str) -> Result<DeploymentView> {
    let plan = json!({
        "components": {"blob": ips},
        "properties": {"domain": "blob.test", "catalog": "blobs", "greeting": greeting},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan refused: {}", a.body);
    let id = ctl.deploy()?.id;
    ctl.finished(&id, WAIT)
}

fn fetch_outputs(d: &DeploymentView) -> Vec<(String, String)> {
    d.steps
        .iter()
        .flatten()
        .filter(|s| s.action.starts_with("fetch"))
        .map(|s| (s.ip.clone(), s.output.clone().unwrap_or_default()))
        .collect()
}

#[test]
fn a_100_mb_artifact_reaches_three_agents_verified_and_cached() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data, "blobs", CATALOG, &[("blob", BLOB)])?;
    let ips = ["127.0.23.1", "127.0.23.2", "127.0.23.3"];
    let (ctl, agents) = cluster(dir.path(), &ips, false)?;

    // Before the upload, the plan is refused naming the artifact and the fix.
    let plan = json!({"components": {"blob": ips}, "properties": {"domain": "blob.test", "catalog": "blobs"}});
    let a = ctl.api("POST", "/api/v1/plan/validate", Some(&plan.to_string()))?;
    assert_eq!(a.status, 400, "{}", a.body);
    let text = a.body.to_string();
    assert!(
        text.contains("blob.bin") && text.contains("dectl artifacts upload"),
        "{text}"
    );

    // The upload, with dectl: the controller checks the hash dectl computed.
    let bytes = noise(SIZE);
    let sha = sha256_hex(&bytes);
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &bytes)?;
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(ctl.base_url())
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(["--json", "artifacts", "upload"])
        .arg(&file);
    let o = run_bounded(cmd, WAIT)?;
    assert!(o.status.success(), "{o:?}");
    let up: ArtifactView = serde_json::from_str(&o.stdout)?;
    assert_eq!(
        (up.name.as_str(), up.size, up.sha256.as_str()),
        ("blob.bin", SIZE as u64, sha.as_str())
    );
    // Stored once, by its hash.
    let stored = std::fs::read(data.join("artifacts/sha256").join(&sha))?;
    assert_eq!(stored.len(), SIZE);

    // A wrong hash is refused and nothing is stored under the name.
    let a = ctl.request(
        "POST",
        &format!("/api/v1/artifacts?name=other.bin&sha256={}", "0".repeat(64)),
        Some(&ctl.token),
        Some("not those bytes"),
    )?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["error"], "artifact_mismatch");

    // First deployment: every node fetches it over its link.
    let d = deploy(&ctl, &ips, "hello")?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    let outs = fetch_outputs(&d);
    assert_eq!(outs.len(), 3, "{outs:?}");
    for (ip, out) in &outs {
        assert!(
            out.contains("fetched 104857600 bytes from the controller, sha256 verified"),
            "{ip}: {out}"
        );
    }
    // The transfer's progress is in each instance's log, as it went.
    for i in 0..3 {
        let log = std::fs::read_to_string(data.join(format!("logs/blob_{i}.log")))?;
        assert!(
            log.contains("fetch blob.bin: ") && log.contains(" of 104857600 bytes ("),
            "blob_{i}.log: {log}"
        );
    }
    for a in &agents {
        let placed = std::fs::read(a.root.join("opt/blob/blob.bin"))?;
        assert!(placed == bytes, "{}: the placed file differs", a.ip);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a.root.join("opt/blob/blob.bin"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    // Second deployment (the greeting changed, so the instances reapply):
    // the bytes come from each agent's cache, nothing crosses the link.
    let d = deploy(&ctl, &ips, "hi")?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    for (ip, out) in fetch_outputs(&d) {
        assert!(
            out.contains("from the cache (104857600 bytes, sha256 verified)"),
            "{ip}: {out}"
        );
        assert!(!out.contains("fetched"), "{ip}: {out}");
    }

    // A corrupted cache entry is found and fetched again; a transfer cut
    // short earlier (half the bytes in `.part`) resumes where it stopped.
    let cache0 = agents[0].state_dir.join("cache");
    let mut bad = std::fs::read(cache0.join(&sha))?;
    bad[SIZE / 2] ^= 0xff;
    std::fs::write(cache0.join(&sha), &bad)?;
    let cache1 = agents[1].state_dir.join("cache");
    std::fs::remove_file(cache1.join(&sha))?;
    std::fs::write(cache1.join(format!("{sha}.part")), &bytes[..SIZE / 2])?;
    let d = deploy(&ctl, &ips, "hey")?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    let outs = fetch_outputs(&d);
    let of = |ip: &str| -> Result<String> {
        outs.iter()
            .find(|(i, _)| i == ip)
            .map(|(_, o)| o.clone())
            .with_context(|| format!("no fetch on {ip}: {outs:?}"))
    };
    let o0 = of(ips[0])?;
    assert!(
        o0.contains("the cached copy did not match its SHA-256: deleted, fetched again"),
        "{o0}"
    );
    assert!(o0.contains("fetched 104857600 bytes"), "{o0}");
    let o1 = of(ips[1])?;
    assert!(
        o1.contains(&format!(
            "resuming at byte {} of an earlier transfer",
            SIZE / 2
        )),
        "{o1}"
    );
    assert!(o1.contains("sha256 verified"), "{o1}");
    for a in &agents[..2] {
        assert!(
            std::fs::read(a.root.join("opt/blob/blob.bin"))? == bytes,
            "{}",
            a.ip
        );
        assert!(
            std::fs::read(a.state_dir.join("cache").join(&sha))? == bytes,
            "{}",
            a.ip
        );
    }
    assert_eq!(
        std::fs::read_to_string(agents[2].root.join("opt/blob/greeting"))?,
        "hey"
    );
    Ok(())
}

/// Names and bytes: one copy for two names, kept until the last name goes.
#[test]
fn deleting_an_artifact_keeps_its_bytes_while_another_name_holds_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start_on(&dir.path().join("data"), "127.0.23.10:0", "127.0.23.10:0")?;
    let up = |name: &str| -> Result<ArtifactView> {
        ctl.request(
            "POST",
            &format!("/api/v1/artifacts?name={name}"),
            Some(&ctl.token),
            Some("same bytes"),
        )?
        .expect(201)
    };
    let a = up("a.txt")?;
    let b = up("b.txt")?;
    assert_eq!(a.sha256, b.sha256);
    let file = ctl.data_dir.join("artifacts/sha256").join(&a.sha256);
    let del = ctl.api("DELETE", "/api/v1/artifacts/a.txt", None)?;
    assert_eq!(del.status, 200, "{}", del.body);
    assert!(Path::new(&file).is_file(), "b.txt still names the bytes");
    let del = ctl.api("DELETE", "/api/v1/artifacts/b.txt", None)?;
    assert_eq!(del.status, 200, "{}", del.body);
    assert!(!Path::new(&file).exists(), "no name is left: the bytes go");
    let list: Vec<ArtifactView> = ctl.api("GET", "/api/v1/artifacts", None)?.expect(200)?;
    assert!(list.is_empty());
    let gone = ctl.api("DELETE", "/api/v1/artifacts/b.txt", None)?;
    assert_eq!(gone.status, 404);
    Ok(())
}

/// A link cut in the middle of a transfer (the controller SIGKILLed and
/// started again): the agent resumes from the bytes it has, the step
/// succeeds, and the file is whole. The controller sends at 2 MiB/s here
/// (a test-only flag), so the cut lands mid-transfer.
#[test]
fn a_transfer_cut_by_a_controller_kill_resumes_where_it_stopped() -> Result<()> {
    use de_tests::{TestAgent, wait_until};
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data, "blobs", CATALOG, &[("blob", BLOB)])?;
    let slow = ["--test-artifact-kibps", "2048"];
    let mut ctl = TestController::start_with(&data, "127.0.23.20:0", "127.0.23.20:0", &slow)?;
    let (api, quic) = (ctl.api.to_string(), ctl.quic.to_string());
    let ip = "127.0.23.21";
    let mut agent = TestAgent::new(dir.path(), ip)?;
    let out = agent.enroll(&ctl.quic, &ctl.new_code(None)?)?;
    anyhow::ensure!(out.status.success(), "enrol: {}", out.stderr);
    agent.start(1)?;
    wait_until(Duration::from_secs(30), "the agent online", || {
        ctl.node_by_ip(ip).ok().flatten().filter(|n| n.online)
    })?;
    let size = 12 << 20;
    let bytes = noise(size);
    let sha = sha256_hex(&bytes);
    let agent_http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent_http
        .post(format!(
            "{}/api/v1/artifacts?name=blob.bin&sha256={sha}",
            ctl.base_url()
        ))
        .header("Authorization", format!("Bearer {}", ctl.token))
        .send(&bytes[..])?;
    let text = resp.body_mut().read_to_string()?;
    anyhow::ensure!(resp.status() == 201, "upload: {text}");

    let plan = json!({"components": {"blob": [ip]}, "properties": {"domain": "blob.test", "catalog": "blobs"}});
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan refused: {}", a.body);
    let id = ctl.deploy()?.id;
    let part = agent.state_dir.join("cache").join(format!("{sha}.part"));
    let cut_at = wait_until(
        Duration::from_secs(60),
        "the transfer a quarter done",
        || {
            std::fs::metadata(&part)
                .ok()
                .map(|m| m.len())
                .filter(|&n| n > (size as u64) / 4)
        },
    )?;
    assert!(cut_at < size as u64, "the transfer was not cut: {cut_at}");
    ctl.proc.kill();
    let ctl = TestController::start_with(&data, &api, &quic, &slow)?;
    let d = ctl.finished(&id, WAIT)?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    let out = fetch_outputs(&d)
        .into_iter()
        .map(|(_, o)| o)
        .next()
        .context("no fetch step")?;
    assert!(out.contains("transfer cut at byte"), "{out}");
    assert!(out.contains("resuming"), "{out}");
    assert!(
        out.contains("fetched 12582912 bytes from the controller, sha256 verified"),
        "{out}"
    );
    assert!(std::fs::read(agent.root.join("opt/blob/blob.bin"))? == bytes);
    Ok(())
}

/// `dectl artifacts upload *.deb`: several files in one call, each under
/// its own name (a '+' in a Debian version included); `--name` renames one
/// file only.
#[test]
fn dectl_uploads_several_files_at_once_under_their_names() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start_on(&dir.path().join("data"), "127.0.23.30:0", "127.0.23.30:0")?;
    let files = ["one_1.0+b1_all.bin", "two.txt"];
    for f in files {
        std::fs::write(dir.path().join(f), format!("contents of {f}"))?;
    }
    let dectl = |args: &[&str]| -> Result<de_tests::Output> {
        let mut cmd = Command::new(bin("dectl"));
        cmd.current_dir(dir.path())
            .arg("--controller")
            .arg(ctl.base_url())
            .arg("--token-file")
            .arg(ctl.data_dir.join("admin.token"))
            .args(args);
        run_bounded(cmd, Duration::from_secs(60))
    };
    let o = dectl(&["artifacts", "upload", files[0], files[1]])?;
    assert!(o.status.success(), "{o:?}");
    assert!(
        o.stdout.contains(files[0]) && o.stdout.contains(files[1]),
        "{}",
        o.stdout
    );
    let list: Vec<ArtifactView> = ctl.api("GET", "/api/v1/artifacts", None)?.expect(200)?;
    let names: Vec<&str> = list.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, files);
    for a in &list {
        assert_eq!(
            a.sha256,
            sha256_hex(format!("contents of {}", a.name).as_bytes())
        );
    }
    let o = dectl(&["artifacts", "upload", "--name", "x", files[0], files[1]])?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stderr.contains("--name names one file"), "{}", o.stderr);
    Ok(())
}
