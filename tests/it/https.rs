//! The API over HTTPS (127.0.20.x): `dectl` verifies the controller's CA (and
//! refuses another's), follows the log over wss://; a fresh node fetches
//! `/join.sh` and the packages with the pin shown with each code, a wrong pin
//! gets nothing, and a package changed after the controller started is
//! refused by the script before anything is installed. The whole packaged
//! join (real .debs, the system monit) is in `packaging/check.sh`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::CodeView;
use de_tests::{Output, TestController, bin, run_bounded, spawn};

const LIMIT: Duration = Duration::from_secs(60);

fn tls_controller(data: &Path, packages: &Path) -> Result<TestController> {
    TestController::start_with(
        data,
        "127.0.20.1:0",
        "127.0.20.1:0",
        &[
            "--api-tls",
            "--packages-dir",
            packages.to_str().context("path")?,
        ],
    )
}

fn pin_of(ctl: &TestController) -> Result<String> {
    ctl.banner
        .iter()
        .find_map(|l| l.strip_prefix("api https pin "))
        .map(str::to_owned)
        .context("no pin in the banner")
}

fn curl(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30"]).args(args);
    run_bounded(cmd, LIMIT)
}

fn dectl(ctl: &TestController, extra: &[&str], args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(ctl.base_url())
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(extra)
        .args(args);
    run_bounded(cmd, LIMIT)
}

#[test]
fn dectl_trusts_the_controllers_ca_and_no_other() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = tls_controller(&dir.path().join("a"), &dir.path().join("none"))?;
    assert!(ctl.base_url().starts_with("https://"));
    // A second controller: its CA is a real CA, just not this one's.
    let other = TestController::start_with(
        &dir.path().join("b"),
        "127.0.20.2:0",
        "127.0.20.2:0",
        &["--api-tls"],
    )?;

    // The CA beside the token file (the data dir) is used by default.
    let o = dectl(&ctl, &[], &["nodes"])?;
    assert!(o.status.success(), "{o:?}");
    let o = dectl(&ctl, &[], &["--json", "ca"])?;
    assert!(o.status.success(), "{o:?}");
    let shown: serde_json::Value = serde_json::from_str(&o.stdout)?;
    assert_eq!(shown["api_pin"], pin_of(&ctl)?.as_str());
    let banner_sha = ctl
        .banner
        .iter()
        .find_map(|l| l.split_once(" sha256 ").map(|(_, s)| s.to_owned()))
        .context("CA fingerprint in the banner")?;
    assert_eq!(shown["ca_sha256"], banner_sha.as_str());

    // Another CA: refused, naming the file and the fix; nothing is sent.
    let wrong = other.data_dir.join("ca.pem");
    let wrong_arg = wrong.to_str().context("path")?;
    let o = dectl(&ctl, &["--ca-cert", wrong_arg], &["nodes"])?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        o.stderr.contains("not from the CA in") && o.stderr.contains("--ca-cert"),
        "{}",
        o.stderr
    );
    let o = dectl(&ctl, &["--ca-cert", wrong_arg], &["ca"])?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // Without a CA file (the token copied elsewhere), the public web PKI is
    // used, and does not vouch for the controller's own CA.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere)?;
    std::fs::copy(
        ctl.data_dir.join("admin.token"),
        elsewhere.join("admin.token"),
    )?;
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(ctl.base_url())
        .arg("--token-file")
        .arg(elsewhere.join("admin.token"))
        .arg("nodes");
    let o = run_bounded(cmd, LIMIT)?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        o.stderr
            .contains("pass the controller's DATA/ca.pem with --ca-cert"),
        "{}",
        o.stderr
    );
    // A CA file that is not there is named.
    let o = dectl(
        &ctl,
        &[
            "--ca-cert",
            dir.path().join("missing.pem").to_str().context("p")?,
        ],
        &["nodes"],
    )?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        o.stderr.contains("cannot read the CA certificate"),
        "{}",
        o.stderr
    );

    // Plain HTTP to the HTTPS port gets no answer from the API.
    let o = curl(&[&format!("http://{}/healthz", ctl.api)])?;
    assert!(!o.status.success(), "{o:?}");

    // The log over wss://, verified the same way: a line written after the
    // follow started arrives.
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(ctl.base_url())
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(["logs", "follow", "--tail", "0"]);
    let (mut follower, lines) = spawn("dectl logs follow", cmd, &dir.path().join("follow.log"))?;
    // The follow is subscribed once a line written now reaches it; write one
    // per try, so a line written before the subscription does not count.
    let mut got = None;
    for _ in 0..20 {
        let a = ctl.api("POST", "/deployment-engine/config", Some("{}"))?;
        assert_eq!(a.status, 400);
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(3)) {
            got = Some(line);
            break;
        }
    }
    let line = got.with_context(|| format!("no line over wss://; {}", follower.log_text()))?;
    assert!(line.contains("plan rejected"), "{line}");
    follower.kill();
    Ok(())
}

#[test]
fn a_node_fetches_join_sh_and_packages_only_with_the_right_pin_and_refuses_a_changed_package()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let packages = dir.path().join("packages");
    std::fs::create_dir_all(&packages)?;
    let agent_deb = format!(
        "deployment-engine-agent_{}-1_amd64.deb",
        env!("CARGO_PKG_VERSION")
    );
    std::fs::write(packages.join(&agent_deb), b"the agent package, as built")?;
    let ctl = tls_controller(&dir.path().join("data"), &packages)?;
    let pin = pin_of(&ctl)?;
    let api = ctl.api.to_string();

    // The line shown with a code: curl with the pin, the code in the environment.
    let code: CodeView = ctl
        .api("POST", "/api/v1/install-codes", None)?
        .expect(201)?;
    assert_eq!(
        code.agent_command,
        format!(
            "curl -fsS --pinnedpubkey '{pin}' -k https://{api}/join.sh | DE_INSTALL_CODE={} bash",
            code.code
        )
    );

    // With the pin: the script, naming this controller and every file's SHA-256.
    let o = curl(&[
        "-f",
        "--pinnedpubkey",
        &pin,
        "-k",
        &format!("https://{api}/join.sh"),
    ])?;
    assert!(o.status.success(), "{o:?}");
    let script = o.stdout;
    assert!(script.starts_with("#!/usr/bin/env bash"), "{script}");
    assert!(
        script.contains(&format!("controller='{}'", ctl.quic)),
        "{script}"
    );
    let listed = |name: &str| -> Option<String> {
        script.lines().find_map(|l| {
            let l = l.trim_start_matches("files='");
            l.strip_prefix(&format!("{name} "))
                .map(|s| s.trim_end_matches('\'').to_owned())
        })
    };
    let sha = listed(&agent_deb).context("the agent package is listed")?;
    assert!(listed("install-agent.sh").is_some(), "{script}");
    let got = dir.path().join("got.deb");
    let o = curl(&[
        "-f",
        "--pinnedpubkey",
        &pin,
        "-k",
        "-o",
        got.to_str().context("p")?,
        &format!("https://{api}/packages/{agent_deb}"),
    ])?;
    assert!(o.status.success(), "{o:?}");
    let digest = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&got)?);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, sha);

    // A wrong pin (a man in the middle's key): curl stops before any byte.
    let wrong = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let o = curl(&[
        "-f",
        "--pinnedpubkey",
        wrong,
        "-k",
        &format!("https://{api}/join.sh"),
    ])?;
    assert_eq!(
        o.status.code(),
        Some(90),
        "curl's 'pinned key mismatch': {o:?}"
    );
    assert!(o.stdout.is_empty());

    // Only listed names are served; no path reaches the file system.
    for bad in ["..%2f..%2fetc%2fpasswd", "notes.txt", "missing.deb"] {
        let o = curl(&[
            "--pinnedpubkey",
            &pin,
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{api}/packages/{bad}"),
        ])?;
        assert_eq!(o.stdout, "404", "{bad}: {o:?}");
    }

    // The package changes on the controller's disk after start: the node's
    // script refuses it, before installing anything, and says why.
    std::fs::write(packages.join(&agent_deb), b"a package someone swapped in")?;
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(&code.agent_command);
    let o = run_bounded(cmd, LIMIT)?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        o.stderr.contains(&format!(
            "{agent_deb} does not match the SHA-256 the controller gave"
        )),
        "{}",
        o.stderr
    );
    assert!(!o.stdout.contains("installing"), "{}", o.stdout);
    Ok(())
}

#[test]
fn over_plain_http_there_is_no_join_script_and_codes_show_the_copied_script_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start_on(&dir.path().join("data"), "127.0.20.3:0", "127.0.20.3:0")?;
    let a = ctl.request("GET", "/join.sh", None, None)?;
    assert_eq!(a.status, 404);
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("only over HTTPS") && m.contains("--api-tls")),
        "{}",
        a.body
    );
    let code: CodeView = ctl
        .api("POST", "/api/v1/install-codes", None)?
        .expect(201)?;
    assert_eq!(
        code.agent_command,
        format!(
            "packaging/install-agent.sh --controller {} --code {}",
            ctl.quic, code.code
        )
    );
    Ok(())
}

/// After a CA rotation and the old CA's retirement, the API's certificate
/// chains to the new CA, the only one `DATA/ca.pem` then holds: clients
/// that trust it keep working without a restart, and the pin holds.
#[test]
fn the_api_certificate_follows_a_ca_rotation_and_keeps_its_pin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = tls_controller(&dir.path().join("data"), &dir.path().join("none"))?;
    let pin = pin_of(&ctl)?;
    let before = std::fs::read_to_string(ctl.data_dir.join("ca.pem"))?;
    ctl.api("POST", "/api/v1/pki/rotate-ca", None)?
        .expect::<serde_json::Value>(200)?;
    ctl.api(
        "POST",
        "/api/v1/pki/retire-old-ca",
        Some(r#"{"force": true}"#),
    )?
    .expect::<serde_json::Value>(200)?;
    let after = std::fs::read_to_string(ctl.data_dir.join("ca.pem"))?;
    assert_ne!(before, after, "the CA changed");
    assert_eq!(after.matches("BEGIN CERTIFICATE").count(), 1, "{after}");
    // Every request of the harness trusts only DATA/ca.pem as it is now.
    let a = ctl.api("GET", "/api/v1/nodes", None)?;
    assert_eq!(a.status, 200, "{}", a.body);
    let o = curl(&[
        "-f",
        "--pinnedpubkey",
        &pin,
        "--cacert",
        ctl.data_dir.join("ca.pem").to_str().context("path")?,
        &format!("https://{}/healthz", ctl.api),
    ])?;
    assert!(o.status.success(), "{o:?}");
    Ok(())
}
