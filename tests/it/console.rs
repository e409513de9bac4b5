//! The web console in a real headless Chromium against a real controller and
//! real agents with private monit (127.0.11.x): sign in, generate a code that
//! agents then enrol with (the nodes appear without a reload), a plan with
//! problems shown next to what they concern, what a deploy would do, a
//! deployment followed live, one cancelled, a restart, stop and start from
//! the status page, and the log files.
//!
//! With `DE_CONSOLE_SCREENSHOTS=DIR` it saves a screenshot of every page
//! there (docs/console/ is made that way; see docs/CONSOLE.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use de_common::api::{AuditAction, AuditEntry, DeployState, DeploymentView};
use de_tests::webdriver::Browser;
use de_tests::{
    TestAgent, TestController, pidfile, process_alive, script_component, supervised_sleeper,
    wait_until, write_catalog,
};

const WAIT: Duration = Duration::from_secs(60);
const IPS: [&str; 2] = ["127.0.11.1", "127.0.11.2"];

/// A component whose install always fails, saying why on stderr.
fn broken() -> String {
    script_component(
        "broken",
        "Never installs",
        r#"echo "cannot start: no licence" >&2; exit 3"#,
    )
}

/// A component whose install, the first time, says so and sleeps 30 s: long
/// enough to cancel it. It leaves `slow.once` in the node root first, so the
/// next install is quick.
fn slow() -> String {
    script_component(
        "slow",
        "Slow to install the first time",
        r#"if [ ! -e "$DE_ROOT/slow.once" ]; then touch "$DE_ROOT/slow.once"; echo "slow: waiting"; sleep 30; fi; echo "slow: installed""#,
    )
}

fn write_sleepers(data: &Path) -> Result<()> {
    // One supervised process per node; its install step prints a line the
    // live log must show.
    write_catalog(
        data,
        "sleepers",
        "description = \"Sleepers: one supervised process per node\"\nentry = \"sleeper\"\n",
        &[
            ("sleeper", &supervised_sleeper("sleeper")),
            ("broken", &broken()),
            ("slow", &slow()),
        ],
    )
}

/// Saves a screenshot as NAME.png in `DE_CONSOLE_SCREENSHOTS`, or in `scratch`.
fn shot(b: &Browser, scratch: &Path, name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("DE_CONSOLE_SCREENSHOTS")
        .map_or_else(|| scratch.to_owned(), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.png"));
    b.exec("window.scrollTo(0, 0); return null;", &[])?;
    b.screenshot(&path)?;
    Ok(path)
}

/// How many `action` entries the audit log holds. Reading it is also a
/// request made after whatever the page sent before: a request from a click
/// has been handled (and audited) by the time this answers.
fn audited(ctl: &TestController, action: AuditAction) -> Result<usize> {
    let audit: Vec<AuditEntry> = ctl.api("GET", "/api/v1/audit", None)?.expect(200)?;
    Ok(audit.iter().filter(|e| e.action == action).count())
}

/// Clicks the element `css` names once it is there. The page re-renders
/// parts of itself (polls, navigation), so an element found a moment ago
/// can be replaced before the click lands ("stale element reference"):
/// then it is found again and clicked again, until `WAIT` has passed.
fn click(b: &Browser, css: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match b.wait_for(css, left)?.click() {
            Ok(()) => return Ok(()),
            Err(e)
                if format!("{e:#}").contains("stale element")
                    && std::time::Instant::now() < deadline => {}
            Err(e) => return Err(e).with_context(|| format!("click {css}")),
        }
    }
}

fn pid_of(agent: &TestAgent) -> Option<u32> {
    pidfile(agent, "sleeper")
}

#[test]
fn the_console_enrols_plans_deploys_and_restarts_in_a_real_browser() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let scratch = dir.path().join("screens");
    let data = dir.path().join("data");
    write_sleepers(&data)?;
    // Over HTTPS, as the packaged controller serves it, with its CA trusted
    // in the browser the way an operator would add it.
    let ctl = TestController::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &["--api-tls"])?;
    let b = Browser::start_trusting(Some(&data.join("ca.pem")))?;
    b.set_window_size(1360, 1000)?;
    let result = walk_through(&b, &ctl, dir.path(), &scratch);
    if result.is_err() {
        // What the page showed when it went wrong.
        let text = b.exec("return document.body.innerText;", &[]);
        eprintln!("--- the page when the test failed ---\n{text:?}");
        if let Ok(p) = shot(&b, &scratch, "failure") {
            let keep = std::env::temp_dir().join("de-console-failure.png");
            let _ = std::fs::copy(p, &keep);
            eprintln!("screenshot: {}", keep.display());
        }
    }
    result
}

fn walk_through(b: &Browser, ctl: &TestController, dir: &Path, scratch: &Path) -> Result<()> {
    let base = ctl.base_url();
    assert!(base.starts_with("https://"), "{base}");

    // Sign in: a wrong token is refused with a hint, the right one opens the console.
    b.goto(&format!("{base}/"))?;
    b.wait_for("#token", WAIT)?.send_keys("not-the-token")?;
    click(b, "#signin-submit")?;
    b.wait_for_text("#signin-error", "refused", WAIT)?;
    shot(b, scratch, "signin")?;
    let token = b.find("#token")?;
    token.clear()?;
    token.send_keys(&ctl.token)?;
    click(b, "#signin-submit")?;

    // Install: generate a code; the page shows it with the command to run.
    click(b, "#new-code")?;
    let code = b.wait_for("#install-code", WAIT)?.text()?;
    ensure!(
        code.len() == 4 && code.chars().all(|c| c.is_ascii_digit()),
        "{code:?}"
    );
    let command = b.wait_for_text("#agent-command", &code, WAIT)?;
    b.wait_for_text("#code-remaining", "expires in", WAIT)?;
    // Enrol with exactly what the page told the operator to run.
    let words: Vec<&str> = command.split_whitespace().collect();
    let arg = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .copied()
            .with_context(|| format!("{flag} in {command:?}"))
    };
    ensure!(arg("--code")? == code, "{command}");
    let controller: std::net::SocketAddr = arg("--controller")?.parse()?;
    ensure!(controller == ctl.quic, "{command} vs {}", ctl.quic);

    // The nodes appear on the page as they join, without a reload.
    b.exec("window.__sameDocument = true; return null;", &[])?;
    let mut agents = Vec::new();
    for ip in IPS {
        let mut a = TestAgent::new(dir, ip)?.with_private_monit();
        a.start_enrolling(&controller, &code)?;
        agents.push(a);
        b.wait_for_text("#install-nodes-table", ip, WAIT)?;
    }
    b.wait_for_text("#install-nodes-table", "just joined", WAIT)?;
    ensure!(
        b.exec("return window.__sameDocument === true;", &[])? == true,
        "the page was reloaded"
    );
    shot(b, scratch, "install")?;
    // End install: the code is gone, here and for the API.
    click(b, "#end-install")?;
    b.wait_for("#new-code", WAIT)?;
    b.wait_for_text("#page", "Installation ended", WAIT)?;
    ensure!(
        b.find_all("#install-code")?.is_empty(),
        "the code is still shown"
    );
    ensure!(
        ctl.api("GET", "/api/v1/install-codes", None)?.status == 404,
        "the code is still open"
    );

    // Nodes: both online, with hardware; revoke is there.
    click(b, "#nav-nodes")?;
    wait_until(WAIT, "both nodes online on the nodes page", || {
        let t = b.find("#nodes-table").ok()?.text().ok()?;
        (t.matches("online").count() == 2).then_some(t)
    })?;
    let table = b.find("#nodes-table")?.text()?;
    ensure!(table.contains("CPU") && table.contains("RAM"), "{table}");
    ensure!(
        b.find_all("#nodes-table button[data-action=revoke]")?.len() == 2,
        "{table}"
    );
    shot(b, scratch, "nodes")?;

    // Plan: an invalid plan gets every problem, each next to what it concerns.
    click(b, "#nav-plan")?;
    click(b, "#catalog option[value=sleepers]")?;
    b.wait_for_text("#catalog-components", "sleeper", WAIT)?;
    let editor = b.wait_for("#plan-json", WAIT)?;
    editor.clear()?;
    editor.send_keys(
        r#"{"components": {"sleeper": ["127.0.11.1", "127.0.11.9"]}, "properties": {"domain": "web.test", "catalog": "sleepers", "colour": "blue"}}"#,
    )?;
    click(b, "#validate")?;
    let problems = b.wait_for_text("#problems", "127.0.11.9", WAIT)?;
    ensure!(problems.contains("colour"), "{problems}");
    b.wait_for_text(
        "#catalog-components tr[data-component=sleeper] .problems-cell",
        "127.0.11.9",
        WAIT,
    )?;
    b.wait_for_text("#property-problems", "colour", WAIT)?;
    shot(b, scratch, "plan")?;
    // Nothing was stored.
    ensure!(
        ctl.api("GET", "/deployment-engine/config", None)?.status == 404,
        "an invalid plan was stored"
    );
    let editor = b.find("#plan-json")?;
    editor.clear()?;
    editor.send_keys(
        r#"{"components": {"sleeper": ["127.0.11.1", "127.0.11.2"]}, "properties": {"domain": "web.test", "catalog": "sleepers"}}"#,
    )?;
    click(b, "#save-plan")?;
    b.wait_for_text("#plan-result", "Saved as revision 1", WAIT)?;

    // Deploy: before the first one, the page says both instances would be
    // installed, and why.
    click(b, "#nav-deploy")?;
    b.wait_for_text("#live-log-state", "live", WAIT)?;
    for (i, ip) in IPS.iter().enumerate() {
        let row = b.wait_for_text(
            &format!("#plan-diff-table tr[data-instance=sleeper_{i}][data-ip='{ip}']"),
            "install",
            WAIT,
        )?;
        ensure!(row.contains("new in the plan"), "{row}");
    }
    ensure!(
        b.find_all("#plan-diff-table tbody tr")?.len() == 2,
        "{}",
        b.find("#plan-diff")?.text()?
    );
    b.wait_for_text("#plan-diff-summary", "2 of 2 instances to change", WAIT)?;
    // Start it from the page and follow it live.
    click(b, "#start-deploy")?;
    b.wait_for_text("#deploy-msg", "started", WAIT)?;
    for ip in IPS {
        b.wait_for_text("#live-log", &format!("installing sleeper on {ip}"), WAIT)?;
    }
    b.wait_for_text("#deployment-state", "succeeded", WAIT)?;
    // Script, monit add, monit start, and the mark the agent keeps.
    let progress = b.wait_for_text("#progress", "done", WAIT)?;
    ensure!(
        IPS.iter().all(|ip| progress.contains(ip)) && progress.contains("4/4"),
        "{progress}"
    );
    b.wait_for_text("#history-table", "succeeded", WAIT)?;
    ensure!(
        b.find_all("#cancel-deployment")?.is_empty(),
        "a finished deployment offers Cancel"
    );
    // Once it ended, the page asks again: nothing to do on either node.
    b.wait_for_text("#plan-diff-summary", "Nothing to do", WAIT)?;
    ensure!(
        b.find_all("#plan-diff-table tr[data-action=nothing]")?
            .len()
            == 2,
        "{}",
        b.find("#plan-diff")?.text()?
    );

    // Status: both running; restart one instance from its row.
    click(b, "#nav-status")?;
    wait_until(WAIT, "both instances RUNNING on the status page", || {
        let t = b.find("#status-table").ok()?.text().ok()?;
        (t.matches("RUNNING").count() == 2).then_some(t)
    })?;
    let before = pid_of(&agents[0]).context("sleeper pid on node 1")?;
    let other = pid_of(&agents[1]).context("sleeper pid on node 2")?;
    click(
        b,
        "#status-table tr[data-comp=sleeper][data-ip='127.0.11.1'] button[data-op=restart]",
    )?;
    b.wait_for_text("#op-result", "ok on 1 instance", WAIT)?;
    let after = wait_until(WAIT, "a new sleeper pid on node 1", || {
        pid_of(&agents[0]).filter(|p| *p != before)
    })?;
    ensure!(after != before);
    ensure!(
        pid_of(&agents[1]) == Some(other),
        "node 2 was restarted too"
    );
    wait_until(WAIT, "node 1 RUNNING again", || {
        let t = b.find("#status-table").ok()?.text().ok()?;
        (t.matches("RUNNING").count() == 2).then_some(t)
    })?;
    // Stop takes a second click; then monit stops node 2's process.
    let stop = "#status-table tr[data-comp=sleeper][data-ip='127.0.11.2'] button[data-op=stop]";
    let stops = audited(ctl, AuditAction::Stop)?;
    click(b, stop)?;
    b.wait_for_text(stop, "Confirm stop", WAIT)?;
    ensure!(
        audited(ctl, AuditAction::Stop)? == stops,
        "a stop was sent on the first click"
    );
    ensure!(process_alive(other), "stopped on the first click");
    click(b, stop)?;
    b.wait_for_text("#op-result", "stop done: ok on 1 instance", WAIT)?;
    ensure!(
        audited(ctl, AuditAction::Stop)? == stops + 1,
        "one stop for the two clicks"
    );
    wait_until(WAIT, "node 2's sleeper to exit", || {
        (!process_alive(other)).then_some(())
    })?;
    b.wait_for_text(
        "#status-table tr[data-comp=sleeper][data-ip='127.0.11.2']",
        "STOPPED",
        WAIT,
    )?;
    // Start undoes the stop: a new process on node 2, RUNNING again.
    click(
        b,
        "#status-table tr[data-comp=sleeper][data-ip='127.0.11.2'] button[data-op=start]",
    )?;
    b.wait_for_text("#op-result", "start done: ok on 1 instance", WAIT)?;
    wait_until(WAIT, "a new sleeper on node 2", || {
        pid_of(&agents[1]).filter(|p| *p != other && process_alive(*p))
    })?;
    b.wait_for_text(
        "#status-table tr[data-comp=sleeper][data-ip='127.0.11.2']",
        "RUNNING",
        WAIT,
    )?;
    ensure!(
        pid_of(&agents[0]) == Some(after),
        "node 1 was started again too"
    );
    shot(b, scratch, "status")?;

    // Run: a command on the nodes picked (node 1 only), each one's output.
    click(b, "#nav-run")?;
    click(b, "#run-targets input[data-ip='127.0.11.2']")?;
    b.wait_for("#run-script", WAIT)?
        .send_keys("echo \"from the console in $DE_ROOT\"; echo careful >&2; exit 4")?;
    click(b, "#run-command")?;
    let result = b.wait_for_text(
        "#run-results .run-result[data-ip='127.0.11.1']",
        "exit 4",
        WAIT,
    )?;
    let root = std::fs::canonicalize(&agents[0].root)?;
    ensure!(
        result.contains(&format!("from the console in {}", root.display()))
            && result.contains("careful"),
        "{result}"
    );
    ensure!(
        b.find_all("#run-results .run-result")?.len() == 1,
        "ran on a node that was not picked"
    );
    b.wait_for_text("#run-results", "Failed on 1 of 1", WAIT)?;
    shot(b, scratch, "run")?;

    // Logs: the files are listed; local.log holds the deployment's output.
    click(b, "#nav-logs")?;
    b.wait_for_text("#logs-table", "local.log", WAIT)?;
    click(b, "#logs-table tr[data-log='local.log'] button")?;
    b.wait_for_text("#log-text", "installing sleeper on 127.0.11.2", WAIT)?;
    shot(b, scratch, "logs")?;
    // Download saves the file itself, through the browser's own download.
    click(
        b,
        "#logs-table tr[data-log='local.log'] button[data-download]",
    )?;
    let saved = wait_until(WAIT, "local.log in the browser's downloads", || {
        std::fs::read_to_string(b.downloads().join("local.log")).ok()
    })?;
    let on_disk = std::fs::read_to_string(ctl.data_dir.join("logs/local.log"))?;
    ensure!(
        saved.contains("installing sleeper on 127.0.11.1") && on_disk.starts_with(saved.trim_end()),
        "downloaded:\n{saved}\non disk:\n{on_disk}"
    );

    // A deployment that fails shows which step, where, and its output.
    click(b, "#nav-plan")?;
    let editor = b.wait_for("#plan-json", WAIT)?;
    wait_until(WAIT, "the stored plan in the editor", || {
        (editor.prop("readOnly").ok()? == false).then_some(())
    })?;
    ensure!(
        editor
            .prop("value")?
            .as_str()
            .unwrap_or_default()
            .contains("127.0.11.2"),
        "the editor starts with the stored plan"
    );
    editor.clear()?;
    editor.send_keys(
        r#"{"components": {"sleeper": ["127.0.11.1", "127.0.11.2"], "broken": ["127.0.11.2"]}, "properties": {"domain": "web.test", "catalog": "sleepers"}}"#,
    )?;
    click(b, "#save-plan")?;
    b.wait_for_text("#plan-result", "Saved as revision 2", WAIT)?;
    click(b, "#nav-deploy")?;
    b.wait_for_text("#live-log-state", "live", WAIT)?;
    // Only what the new revision adds; the sleepers run as applied (node 2's
    // since it was started again).
    b.wait_for_text("#plan-diff-summary", "1 of 3 instances to change", WAIT)?;
    b.wait_for_text(
        "#plan-diff-table tr[data-instance=broken_0][data-action=install]",
        "new in the plan",
        WAIT,
    )?;
    shot(b, scratch, "deploy")?;
    click(b, "#start-deploy")?;
    b.wait_for_text("#deployment-state", "failed", WAIT)?;
    let failure = b.wait_for_text(".failures", "broken_0 on 127.0.11.2", WAIT)?;
    ensure!(
        failure.contains("exit 3") && failure.contains("cannot start: no licence"),
        "{failure}"
    );
    let error = b.find("#deployment .notice.bad")?.text()?;
    ensure!(
        error.contains("script failed after 3 attempts: exit code 3;"),
        "{error}"
    );
    b.wait_for_text("#live-log", "cannot start: no licence", WAIT)?;
    b.wait_for_text("#progress tr[data-instance=broken_0]", "failed", WAIT)?;
    shot(b, scratch, "deploy-failed")?;
    // Its log, downloaded from the page, says the same in plain words.
    let failed_id = b.find("#deployment-id")?.text()?;
    click(b, "#download-deployment-log")?;
    let log = wait_until(WAIT, "the deployment's log in the downloads", || {
        std::fs::read_to_string(b.downloads().join(format!("{failed_id}.log"))).ok()
    })?;
    ensure!(
        log.contains("install script: failed, attempts 3, exit 3, exit code 3")
            && !log.contains("Some("),
        "{log}"
    );

    // Cancel: a deployment whose step sleeps is cancelled from the page
    // (a second click confirms), and the next one is accepted at once.
    click(b, "#nav-plan")?;
    let editor = b.wait_for("#plan-json", WAIT)?;
    wait_until(WAIT, "the stored plan in the editor", || {
        (editor.prop("readOnly").ok()? == false).then_some(())
    })?;
    editor.clear()?;
    editor.send_keys(
        r#"{"components": {"sleeper": ["127.0.11.1", "127.0.11.2"], "slow": ["127.0.11.1"]}, "properties": {"domain": "web.test", "catalog": "sleepers"}}"#,
    )?;
    click(b, "#save-plan")?;
    b.wait_for_text("#plan-result", "Saved as revision 3", WAIT)?;
    click(b, "#nav-deploy")?;
    b.wait_for_text("#live-log-state", "live", WAIT)?;
    b.wait_for_text(
        "#plan-diff-table tr[data-instance=slow_0][data-action=install]",
        "new in the plan",
        WAIT,
    )?;
    click(b, "#start-deploy")?;
    b.wait_for_text("#deploy-msg", "started", WAIT)?;
    let once = agents[0].root.join("slow.once");
    wait_until(WAIT, "the slow step to run on node 1", || {
        once.exists().then_some(())
    })?;
    let slow_id = b.wait_for("#deployment-id", WAIT)?.text()?;
    b.wait_for_text("#progress tr[data-instance=slow_0]", "running", WAIT)?;
    let cancels = audited(ctl, AuditAction::Cancel)?;
    click(b, "#cancel-deployment")?;
    b.wait_for_text("#cancel-deployment", "Confirm cancel", WAIT)?;
    ensure!(
        audited(ctl, AuditAction::Cancel)? == cancels,
        "a cancel was sent on the first click"
    );
    let still: DeploymentView = ctl
        .api("GET", &format!("/api/v1/deployments/{slow_id}"), None)?
        .expect(200)?;
    ensure!(
        still.state == DeployState::Running,
        "cancelled on the first click: {still:?}"
    );
    click(b, "#cancel-deployment")?;
    b.wait_for_text(
        "#deployment-msg",
        &format!("Deployment {slow_id} cancelled"),
        WAIT,
    )?;
    b.wait_for_text("#deployment-state", "cancelled", WAIT)?;
    b.wait_for_text("#progress tr[data-instance=slow_0]", "cancelled", WAIT)?;
    b.wait_for_text(".failures details.cancelled", "slow_0 on 127.0.11.1", WAIT)?;
    b.wait_for_text(
        &format!("#history-table tr[data-deployment='{slow_id}']"),
        "cancelled",
        WAIT,
    )?;
    ensure!(
        b.find_all("#cancel-deployment")?.is_empty(),
        "Cancel is still offered"
    );
    shot(b, scratch, "deploy-cancelled")?;
    let cancelled: DeploymentView = ctl
        .api("GET", &format!("/api/v1/deployments/{slow_id}"), None)?
        .expect(200)?;
    ensure!(cancelled.state == DeployState::Cancelled, "{cancelled:?}");
    // It never got to install slow_0: the page still offers it, and a new
    // deployment starts (and, the second time, installs it quickly).
    b.wait_for_text(
        "#plan-diff-table tr[data-instance=slow_0][data-action=install]",
        "new in the plan",
        WAIT,
    )?;
    click(b, "#start-deploy")?;
    wait_until(WAIT, "a second deployment started", || {
        let t = b.find("#deploy-msg").ok()?.text().ok()?;
        (t.contains("started") && !t.contains(&slow_id)).then_some(t)
    })?;
    b.wait_for_text("#deployment-state", "succeeded", WAIT)?;
    ensure!(
        b.find("#deployment-id")?.text()? != slow_id,
        "the page still shows the cancelled deployment"
    );
    b.wait_for_text("#plan-diff-summary", "Nothing to do", WAIT)?;

    // The deploy page opened later starts with local.log's last lines, and
    // any deployment of the history opens.
    click(b, "#nav-deploy")?;
    b.wait_for_text("#live-log", "slow: installed", WAIT)?;
    let id = b
        .wait_for("#history-table tr[data-deployment] a", WAIT)?
        .text()?;
    click(b, "#history-table tr[data-deployment] a")?;
    b.wait_for_text("#deployment-id", &id, WAIT)?;
    ensure!(
        b.url()?.ends_with(&format!("#/deploy/{id}")),
        "{}",
        b.url()?
    );

    // Nodes: revoking takes a second click, and the node is refused from then on.
    click(b, "#nav-nodes")?;
    let revoke = "#nodes-table tr[data-node-id] button[data-action=revoke]";
    b.wait_for(revoke, WAIT)?;
    let row = format!("#nodes-table tr[data-node-id='{}']", agents[1].node_id()?);
    let revokes = audited(ctl, AuditAction::Revoke)?;
    click(b, &format!("{row} button[data-action=revoke]"))?;
    b.wait_for_text(
        &format!("{row} button[data-action=revoke]"),
        "Confirm",
        WAIT,
    )?;
    ensure!(
        audited(ctl, AuditAction::Revoke)? == revokes,
        "a revoke was sent on the first click"
    );
    ensure!(
        !ctl.node_by_ip(IPS[1])?.context("node 2")?.revoked,
        "revoked on the first click"
    );
    click(b, &format!("{row} button[data-action=revoke]"))?;
    b.wait_for_text(&row, "revoked", WAIT)?;
    ensure!(
        ctl.node_by_ip(IPS[1])?.context("node 2")?.revoked,
        "not revoked in the API"
    );
    ensure!(
        audited(ctl, AuditAction::Revoke)? == revokes + 1,
        "one revoke for the two clicks"
    );
    // Refused from then on: the controller drops its link and turns it
    // away when it comes back; the agent says so and the node stays offline.
    wait_until(WAIT, "node 2's agent to be told it is revoked", || {
        agents[1]
            .log_text()
            .contains("the controller revoked this node")
            .then_some(())
    })?;
    wait_until(WAIT, "node 2 offline", || {
        ctl.node_by_ip(IPS[1]).ok().flatten().filter(|n| !n.online)
    })?;

    // Signing out forgets the token.
    click(b, "#sign-out")?;
    b.wait_for("#token", WAIT)?;
    ensure!(
        b.exec("return sessionStorage.getItem('de.token');", &[])?
            .is_null(),
        "the token is still stored"
    );
    drop(agents);
    Ok(())
}
