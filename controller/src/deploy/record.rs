//! The deployment record as stored (tree `deployments`, by id) and the
//! applied plan (`plans/applied`). Their JSON is the store's format, and the
//! API's field names come from it too: records written by older controllers
//! must keep loading, so the test below pins it byte for byte.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use de_common::{DeploymentId, NodeId, StepAction, StepId};

/// Deployment and step states and step kinds are the API's words, defined
/// once in `de_common::api`; the store keeps the same words.
pub(crate) use de_common::api::{DeployState, Hook, PhaseState, TaskKind};

/// One action of one component instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployStep {
    pub component: String,
    pub instance: String,
    pub ip: String,
    pub node_id: NodeId,
    pub kind: TaskKind,
    /// Order group: every step of group n finishes before group n+1 starts.
    pub group: usize,
    pub action: StepAction,
    pub state: PhaseState,
    pub attempts: u32,
    /// The queue step of the current attempt (chosen before it is queued).
    pub step_id: Option<StepId>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The end of the last attempt's output.
    pub output: Option<String>,
    /// The catalog hook it comes from (none in records before hooks).
    #[serde(default)]
    pub hook: Option<Hook>,
}

/// A deployment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: DeploymentId,
    pub state: DeployState,
    pub plan_revision: u64,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub max_attempts: u32,
    pub steps: Vec<DeployStep>,
    /// What the cluster looks like once this deployment succeeds.
    pub target: Applied,
    /// An operator paused it: steps in flight finish, no new one starts.
    #[serde(default)]
    pub paused: bool,
    /// Component -> how its instances change (a component missing here,
    /// as in records before rollouts: all at once, no watch).
    #[serde(default)]
    pub rollout: BTreeMap<String, Rollout>,
    /// The watches of instances whose steps are done, in the order started.
    #[serde(default)]
    pub watches: Vec<Watch>,
}

/// A component's rollout, resolved for this deployment (a percentage is
/// already a count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub canaries: usize,
    /// None: every instance at once.
    pub max_in_flight: Option<usize>,
    pub watch_secs: u64,
    pub serial: bool,
}

impl Default for Rollout {
    /// What a component without a `[rollout]` does: all at once, no watch, serial.
    fn default() -> Rollout {
        Rollout {
            canaries: 0,
            max_in_flight: None,
            watch_secs: 0,
            serial: true,
        }
    }
}

/// The watch of one instance once its steps in a group are done: monit on
/// its node must report it RUNNING, with one pid, for `secs` seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub component: String,
    pub instance: String,
    pub ip: String,
    pub node_id: NodeId,
    pub group: usize,
    pub secs: u64,
    /// `running` while watched, then `done`, `failed`, `skipped` or `cancelled`.
    pub state: PhaseState,
    pub started_at: String,
    /// When it started (or restarted, after a controller restart), in ms
    /// since the Unix epoch: only a monit report received after it counts.
    pub since_ms: u64,
    /// When the first report that counts said RUNNING (ms since the epoch).
    pub running_since_ms: Option<u64>,
    pub pid: Option<u32>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

/// The last successfully applied plan: per instance, a fingerprint of its
/// rendered install steps and what uninstalling it takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: u64,
    /// `component@ip` -> instance.
    pub instances: BTreeMap<String, AppliedInstance>,
}

/// One instance of the applied plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedInstance {
    pub component: String,
    pub ip: String,
    pub instance: String,
    pub fingerprint: String,
    pub monit_name: String,
    pub uninstall: Vec<StepAction>,
    /// The catalog's `pre_stop` hook as rendered when it was applied; run
    /// before its uninstall (none in records before hooks).
    #[serde(default)]
    pub pre_stop: Vec<StepAction>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed deployment as the controller stored it (pretty-printed; the
    /// store holds the same fields in the same order without the spaces).
    const STORED: &str = r##"{
  "id": "d-0a1b2c3d4e5f",
  "state": "running",
  "plan_revision": 7,
  "created_at": "2026-01-01T00:00:00Z",
  "finished_at": null,
  "error": null,
  "max_attempts": 3,
  "steps": [
    {
      "component": "old",
      "instance": "old_0",
      "ip": "10.0.0.2",
      "node_id": "n2",
      "kind": "uninstall",
      "group": 0,
      "action": {
        "MonitRemove": {
          "name": "old"
        }
      },
      "state": "done",
      "attempts": 1,
      "step_id": "s-00112233445566ff",
      "started_at": "2026-01-01T00:00:01Z",
      "finished_at": "2026-01-01T00:00:02Z",
      "exit_code": 0,
      "error": null,
      "output": "",
      "hook": null
    },
    {
      "component": "base",
      "instance": "base_0",
      "ip": "10.0.0.1",
      "node_id": "n1",
      "kind": "reconfigure",
      "group": 1,
      "action": {
        "Script": {
          "script": "exit 1",
          "user": null,
          "env": [
            [
              "K",
              "v"
            ]
          ],
          "timeout_secs": 60
        }
      },
      "state": "done",
      "attempts": 3,
      "step_id": "s-8899aabbccddeeff",
      "started_at": "2026-01-01T00:00:03Z",
      "finished_at": "2026-01-01T00:01:00Z",
      "exit_code": 0,
      "error": null,
      "output": "no\n",
      "hook": "pre_stop"
    },
    {
      "component": "app",
      "instance": "app_0",
      "ip": "10.0.0.1",
      "node_id": "n1",
      "kind": "install",
      "group": 2,
      "action": {
        "Monit": {
          "name": "app",
          "op": "Restart"
        }
      },
      "state": "pending",
      "attempts": 0,
      "step_id": null,
      "started_at": null,
      "finished_at": null,
      "exit_code": null,
      "error": null,
      "output": null,
      "hook": null
    }
  ],
  "target": {
    "revision": 7,
    "instances": {
      "base@10.0.0.1": {
        "component": "base",
        "ip": "10.0.0.1",
        "instance": "base_0",
        "fingerprint": "00112233445566778899aabb",
        "monit_name": "base",
        "uninstall": [
          {
            "WriteFile": {
              "path": "x",
              "contents": [
                104,
                105
              ],
              "mode": 420,
              "owner": null
            }
          }
        ],
        "pre_stop": [
          {
            "Script": {
              "script": "drain",
              "user": null,
              "env": [],
              "timeout_secs": 60
            }
          }
        ]
      }
    }
  },
  "paused": true,
  "rollout": {
    "base": {
      "canaries": 1,
      "max_in_flight": 2,
      "watch_secs": 10,
      "serial": true
    }
  },
  "watches": [
    {
      "component": "base",
      "instance": "base_0",
      "ip": "10.0.0.1",
      "node_id": "n1",
      "group": 1,
      "secs": 10,
      "state": "running",
      "started_at": "2026-01-01T00:01:00Z",
      "since_ms": 1767225660000,
      "running_since_ms": 1767225662000,
      "pid": 4242,
      "finished_at": null,
      "error": null
    }
  ]
}"##;

    /// A record written before rollouts (no hooks, pause, rollout or
    /// watches): it must keep loading.
    const BEFORE_ROLLOUTS: &str = r##"{
  "id": "d-0a1b2c3d4e5f",
  "state": "failed",
  "plan_revision": 7,
  "created_at": "2026-01-01T00:00:00Z",
  "finished_at": "2026-01-01T00:01:00Z",
  "error": "base (base_0) on 10.0.0.1 (node n1): script failed after 3 attempts: exit code 1; output: no",
  "max_attempts": 3,
  "steps": [
    {
      "component": "old",
      "instance": "old_0",
      "ip": "10.0.0.2",
      "node_id": "n2",
      "kind": "uninstall",
      "group": 0,
      "action": {
        "MonitRemove": {
          "name": "old"
        }
      },
      "state": "done",
      "attempts": 1,
      "step_id": "s-00112233445566ff",
      "started_at": "2026-01-01T00:00:01Z",
      "finished_at": "2026-01-01T00:00:02Z",
      "exit_code": 0,
      "error": null,
      "output": ""
    },
    {
      "component": "base",
      "instance": "base_0",
      "ip": "10.0.0.1",
      "node_id": "n1",
      "kind": "reconfigure",
      "group": 1,
      "action": {
        "Script": {
          "script": "exit 1",
          "user": null,
          "env": [
            [
              "K",
              "v"
            ]
          ],
          "timeout_secs": 60
        }
      },
      "state": "failed",
      "attempts": 3,
      "step_id": "s-8899aabbccddeeff",
      "started_at": "2026-01-01T00:00:03Z",
      "finished_at": "2026-01-01T00:01:00Z",
      "exit_code": 1,
      "error": "exit code 1",
      "output": "no\n"
    },
    {
      "component": "app",
      "instance": "app_0",
      "ip": "10.0.0.1",
      "node_id": "n1",
      "kind": "install",
      "group": 2,
      "action": {
        "Monit": {
          "name": "app",
          "op": "Restart"
        }
      },
      "state": "skipped",
      "attempts": 0,
      "step_id": null,
      "started_at": null,
      "finished_at": null,
      "exit_code": null,
      "error": null,
      "output": null
    }
  ],
  "target": {
    "revision": 7,
    "instances": {
      "base@10.0.0.1": {
        "component": "base",
        "ip": "10.0.0.1",
        "instance": "base_0",
        "fingerprint": "00112233445566778899aabb",
        "monit_name": "base",
        "uninstall": [
          {
            "WriteFile": {
              "path": "x",
              "contents": [
                104,
                105
              ],
              "mode": 420,
              "owner": null
            }
          }
        ]
      }
    }
  }
}"##;

    #[test]
    fn a_stored_deployment_loads_and_is_written_back_the_same() {
        let d: Deployment = serde_json::from_str(STORED).expect("a stored record loads");
        assert_eq!(d.state, DeployState::Running);
        let states: Vec<PhaseState> = d.steps.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [PhaseState::Done, PhaseState::Done, PhaseState::Pending]
        );
        assert_eq!(d.steps[1].kind, TaskKind::Reconfigure);
        assert_eq!(d.steps[1].hook, Some(Hook::PreStop));
        assert_eq!(d.target.instances["base@10.0.0.1"].instance, "base_0");
        assert_eq!(d.target.instances["base@10.0.0.1"].pre_stop.len(), 1);
        assert!(d.paused);
        assert_eq!(d.rollout["base"].max_in_flight, Some(2));
        assert_eq!(
            (d.watches[0].state, d.watches[0].pid),
            (PhaseState::Running, Some(4242))
        );
        let again = serde_json::to_string_pretty(&d).expect("serialize");
        assert_eq!(again, STORED, "the stored JSON changed shape");
    }

    #[test]
    fn a_record_from_before_rollouts_loads_as_not_paused_all_at_once_without_hooks() {
        let d: Deployment = serde_json::from_str(BEFORE_ROLLOUTS).expect("an older record loads");
        assert_eq!(d.state, DeployState::Failed);
        let states: Vec<PhaseState> = d.steps.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [PhaseState::Done, PhaseState::Failed, PhaseState::Skipped]
        );
        assert!(!d.paused);
        assert!(d.rollout.is_empty() && d.watches.is_empty());
        assert!(d.steps.iter().all(|s| s.hook.is_none()));
        assert!(d.target.instances["base@10.0.0.1"].pre_stop.is_empty());
    }
}
