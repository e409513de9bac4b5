//! The fault suite: controllers and agents SIGKILLed at random moments
//! during deployments, many times, from a printed seed (127.0.12.x).
//!
//! Every step of the catalog here appends `ROUND COMPONENT K IP STEP_ID` to
//! one journal shared by all nodes, so the test sees exactly which step ran
//! how often and under which queue id. Each round changes a property, so
//! every instance is re-applied and the whole deployment runs again.
//!
//! Strength is set by the environment, so CI runs a small count and a user
//! runs the full suite with one command (docs/RELIABILITY.md):
//! `DE_FAULT_KILLS` (controller kills, default 6), `DE_FAULT_AGENT_KILLS`
//! (agent kills, default 4), `DE_FAULT_BOTH_KILLS` (the controller and an
//! agent together, default 3), `DE_FAULT_ADHOC_KILLS` (controller kills
//! under ad-hoc commands, default 3), `DE_FAULT_SEED` (replay a failure: the
//! seed is printed at the start of each test).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use de_tests::{TestAgent, TestController, cluster, wait_until};
use serde_json::{Value, json};

/// Components, and script steps per component: 2 x 6 x 4 nodes = 48 steps a round.
const COMPONENTS: [&str; 2] = ["alpha", "beta"];
const STEPS: usize = 6;
const DEPLOY_LIMIT: Duration = Duration::from_secs(120);

/// splitmix64: a small, seedable generator, so a failing run replays exactly.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = std::env::var("DE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{test}: seed {seed} (replay with DE_FAULT_SEED={seed})");
        eprintln!("{test}: seed {seed} (replay with DE_FAULT_SEED={seed})");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A catalog of script-only components whose every step writes the journal.
fn write_catalog(data: &Path) -> Result<()> {
    let cat = data.join("catalogs/faults");
    std::fs::create_dir_all(&cat)?;
    std::fs::write(
        cat.join("catalog.toml"),
        "description = \"Steps that write a journal, for the fault suite\"\nentry = \"beta\"\n\
         [properties]\njournal = \"\"\nround = 0\npause = \"0\"\n",
    )?;
    for (i, c) in COMPONENTS.iter().enumerate() {
        let mut toml = format!(
            "description = \"Fault-suite component {c}\"\ncardinality = \"many\"\n{}\
             monit_check = '''\ncheck program {c} with path /bin/true\n'''\nlogs = []\n\
             [minimum]\ncpus = 1\nram_mb = 1\ndisk_mb = 1\n",
            if i > 0 {
                format!("after = [\"{}\"]\n", COMPONENTS[i - 1])
            } else {
                String::new()
            }
        );
        for k in 1..=STEPS {
            toml.push_str(&format!(
                "\n[[install]]\naction = \"script\"\nrun = 'sleep {{{{ properties.pause }}}}; \
                 echo \"{{{{ properties.round }}}} {c} {k} {{{{ node.ip }}}} $DE_STEP_ID\" >> {{{{ properties.journal }}}}'\n"
            ));
        }
        std::fs::write(cat.join(format!("{c}.toml")), toml)?;
    }
    Ok(())
}

fn plan(ips: &[&str], journal: &Path, round: u32, pause: &str) -> String {
    json!({
        "components": {"alpha": ips, "beta": ips},
        "properties": {
            "domain": "faults.test", "catalog": "faults",
            "journal": journal.display().to_string(), "round": round, "pause": pause,
        },
    })
    .to_string()
}

/// One journal line: which step of which round ran on which node, under which queue id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Run {
    round: u32,
    component: String,
    k: usize,
    ip: String,
    step_id: String,
}

fn journal(path: &Path) -> Result<Vec<Run>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [round, component, k, ip, step_id] = f[..] else {
            bail!("malformed journal line {line:?}");
        };
        out.push(Run {
            round: round.parse()?,
            component: component.to_owned(),
            k: k.parse()?,
            ip: ip.to_owned(),
            step_id: step_id.to_owned(),
        });
    }
    Ok(out)
}

/// The journal's runs of `round`, grouped by (component, k, ip).
fn runs_of(all: &[Run], round: u32) -> BTreeMap<(String, usize, String), Vec<String>> {
    let mut by: BTreeMap<(String, usize, String), Vec<String>> = BTreeMap::new();
    for r in all.iter().filter(|r| r.round == round) {
        by.entry((r.component.clone(), r.k, r.ip.clone()))
            .or_default()
            .push(r.step_id.clone());
    }
    by
}

fn expected_keys(ips: &[&str]) -> Vec<(String, usize, String)> {
    let mut keys = Vec::new();
    for c in COMPONENTS {
        for k in 1..=STEPS {
            for ip in ips {
                keys.push((c.to_owned(), k, (*ip).to_owned()));
            }
        }
    }
    keys
}

fn submit(ctl: &TestController, plan: &str) -> Result<()> {
    let a = ctl.api("POST", "/deployment-engine/config", Some(plan))?;
    ensure!(a.status == 201, "plan refused: {} {}", a.status, a.body);
    Ok(())
}

fn start_deploy(ctl: &TestController) -> Result<String> {
    let a = ctl.api("GET", "/deployment-engine/deploy", None)?;
    ensure!(a.status == 202, "deploy: {} {}", a.status, a.body);
    Ok(a.body["id"].as_str().context("deployment id")?.to_owned())
}

fn deployment(ctl: &TestController, id: &str) -> Option<Value> {
    ctl.api("GET", &format!("/api/v1/deployments/{id}"), None)
        .ok()
        .filter(|a| a.status == 200)
        .map(|a| a.body)
}

/// Waits for deployment `id` to end and checks it succeeded; `after` says
/// what the round went through, for the message.
fn round_succeeded(ctl: &TestController, id: &str, round: u32, after: &str) -> Result<Value> {
    let d = wait_until(
        DEPLOY_LIMIT,
        &format!("deployment {id} (round {round}) to end"),
        || deployment(ctl, id).filter(|d| d["state"] != "running"),
    )
    .with_context(|| format!("round {round}, after {after}"))?;
    ensure!(
        d["state"] == "succeeded",
        "round {round} after {after}: {d}"
    );
    Ok(d)
}

fn all_online(ctl: &TestController, ips: &[&str]) -> Result<()> {
    for ip in ips {
        wait_until(Duration::from_secs(60), &format!("{ip} online"), || {
            ctl.node_by_ip(ip).ok().flatten().filter(|n| n.online)
        })?;
    }
    Ok(())
}

fn controller_on(data: &Path, api: &str, quic: &str, attempts: u32) -> Result<TestController> {
    let mut cmd = de_tests::command("de-controller");
    cmd.args([
        "serve",
        "--api-listen",
        api,
        "--quic-listen",
        quic,
        "--step-attempts",
        &attempts.to_string(),
        "--data-dir",
    ])
    .arg(data);
    TestController::start_cmd(data, cmd)
}

/// After a round with agent kills: every step of `round` ran, no queue id
/// ran twice, every run but the last was reported `interrupted`, and the
/// last is the record's done step. Returns (steps checked, re-runs).
fn check_rerun_only_interrupted(
    ctl: &TestController,
    d: &Value,
    log: &Path,
    round: u32,
    ips: &[&str],
) -> Result<(usize, usize)> {
    let (mut checked, mut interrupted_seen) = (0, 0);
    // Each step's final queue id, from the record.
    let steps = d["steps"].as_array().context("steps")?;
    let runs = runs_of(&journal(log)?, round);
    for key in expected_keys(ips) {
        let ids = runs.get(&key).cloned().unwrap_or_default();
        ensure!(!ids.is_empty(), "round {round}: step {key:?} never ran");
        // A queue id never runs twice: at-most-once execution per step id.
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        ensure!(
            uniq.len() == ids.len(),
            "round {round}: a step id ran twice for {key:?}: {ids:?}"
        );
        // Every run but the last was interrupted, and the controller was told so.
        for earlier in &ids[..ids.len() - 1] {
            let s = ctl.api("GET", &format!("/api/v1/steps/{earlier}"), None)?;
            let err = s.body["outcome"]["error"].as_str().unwrap_or_default();
            ensure!(
                err.contains("interrupted"),
                "round {round}: {key:?} ran again after step {earlier}, which was not reported interrupted: {}",
                s.body
            );
            interrupted_seen += 1;
        }
        let last = ids.last().context("a run")?;
        ensure!(
            steps
                .iter()
                .any(|s| s["step_id"] == last.as_str() && s["state"] == "done"),
            "round {round}: the last run of {key:?} ({last}) is not the record's done step"
        );
        checked += 1;
    }
    Ok((checked, interrupted_seen))
}

#[test]
fn controller_killed_at_random_moments_loses_no_result_and_runs_no_step_twice() -> Result<()> {
    let kills = count_from_env("DE_FAULT_KILLS", 6);
    let mut rng = Rng::from_env("controller kills");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data)?;
    let ips = ["127.0.12.1", "127.0.12.2", "127.0.12.3", "127.0.12.4"];
    let (first, _agents) = cluster(dir.path(), &ips, false)?;
    let (api, quic) = (first.api.to_string(), first.quic.to_string());
    drop(first);
    let mut ctl = controller_on(&data, &api, &quic, 3)?;
    all_online(&ctl, &ips)?;
    let log = dir.path().join("journal.log");
    let started = Instant::now();
    let (mut done_kills, mut round) = (0usize, 0u32);
    let mut checked = 0usize;
    while done_kills < kills || round == 0 {
        round += 1;
        // Steps of 0-40 ms, so kills land before, between and during steps.
        let pause = format!("0.0{}", rng.below(5));
        all_online(&ctl, &ips)?;
        submit(&ctl, &plan(&ips, &log, round, &pause))?;
        let id = start_deploy(&ctl)?;
        // Up to 3 kills in this round, each after a uniform random delay
        // from the (re)start: during resume, while steps run, while results
        // are in flight and while the record is written.
        let this_round = (1 + rng.below(3) as usize).min(kills.saturating_sub(done_kills));
        for _ in 0..this_round {
            let delay = Duration::from_millis(rng.below(1500));
            std::thread::sleep(delay);
            drop(ctl); // SIGKILL
            done_kills += 1;
            ctl = controller_on(&data, &api, &quic, 3)?;
        }
        round_succeeded(&ctl, &id, round, &format!("{done_kills} kills"))?;
        let runs = runs_of(&journal(&log)?, round);
        for key in expected_keys(&ips) {
            let ids = runs.get(&key).cloned().unwrap_or_default();
            ensure!(
                ids.len() == 1,
                "round {round}: step {key:?} ran {} times (ids {ids:?}) after {done_kills} kills",
                ids.len()
            );
            checked += 1;
        }
        ensure!(
            runs.len() == expected_keys(&ips).len(),
            "round {round}: unexpected steps in the journal: {runs:?}"
        );
    }
    println!(
        "controller kills: {done_kills} kills over {round} deployments, {checked} steps checked exactly once, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn agents_killed_at_random_moments_skip_nothing_and_rerun_only_interrupted_steps() -> Result<()> {
    let kills = count_from_env("DE_FAULT_AGENT_KILLS", 4);
    let mut rng = Rng::from_env("agent kills");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data)?;
    let ips = ["127.0.12.11", "127.0.12.12", "127.0.12.13", "127.0.12.14"];
    let (first, mut agents) = cluster(dir.path(), &ips, false)?;
    let (api, quic) = (first.api.to_string(), first.quic.to_string());
    drop(first);
    // Interrupted steps are retried by the deployment's policy: allow many tries.
    let ctl = controller_on(&data, &api, &quic, 20)?;
    all_online(&ctl, &ips)?;
    let log = dir.path().join("journal.log");
    let started = Instant::now();
    let (mut done_kills, mut round, mut interrupted_seen) = (0usize, 0u32, 0usize);
    let mut checked = 0usize;
    while done_kills < kills || round == 0 {
        round += 1;
        let pause = format!("0.{}", 1 + rng.below(2));
        all_online(&ctl, &ips)?;
        submit(&ctl, &plan(&ips, &log, round, &pause))?;
        let id = start_deploy(&ctl)?;
        let this_round = (1 + rng.below(3) as usize).min(kills.saturating_sub(done_kills));
        for _ in 0..this_round {
            std::thread::sleep(Duration::from_millis(rng.below(2000)));
            let a: &mut TestAgent = &mut agents[rng.below(ips.len() as u64) as usize];
            if let Some(p) = a.proc.as_mut() {
                p.kill(); // SIGKILL
            }
            done_kills += 1;
            a.start(1)?;
        }
        let d = round_succeeded(&ctl, &id, round, &format!("{done_kills} agent kills"))?;
        let (c, i) = check_rerun_only_interrupted(&ctl, &d, &log, round, &ips)?;
        checked += c;
        interrupted_seen += i;
    }
    println!(
        "agent kills: {done_kills} kills over {round} deployments, {checked} steps checked, {interrupted_seen} interrupted and re-run, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn a_node_frozen_mid_step_fails_the_deployment_naming_it_and_the_next_one_finishes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data)?;
    let ips = ["127.0.12.21", "127.0.12.22"];
    let (first, agents) = cluster(dir.path(), &ips, false)?;
    let (api, quic) = (first.api.to_string(), first.quic.to_string());
    drop(first);
    let mut cmd = de_tests::command("de-controller");
    cmd.args(["serve", "--api-listen", &api, "--quic-listen", &quic])
        .args(["--node-grace", "3", "--data-dir"])
        .arg(&data);
    let ctl = TestController::start_cmd(&data, cmd)?;
    all_online(&ctl, &ips)?;
    let log = dir.path().join("journal.log");
    submit(&ctl, &plan(&ips, &log, 1, "2"))?;
    let id = start_deploy(&ctl)?;
    let frozen = agents[0].node_id()?;
    wait_until(Duration::from_secs(60), "a step running on node 1", || {
        deployment(&ctl, &id).filter(|d| {
            d["steps"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["node_id"] == frozen.as_str() && s["state"] == "running")
            })
        })
    })?;
    let pid = agents[0].proc.as_ref().context("agent 1 runs")?.pid();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()?;
    ensure!(stop.success(), "SIGSTOP");
    let d = wait_until(Duration::from_secs(60), "the deployment to fail", || {
        deployment(&ctl, &id).filter(|d| d["state"] != "running")
    });
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()?;
    let d = d?;
    ensure!(cont.success(), "SIGCONT");
    ensure!(d["state"] == "failed", "{d}");
    let err = d["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains(&frozen) && err.contains(ips[0]) && err.contains("silent"),
        "the failure names the frozen node: {err}"
    );
    // Awake again, the node takes the next deployment, which finishes.
    all_online(&ctl, &ips)?;
    submit(&ctl, &plan(&ips, &log, 2, "0"))?;
    let id = start_deploy(&ctl)?;
    let d = wait_until(DEPLOY_LIMIT, "the next deployment", || {
        deployment(&ctl, &id).filter(|d| d["state"] != "running")
    })?;
    ensure!(d["state"] == "succeeded", "{d}");
    let runs = runs_of(&journal(&log)?, 2);
    for key in expected_keys(&ips) {
        ensure!(
            runs.get(&key).map(Vec::len) == Some(1),
            "round 2: {key:?} ran {:?}",
            runs.get(&key)
        );
    }
    Ok(())
}

#[test]
fn a_revoked_nodes_steps_fail_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data)?;
    let ips = ["127.0.12.31", "127.0.12.32"];
    let (ctl, agents) = cluster(dir.path(), &ips, false)?;
    let log = dir.path().join("journal.log");
    // Long steps, so the revocation lands while node 2 has work queued or running.
    submit(&ctl, &plan(&ips, &log, 1, "1"))?;
    let id = start_deploy(&ctl)?;
    let revoked = agents[1].node_id()?;
    let a = ctl.api("DELETE", &format!("/api/v1/nodes/{revoked}"), None)?;
    ensure!(a.status == 204, "revoke: {} {}", a.status, a.body);
    let d = wait_until(Duration::from_secs(60), "the deployment to end", || {
        deployment(&ctl, &id).filter(|d| d["state"] != "running")
    })?;
    ensure!(d["state"] == "failed", "{d}");
    let err = d["error"].as_str().unwrap_or_default();
    ensure!(
        err.contains(&revoked) && err.contains("revoked"),
        "the failure names the revoked node: {err}"
    );
    Ok(())
}

#[test]
fn controller_and_an_agent_killed_together_lose_nothing_and_rerun_only_interrupted_steps()
-> Result<()> {
    let kills = count_from_env("DE_FAULT_BOTH_KILLS", 3);
    let mut rng = Rng::from_env("controller and agent kills");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data)?;
    let ips = ["127.0.12.41", "127.0.12.42", "127.0.12.43", "127.0.12.44"];
    let (first, mut agents) = cluster(dir.path(), &ips, false)?;
    let (api, quic) = (first.api.to_string(), first.quic.to_string());
    drop(first);
    let mut ctl = controller_on(&data, &api, &quic, 20)?;
    all_online(&ctl, &ips)?;
    let log = dir.path().join("journal.log");
    let started = Instant::now();
    let (mut done_kills, mut round, mut checked, mut interrupted_seen) = (0usize, 0u32, 0, 0);
    while done_kills < kills || round == 0 {
        round += 1;
        let pause = format!("0.{}", rng.below(2));
        all_online(&ctl, &ips)?;
        submit(&ctl, &plan(&ips, &log, round, &pause))?;
        let id = start_deploy(&ctl)?;
        let this_round = (1 + rng.below(2) as usize).min(kills.saturating_sub(done_kills));
        for _ in 0..this_round {
            std::thread::sleep(Duration::from_millis(rng.below(1500)));
            // Both at once: the controller, and one agent chosen at random.
            let a: &mut TestAgent = &mut agents[rng.below(ips.len() as u64) as usize];
            if let Some(p) = a.proc.as_mut() {
                p.kill();
            }
            drop(ctl);
            done_kills += 1;
            ctl = controller_on(&data, &api, &quic, 20)?;
            a.start(1)?;
        }
        let d = round_succeeded(&ctl, &id, round, &format!("{done_kills} double kills"))?;
        let (c, i) = check_rerun_only_interrupted(&ctl, &d, &log, round, &ips)?;
        checked += c;
        interrupted_seen += i;
    }
    println!(
        "controller and agent kills: {done_kills} double kills over {round} deployments, {checked} steps checked, {interrupted_seen} interrupted and re-run, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Queues `script` on `node`'s ad-hoc lane without waiting; its step id.
fn queue_adhoc(ctl: &TestController, node: &str, script: &str) -> Result<String> {
    let req = de_common::api::StepRequest {
        action: de_common::StepAction::Script {
            script: script.to_owned(),
            user: None,
            env: Vec::new(),
            timeout_secs: 60,
        },
        lane: Some(de_common::Lane::Adhoc),
        wait_secs: Some(0),
    };
    let a = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{node}/steps"),
        Some(&serde_json::to_string(&req)?),
    )?;
    ensure!(
        a.status == 200 || a.status == 202,
        "queue: {} {}",
        a.status,
        a.body
    );
    Ok(a.json::<de_common::api::StepRecordView>()?
        .step
        .id
        .to_string())
}

#[test]
fn ad_hoc_steps_survive_controller_kills_with_each_result_recorded_once() -> Result<()> {
    let kills = count_from_env("DE_FAULT_ADHOC_KILLS", 3);
    let mut rng = Rng::from_env("ad-hoc kills");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ips = ["127.0.12.51", "127.0.12.52", "127.0.12.53", "127.0.12.54"];
    let (first, agents) = cluster(dir.path(), &ips, false)?;
    let (api, quic) = (first.api.to_string(), first.quic.to_string());
    drop(first);
    let mut ctl = controller_on(&data, &api, &quic, 3)?;
    let log = dir.path().join("adhoc.log");
    let nodes: Vec<String> = agents
        .iter()
        .map(TestAgent::node_id)
        .collect::<Result<_>>()?;
    let mut queued: Vec<String> = Vec::new();
    for kill in 0..kills.max(1) {
        all_online(&ctl, &ips)?;
        // Three commands per node, each writing its own step id to the journal.
        for node in &nodes {
            for _ in 0..3 {
                queued.push(queue_adhoc(
                    &ctl,
                    node,
                    &format!(
                        "sleep 0.0{}; echo \"$DE_STEP_ID\" >> {}",
                        rng.below(9),
                        log.display()
                    ),
                )?);
            }
        }
        if kill < kills {
            std::thread::sleep(Duration::from_millis(rng.below(600)));
            drop(ctl); // SIGKILL, while commands run, finish or wait to be acknowledged
            ctl = controller_on(&data, &api, &quic, 3)?;
        }
    }
    // Every command's result reaches the restarted controller, once.
    for id in &queued {
        let rec = wait_until(DEPLOY_LIMIT, &format!("step {id} to end"), || {
            ctl.api("GET", &format!("/api/v1/steps/{id}"), None)
                .ok()
                .and_then(|a| a.json::<de_common::api::StepRecordView>().ok())
                .filter(|r| r.state.is_final())
        })?;
        ensure!(
            rec.state == de_common::api::StepState::Done,
            "step {id}: {rec:?}"
        );
    }
    let text = std::fs::read_to_string(&log)?;
    for id in &queued {
        let n = text.lines().filter(|l| l.trim() == id).count();
        ensure!(n == 1, "step {id} ran {n} times");
    }
    println!(
        "ad-hoc kills: {kills} kills, {} commands each recorded done and run once",
        queued.len()
    );
    Ok(())
}
