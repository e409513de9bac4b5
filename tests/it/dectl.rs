//! The real `dectl` against a real controller and agents with private monit
//! (127.0.10.x): codes, nodes, plans (with the API's own problems), plan diff,
//! deploy --follow, deploy cancel, status, stop/start/restart, exec, logs,
//! --json, and clear failures.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use anyhow::Result;
use de_common::api::{ChangeAction, PlanDiff};
use de_tests::{
    Output, TestAgent, TestController, bin, run_bounded, script_component, spawn,
    supervised_sleeper, wait_until,
};

fn dectl(ctl: &TestController, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(format!("http://{}", ctl.api))
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(args);
    run_bounded(cmd, Duration::from_secs(300))
}

fn ok(o: &Output) -> bool {
    o.status.success()
}

#[test]
fn dectl_drives_a_controller_from_codes_to_a_deployment() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let cat = data.join("catalogs/tiny");
    std::fs::create_dir_all(&cat)?;
    std::fs::write(
        cat.join("catalog.toml"),
        "description = \"tiny\"\nentry = \"hello\"\n",
    )?;
    std::fs::write(
        cat.join("hello.toml"),
        script_component(
            "hello",
            "writes a greeting",
            r#"echo "hello from {{ node.ip }}""#,
        ),
    )?;
    std::fs::write(cat.join("sleeper.toml"), supervised_sleeper("sleeper"))?;
    // Sleeps 30 s the first time it is installed (long enough to cancel),
    // leaving slow.once in the node root first so the next time is quick.
    std::fs::write(
        cat.join("slow.toml"),
        script_component(
            "slow",
            "slow to install the first time",
            r#"if [ ! -e "$DE_ROOT/slow.once" ]; then touch "$DE_ROOT/slow.once"; sleep 30; fi"#,
        ),
    )?;
    let ctl = TestController::start(&data)?;

    // Codes.
    let o = dectl(&ctl, &["codes", "show"])?;
    assert!(
        !ok(&o) && o.stderr.contains("no install code is active"),
        "{o:?}"
    );
    let o = dectl(&ctl, &["codes", "new"])?;
    assert!(ok(&o), "{o:?}");
    let code = o
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert_eq!(code.len(), 4, "{}", o.stdout);
    assert!(
        o.stdout.contains("install-agent.sh --controller"),
        "{}",
        o.stdout
    );
    // The time left, by the controller's clock (the default hour).
    assert!(
        o.stdout.contains(", in 0:59:") || o.stdout.contains(", in 1:00:00"),
        "{}",
        o.stdout
    );
    let o = dectl(&ctl, &["--json", "codes", "show"])?;
    let shown: serde_json::Value = serde_json::from_str(&o.stdout)?;
    assert_eq!(shown["code"], code.as_str());

    // Nodes.
    let mut agents = Vec::new();
    for ip in ["127.0.10.1", "127.0.10.2"] {
        let mut a = TestAgent::new(dir.path(), ip)?.with_private_monit();
        assert!(a.enroll(&ctl.quic, &code)?.status.success());
        a.start(1)?;
        agents.push(a);
    }
    let table = wait_until(
        Duration::from_secs(30),
        "both online in dectl nodes",
        || {
            let o = dectl(&ctl, &["nodes"]).ok()?;
            (o.stdout.matches("online").count() == 2).then_some(o.stdout)
        },
    )?;
    assert!(
        table.starts_with("ID") && table.contains("127.0.10.1") && table.contains("127.0.10.2"),
        "{table}"
    );

    // Plans: the API's problems are printed as it words them; exit 1.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"components": {"hello": ["127.0.10.9"]}, "properties": {"domain": "t.test", "catalog": "tiny"}}"#,
    )?;
    let o = dectl(
        &ctl,
        &["plan", "validate", bad.to_str().unwrap_or_default()],
    )?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        o.stderr.contains("127.0.10.9") && o.stderr.contains("HTTP 400"),
        "{}",
        o.stderr
    );
    let good = dir.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"components": {"hello": ["127.0.10.1", "127.0.10.2"], "sleeper": ["127.0.10.1"]}, "properties": {"domain": "t.test", "catalog": "tiny"}}"#,
    )?;
    assert!(ok(&dectl(
        &ctl,
        &["plan", "validate", good.to_str().unwrap_or_default()]
    )?));
    let o = dectl(&ctl, &["status"])?;
    assert!(!ok(&o) && o.stderr.contains("no plan"), "{o:?}");
    let o = dectl(&ctl, &["plan", "diff"])?;
    assert!(!ok(&o) && o.stderr.contains("no plan"), "{o:?}");
    let o = dectl(&ctl, &["plan", "apply", good.to_str().unwrap_or_default()])?;
    assert!(ok(&o) && o.stdout.contains("revision 1"), "{o:?}");

    // Plan diff: before the first deployment, every instance is installed.
    let o = dectl(&ctl, &["plan", "diff"])?;
    assert!(ok(&o), "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "a header, three instances, a summary: {}",
        o.stdout
    );
    assert!(lines[0].starts_with("COMPONENT  INSTANCE"), "{}", o.stdout);
    for (comp, inst, ip) in [
        ("hello", "hello_0", "127.0.10.1"),
        ("hello", "hello_1", "127.0.10.2"),
        ("sleeper", "sleeper_0", "127.0.10.1"),
    ] {
        assert!(
            lines.iter().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.starts_with(&[comp, inst, ip, "install", "new"])
            }),
            "{comp} {ip}: {}",
            o.stdout
        );
    }
    // hello: script and mark, twice; sleeper: script, monit add, start, mark.
    assert_eq!(
        lines[4], "a deployment would run 8 steps (plan revision 1, none applied yet)",
        "{}",
        o.stdout
    );
    let o = dectl(&ctl, &["--json", "plan", "diff"])?;
    let d: PlanDiff = serde_json::from_str(&o.stdout)?;
    assert!(
        d.instances.len() == 3
            && d.instances
                .iter()
                .all(|i| i.action == ChangeAction::Install)
            && d.offline.is_empty(),
        "{d:?}"
    );

    // Deploy and follow to the end.
    let o = dectl(&ctl, &["deploy", "--follow"])?;
    assert!(ok(&o), "{o:?}");
    assert!(
        o.stdout.contains("succeeded") && o.stdout.contains("hello_0 127.0.10.1"),
        "{}",
        o.stdout
    );
    let o = dectl(&ctl, &["deployments"])?;
    assert!(o.stdout.contains("succeeded"), "{}", o.stdout);
    // Once the nodes report what they applied: nothing to do.
    let diff = wait_until(
        Duration::from_secs(30),
        "dectl plan diff to say nothing to do",
        || {
            let o = dectl(&ctl, &["plan", "diff"]).ok()?;
            o.stdout.contains("nothing to do").then_some(o.stdout)
        },
    )?;
    assert!(
        diff.ends_with(
            "nothing to do: a deployment would run 0 steps (plan revision 1, revision 1 applied)\n"
        ) && diff.lines().filter(|l| l.contains(" nothing ")).count() == 3,
        "{diff}"
    );

    let o = dectl(&ctl, &["status"])?;
    assert!(
        ok(&o) && o.stdout.starts_with("COMPONENT") && o.stdout.contains("127.0.10.2"),
        "{o:?}"
    );

    // Exec prints each node's output; a failing command exits 1.
    let o = dectl(
        &ctl,
        &["exec", "echo hi from $DE_ROOT", "--targets", "127.0.10.1"],
    )?;
    assert!(
        ok(&o) && o.stdout.contains("== 127.0.10.1") && o.stdout.contains("hi from"),
        "{o:?}"
    );
    let o = dectl(&ctl, &["exec", "exit 3"])?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stdout.contains("exit 3"), "{}", o.stdout);

    // Logs.
    let o = dectl(&ctl, &["logs", "list"])?;
    assert!(o.stdout.lines().any(|l| l == "hello_0.log"), "{}", o.stdout);
    let o = dectl(&ctl, &["logs", "get", "hello_0.log"])?;
    assert!(o.stdout.contains("hello from 127.0.10.1"), "{}", o.stdout);
    let o = dectl(&ctl, &["logs", "get", "../admin.token"])?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stderr.contains("HTTP 400"), "{o:?}");
    assert!(
        !o.stdout.contains(&ctl.token) && !o.stderr.contains(&ctl.token),
        "the token is shown: {o:?}"
    );
    let o = dectl(&ctl, &["logs", "get", "local.log", "--tail", "2"])?;
    assert!(ok(&o) && o.stdout.lines().count() == 2, "{o:?}");
    let whole = dectl(&ctl, &["logs", "get", "local.log"])?.stdout;
    assert!(whole.ends_with(&o.stdout), "the last lines of {whole}");

    // Follow: the last lines, then each new one as it is written.
    let mut cmd = Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(format!("http://{}", ctl.api))
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(["logs", "follow", "--tail", "3"]);
    let (follower, lines) = spawn("dectl logs follow", cmd, &dir.path().join("follow.log"))?;
    let mut seen = Vec::new();
    let next_line = |seen: &mut Vec<String>| -> Result<String> {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("a line from dectl logs follow after {seen:?}"))?;
        seen.push(line.clone());
        Ok(line)
    };
    let backlog: Vec<String> = (0..3)
        .map(|_| next_line(&mut seen))
        .collect::<Result<_>>()?;
    assert_eq!(
        backlog.join("\n"),
        whole
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Something happens: a rejected plan is one line of local.log.
    let a = ctl.api("POST", "/deployment-engine/config", Some("{}"))?;
    assert_eq!(a.status, 400);
    let line = next_line(&mut seen)?;
    assert!(line.contains("plan rejected"), "{line}");
    drop(follower);

    // Restart a component that is not supervised: the agent's answer is shown, exit 1.
    let o = dectl(&ctl, &["restart", "hello", "127.0.10.1"])?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    // Failed because monit has no such service, not for want of a monit.
    assert_eq!(
        o.stdout,
        "hello 127.0.10.1: failed: monit restart hello failed: There is no service named \"hello\"\n",
        "{o:?}"
    );

    // Stop, then start: the operator's stop is kept by a deployment until
    // the start; both print a row per instance.
    let status_of = |ip: &str| -> Option<String> {
        let o = dectl(&ctl, &["status"]).ok()?;
        o.stdout
            .lines()
            .find(|l| l.starts_with("sleeper") && l.contains(ip))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    };
    let o = dectl(&ctl, &["stop", "sleeper", "127.0.10.1"])?;
    assert!(ok(&o) && o.stdout == "sleeper 127.0.10.1: ok\n", "{o:?}");
    wait_until(Duration::from_secs(30), "sleeper STOPPED", || {
        status_of("127.0.10.1").filter(|s| s == "STOPPED")
    })?;
    let diff = wait_until(Duration::from_secs(30), "the diff to keep the stop", || {
        let o = dectl(&ctl, &["plan", "diff"]).ok()?;
        o.stdout
            .contains("stopped through the API")
            .then_some(o.stdout)
    })?;
    assert!(diff.contains("nothing to do"), "{diff}");
    let o = dectl(&ctl, &["start", "sleeper", "127.0.10.1"])?;
    assert!(ok(&o) && o.stdout == "sleeper 127.0.10.1: ok\n", "{o:?}");
    wait_until(Duration::from_secs(30), "sleeper RUNNING again", || {
        status_of("127.0.10.1").filter(|s| s == "RUNNING")
    })?;
    let o = dectl(&ctl, &["--json", "start", "sleeper"])?;
    let rows: serde_json::Value = serde_json::from_str(&o.stdout)?;
    assert!(
        ok(&o) && rows[0]["Comp"] == "sleeper" && rows[0]["Result"] == "ok",
        "{o:?}"
    );
    let o = dectl(&ctl, &["start", "nope"])?;
    assert!(
        o.status.code() == Some(1) && o.stderr.contains("HTTP 400"),
        "{o:?}"
    );

    // Cancel: nothing running yet; then a deployment whose step sleeps is
    // cancelled, and the next one runs.
    let o = dectl(&ctl, &["deploy", "cancel"])?;
    assert!(
        o.status.code() == Some(1) && o.stderr.contains("no deployment is running"),
        "{o:?}"
    );
    let o = dectl(&ctl, &["deploy", "cancel", "d-nope"])?;
    assert!(
        o.status.code() == Some(1) && o.stderr.contains("HTTP 404"),
        "{o:?}"
    );
    let slow = dir.path().join("slow.json");
    std::fs::write(
        &slow,
        r#"{"components": {"hello": ["127.0.10.1", "127.0.10.2"], "sleeper": ["127.0.10.1"], "slow": ["127.0.10.2"]}, "properties": {"domain": "t.test", "catalog": "tiny"}}"#,
    )?;
    assert!(ok(&dectl(
        &ctl,
        &["plan", "apply", slow.to_str().unwrap_or_default()]
    )?));
    let o = dectl(&ctl, &["deploy"])?;
    assert!(ok(&o), "{o:?}");
    let id = o
        .stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let once = agents[1].root.join("slow.once");
    wait_until(Duration::from_secs(30), "the slow step to run", || {
        once.exists().then_some(())
    })?;
    let o = dectl(&ctl, &["deploy", "cancel"])?;
    assert!(ok(&o), "{o:?}");
    assert_eq!(
        o.stdout,
        format!("deployment {id} cancelled (0/2 steps done)\n")
    );
    let o = dectl(&ctl, &["deploy", "cancel", &id])?;
    assert!(
        o.status.code() == Some(1) && o.stderr.contains("HTTP 409"),
        "{o:?}"
    );
    let o = dectl(&ctl, &["deployments"])?;
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("cancelled")),
        "{}",
        o.stdout
    );
    let o = dectl(&ctl, &["deploy", "--follow"])?;
    assert!(ok(&o) && o.stdout.contains("succeeded"), "{o:?}");

    // Revoke by IP: the node is refused from then on; again, nothing to revoke.
    let o = dectl(&ctl, &["revoke", "127.0.10.2"])?;
    assert!(ok(&o) && o.stdout.contains("revoked node n-"), "{o:?}");
    let n = ctl.node_by_ip("127.0.10.2")?.context("node 2")?;
    assert!(n.revoked, "{n:?}");
    wait_until(
        Duration::from_secs(30),
        "node 2's agent told it is revoked",
        || {
            agents[1]
                .log_text()
                .contains("the controller revoked this node")
                .then_some(())
        },
    )?;
    wait_until(Duration::from_secs(30), "node 2 offline", || {
        ctl.node_by_ip("127.0.10.2")
            .ok()
            .flatten()
            .filter(|n| !n.online)
    })?;
    let o = dectl(&ctl, &["exec", "--targets", "127.0.10.2", "true"])?;
    assert_eq!(
        o.status.code(),
        Some(1),
        "a revoked node runs commands: {o:?}"
    );
    assert!(
        o.stderr
            .contains("no enrolled node for target(s) 127.0.10.2"),
        "{o:?}"
    );
    let table = dectl(&ctl, &["nodes"])?.stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains("127.0.10.2") && l.contains("revoked")),
        "{table}"
    );
    let o = dectl(&ctl, &["revoke", "127.0.10.2"])?;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(o.stderr.contains("no enrolled node"), "{}", o.stderr);

    // No controller / no token: exit 2 with what to do.
    let mut cmd = Command::new(bin("dectl"));
    cmd.args(["--controller", "http://127.0.0.1:9", "--token-file"])
        .arg(ctl.data_dir.join("admin.token"))
        .arg("nodes");
    let o = run_bounded(cmd, Duration::from_secs(60))?;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        o.stderr.contains("cannot reach the controller"),
        "{}",
        o.stderr
    );
    let mut cmd = Command::new(bin("dectl"));
    cmd.args(["--token-file", "/nonexistent/token", "nodes"]);
    let o = run_bounded(cmd, Duration::from_secs(60))?;
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stderr.contains("--token-file"), "{}", o.stderr);
    Ok(())
}

/// `dectl` finds its controller without flags: `~/.config/dectl/config.toml`
/// names the URL, the token file and the CA; a flag still wins; a bad key
/// is refused naming the file.
#[test]
fn dectl_finds_its_controller_from_its_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start_with(
        &dir.path().join("data"),
        "127.0.10.50:0",
        "127.0.10.50:0",
        &["--api-tls"],
    )?;
    let home = dir.path().join("home");
    let conf_dir = home.join(".config/dectl");
    std::fs::create_dir_all(&conf_dir)?;
    // The token and CA elsewhere than dectl's defaults, so only the file can name them.
    std::fs::write(
        conf_dir.join("config.toml"),
        format!(
            "controller = \"{}\"\ntoken_file = {:?}\nca_cert = {:?}\n",
            ctl.base_url(),
            ctl.data_dir.join("admin.token"),
            ctl.data_dir.join("ca.pem")
        ),
    )?;
    let run = |args: &[&str]| -> Result<Output> {
        let mut cmd = Command::new(bin("dectl"));
        cmd.current_dir(dir.path())
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DECTL_CONTROLLER")
            .env_remove("DECTL_TOKEN_FILE")
            .env_remove("DECTL_CA_CERT")
            .args(args);
        run_bounded(cmd, Duration::from_secs(60))
    };
    let o = run(&["nodes"])?;
    assert!(ok(&o), "{o:?}");
    // A flag overrides the file.
    let o = run(&["--controller", "https://127.0.10.51:9", "nodes"])?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(o.stderr.contains("127.0.10.51:9"), "{}", o.stderr);
    // A key dectl does not know: refused, naming the file and the keys.
    std::fs::write(conf_dir.join("config.toml"), "controler = \"x\"\n")?;
    let o = run(&["nodes"])?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        o.stderr.contains("config.toml")
            && o.stderr.contains("keys: controller, token_file, ca_cert"),
        "{}",
        o.stderr
    );
    Ok(())
}
