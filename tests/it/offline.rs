//! An offline intranet (127.0.25.x): debian-demo with `offline = 1`
//! installs nats-server from the controller's own Debian repository — the
//! `.deb` uploaded as an artifact, fetched by the agent over its link, with
//! an index the signed step carries — and apt on the node is given that
//! repository as its only source.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{ArtifactView, DeployState};
use de_tests::{cluster, run_bounded, wait_until};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(600);

/// nats-server's .deb from this machine's Debian mirror (the one thing this
/// test takes from the network; the node does not).
fn download_nats(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let get = || {
        let mut c = Command::new("apt-get");
        c.current_dir(dir).args(["download", "-q", "nats-server"]);
        run_bounded(c, Duration::from_secs(300))
    };
    let mut o = get()?;
    if !o.status.success() {
        let mut u = Command::new("apt-get");
        u.args(["update", "-q"]);
        run_bounded(u, Duration::from_secs(300))?;
        o = get()?;
    }
    anyhow::ensure!(o.status.success(), "apt-get download nats-server: {o:?}");
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("nats-server_") && n.ends_with(".deb"))
        })
        .context("no nats-server .deb downloaded")
}

#[test]
fn debian_demo_offline_installs_from_the_controllers_repository_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let debs = dir.path().join("debs");
    std::fs::create_dir_all(&debs)?;
    let deb = download_nats(&debs)?;
    let name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .context("name")?
        .to_owned();
    let ip = "127.0.25.1";
    let (ctl, agents) = cluster(dir.path(), &[ip], true)?;

    // Not a Debian package, though named like one: refused, nothing stored.
    let a = ctl.request(
        "POST",
        "/api/v1/artifacts?name=fake_1.0_amd64.deb",
        Some(&ctl.token),
        Some("not a package"),
    )?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a Debian package")),
        "{}",
        a.body
    );
    let up: ArtifactView = {
        let bytes = std::fs::read(&deb)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut resp = agent
            .post(format!(
                "{}/api/v1/artifacts?name={}",
                ctl.base_url(),
                name.replace('+', "%2B")
            ))
            .header("Authorization", format!("Bearer {}", ctl.token))
            .send(&bytes[..])?;
        let text = resp.body_mut().read_to_string()?;
        anyhow::ensure!(resp.status() == 201, "upload: {text}");
        serde_json::from_str(&text)?
    };
    assert!(
        up.deb
            .as_deref()
            .is_some_and(|d| d.starts_with("nats-server ")),
        "{up:?}"
    );

    let plan = json!({
        "components": {"nats": [ip]},
        "properties": {"domain": "offline.test", "catalog": "debian-demo", "offline": 1},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    assert_eq!(a.status, 201, "{}", a.body);
    let id = ctl.deploy()?.id;
    let d = ctl.finished(&id, WAIT)?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);

    // The repository on the node: the package, fetched and verified, and an
    // index naming its SHA-256.
    let root = &agents[0].root;
    let repo = root.join("var/lib/deployment-engine/repo");
    assert!(std::fs::read(repo.join(&name))? == std::fs::read(&deb)?);
    let index = std::fs::read_to_string(repo.join("Packages"))?;
    assert!(
        index.contains("Package: nats-server") && index.contains(&format!("SHA256: {}", up.sha256)),
        "{index}"
    );
    let sources = std::fs::read_to_string(repo.join("sources.list"))?;
    assert_eq!(sources.lines().count(), 1, "{sources}");
    assert!(sources.starts_with("deb [trusted=yes] file:"), "{sources}");

    // What apt on the node knew: the controller's repository and nothing
    // else (apt-cache policy, printed by the install step, lists every
    // source that offers the package).
    let log = std::fs::read_to_string(ctl.data_dir.join("logs/nats_0.log"))?;
    let policy: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("nats-server:"))
        .take_while(|l| !l.contains("Get:") || l.contains("file:"))
        .collect();
    assert!(
        policy
            .iter()
            .any(|l| l.contains(&format!("file:{}", repo.display()))),
        "the controller's repository is not a source: {log}"
    );
    let sources_seen: Vec<&&str> = policy
        .iter()
        .filter(|l| l.contains("http://") || l.contains("https://"))
        .collect();
    assert!(
        sources_seen.is_empty(),
        "another source: {sources_seen:?}\n{log}"
    );
    assert!(!log.contains("http://deb.debian.org"), "{log}");

    wait_until(Duration::from_secs(90), "nats RUNNING", || {
        ctl.status()
            .ok()?
            .into_iter()
            .find(|r| r.status == "RUNNING")
    })?;
    Ok(())
}
