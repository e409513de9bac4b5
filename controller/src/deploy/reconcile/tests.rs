//! Tests of the reconciler's core in an in-memory world: the store is one
//! saved record (and the applied plan), the queue a list of steps, the
//! agents run the oldest unfinished queued step on each tick, and a crash is
//! a copy of the world taken between two effects. Every effect is checked as
//! it is carried out: a step is queued once, only under an id a saved record
//! holds, and a saved record never runs two steps of an instance or a step
//! before the groups below it are done.

use std::collections::HashMap;

use de_common::{MonitOp, StepAction, StepId};

use super::*;
use crate::deploy::record::{Applied, DeployStep, Deployment, Rollout, TaskKind};

/// Ids `s1`, `s2`... (`r3-s1`... for the controller that resumes from snapshot 3).
#[derive(Debug, Clone)]
struct Counter {
    prefix: String,
    n: u32,
}

impl IdSource for Counter {
    fn step_id(&mut self) -> StepId {
        self.n += 1;
        StepId::from(format!("{}s{}", self.prefix, self.n))
    }
}

fn done() -> Finished {
    Finished {
        exit_code: Some(0),
        ..Finished::default()
    }
}

fn exit(code: i32, stderr: &str) -> Finished {
    Finished {
        ending: Ending::Failed,
        exit_code: Some(code),
        stderr_tail: stderr.to_owned(),
        ..Finished::default()
    }
}

fn refused(why: &str) -> Finished {
    Finished {
        ending: Ending::Refused,
        refusal: Some(why.to_owned()),
        ..Finished::default()
    }
}

/// A running deployment `d-test` of steps written `instance@ip group path`
/// (the component is the instance's name before `_`, the node `n` and the
/// IP's last number, the action writes `path`, or, for `start:path`, starts
/// a monit check named `path`; group 0 uninstalls).
fn deployment(steps: &[&str], max_attempts: u32) -> Deployment {
    let steps = steps
        .iter()
        .map(|spec| {
            let parts: Vec<&str> = spec.split_whitespace().collect();
            let [at, group, path] = parts[..] else {
                panic!("{spec:?} is not `instance@ip group path`");
            };
            let (instance, ip) = at.split_once('@').expect("instance@ip");
            let component = instance.rsplit_once('_').map_or(instance, |(c, _)| c);
            let group: usize = group.parse().expect("group");
            DeployStep {
                component: component.to_owned(),
                instance: instance.to_owned(),
                ip: ip.to_owned(),
                node_id: format!("n{}", ip.rsplit('.').next().unwrap_or(ip)).into(),
                kind: if group == 0 {
                    TaskKind::Uninstall
                } else {
                    TaskKind::Install
                },
                group,
                action: match path.strip_prefix("start:") {
                    Some(name) => StepAction::Monit {
                        name: name.to_owned(),
                        op: MonitOp::Start,
                    },
                    None => StepAction::WriteFile {
                        path: path.to_owned(),
                        contents: Vec::new(),
                        mode: 0o644,
                        owner: None,
                    },
                },
                state: PhaseState::Pending,
                attempts: 0,
                step_id: None,
                started_at: None,
                finished_at: None,
                exit_code: None,
                error: None,
                output: None,
                hook: None,
            }
        })
        .collect();
    Deployment {
        id: "d-test".into(),
        state: DeployState::Running,
        plan_revision: 2,
        created_at: "t0".to_owned(),
        finished_at: None,
        error: None,
        max_attempts,
        steps,
        target: Applied {
            revision: 2,
            instances: Default::default(),
        },
        paused: false,
        rollout: Default::default(),
        watches: Vec::new(),
    }
}

fn path_of(a: &StepAction) -> &str {
    match a {
        StepAction::WriteFile { path, .. } => path,
        StepAction::Monit { name, .. } => name,
        other => panic!("the tests' steps write files, not {other:?}"),
    }
}

/// The store, the step queue and the agents, in memory.
#[derive(Debug, Clone)]
struct World {
    saved: Deployment,
    applied: Option<Applied>,
    /// In the order queued, with how each ended once an agent ran it.
    queue: Vec<(QueueStep, Option<Finished>)>,
    /// How the tries of the step writing a path end, in order; further tries are done.
    script: HashMap<String, Vec<Finished>>,
    /// How often the step writing a path ran.
    tries: HashMap<String, usize>,
    ids: Counter,
    clock: u32,
    /// What monit on the nodes says of an instance at a clock tick:
    /// (status, pid); refreshed on every tick.
    health: fn(u32, &str) -> (&'static str, Option<u32>),
    monit: MonitReports,
    transcript: Vec<String>,
}

/// Every instance runs as pid 100 throughout.
fn healthy(_: u32, _: &str) -> (&'static str, Option<u32>) {
    ("RUNNING", Some(100))
}

impl World {
    fn new(steps: &[&str]) -> World {
        World {
            saved: deployment(steps, 3),
            applied: None,
            queue: Vec::new(),
            script: HashMap::new(),
            tries: HashMap::new(),
            ids: Counter {
                prefix: String::new(),
                n: 0,
            },
            clock: 0,
            health: healthy,
            monit: MonitReports::new(),
            transcript: Vec::new(),
        }
    }

    fn rollout(mut self, component: &str, r: Rollout) -> World {
        self.saved.rollout.insert(component.to_owned(), r);
        self
    }

    fn health(mut self, f: fn(u32, &str) -> (&'static str, Option<u32>)) -> World {
        self.health = f;
        self
    }

    /// Every node's monit reports, as of this tick, each instance of the
    /// record on it as `health` says.
    fn report(&mut self) {
        let mut reports = MonitReports::new();
        for s in &self.saved.steps {
            let r = reports.entry(s.node_id.clone()).or_default();
            r.at_ms = u64::from(self.clock) * 1000;
            if r.checks.iter().any(|c| c.name == s.component) {
                continue;
            }
            let (status, pid) = (self.health)(self.clock, &s.instance);
            r.checks.push(CheckSeen {
                name: s.component.clone(),
                status: status.to_owned(),
                pid,
            });
        }
        self.monit = reports;
    }

    fn attempts(mut self, n: u32) -> World {
        self.saved.max_attempts = n;
        self
    }

    fn script(mut self, path: &str, tries: &[Finished]) -> World {
        self.script.insert(path.to_owned(), tries.to_vec());
        self
    }

    /// What the queue says about the saved record's running steps.
    fn seen(&self) -> HashMap<StepId, Seen> {
        self.saved
            .steps
            .iter()
            .filter(|s| s.state == PhaseState::Running)
            .filter_map(|s| s.step_id.clone())
            .map(|id| {
                let seen = match self.queue.iter().find(|(q, _)| q.id == id) {
                    None => Seen::NotQueued,
                    Some((_, None)) => Seen::Waiting,
                    Some((_, Some(f))) => Seen::Finished(f.clone()),
                };
                (id, seen)
            })
            .collect()
    }

    /// A pass over the saved record: the record it leaves and its effects.
    fn reconcile(&mut self) -> (Deployment, Vec<Effect>) {
        self.clock += 1;
        let mut d = self.saved.clone();
        let seen = self.seen();
        let text = format!("t{}", self.clock);
        let now = Now {
            text: &text,
            ms: u64::from(self.clock) * 1000,
        };
        let fx = reconcile(&mut d, &seen, &self.monit, &mut self.ids, now);
        (d, fx)
    }

    /// Carries out one effect of a pass that left `d`, checking the invariants.
    fn apply(&mut self, d: &Deployment, e: &Effect) {
        match e {
            Effect::Log { instance, line } => self.transcript.push(format!(
                "[{}] {line}",
                instance.as_deref().unwrap_or("controller")
            )),
            Effect::RecordApplied(a) => {
                self.applied = Some(a.clone());
                self.transcript.push("applied".to_owned());
            }
            Effect::Save => {
                check_invariants(d);
                self.saved = d.clone();
                self.transcript.push("save".to_owned());
            }
            Effect::Queue(steps) => {
                for s in steps {
                    assert!(
                        self.saved
                            .steps
                            .iter()
                            .any(|x| x.state == PhaseState::Running
                                && x.step_id.as_ref() == Some(&s.id)),
                        "{} queued before a saved record holds it",
                        s.id
                    );
                    assert!(
                        self.queue.iter().all(|(q, _)| q.id != s.id),
                        "{} queued twice",
                        s.id
                    );
                    self.queue.push((s.clone(), None));
                }
                let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
                self.transcript.push(format!("queue {}", ids.join(" ")));
            }
            Effect::CancelSteps(ids) => {
                for (q, result) in self.queue.iter_mut() {
                    if ids.contains(&q.id) && result.is_none() {
                        *result = Some(Finished {
                            ending: Ending::Cancelled,
                            ..Finished::default()
                        });
                    }
                }
                self.transcript.push(format!("cancel {}", ids.join(" ")));
            }
        }
    }

    /// One pass with all its effects carried out.
    fn pass(&mut self) {
        let (d, fx) = self.reconcile();
        for e in &fx {
            self.apply(&d, e);
        }
    }

    /// An agent runs the oldest queued step that has not run yet; the
    /// nodes' monit reports.
    fn tick(&mut self) {
        self.report();
        let Some((q, result)) = self.queue.iter_mut().find(|(_, r)| r.is_none()) else {
            return;
        };
        let path = path_of(&q.action).to_owned();
        let n = self.tries.entry(path.clone()).or_default();
        *n += 1;
        let f = self
            .script
            .get(&path)
            .and_then(|tries| tries.get(*n - 1))
            .cloned()
            .unwrap_or_else(done);
        let how = match f.ending {
            Ending::Done => "done",
            Ending::Failed => "failed",
            Ending::Refused => "refused",
            Ending::Cancelled => "cancelled",
        };
        self.transcript.push(format!("ran {}: {how}", q.id));
        *result = Some(f);
    }

    /// Passes and ticks until the saved deployment is over, calling `each`
    /// after every effect and every tick (the points a controller may die at).
    fn run_with(&mut self, mut each: impl FnMut(&World)) {
        for _ in 0..200 {
            let (d, fx) = self.reconcile();
            for e in &fx {
                self.apply(&d, e);
                each(self);
            }
            if self.saved.state != DeployState::Running {
                return;
            }
            self.tick();
            each(self);
        }
        panic!("the deployment did not end: {:#?}", self.saved);
    }

    fn run(&mut self) {
        self.run_with(|_| {});
    }

    /// A new controller picks the saved deployment up.
    fn resume(&mut self, prefix: &str) {
        self.ids = Counter {
            prefix: prefix.to_owned(),
            n: 0,
        };
        let mut d = self.saved.clone();
        let text = format!("t{}", self.clock);
        let now = Now {
            text: &text,
            ms: u64::from(self.clock) * 1000,
        };
        for e in resumed(&mut d, now) {
            self.apply(&d, &e);
        }
    }

    fn step(&self, path: &str) -> &DeployStep {
        self.saved
            .steps
            .iter()
            .find(|s| path_of(&s.action) == path)
            .expect("a step writes this path")
    }
}

/// What every saved record must hold: one running step per instance at most,
/// steps run only once every group below theirs is done, and each
/// component's rollout holds (see [`check_rollout`]).
fn check_invariants(d: &Deployment) {
    check_rollout(d);
    for s in d.steps.iter().filter(|s| s.state == PhaseState::Running) {
        let same = d
            .steps
            .iter()
            .filter(|x| x.state == PhaseState::Running && x.instance == s.instance && x.ip == s.ip)
            .count();
        assert_eq!(same, 1, "{} runs {same} steps at once", s.instance);
        assert!(
            d.steps
                .iter()
                .filter(|x| x.group < s.group)
                .all(|x| x.state == PhaseState::Done),
            "{} runs in group {} before the groups below are done",
            s.instance,
            s.group
        );
    }
}

/// Per group and component: at most `max_in_flight` instances in flight (a
/// step started, and not every step done with no watch left running), and
/// no instance but a canary started before every canary is through.
fn check_rollout(d: &Deployment) {
    let mut keys: Vec<(usize, String, String)> = Vec::new();
    for s in &d.steps {
        let k = (s.group, s.component.clone(), s.instance.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let of = |(g, _, i): &(usize, String, String)| {
        let steps: Vec<&DeployStep> = d
            .steps
            .iter()
            .filter(|s| s.group == *g && s.instance == *i)
            .collect();
        let started = steps.iter().any(|s| s.attempts > 0);
        let watching = d
            .watches
            .iter()
            .any(|w| w.group == *g && w.instance == *i && w.state == PhaseState::Running);
        let through = steps.iter().all(|s| s.state == PhaseState::Done) && !watching;
        (started, through)
    };
    let mut groups: Vec<(usize, String)> = keys.iter().map(|(g, c, _)| (*g, c.clone())).collect();
    groups.dedup();
    for (g, c) in groups {
        let r = d.rollout.get(&c).cloned().unwrap_or_default();
        let mine: Vec<&(usize, String, String)> =
            keys.iter().filter(|k| k.0 == g && k.1 == c).collect();
        let in_flight = mine
            .iter()
            .filter(|k| {
                let (started, through) = of(k);
                started && !through
            })
            .count();
        let max = r.max_in_flight.unwrap_or(usize::MAX);
        assert!(
            in_flight <= max,
            "{c} has {in_flight} instances in flight, at most {max} allowed"
        );
        let (canaries, rest) = mine.split_at(r.canaries.min(mine.len()));
        if rest.iter().any(|k| of(k).0) {
            for k in canaries {
                assert!(of(k).1, "{} started before canary {} was through", c, k.2);
            }
        }
    }
}

/// Compares a transcript with the expected one, ignoring indentation,
/// trailing spaces (an empty output leaves one after `output:`) and blank lines.
fn assert_transcript(w: &World, expect: &str) {
    let want: Vec<&str> = expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let got: Vec<&str> = w.transcript.iter().map(|l| l.trim_end()).collect();
    assert!(
        got == want,
        "transcript differs\n--- got:\n{}\n--- want:\n{}",
        got.join("\n"),
        want.join("\n")
    );
}

/// Runs the deployment of `steps` (tries of the paths as `script` says, 3
/// attempts) to its end and compares the transcript.
fn check(steps: &[&str], script: &[(&str, &[Finished])], expect: &str) -> World {
    let mut w = World::new(steps);
    for (path, tries) in script {
        w = w.script(path, tries);
    }
    w.run();
    assert_transcript(&w, expect);
    w
}

#[test]
fn a_fresh_deployment_starts_the_first_step_of_every_instance_of_the_lowest_group() {
    let mut w = World::new(&[
        "base_0@10.0.0.1 1 /base/a",
        "base_0@10.0.0.1 1 /base/b",
        "base_1@10.0.0.2 1 /base/a1",
        "app_0@10.0.0.1 2 /app/a",
    ]);
    w.pass();
    assert_transcript(
        &w,
        "
        save
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 1)
        [base_1] base_1 on 10.0.0.2: write /base/a1 (attempt 1)
        queue s1 s2
        ",
    );
    let s = w.step("/base/a");
    assert_eq!(
        (
            s.state,
            s.attempts,
            s.step_id.as_ref().map(StepId::as_str),
            s.started_at.as_deref()
        ),
        (PhaseState::Running, 1, Some("s1"), Some("t1"))
    );
    assert_eq!(w.step("/base/b").state, PhaseState::Pending);
    assert_eq!(w.step("/app/a").state, PhaseState::Pending);
}

#[test]
fn uninstalls_finish_before_installs_start() {
    check(
        &[
            "old_0@10.0.0.3 0 /old/stop",
            "old_0@10.0.0.3 0 /old/unmonitor",
            "gone_0@10.0.0.4 0 /gone/stop",
            "base_0@10.0.0.1 1 /base/a",
        ],
        &[],
        "
        save
        [old_0] old_0 on 10.0.0.3: write /old/stop (attempt 1)
        [gone_0] gone_0 on 10.0.0.4: write /gone/stop (attempt 1)
        queue s1 s2
        ran s1: done
        [old_0] old_0 on 10.0.0.3: write /old/stop done
        save
        [old_0] old_0 on 10.0.0.3: write /old/unmonitor (attempt 1)
        queue s3
        ran s2: done
        [gone_0] gone_0 on 10.0.0.4: write /gone/stop done
        save
        ran s3: done
        [old_0] old_0 on 10.0.0.3: write /old/unmonitor done
        save
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 1)
        queue s4
        ran s4: done
        [base_0] base_0 on 10.0.0.1: write /base/a done
        applied
        save
        [controller] deployment d-test succeeded
        ",
    );
}

#[test]
fn a_group_waits_for_the_one_below_and_an_instance_runs_one_step_at_a_time() {
    check(
        &[
            "base_0@10.0.0.1 1 /base/a",
            "base_0@10.0.0.1 1 /base/b",
            "base_1@10.0.0.2 1 /base/a1",
            "app_0@10.0.0.1 2 /app/a",
            "app_1@10.0.0.2 2 /app/a1",
        ],
        &[],
        "
        save
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 1)
        [base_1] base_1 on 10.0.0.2: write /base/a1 (attempt 1)
        queue s1 s2
        ran s1: done
        [base_0] base_0 on 10.0.0.1: write /base/a done
        save
        [base_0] base_0 on 10.0.0.1: write /base/b (attempt 1)
        queue s3
        ran s2: done
        [base_1] base_1 on 10.0.0.2: write /base/a1 done
        save
        ran s3: done
        [base_0] base_0 on 10.0.0.1: write /base/b done
        save
        [app_0] app_0 on 10.0.0.1: write /app/a (attempt 1)
        [app_1] app_1 on 10.0.0.2: write /app/a1 (attempt 1)
        queue s4 s5
        ran s4: done
        [app_0] app_0 on 10.0.0.1: write /app/a done
        save
        ran s5: done
        [app_1] app_1 on 10.0.0.2: write /app/a1 done
        applied
        save
        [controller] deployment d-test succeeded
        ",
    );
}

#[test]
fn a_failed_step_is_retried_under_a_new_id_until_it_works() {
    let w = check(
        &["app_0@10.0.0.1 1 /app/flaky", "app_0@10.0.0.1 1 /app/next"],
        &[("/app/flaky", &[exit(1, "not yet\n"), refused("expired")])],
        "
        save
        [app_0] app_0 on 10.0.0.1: write /app/flaky (attempt 1)
        queue s1
        ran s1: failed
        [app_0] app_0 on 10.0.0.1: write /app/flaky failed (exit code 1); retrying (attempt 2 of 3)
        save
        [app_0] app_0 on 10.0.0.1: write /app/flaky (attempt 2)
        queue s2
        ran s2: refused
        [app_0] app_0 on 10.0.0.1: write /app/flaky failed (expired); retrying (attempt 3 of 3)
        save
        [app_0] app_0 on 10.0.0.1: write /app/flaky (attempt 3)
        queue s3
        ran s3: done
        [app_0] app_0 on 10.0.0.1: write /app/flaky done
        save
        [app_0] app_0 on 10.0.0.1: write /app/next (attempt 1)
        queue s4
        ran s4: done
        [app_0] app_0 on 10.0.0.1: write /app/next done
        applied
        save
        [controller] deployment d-test succeeded
        ",
    );
    let s = w.step("/app/flaky");
    assert_eq!(
        (
            s.attempts,
            s.step_id.as_ref().map(StepId::as_str),
            s.error.as_deref()
        ),
        (3, Some("s3"), None),
        "the last attempt's id stays; its success clears the error"
    );
    assert_eq!(
        (s.started_at.as_deref(), s.finished_at.as_deref()),
        (Some("t1"), Some("t4")),
        "started at the first attempt, finished at the last"
    );
}

#[test]
fn a_step_failing_every_attempt_fails_the_deployment_saying_what_where_and_why() {
    let mut w = World::new(&["app_0@10.0.0.1 1 /app/start"])
        .attempts(2)
        .script(
            "/app/start",
            &[
                exit(9, "first\n"),
                exit(9, "app cannot start: fail_app is set\n"),
            ],
        );
    w.run();
    let msg = "app (app_0) on 10.0.0.1 (node n1): write /app/start failed after 2 attempts: exit code 9; output: app cannot start: fail_app is set";
    assert_eq!(w.saved.state, DeployState::Failed);
    assert_eq!(w.saved.error.as_deref(), Some(msg));
    assert_eq!(w.saved.finished_at.as_deref(), Some("t3"));
    let s = w.step("/app/start");
    assert_eq!(
        (s.state, s.attempts, s.exit_code),
        (PhaseState::Failed, 2, Some(9))
    );
    assert_eq!(w.applied, None, "a failed deployment applies nothing");
    let tail: Vec<&str> = w
        .transcript
        .iter()
        .rev()
        .take(3)
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            format!("[controller] deployment d-test failed: {msg}").as_str(),
            "save",
            format!("[app_0] {msg}").as_str(),
        ]
    );
}

#[test]
fn a_failure_for_good_stops_later_groups_and_skips_what_is_pending() {
    let w = check(
        &[
            "base_0@10.0.0.1 1 /base/a",
            "base_0@10.0.0.1 1 /base/b",
            "app_0@10.0.0.1 2 /app/a",
        ],
        &[("/base/a", &[exit(1, ""), exit(1, ""), exit(1, "")])],
        "
        save
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 1)
        queue s1
        ran s1: failed
        [base_0] base_0 on 10.0.0.1: write /base/a failed (exit code 1); retrying (attempt 2 of 3)
        save
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 2)
        queue s2
        ran s2: failed
        [base_0] base_0 on 10.0.0.1: write /base/a failed (exit code 1); retrying (attempt 3 of 3)
        save
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 3)
        queue s3
        ran s3: failed
        [base_0] base (base_0) on 10.0.0.1 (node n1): write /base/a failed after 3 attempts: exit code 1; output:
        save
        [controller] deployment d-test failed: base (base_0) on 10.0.0.1 (node n1): write /base/a failed after 3 attempts: exit code 1; output:
        ",
    );
    let states: Vec<PhaseState> = w.saved.steps.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [PhaseState::Failed, PhaseState::Skipped, PhaseState::Skipped]
    );
}

#[test]
fn steps_in_flight_when_another_fails_for_good_are_left_to_finish() {
    let msg = "base (base_0) on 10.0.0.1 (node n1): write /base/a failed after 1 attempts: exit code 2; output:";
    let mut w = World::new(&[
        "base_0@10.0.0.1 1 /base/a",
        "base_1@10.0.0.2 1 /base/a1",
        "base_1@10.0.0.2 1 /base/b1",
    ])
    .attempts(1)
    .script("/base/a", &[exit(2, "")]);
    w.run();
    assert_transcript(
        &w,
        &format!(
            "
            save
            [base_0] base_0 on 10.0.0.1: write /base/a (attempt 1)
            [base_1] base_1 on 10.0.0.2: write /base/a1 (attempt 1)
            queue s1 s2
            ran s1: failed
            [base_0] {msg}
            save
            ran s2: done
            [base_1] base_1 on 10.0.0.2: write /base/a1 done
            save
            [controller] deployment d-test failed: {msg}
            "
        ),
    );
    assert_eq!(w.step("/base/a1").state, PhaseState::Done);
    assert_eq!(w.step("/base/b1").state, PhaseState::Skipped);
}

#[test]
fn why_a_step_failed_is_its_error_else_its_refusal_else_its_exit_code() {
    let cases = [
        (exit(3, "boom\n"), "exit code 3; output: boom"),
        (
            Finished {
                exit_code: None,
                ..exit(0, "")
            },
            "ended without an exit code (killed by a signal); output: ",
        ),
        (
            refused("the step expired before the node pulled it"),
            "the step expired before the node pulled it; output: ",
        ),
        (
            Finished {
                error: Some("timed out after 60 s".to_owned()),
                refusal: Some("not this".to_owned()),
                stdout_tail: "half done\n".to_owned(),
                ..exit(137, "killed\n")
            },
            "timed out after 60 s; output: half done\nkilled",
        ),
    ];
    for (finished, why) in cases {
        let mut w = World::new(&["web_0@10.0.0.5 1 /web/a"])
            .attempts(1)
            .script("/web/a", std::slice::from_ref(&finished));
        w.run();
        assert_eq!(
            w.saved.error.as_deref(),
            Some(
                format!(
                    "web (web_0) on 10.0.0.5 (node n5): write /web/a failed after 1 attempts: {why}"
                )
                .as_str()
            ),
            "{finished:?}"
        );
        assert_eq!(w.step("/web/a").state, PhaseState::Failed, "{finished:?}");
    }
}

#[test]
fn with_every_step_done_a_deployment_succeeds_and_records_its_target_first() {
    let mut w = World::new(&["nats_0@10.0.0.1 1 /nats/a"]);
    w.saved.target.revision = 7;
    w.run();
    assert_eq!(w.saved.state, DeployState::Succeeded);
    assert_eq!(w.saved.finished_at.as_deref(), Some("t2"));
    assert_eq!(w.saved.error, None);
    assert_eq!(w.applied.as_ref().map(|a| a.revision), Some(7));
    let tail: Vec<&str> = w
        .transcript
        .iter()
        .rev()
        .take(3)
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "[controller] deployment d-test succeeded",
            "save",
            "applied"
        ]
    );
    // A plan with nothing to change succeeds on its first pass.
    let mut empty = World::new(&[]);
    empty.pass();
    assert_transcript(
        &empty,
        "
        applied
        save
        [controller] deployment d-test succeeded
        ",
    );
    // Over is over: a finished deployment is left as it is.
    let before = w.saved.clone();
    let (after, fx) = w.reconcile();
    assert_eq!((after, fx), (before, Vec::new()));
}

#[test]
fn a_step_chosen_but_not_queued_before_a_crash_is_queued_under_its_id() {
    let mut w = World::new(&["base_0@10.0.0.1 1 /base/a", "base_1@10.0.0.2 1 /base/a1"]);
    let (d, fx) = w.reconcile();
    assert_eq!(fx[0], Effect::Save);
    w.apply(&d, &fx[0]);
    // The controller dies here: the ids are saved, nothing is queued.
    w.transcript.clear();
    w.resume("r-");
    w.pass();
    assert_transcript(
        &w,
        "
        [controller] deployment d-test resumed after a controller restart
        [base_0] base_0 on 10.0.0.1: write /base/a (attempt 1)
        [base_1] base_1 on 10.0.0.2: write /base/a1 (attempt 1)
        queue s1 s2
        ",
    );
    assert_eq!(w.step("/base/a").attempts, 1);
    w.run();
    assert_eq!(w.saved.state, DeployState::Succeeded);
    assert_eq!(w.tries["/base/a"], 1);
}

#[test]
fn a_finish_reported_again_or_for_an_earlier_attempt_changes_nothing() {
    let mut w = World::new(&["base_0@10.0.0.1 1 /base/a", "base_0@10.0.0.1 1 /base/b"])
        .script("/base/b", &[exit(1, "")]);
    // /base/a done (s1), /base/b failed once (s2) and runs again as s3.
    for _ in 0..3 {
        w.pass();
        w.tick();
    }
    w.transcript.clear();
    assert_eq!(
        w.step("/base/b").step_id.as_ref().map(StepId::as_str),
        Some("s3")
    );
    let before = w.saved.clone();
    let mut seen = HashMap::from([
        ("s1".into(), Seen::Finished(exit(5, "late"))),
        ("s2".into(), Seen::Finished(done())),
        ("s3".into(), Seen::Waiting),
    ]);
    let mut d = before.clone();
    let now = |text| Now { text, ms: 9_000 };
    let monit = MonitReports::new();
    let fx = reconcile(&mut d, &seen, &monit, &mut w.ids, now("t9"));
    assert_eq!((&d, fx), (&before, Vec::new()));
    // The current attempt's own result counts, once.
    seen.insert("s3".into(), Seen::Finished(done()));
    let fx = reconcile(&mut d, &seen, &monit, &mut w.ids, now("t10"));
    assert_eq!(fx.iter().filter(|e| **e == Effect::Save).count(), 1);
    let again = d.clone();
    let fx = reconcile(&mut d, &seen, &monit, &mut w.ids, now("t11"));
    assert_eq!((&d, fx), (&again, Vec::new()));
}

#[test]
fn a_pass_saves_the_record_holding_new_ids_before_it_queues_them() {
    let mut w = World::new(&[
        "old_0@10.0.0.3 0 /old/a",
        "base_0@10.0.0.1 1 /base/a",
        "base_1@10.0.0.2 1 /base/a1",
        "app_0@10.0.0.1 2 /app/a",
    ])
    .script("/base/a", &[exit(1, "")]);
    let mut queued = 0;
    for _ in 0..20 {
        let before = w.saved.clone();
        let (d, fx) = w.reconcile();
        if let Some(q) = fx.iter().position(|e| matches!(e, Effect::Queue(_))) {
            let Effect::Queue(steps) = &fx[q] else {
                unreachable!()
            };
            let saved_before = fx[..q].contains(&Effect::Save);
            for s in steps {
                let known = before
                    .steps
                    .iter()
                    .any(|x| x.step_id.as_ref() == Some(&s.id));
                assert!(
                    known || saved_before,
                    "{} is queued before it is saved",
                    s.id
                );
                assert!(
                    d.steps.iter().any(|x| x.step_id.as_ref() == Some(&s.id)),
                    "{} is in the record",
                    s.id
                );
                queued += 1;
            }
        }
        for e in &fx {
            w.apply(&d, e);
        }
        if w.saved.state != DeployState::Running {
            break;
        }
        w.tick();
    }
    assert_eq!(w.saved.state, DeployState::Succeeded);
    assert_eq!(queued, 5, "4 steps, one of them twice");
}

#[test]
fn resuming_announces_the_steps_still_running() {
    let mut w = World::new(&[
        "base_0@10.0.0.1 1 /base/a",
        "base_0@10.0.0.1 1 /base/b",
        "base_1@10.0.0.2 1 /base/a1",
    ]);
    w.pass();
    w.tick();
    w.pass();
    w.transcript.clear();
    w.resume("r-");
    assert_transcript(
        &w,
        "
        [controller] deployment d-test resumed after a controller restart
        [base_0] base_0 on 10.0.0.1: write /base/b (attempt 1)
        [base_1] base_1 on 10.0.0.2: write /base/a1 (attempt 1)
        ",
    );
}

/// The record at every point a controller may die at (after each effect of
/// each pass, and after each step an agent runs), resumed by a new
/// controller, ends as the uninterrupted run did: every step run exactly as
/// many times as it was attempted, a step chosen before the crash run under
/// the id it was given, no id queued twice (checked as effects are applied).
#[test]
fn a_deployment_resumed_from_any_saved_record_ends_the_same_without_running_a_step_twice() {
    let scenarios = [
        (
            DeployState::Succeeded,
            World::new(&[
                "old_0@10.0.0.3 0 /old/stop",
                "old_0@10.0.0.3 0 /old/remove",
                "base_0@10.0.0.1 1 /base/a",
                "base_0@10.0.0.1 1 /base/b",
                "base_1@10.0.0.2 1 /base/a1",
                "app_0@10.0.0.1 2 /app/flaky",
                "app_1@10.0.0.2 2 /app/a1",
            ])
            .script("/app/flaky", &[exit(1, "not yet"), refused("expired")]),
        ),
        (
            DeployState::Failed,
            World::new(&[
                "base_0@10.0.0.1 1 /base/a",
                "base_1@10.0.0.2 1 /base/a1",
                "base_1@10.0.0.2 1 /base/b1",
                "app_0@10.0.0.1 2 /app/a",
            ])
            .attempts(2)
            .script("/base/a", &[exit(1, "no"), exit(1, "still no")]),
        ),
        (
            DeployState::Succeeded,
            World::new(&[
                "web_0@10.0.0.1 1 /web0/a",
                "web_0@10.0.0.1 1 start:/web0/start",
                "web_1@10.0.0.2 1 /web1/a",
                "web_1@10.0.0.2 1 start:/web1/start",
                "web_2@10.0.0.3 1 /web2/a",
                "web_2@10.0.0.3 1 start:/web2/start",
                "app_0@10.0.0.1 2 /app/a",
            ])
            .rollout("web", rollout(1, Some(1), 2))
            .script("/web1/a", &[exit(1, "not yet")]),
        ),
        (
            DeployState::Failed,
            World::new(&[
                "app_0@10.0.0.1 1 /app0/a",
                "app_0@10.0.0.1 1 start:/app0/start",
                "app_1@10.0.0.2 1 start:/app1/start",
            ])
            .rollout("app", rollout(1, Some(1), 30))
            .health(exits),
        ),
    ];
    for (n, (end, start)) in scenarios.into_iter().enumerate() {
        let mut full = start.clone();
        let mut snapshots = vec![start];
        full.run_with(|w| snapshots.push(w.clone()));
        assert_eq!(full.saved.state, end, "scenario {n}");
        assert!(
            snapshots.len() > 20,
            "scenario {n}: {} crash points",
            snapshots.len()
        );
        for (k, snap) in snapshots.into_iter().enumerate() {
            let at = format!("scenario {n}, crash point {k}");
            let mut w = snap.clone();
            if w.saved.state == DeployState::Running {
                w.resume(&format!("r{k}-"));
                w.run();
            }
            assert_eq!(w.saved.state, full.saved.state, "{at}");
            assert_eq!(w.saved.error, full.saved.error, "{at}");
            assert_eq!(w.applied, full.applied, "{at}");
            for (got, want) in w.saved.steps.iter().zip(&full.saved.steps) {
                let path = path_of(&got.action);
                let outcome = |s: &DeployStep| {
                    (
                        s.state,
                        s.attempts,
                        s.exit_code,
                        s.error.clone(),
                        s.output.clone(),
                    )
                };
                assert_eq!(outcome(got), outcome(want), "{at}: {path}");
                let tries = w.tries.get(path).copied().unwrap_or(0);
                assert_eq!(
                    tries, got.attempts as usize,
                    "{at}: {path} ran {tries} times"
                );
            }
            for s in snap
                .saved
                .steps
                .iter()
                .filter(|s| s.state == PhaseState::Running)
            {
                let id = s.step_id.as_ref().expect("a running step has an id");
                assert!(
                    w.queue.iter().any(|(q, r)| &q.id == id && r.is_some()),
                    "{at}: {id}, chosen before the crash, ran"
                );
            }
        }
    }
}

#[test]
fn a_cancel_withdraws_running_steps_skips_pending_ones_and_ends_cancelled() {
    let mut w = World::new(&[
        "base_0@10.0.0.1 1 /base/a",
        "base_1@10.0.0.2 1 /base/b",
        "app_0@10.0.0.1 2 /app/a",
    ]);
    w.pass();
    w.transcript.clear();
    let mut d = w.saved.clone();
    let fx = cancel(&mut d, CANCELLED_BY_OPERATOR, "t5");
    for e in &fx {
        w.apply(&d, e);
    }
    assert_transcript(
        &w,
        "
        cancel s1 s2
        save
        [controller] deployment d-test cancelled: cancelled by an operator
        ",
    );
    assert_eq!(w.saved.state, DeployState::Cancelled);
    assert_eq!(w.saved.finished_at.as_deref(), Some("t5"));
    assert_eq!(w.step("/base/a").state, PhaseState::Cancelled);
    assert_eq!(w.step("/app/a").state, PhaseState::Skipped);
    // Nothing runs any more, and neither a pass nor a second cancel changes the record.
    w.tick();
    assert!(w.tries.is_empty(), "a cancelled step ran: {:?}", w.tries);
    let (after, fx) = w.reconcile();
    assert_eq!((after, fx), (w.saved.clone(), Vec::new()));
    let mut again = w.saved.clone();
    assert!(cancel(&mut again, CANCELLED_BY_OPERATOR, "t6").is_empty());
}

#[test]
fn a_cancel_cut_short_by_a_crash_is_finished_on_restart_not_retried() {
    let mut w = World::new(&["base_0@10.0.0.1 1 /base/a", "app_0@10.0.0.1 2 /app/a"]);
    w.pass();
    let mut d = w.saved.clone();
    let fx = cancel(&mut d, CANCELLED_BY_OPERATOR, "t5");
    // The steps are cancelled in the queue; the controller dies before the save.
    assert!(matches!(fx[0], Effect::CancelSteps(_)));
    w.apply(&d, &fx[0]);
    assert_eq!(w.saved.state, DeployState::Running);
    w.transcript.clear();
    w.resume("r-");
    w.pass();
    assert_eq!(w.saved.state, DeployState::Cancelled, "{:#?}", w.saved);
    assert_eq!(w.step("/app/a").state, PhaseState::Skipped);
    assert!(
        !w.transcript.iter().any(|l| l.starts_with("queue")),
        "nothing was queued again: {:?}",
        w.transcript
    );
}

#[test]
fn a_records_output_is_its_last_bytes_with_stderr_kept_first() {
    assert_eq!(output_tail("out\n", "err\n"), "out\nerr\n");
    let long_out = "o".repeat(10_000);
    let got = output_tail(&long_out, "the reason\n");
    assert_eq!(got.len(), OUTPUT_KEPT);
    assert!(
        got.ends_with("ooo\nthe reason\n") || got.ends_with("othe reason\n"),
        "{got}"
    );
    let long_err = "é".repeat(5_000);
    let got = output_tail("lost", &long_err);
    assert!(
        got.len() <= OUTPUT_KEPT && got.chars().all(|c| c == 'é'),
        "cut at a char boundary"
    );
}

fn rollout(canaries: usize, max_in_flight: Option<usize>, watch_secs: u64) -> Rollout {
    Rollout {
        canaries,
        max_in_flight,
        watch_secs,
        serial: true,
    }
}

/// When each step started and finished, by the clock of the passes:
/// `(path, started, finished)`, ordered by path.
fn times(w: &World) -> Vec<(String, u32, u32)> {
    let t = |s: &Option<String>| -> u32 {
        s.as_deref()
            .and_then(|t| t.strip_prefix('t'))
            .and_then(|n| n.parse().ok())
            .expect("a time t<n>")
    };
    let mut out: Vec<(String, u32, u32)> = w
        .saved
        .steps
        .iter()
        .map(|s| {
            (
                path_of(&s.action).to_owned(),
                t(&s.started_at),
                t(&s.finished_at),
            )
        })
        .collect();
    out.sort();
    out
}

/// The most steps that were running at one time (a step runs from the
/// pass that started it to the pass that saw it end).
fn most_at_once(w: &World) -> usize {
    let t = times(w);
    let end = t.iter().map(|x| x.2).max().unwrap_or(0);
    (0..=end)
        .map(|c| t.iter().filter(|x| x.1 <= c && c < x.2).count())
        .max()
        .unwrap_or(0)
}

fn web(n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| {
            [
                format!("web_{i}@10.0.0.{} 1 /web{i}/a", i + 1),
                format!("web_{i}@10.0.0.{} 1 /web{i}/b", i + 1),
            ]
        })
        .collect()
}

fn world(steps: &[String]) -> World {
    let refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    World::new(&refs)
}

#[test]
fn max_in_flight_bounds_how_many_instances_change_at_once() {
    // Several agents: every queued step runs on each tick (nodes in parallel).
    for (max, want) in [(Some(1), 1), (Some(2), 2), (None, 5)] {
        let mut w = world(&web(5)).rollout("web", rollout(0, max, 0));
        for _ in 0..100 {
            w.pass();
            if w.saved.state != DeployState::Running {
                break;
            }
            while w.queue.iter().any(|(_, r)| r.is_none()) {
                w.tick();
            }
        }
        assert_eq!(w.saved.state, DeployState::Succeeded, "max {max:?}");
        assert_eq!(most_at_once(&w), want, "max {max:?}: {:?}", times(&w));
    }
}

#[test]
fn canaries_change_first_and_a_failing_one_leaves_the_others_untouched() {
    // Canary web_0 goes alone; then the rest two at a time.
    let mut w = world(&web(4)).rollout("web", rollout(1, Some(2), 0));
    w.run();
    assert_eq!(w.saved.state, DeployState::Succeeded);
    let t = times(&w);
    let canary_end = t[0].2.max(t[1].2);
    assert!(
        t[2..].iter().all(|x| x.1 >= canary_end),
        "another instance started before the canary finished: {t:?}"
    );
    // A canary that fails for good: no other instance is touched.
    let mut w = world(&web(4))
        .rollout("web", rollout(1, Some(2), 0))
        .attempts(1)
        .script("/web0/b", &[exit(3, "web_0 broke\n")]);
    w.run();
    assert_eq!(w.saved.state, DeployState::Failed);
    assert_eq!(
        w.saved.error.as_deref(),
        Some(
            "web (web_0, a canary) on 10.0.0.1 (node n1): write /web0/b failed after 1 attempts: exit code 3; output: web_0 broke"
        )
    );
    for i in 1..4 {
        for step in ["a", "b"] {
            let path = format!("/web{i}/{step}");
            let s = w.step(&path);
            assert_eq!((s.state, s.attempts), (PhaseState::Skipped, 0), "{path}");
            assert!(!w.tries.contains_key(&path), "{path} ran");
        }
    }
}

fn started(w: &World) -> Vec<String> {
    w.saved
        .steps
        .iter()
        .filter(|s| s.attempts > 0)
        .map(|s| path_of(&s.action).to_owned())
        .collect()
}

#[test]
fn an_instance_counts_done_only_after_it_stayed_running_for_its_watch() {
    let steps = [
        "app_0@10.0.0.1 1 /app0/a",
        "app_0@10.0.0.1 1 start:/app0/start",
        "app_1@10.0.0.2 1 /app1/a",
        "app_1@10.0.0.2 1 start:/app1/start",
        "next_0@10.0.0.1 2 /next/a",
    ];
    let mut w = World::new(&steps).rollout("app", rollout(0, Some(1), 3));
    w.run();
    assert_eq!(w.saved.state, DeployState::Succeeded);
    assert_eq!(w.saved.watches.len(), 2);
    for watch in &w.saved.watches {
        assert_eq!((watch.state, watch.pid), (PhaseState::Done, Some(100)));
    }
    // app_1 starts only once app_0's watch is over, and `next` after app_1's.
    let t = times(&w);
    let end_of = |i: &str| {
        w.saved
            .watches
            .iter()
            .find(|x| x.instance == i)
            .and_then(|x| x.finished_at.clone())
            .and_then(|f| f.strip_prefix('t').and_then(|n| n.parse::<u32>().ok()))
            .expect("a finished watch")
    };
    let start = |p: &str| t.iter().find(|x| x.0 == p).map(|x| x.1).expect("a step");
    let app0_start_done = t.iter().find(|x| x.0 == "/app0/start").map(|x| x.2);
    assert!(
        end_of("app_0") >= app0_start_done.expect("done") + 3,
        "watched at least 3 s: {t:?}"
    );
    assert!(start("/app1/a") >= end_of("app_0"), "{t:?}");
    assert!(start("/next/a") >= end_of("app_1"), "{t:?}");
    assert!(
        w.transcript.iter().any(|l| l
            == "[app_0] app_0 on 10.0.0.1: watched for 3 s: monit reported it RUNNING throughout (pid 100)"),
        "{:#?}",
        w.transcript
    );
}

/// app_0 runs as pid 100 until tick 6, then monit has restarted it as 101.
fn restarts(clock: u32, instance: &str) -> (&'static str, Option<u32>) {
    match (instance, clock) {
        ("app_0", 0..6) => ("RUNNING", Some(100)),
        ("app_0", _) => ("RUNNING", Some(101)),
        _ => ("RUNNING", Some(7)),
    }
}

/// app_0 goes DOWN at tick 6.
fn exits(clock: u32, instance: &str) -> (&'static str, Option<u32>) {
    match (instance, clock) {
        ("app_0", 0..6) => ("RUNNING", Some(100)),
        ("app_0", _) => ("DOWN", None),
        _ => ("RUNNING", Some(7)),
    }
}

/// app_0 never comes up.
fn never_up(_: u32, instance: &str) -> (&'static str, Option<u32>) {
    match instance {
        "app_0" => ("STARTING", None),
        _ => ("RUNNING", Some(7)),
    }
}

#[test]
fn a_watch_fails_when_the_instance_exits_restarts_or_never_runs_and_names_why() {
    let steps = [
        "app_0@10.0.0.1 1 start:/app0/start",
        "app_1@10.0.0.2 1 start:/app1/start",
    ];
    for (health, why) in [
        (
            restarts as fn(u32, &str) -> (&'static str, Option<u32>),
            "its pid changed from 100 to 101: it restarted",
        ),
        (
            exits,
            "monit reports it DOWN after it was RUNNING as pid 100",
        ),
        (
            never_up,
            "monit never reported it RUNNING within 60 s (last: STARTING)",
        ),
    ] {
        let mut w = World::new(&steps)
            .rollout("app", rollout(1, Some(1), 30))
            .health(health);
        w.run();
        assert_eq!(w.saved.state, DeployState::Failed, "{why}");
        assert_eq!(
            w.saved.error.as_deref(),
            Some(
                format!("app (app_0, a canary) on 10.0.0.1 (node n1): watch failed: {why}")
                    .as_str()
            )
        );
        assert_eq!(w.saved.watches[0].state, PhaseState::Failed);
        assert_eq!(
            started(&w),
            ["/app0/start"],
            "{why}: nothing else was touched"
        );
        assert_eq!(w.applied, None);
    }
}

#[test]
fn a_paused_deployment_finishes_its_steps_in_flight_and_starts_none_until_resumed() {
    let mut w = world(&web(3)).rollout("web", rollout(0, Some(2), 0));
    w.pass();
    assert_eq!(started(&w), ["/web0/a", "/web1/a"]);
    let mut d = w.saved.clone();
    let fx = set_paused(&mut d, true);
    for e in &fx {
        w.apply(&d, e);
    }
    assert!(w.saved.paused);
    assert!(
        set_paused(&mut d, true).is_empty(),
        "pausing twice changes nothing"
    );
    for _ in 0..10 {
        w.tick();
        w.pass();
    }
    assert_eq!(w.saved.state, DeployState::Running);
    assert_eq!(started(&w), ["/web0/a", "/web1/a"], "nothing new started");
    assert!(
        w.saved.steps.iter().all(|s| s.state != PhaseState::Running),
        "the steps in flight finished"
    );
    // A controller restart keeps it paused.
    w.transcript.clear();
    w.resume("r-");
    w.pass();
    assert_eq!(started(&w), ["/web0/a", "/web1/a"]);
    assert_eq!(
        w.transcript[0],
        "[controller] deployment d-test resumed after a controller restart (paused: no new step starts until an operator resumes it)"
    );
    let mut d = w.saved.clone();
    for e in &set_paused(&mut d, false) {
        w.apply(&d, e);
    }
    w.run();
    assert_eq!(w.saved.state, DeployState::Succeeded);
}

#[test]
fn a_watch_under_way_when_the_controller_stops_starts_over_on_resume() {
    let mut w =
        World::new(&["app_0@10.0.0.1 1 start:/app0/start"]).rollout("app", rollout(0, None, 5));
    while w.saved.watches.is_empty() {
        w.pass();
        w.tick();
    }
    w.pass();
    w.tick();
    w.pass();
    assert_eq!(w.saved.watches[0].pid, Some(100));
    w.clock += 20;
    w.resume("r-");
    let watch = &w.saved.watches[0];
    assert_eq!(
        watch.since_ms,
        u64::from(w.clock) * 1000,
        "restarted from now"
    );
    assert_eq!((watch.running_since_ms, watch.pid), (None, Some(100)));
    // The old reports, from before the restart, do not count.
    let before = w.clock;
    w.run();
    assert_eq!(w.saved.state, DeployState::Succeeded);
    assert!(w.clock >= before + 5, "watched 5 s again");
}
