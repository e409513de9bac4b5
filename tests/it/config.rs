//! Config files through the real binaries: precedence (flag > env > file > default), the
//! agent enrolling from its file alone, and bad files exiting 64 with one line naming them.

use std::time::Duration;

use anyhow::{Context, Result};
use de_tests::{TestController, command, run_bounded, wait_until};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn controller_settings_come_from_flag_then_env_then_file_then_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("from-file");
    let file = dir.path().join("controller.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\napi_listen = \"127.0.0.1:0\"\nquic_listen = \"127.0.0.1:1\"\npublic_addr = \"file.example\"\n",
            data.display().to_string()
        ),
    )?;
    let mut cmd = command("de-controller");
    cmd.args(["serve", "--quic-listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .env("DE_PUBLIC_ADDR", "env.example");
    let ctl = TestController::start_cmd(&data, cmd)?;
    assert_ne!(ctl.quic.port(), 1, "the flag overrides the file");
    assert!(data.join("admin.token").is_file(), "data_dir from the file");
    let a = ctl.api("POST", "/api/v1/install-codes", None)?;
    assert_eq!(a.status, 201, "{}", a.body);
    let code = a.body["code"].as_str().context("code")?;
    assert_eq!(
        a.body["agent_command"],
        format!(
            "packaging/install-agent.sh --controller env.example:{} --code {code}",
            ctl.quic.port()
        ),
        "the environment overrides the file; the QUIC port fills in a public address without one"
    );
    Ok(())
}

#[test]
fn log_files_rotate_at_the_size_the_config_file_sets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // A local.log already past 1 MiB, as a controller that ran for long leaves it.
    std::fs::create_dir_all(data.join("logs"))?;
    let old = "2026-01-01T00:00:00Z an old line\n".repeat(40_000);
    std::fs::write(data.join("logs/local.log"), &old)?;
    let file = dir.path().join("controller.toml");
    std::fs::write(&file, "log_max_mb = 1\nlog_keep = 2\n")?;
    let mut cmd = command("de-controller");
    cmd.args([
        "serve",
        "--api-listen",
        "127.0.0.1:0",
        "--quic-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&data)
    .arg("--config")
    .arg(&file);
    let ctl = TestController::start_cmd(&data, cmd)?;
    // Any operation writes a line: a rejected plan does.
    let a = ctl.api("POST", "/deployment-engine/config", Some("{}"))?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(
        std::fs::read_to_string(data.join("logs/local.log.1"))?,
        old,
        "the full file moved to local.log.1 whole"
    );
    let now = std::fs::read_to_string(data.join("logs/local.log"))?;
    assert!(
        now.lines().count() == 1 && now.contains("plan rejected"),
        "{now}"
    );
    let names = ctl.api("GET", "/api/v1/logs", None)?;
    assert_eq!(names.body, serde_json::json!(["local.log", "local.log.1"]));
    Ok(())
}

#[test]
fn the_install_command_names_the_bound_quic_address_when_no_public_address_is_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let a = ctl.api("POST", "/api/v1/install-codes", None)?;
    let code = a.body["code"].as_str().context("code")?;
    assert_eq!(
        a.body["agent_command"],
        format!(
            "packaging/install-agent.sh --controller {} --code {code}",
            ctl.quic
        )
    );
    let shown = ctl.api("GET", "/api/v1/install-codes", None)?;
    assert_eq!(shown.body["agent_command"], a.body["agent_command"]);
    Ok(())
}

#[test]
fn an_agent_enrols_with_the_controller_and_options_from_its_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let code = ctl.new_code(None)?;
    let state = dir.path().join("state");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root)?;
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "controller = \"{}\"\nadvertise_ip = \"127.0.0.6\"\nstate_dir = {:?}\nroot = {:?}\nconnect_timeout_secs = 5\nheartbeat_secs = 1\n",
            ctl.quic,
            state.display().to_string(),
            root.display().to_string()
        ),
    )?;
    let mut cmd = command("de-agent");
    cmd.args(["enroll", "--code", &code, "--config"]).arg(&file);
    let out = run_bounded(cmd, Duration::from_secs(60))?;
    assert!(out.status.success(), "enrol: {}", out.stderr);
    assert!(
        state.join("agent.json").is_file(),
        "state_dir from the file"
    );
    assert!(
        !std::fs::read_to_string(&file)?.contains(&code),
        "the code is never written to the config file"
    );
    let node = wait_until(WAIT, "the node with advertise_ip from the file", || {
        ctl.node_by_ip("127.0.0.6").ok().flatten()
    })?;
    assert!(node.id.starts_with("n-"), "{node:?}");
    Ok(())
}

#[test]
fn bad_config_files_exit_64_with_one_line_naming_the_file_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        (
            "de-controller",
            "serve",
            "data_dir = \"/x\"\ndatadir = \"/y\"\n",
            "line 2: unknown field `datadir`",
        ),
        (
            "de-controller",
            "serve",
            "public_addr = \"x; reboot\"\n",
            "line 1, key `public_addr`",
        ),
        (
            "de-controller",
            "serve",
            "log_keep = 4\nstep_attempts = 0\n",
            "line 2, key `step_attempts`: must be between 1 and 20, got 0",
        ),
        (
            "de-agent",
            "run",
            "heartbeat_secs = 0\n",
            "line 1, key `heartbeat_secs`: must be between 1 and 3600",
        ),
        (
            "de-agent",
            "enroll",
            "controller = \"c:1\"\ncode = \"0427\"\n",
            "line 2, key `code`: the install code does not belong in a config file",
        ),
    ];
    for (i, (bin, sub, text, expected)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&file, text)?;
        let mut cmd = command(bin);
        cmd.args([sub, "--code", "0427", "--config"]).arg(&file);
        if bin == "de-controller" {
            cmd = command(bin);
            cmd.args([sub, "--config"]).arg(&file);
        }
        let out = run_bounded(cmd, Duration::from_secs(30))?;
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bin} {text:?}: {}",
            out.stderr
        );
        let line = format!("{bin}: config file {}, {expected}", file.display());
        assert!(
            out.stderr.starts_with(&line),
            "{bin} {text:?}:\n{}\nexpected: {line}",
            out.stderr
        );
        assert_eq!(
            out.stderr.trim_end().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
    let mut cmd = command("de-agent");
    cmd.args(["run", "--config", "/nonexistent/agent.toml"]);
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        out.stderr
            .starts_with("de-agent: could not read the config file /nonexistent/agent.toml:"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// `--log-format json`: every line the controller logs is one JSON object
/// with its level and fields, for journald and log shippers; a format that
/// does not exist is refused naming the choices.
#[test]
fn log_lines_can_be_json_objects_one_per_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = TestController::start_with(
        &data,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--log-format", "json"],
    )?;
    let log = data.with_extension("controller.log");
    let text = wait_until(
        std::time::Duration::from_secs(20),
        "a JSON log line",
        || {
            let t = std::fs::read_to_string(&log).ok()?;
            t.lines().any(|l| l.starts_with('{')).then_some(t)
        },
    )?;
    let mut objects = 0;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line}"))?;
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        objects += 1;
    }
    assert!(objects >= 1);
    assert!(
        text.contains(r#""message":"agents are told to dial""#),
        "{text}"
    );
    drop(ctl);
    let mut cmd = command("de-controller");
    cmd.args(["serve", "--log-format", "xml"]);
    let o = run_bounded(cmd, Duration::from_secs(30))?;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(o.stderr.contains("text or json"), "{}", o.stderr);
    Ok(())
}
