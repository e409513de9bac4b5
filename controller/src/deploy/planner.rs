//! The planner: what a deployment must do to bring the nodes to the current
//! plan, as the ordered steps of a new deployment record and, per instance,
//! the action and why (`GET /api/v1/plan/diff`). Pure: the catalog, the
//! nodes with what they report, the plans, the operator's stops and the new
//! record's id and time come in as data.
//!
//! An instance is compared with the last applied plan *and* with what its
//! node reports (the agent's inventory: the fingerprint it last applied and
//! what drifted since; monit's state of its check). New: install. Dropped:
//! uninstall. Changed in the plan or drifted on its node: re-apply (its
//! install steps again, then a restart if supervised). Stopped outside the
//! controller: start. Stopped through the API: left stopped (operator
//! intent), even when it is re-applied. A node that sends no inventory (an
//! older agent) is trusted to hold what was last applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use de_common::api::{ChangeAction, InstanceChange};
use de_common::{DeploymentId, InstanceState, MonitOp, NodeId, StepAction};

use super::DeployError;
use super::intent::key;
use super::record::{
    Applied, AppliedInstance, DeployState, DeployStep, Deployment, Hook, PhaseState, Rollout,
    TaskKind,
};
use crate::agents::NodeView;
use crate::plan::render::{NodeContext, RenderedComponent};
use crate::plan::rollout::RolloutSpec;
use crate::plan::validate::NodeIndex;
use crate::plan::{Catalog, StoredPlan};

fn fingerprint(actions: &[StepAction]) -> String {
    let bytes = serde_json::to_vec(actions).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    d.as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a new deployment record starts with besides its steps: chosen by
/// the caller, so planning needs no clock and no randomness.
#[derive(Debug, Clone)]
pub(crate) struct NewDeployment {
    pub(crate) id: DeploymentId,
    pub(crate) created_at: String,
    pub(crate) max_attempts: u32,
}

/// What the nodes and the operator say, beside the plans.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observed {
    /// Node id -> the instances its agent reports it applied. A node
    /// missing here has not reported (an older agent): it is trusted to
    /// hold what was last applied.
    pub(crate) inventory: HashMap<NodeId, Vec<InstanceState>>,
    /// Instances (`component@ip`) an operator stopped through the API.
    pub(crate) stopped: BTreeSet<String>,
    /// Nodes that ended a step since their last report: what they hold is
    /// taken as last applied until they report again (a deployment started
    /// right after another must not re-apply what it just applied).
    pub(crate) stale: BTreeSet<NodeId>,
    /// The artifacts the controller holds, for `fetch` steps.
    pub(crate) artifacts: crate::artifacts::ArtifactIndex,
}

/// Everything the planner decided: the steps, per instance what and why,
/// and the nodes it needs that are offline.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub(crate) steps: Vec<DeployStep>,
    /// Component -> its rollout, for every component with steps.
    pub(crate) rollout: BTreeMap<String, Rollout>,
    pub(crate) target: Applied,
    pub(crate) changes: Vec<InstanceChange>,
    /// `IP (node)` or `IP (no enrolled node)`, sorted.
    pub(crate) offline: Vec<String>,
}

/// monit states in which a supervised instance is not running and nothing
/// is starting it.
fn stopped_state(status: &str) -> bool {
    matches!(status, "STOPPED" | "STOPPING" | "DOWN")
}

/// Why an applied, unchanged instance must be re-applied or started on its
/// node, from what the node reports; None when it is as applied.
fn drift(
    rendered: &RenderedComponent,
    fp: &str,
    supervised: bool,
    operator_stopped: bool,
    node: &NodeView,
    observed: &Observed,
) -> Option<(ChangeAction, String)> {
    let inventory = observed.inventory.get(node.id.as_str())?;
    let Some(mark) = inventory.iter().find(|i| i.instance == rendered.instance) else {
        return Some((
            ChangeAction::Reapply,
            format!("node {} has no record of applying it", node.id),
        ));
    };
    if mark.fingerprint != fp {
        return Some((
            ChangeAction::Reapply,
            format!(
                "node {} last applied {}, the plan renders {fp}",
                node.id, mark.fingerprint
            ),
        ));
    }
    if !mark.drift.is_empty() {
        return Some((ChangeAction::Reapply, mark.drift.join("; ")));
    }
    if !supervised || operator_stopped {
        return None;
    }
    match node
        .components
        .iter()
        .find(|c| c.name == rendered.monit_name)
    {
        None => Some((
            ChangeAction::Reapply,
            format!(
                "monit on node {} has no check {}",
                node.id, rendered.monit_name
            ),
        )),
        Some(c) if stopped_state(&c.status) => Some((
            ChangeAction::Start,
            format!("stopped outside the controller (monit: {})", c.status),
        )),
        Some(_) => None,
    }
}

/// The steps that apply `rendered`: its install steps (without the ones
/// that start it when an operator stopped it), a restart when it is
/// re-applied and supervised and meant to run, then the mark its agent keeps.
fn apply_steps(
    rendered: &RenderedComponent,
    fp: &str,
    reapply: bool,
    supervised: bool,
    operator_stopped: bool,
) -> Vec<StepAction> {
    let starts = |a: &StepAction| {
        matches!(
            a,
            StepAction::Monit {
                op: MonitOp::Start | MonitOp::Restart,
                ..
            }
        )
    };
    let mut out: Vec<StepAction> = rendered
        .install
        .iter()
        .filter(|a| !(operator_stopped && starts(a)))
        .cloned()
        .collect();
    if reapply && supervised && !operator_stopped {
        out.push(StepAction::Monit {
            name: rendered.monit_name.clone(),
            op: MonitOp::Restart,
        });
    }
    let files = rendered
        .install
        .iter()
        .filter_map(|a| match a {
            StepAction::WriteFile { path, .. } => Some(path.clone()),
            _ => None,
        })
        .collect();
    out.push(StepAction::MarkApplied {
        instance: rendered.instance.clone(),
        fingerprint: fp.to_owned(),
        files,
        check: supervised.then(|| rendered.monit_name.clone()),
    });
    out
}

/// Compares the stored plan with `applied` and with what the nodes report
/// (see the module's header): uninstalls of instances the plan dropped
/// (group 0), then per component, in the catalog's install order, the
/// steps of every instance that needs any. Fails only when a component does
/// not render; offline nodes are listed in the answer.
pub(crate) fn plan_changes(
    catalog: &Catalog,
    stored: &StoredPlan,
    applied: &Applied,
    nodes: &[NodeView],
    observed: &Observed,
) -> Result<Planned, DeployError> {
    let (plan, revision) = (&stored.plan, stored.revision);
    let mut offline = Vec::new();
    let index = NodeIndex::new(nodes);
    let mut node_of = |ip: &str| -> Option<NodeView> {
        match index.find(ip) {
            Some(n) => {
                if !n.online {
                    offline.push(format!("{ip} ({})", n.id));
                }
                Some(n.clone())
            }
            None => {
                offline.push(format!("{ip} (no enrolled node)"));
                None
            }
        }
    };
    let renderer = catalog.for_plan(plan).with_artifacts(&observed.artifacts);
    let mut target = Applied {
        revision,
        instances: BTreeMap::new(),
    };
    let mut steps = Vec::new();
    let mut changes = Vec::new();
    let step = |component: &str,
                instance: &str,
                ip: &str,
                node: &NodeId,
                kind,
                group,
                (action, hook): (StepAction, Option<Hook>)| {
        DeployStep {
            component: component.to_owned(),
            instance: instance.to_owned(),
            ip: ip.to_owned(),
            node_id: node.clone(),
            kind,
            group,
            action,
            state: PhaseState::Pending,
            attempts: 0,
            step_id: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            output: None,
            hook,
        }
    };
    let mut uninstalled: BTreeMap<String, usize> = BTreeMap::new();
    // Uninstalls first (group 0; they are independent of each other).
    for r in applied
        .instances
        .iter()
        .filter(|(k, _)| !plan.instances().any(|(c, ip)| key(c, ip) == **k))
        .map(|(_, v)| v)
    {
        let node = node_of(&r.ip);
        changes.push(InstanceChange {
            component: r.component.clone(),
            instance: r.instance.clone(),
            ip: r.ip.clone(),
            node_id: node.as_ref().map(|n| n.id.clone()),
            action: ChangeAction::Uninstall,
            why: "no longer in the plan".to_owned(),
        });
        let Some(node_id) = node.map(|n| n.node_id()) else {
            continue;
        };
        *uninstalled.entry(r.component.clone()).or_default() += 1;
        // pre_stop (drain it), the catalog's uninstall steps (stop, clean
        // up), then the check goes, then the mark.
        let actions = hooked(&r.pre_stop, Hook::PreStop)
            .chain(r.uninstall.iter().cloned().map(|a| (a, None)))
            .chain([
                (
                    StepAction::MonitRemove {
                        name: r.monit_name.clone(),
                    },
                    None,
                ),
                (
                    StepAction::Unmark {
                        instance: r.instance.clone(),
                    },
                    None,
                ),
            ]);
        for a in actions {
            steps.push(step(
                &r.component,
                &r.instance,
                &r.ip,
                &node_id,
                TaskKind::Uninstall,
                0,
                a,
            ));
        }
    }
    let instances: Vec<(String, String)> = plan
        .instances()
        .map(|(c, ip)| (c.to_owned(), ip.to_owned()))
        .collect();
    let specs: BTreeMap<&str, RolloutSpec> = catalog
        .components()
        .map(|def| {
            (
                def.name.as_str(),
                def.rollout.overridden_by(plan.rollout.get(&def.name)),
            )
        })
        .collect();
    // Groups: a serial component waits for every one before it; another
    // only for those of its `after` list the plan has.
    let mut group_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last_group = 0;
    for component in catalog.install_order() {
        if !plan.components.contains_key(component) {
            continue;
        }
        let serial = specs
            .get(component.as_str())
            .and_then(|s| s.serial)
            .unwrap_or(true);
        let g = if serial {
            last_group + 1
        } else {
            catalog
                .component(component)
                .map(|def| {
                    def.after
                        .iter()
                        .filter_map(|a| group_of.get(a.as_str()))
                        .max()
                        .copied()
                        .unwrap_or(0)
                })
                .unwrap_or(last_group)
                + 1
        };
        group_of.insert(component, g);
        last_group = last_group.max(g);
    }
    let post_deploy_group = last_group + 1;
    // Per component: whether this deployment changes it, and its first
    // instance as rendered (where its post_deploy hook runs).
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut first: BTreeMap<String, (RenderedComponent, NodeId)> = BTreeMap::new();
    for component in catalog.install_order() {
        let g = group_of.get(component.as_str()).copied().unwrap_or(0);
        for (c, ip) in instances.iter().filter(|(c, _)| c == component) {
            let k = key(c, ip);
            let prev = applied.instances.get(&k);
            let Some(n) = node_of(ip) else {
                let (action, why) = match prev {
                    None => (ChangeAction::Install, "new in the plan"),
                    Some(_) => (ChangeAction::Nothing, "as last applied"),
                };
                changes.push(InstanceChange {
                    component: c.clone(),
                    instance: prev.map(|p| p.instance.clone()).unwrap_or_default(),
                    ip: ip.clone(),
                    node_id: None,
                    action,
                    why: format!("{why}; no enrolled node has this IP"),
                });
                continue;
            };
            let rendered = renderer
                .render(c, &NodeContext::from_view(&n, ip))
                .map_err(|e| DeployError::Render(e.to_string()))?;
            let fp = fingerprint(&rendered.install);
            let supervised = rendered
                .install
                .iter()
                .any(|a| matches!(a, StepAction::MonitAdd { .. }));
            let operator_stopped = observed.stopped.contains(&k);
            let (action, why) = match prev {
                None => (ChangeAction::Install, "new in the plan".to_owned()),
                Some(p) if p.fingerprint != fp => (
                    ChangeAction::Reapply,
                    "the plan changed: its rendered steps differ from the applied ones".to_owned(),
                ),
                Some(_) => drift(&rendered, &fp, supervised, operator_stopped, &n, observed)
                    .unwrap_or_else(|| {
                        let why = if operator_stopped {
                            "as last applied; stopped through the API, so it stays stopped"
                                .to_owned()
                        } else if observed.stale.contains(&n.node_id()) {
                            format!(
                                "as last applied (node {} has not reported since its last step)",
                                n.id
                            )
                        } else {
                            "as last applied, and running".to_owned()
                        };
                        (ChangeAction::Nothing, why)
                    }),
            };
            let plain = |list: Vec<StepAction>| list.into_iter().map(|a| (a, None));
            let post_start = || -> Vec<(StepAction, Option<Hook>)> {
                if operator_stopped {
                    Vec::new()
                } else {
                    hooked(&rendered.post_start, Hook::PostStart).collect()
                }
            };
            // post_start goes after the start, before the mark: an instance
            // whose check fails is not marked applied, so it is tried again.
            let with_post_start = |mut list: Vec<StepAction>| {
                let mark = list.pop();
                plain(list)
                    .chain(post_start())
                    .chain(mark.map(|m| (m, None)))
                    .collect::<Vec<_>>()
            };
            let (kind, actions) = match action {
                ChangeAction::Install => (
                    TaskKind::Install,
                    with_post_start(apply_steps(
                        &rendered,
                        &fp,
                        false,
                        supervised,
                        operator_stopped,
                    )),
                ),
                ChangeAction::Reapply => {
                    let pre_stop: Vec<_> = if operator_stopped {
                        Vec::new()
                    } else {
                        hooked(&rendered.pre_stop, Hook::PreStop).collect()
                    };
                    (
                        TaskKind::Reconfigure,
                        pre_stop
                            .into_iter()
                            .chain(with_post_start(apply_steps(
                                &rendered,
                                &fp,
                                true,
                                supervised,
                                operator_stopped,
                            )))
                            .collect(),
                    )
                }
                ChangeAction::Start => (
                    TaskKind::Reconfigure,
                    plain(vec![StepAction::Monit {
                        name: rendered.monit_name.clone(),
                        op: MonitOp::Start,
                    }])
                    .chain(post_start())
                    .collect(),
                ),
                ChangeAction::Nothing | ChangeAction::Uninstall => (TaskKind::Reconfigure, vec![]),
            };
            let node_id = n.node_id();
            if !actions.is_empty() {
                changed.insert(c.clone());
            }
            for a in actions {
                steps.push(step(c, &rendered.instance, ip, &node_id, kind, g, a));
            }
            if rendered.index == 0 {
                first.insert(c.clone(), (rendered.clone(), node_id.clone()));
            }
            let why = if operator_stopped && action != ChangeAction::Nothing {
                format!("{why}; stopped through the API, so it is not started")
            } else {
                why
            };
            changes.push(InstanceChange {
                component: c.clone(),
                instance: rendered.instance.clone(),
                ip: ip.clone(),
                node_id: Some(n.id.clone()),
                action,
                why,
            });
            target.instances.insert(
                k,
                AppliedInstance {
                    component: c.clone(),
                    ip: ip.clone(),
                    instance: rendered.instance.clone(),
                    fingerprint: fp,
                    monit_name: rendered.monit_name.clone(),
                    uninstall: rendered.uninstall.clone(),
                    pre_stop: rendered.pre_stop.clone(),
                },
            );
        }
    }
    // post_deploy: once per component this deployment changes, on its first instance.
    for component in catalog.install_order() {
        let Some((r, node_id)) = first.get(component).filter(|_| changed.contains(component))
        else {
            continue;
        };
        for a in hooked(&r.post_deploy, Hook::PostDeploy) {
            steps.push(step(
                component,
                &r.instance,
                &r.ip,
                node_id,
                TaskKind::Reconfigure,
                post_deploy_group,
                a,
            ));
        }
    }
    // Each component's rollout, a percentage of its instances in the plan
    // (of those uninstalled, for a component the plan dropped).
    let mut rollout = BTreeMap::new();
    for s in &steps {
        if rollout.contains_key(&s.component) {
            continue;
        }
        let spec = specs.get(s.component.as_str()).cloned().unwrap_or_default();
        let count = plan
            .components
            .get(&s.component)
            .map(Vec::len)
            .filter(|n| *n > 0)
            .or_else(|| uninstalled.get(&s.component).copied())
            .unwrap_or(1);
        let canaries = usize::try_from(spec.canaries.unwrap_or(0)).unwrap_or(usize::MAX);
        rollout.insert(
            s.component.clone(),
            Rollout {
                canaries,
                max_in_flight: spec.max_in_flight.map(|m| m.resolve(count)),
                watch_secs: spec.watch_secs.unwrap_or(0),
                serial: spec.serial.unwrap_or(true),
            },
        );
    }
    offline.sort();
    offline.dedup();
    Ok(Planned {
        steps,
        rollout,
        target,
        changes,
        offline,
    })
}

/// A hook's steps, marked as such.
fn hooked(list: &[StepAction], hook: Hook) -> impl Iterator<Item = (StepAction, Option<Hook>)> {
    list.iter().cloned().map(move |a| (a, Some(hook)))
}

/// A running deployment of what [`plan_changes`] decided; refused when a
/// node it needs is offline or unknown (naming every one).
pub(crate) fn plan_deployment(
    catalog: &Catalog,
    stored: &StoredPlan,
    applied: &Applied,
    nodes: &[NodeView],
    observed: &Observed,
    new: NewDeployment,
) -> Result<Deployment, DeployError> {
    let planned = plan_changes(catalog, stored, applied, nodes, observed)?;
    if !planned.offline.is_empty() {
        return Err(DeployError::Offline(planned.offline.join(", ")));
    }
    Ok(Deployment {
        id: new.id,
        state: DeployState::Running,
        plan_revision: stored.revision,
        created_at: new.created_at,
        finished_at: None,
        error: None,
        max_attempts: new.max_attempts,
        steps: planned.steps,
        target: planned.target,
        paused: false,
        rollout: planned.rollout,
        watches: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::view::describe;
    use crate::testkit;
    use de_common::InstanceState;

    /// `base` is supervised (a monit check it adds and starts); `app` comes
    /// after it and only runs scripts.
    fn catalog() -> Catalog {
        let files = [
            ("catalog.toml", "description = \"test\"\nentry = \"app\"\n"),
            (
                "base.toml",
                r#"
description = "supervised"
cardinality = "many"
monit_check = "check process base with pidfile /run/base.pid"
[[install]]
action = "script"
run = "echo base {{ node.ip }}"
[[install]]
action = "monit_add"
[[install]]
action = "monit_start"
[[uninstall]]
action = "monit_stop"
"#,
            ),
            (
                "app.toml",
                r#"
description = "after base"
cardinality = "many"
after = ["base"]
monit_check = "check process app with pidfile /run/app.pid"
[[install]]
action = "write_file"
path = "/etc/app.conf"
contents = "members={{ components.base | join(',') }}"
"#,
            ),
        ];
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        Catalog::from_files("t", "/catalogs/t", false, &files).expect("the test catalog loads")
    }

    fn stored(revision: u64, components: &[(&str, &[&str])]) -> StoredPlan {
        StoredPlan {
            revision,
            stored_at: "t0".to_owned(),
            plan: testkit::plan("t", components),
        }
    }

    fn nodes() -> Vec<NodeView> {
        vec![
            testkit::node("n1", "10.0.0.1", 2, 4096, 50_000),
            testkit::node("n2", "10.0.0.2", 2, 4096, 50_000),
        ]
    }

    fn new(id: &str) -> NewDeployment {
        NewDeployment {
            id: id.into(),
            created_at: "t1".to_owned(),
            max_attempts: 3,
        }
    }

    /// One line per step: group, kind, instance, IP, node, action.
    fn steps(d: &Deployment) -> Vec<String> {
        d.steps
            .iter()
            .map(|s| {
                let kind = serde_json::to_value(s.kind).expect("kind");
                format!(
                    "{} {} {} {} {}: {}",
                    s.group,
                    kind.as_str().unwrap_or("?"),
                    s.instance,
                    s.ip,
                    s.node_id,
                    describe(&s.action)
                )
            })
            .collect()
    }

    /// The deployment of `plan` onto an empty cluster; its target is what a
    /// later deployment is diffed against.
    fn first(plan: &StoredPlan) -> Deployment {
        plan_deployment(
            &catalog(),
            plan,
            &Applied::default(),
            &nodes(),
            &Observed::default(),
            new("d-1"),
        )
        .expect("plans")
    }

    #[test]
    fn a_first_deployment_installs_every_instance_component_by_component() {
        let plan = stored(
            1,
            &[("base", &["10.0.0.1", "10.0.0.2"]), ("app", &["10.0.0.1"])],
        );
        let d = first(&plan);
        assert_eq!(
            steps(&d),
            [
                "1 install base_0 10.0.0.1 n1: script",
                "1 install base_0 10.0.0.1 n1: monit add base",
                "1 install base_0 10.0.0.1 n1: monit start base",
                "1 install base_0 10.0.0.1 n1: mark applied",
                "1 install base_1 10.0.0.2 n2: script",
                "1 install base_1 10.0.0.2 n2: monit add base",
                "1 install base_1 10.0.0.2 n2: monit start base",
                "1 install base_1 10.0.0.2 n2: mark applied",
                "2 install app_0 10.0.0.1 n1: write /etc/app.conf",
                "2 install app_0 10.0.0.1 n1: mark applied",
            ]
        );
        assert_eq!(
            (
                d.id.as_str(),
                d.state,
                d.plan_revision,
                d.created_at.as_str(),
                d.max_attempts
            ),
            ("d-1", DeployState::Running, 1, "t1", 3)
        );
        assert!(
            d.steps
                .iter()
                .all(|s| s.state == PhaseState::Pending && s.attempts == 0 && s.step_id.is_none())
        );
        let keys: Vec<&str> = d.target.instances.keys().map(String::as_str).collect();
        assert_eq!(keys, ["app@10.0.0.1", "base@10.0.0.1", "base@10.0.0.2"]);
        assert_eq!(d.target.revision, 1);
    }

    #[test]
    fn a_dropped_instance_is_uninstalled_first_and_an_unchanged_one_adds_nothing() {
        let applied = first(&stored(1, &[("base", &["10.0.0.1", "10.0.0.2"])])).target;
        let d = plan_deployment(
            &catalog(),
            &stored(2, &[("base", &["10.0.0.1"])]),
            &applied,
            &nodes(),
            &Observed::default(),
            new("d-2"),
        )
        .expect("plans");
        assert_eq!(
            steps(&d),
            [
                "0 uninstall base_1 10.0.0.2 n2: monit stop base",
                "0 uninstall base_1 10.0.0.2 n2: monit remove base",
                "0 uninstall base_1 10.0.0.2 n2: unmark",
            ]
        );
        let keys: Vec<&str> = d.target.instances.keys().map(String::as_str).collect();
        assert_eq!(keys, ["base@10.0.0.1"]);
    }

    #[test]
    fn a_changed_supervised_instance_is_reconfigured_then_restarted() {
        let plan = stored(3, &[("base", &["10.0.0.1"]), ("app", &["10.0.0.1"])]);
        let mut applied = first(&plan).target;
        for i in applied.instances.values_mut() {
            i.fingerprint = "rendered by an older plan".to_owned();
        }
        let d = plan_deployment(
            &catalog(),
            &plan,
            &applied,
            &nodes(),
            &Observed::default(),
            new("d-3"),
        )
        .expect("plans");
        assert_eq!(
            steps(&d),
            [
                "1 reconfigure base_0 10.0.0.1 n1: script",
                "1 reconfigure base_0 10.0.0.1 n1: monit add base",
                "1 reconfigure base_0 10.0.0.1 n1: monit start base",
                "1 reconfigure base_0 10.0.0.1 n1: monit restart base",
                "1 reconfigure base_0 10.0.0.1 n1: mark applied",
                "2 reconfigure app_0 10.0.0.1 n1: write /etc/app.conf",
                "2 reconfigure app_0 10.0.0.1 n1: mark applied",
            ]
        );
    }

    #[test]
    fn a_deployment_names_every_node_it_would_touch_that_is_offline_or_unknown() {
        let plan = stored(1, &[("base", &["10.0.0.1", "10.0.0.2"])]);
        let mut applied = first(&plan).target;
        let mut gone = applied.instances["base@10.0.0.2"].clone();
        gone.ip = "10.0.0.9".to_owned();
        applied.instances.insert("base@10.0.0.9".to_owned(), gone);
        let mut nodes = nodes();
        nodes[1].online = false;
        let err = plan_deployment(
            &catalog(),
            &plan,
            &applied,
            &nodes,
            &Observed::default(),
            new("d-4"),
        )
        .expect_err("a node is offline");
        assert_eq!(
            err.to_string(),
            "nodes of the plan are offline: 10.0.0.2 (n2), 10.0.0.9 (no enrolled node); start their agents (or change the plan) and deploy again"
        );
    }

    /// What the nodes report after `plan` was applied as `first` planned
    /// it: each instance marked with its fingerprint, nothing drifted, and
    /// monit running every supervised check.
    fn reported(d: &Deployment) -> (Vec<NodeView>, Observed) {
        let mut nodes = nodes();
        let mut observed = Observed::default();
        for s in &d.steps {
            if let StepAction::MarkApplied {
                instance,
                fingerprint,
                check,
                ..
            } = &s.action
            {
                observed
                    .inventory
                    .entry(s.node_id.clone())
                    .or_default()
                    .push(InstanceState {
                        instance: instance.clone(),
                        fingerprint: fingerprint.clone(),
                        drift: vec![],
                    });
                if let Some(name) = check
                    && let Some(n) = nodes.iter_mut().find(|n| s.node_id == n.id.as_str())
                {
                    n.components.push(de_common::ComponentStatus {
                        name: name.clone(),
                        status: "RUNNING".into(),
                        pid: Some(1),
                        cpu_pct: None,
                        mem_kb: None,
                    });
                }
            }
        }
        (nodes, observed)
    }

    fn diff(plan: &StoredPlan, applied: &Applied, nodes: &[NodeView], o: &Observed) -> Vec<String> {
        let p = plan_changes(&catalog(), plan, applied, nodes, o).expect("plans");
        p.changes
            .iter()
            .map(|c| {
                let a = serde_json::to_value(c.action).expect("action");
                format!("{} {}: {}", c.instance, a.as_str().unwrap_or("?"), c.why)
            })
            .chain(
                p.steps
                    .iter()
                    .map(|s| format!("  {} {}: {}", s.instance, s.ip, describe(&s.action))),
            )
            .collect()
    }

    #[test]
    fn an_unchanged_plan_on_nodes_as_applied_does_nothing() {
        let plan = stored(1, &[("base", &["10.0.0.1"]), ("app", &["10.0.0.1"])]);
        let d = first(&plan);
        let (nodes, observed) = reported(&d);
        assert_eq!(
            diff(&plan, &d.target, &nodes, &observed),
            [
                "base_0 nothing: as last applied, and running",
                "app_0 nothing: as last applied, and running",
            ]
        );
        // A node that sends no inventory (an older agent) is trusted.
        assert_eq!(
            diff(&plan, &d.target, &nodes, &Observed::default()),
            [
                "base_0 nothing: as last applied, and running",
                "app_0 nothing: as last applied, and running",
            ]
        );
    }

    #[test]
    fn drift_on_a_node_is_repaired_with_the_reason_named() {
        let plan = stored(
            1,
            &[("base", &["10.0.0.1", "10.0.0.2"]), ("app", &["10.0.0.1"])],
        );
        let d = first(&plan);
        let (mut nodes, mut observed) = reported(&d);
        // On n1 the check file was deleted; base on n2 was stopped with monit; app_0's mark is gone.
        observed.inventory.get_mut("n1").expect("n1")[0].drift =
            vec!["monit check base is missing".into()];
        observed
            .inventory
            .get_mut("n1")
            .expect("n1")
            .retain(|i| i.instance != "app_0");
        nodes[1].components[0].status = "STOPPED".into();
        assert_eq!(
            diff(&plan, &d.target, &nodes, &observed),
            [
                "base_0 reapply: monit check base is missing",
                "base_1 start: stopped outside the controller (monit: STOPPED)",
                "app_0 reapply: node n1 has no record of applying it",
                "  base_0 10.0.0.1: script",
                "  base_0 10.0.0.1: monit add base",
                "  base_0 10.0.0.1: monit start base",
                "  base_0 10.0.0.1: monit restart base",
                "  base_0 10.0.0.1: mark applied",
                "  base_1 10.0.0.2: monit start base",
                "  app_0 10.0.0.1: write /etc/app.conf",
                "  app_0 10.0.0.1: mark applied",
            ]
        );
    }

    #[test]
    fn a_node_that_has_not_reported_since_its_last_step_is_taken_as_applied() {
        let plan = stored(1, &[("base", &["10.0.0.1"])]);
        let d = first(&plan);
        let (mut nodes, mut observed) = reported(&d);
        // Its last report predates the step that started base: no start, no re-apply.
        nodes[0].components[0].status = "STOPPED".into();
        observed.inventory.clear();
        observed.stale.insert(NodeId::from("n1"));
        assert_eq!(
            diff(&plan, &d.target, &nodes, &observed),
            ["base_0 nothing: as last applied (node n1 has not reported since its last step)"]
        );
    }

    #[test]
    fn an_instance_stopped_through_the_api_stays_stopped_even_when_reapplied() {
        let plan = stored(1, &[("base", &["10.0.0.1", "10.0.0.2"])]);
        let d = first(&plan);
        let (mut nodes, mut observed) = reported(&d);
        for n in &mut nodes {
            n.components[0].status = "STOPPED".into();
        }
        observed.stopped.insert("base@10.0.0.1".into());
        observed.stopped.insert("base@10.0.0.2".into());
        observed.inventory.get_mut("n2").expect("n2")[0].drift =
            vec!["file /etc/base.conf changed since it was applied".into()];
        assert_eq!(
            diff(&plan, &d.target, &nodes, &observed),
            [
                "base_0 nothing: as last applied; stopped through the API, so it stays stopped",
                "base_1 reapply: file /etc/base.conf changed since it was applied; stopped through the API, so it is not started",
                "  base_1 10.0.0.2: script",
                "  base_1 10.0.0.2: monit add base",
                "  base_1 10.0.0.2: mark applied",
            ]
        );
    }

    #[test]
    fn the_mark_names_the_files_and_check_the_install_wrote() {
        let plan = stored(1, &[("base", &["10.0.0.1"]), ("app", &["10.0.0.1"])]);
        let d = first(&plan);
        let marks: Vec<(&str, &[String], Option<&str>)> = d
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                StepAction::MarkApplied {
                    instance,
                    files,
                    check,
                    ..
                } => Some((instance.as_str(), files.as_slice(), check.as_deref())),
                _ => None,
            })
            .collect();
        assert_eq!(
            marks,
            [
                ("base_0", &[][..], Some("base")),
                ("app_0", &["/etc/app.conf".to_owned()][..], None),
            ]
        );
    }
}

#[cfg(test)]
mod rollout_tests {
    use super::*;
    use crate::deploy::view::describe;
    use crate::testkit;

    /// `web` has every hook and a rollout; `side`, not serial and after
    /// nothing, runs beside `db`; `late`, serial, waits for both.
    fn catalog() -> Catalog {
        let files = [
            ("catalog.toml", "description = \"hooks\"\n"),
            (
                "db.toml",
                "description = \"db\"\ncardinality = \"many\"\nmonit_check = \"check process db with pidfile /db\"\n[[install]]\naction = \"script\"\nrun = \"db\"\n",
            ),
            (
                "side.toml",
                "description = \"side\"\ncardinality = \"many\"\nmonit_check = \"check process side with pidfile /s\"\n[rollout]\nserial = false\n[[install]]\naction = \"script\"\nrun = \"side\"\n",
            ),
            (
                "web.toml",
                r#"
description = "web"
cardinality = "many"
after = ["db"]
monit_check = "check process web with pidfile /run/web.pid"
[rollout]
canaries = 1
max_in_flight = "50%"
watch_secs = 5
[[install]]
action = "script"
run = "install {{ properties.domain }}"
[[install]]
action = "monit_add"
[[install]]
action = "monit_start"
[[uninstall]]
action = "monit_stop"
[[pre_stop]]
action = "write_file"
path = "/drain/{{ instance }}"
contents = ""
[[post_start]]
action = "write_file"
path = "/check/{{ instance }}"
contents = ""
[[post_deploy]]
action = "write_file"
path = "/smoke/{{ instance }}"
contents = ""
"#,
            ),
            (
                "late.toml",
                "description = \"late\"\ncardinality = \"many\"\nafter = [\"web\"]\nmonit_check = \"check process late with pidfile /l\"\n[[install]]\naction = \"script\"\nrun = \"late\"\n",
            ),
        ];
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        Catalog::from_files("h", "/catalogs/h", false, &files).expect("the test catalog loads")
    }

    fn plan(domain: &str, web: &[&str]) -> StoredPlan {
        let mut plan = testkit::plan(
            "h",
            &[
                ("db", &["10.0.0.1"]),
                ("side", &["10.0.0.2"]),
                ("web", web),
                ("late", &["10.0.0.1"]),
            ],
        );
        plan.properties.domain = domain.to_owned();
        StoredPlan {
            revision: 1,
            stored_at: "t0".to_owned(),
            plan,
        }
    }

    fn deploy(p: &StoredPlan, applied: &Applied) -> Deployment {
        let nodes: Vec<NodeView> = (1..=3)
            .map(|i| testkit::node(&format!("n{i}"), &format!("10.0.0.{i}"), 2, 4096, 50_000))
            .collect();
        plan_deployment(
            &catalog(),
            p,
            applied,
            &nodes,
            &Observed::default(),
            NewDeployment {
                id: "d-1".into(),
                created_at: "t1".to_owned(),
                max_attempts: 3,
            },
        )
        .expect("plans")
    }

    fn lines(d: &Deployment, component: &str) -> Vec<String> {
        d.steps
            .iter()
            .filter(|s| s.component == component)
            .map(|s| {
                let hook = s.hook.map(|h| format!(" ({h:?})")).unwrap_or_default();
                format!("{} {}: {}{hook}", s.group, s.instance, describe(&s.action))
            })
            .collect()
    }

    #[test]
    fn hooks_run_around_a_change_and_once_after_the_deployment_and_groups_follow_serial() {
        let p = plan("a.test", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let d = deploy(&p, &Applied::default());
        // side (not serial, after nothing) runs beside db; web after db;
        // late (serial) after everything before it.
        let group = |c: &str| d.steps.iter().find(|s| s.component == c).map(|s| s.group);
        assert_eq!(
            [group("db"), group("side"), group("web"), group("late")],
            [Some(1), Some(1), Some(2), Some(3)]
        );
        // A first install: post_start after the start, before the mark; no
        // pre_stop; post_deploy once, on web_0, after everything.
        let web = lines(&d, "web");
        assert_eq!(
            web[..5],
            [
                "2 web_0: script",
                "2 web_0: monit add web",
                "2 web_0: monit start web",
                "2 web_0: write /check/web_0 (PostStart)",
                "2 web_0: mark applied",
            ]
        );
        assert_eq!(
            web.last().map(String::as_str),
            Some("4 web_0: write /smoke/web_0 (PostDeploy)")
        );
        assert_eq!(web.iter().filter(|l| l.contains("/smoke/")).count(), 1);
        // 50% of 3 rounds down to 1; the rollout is in the record.
        assert_eq!(
            d.rollout.get("web"),
            Some(&Rollout {
                canaries: 1,
                max_in_flight: Some(1),
                watch_secs: 5,
                serial: true,
            })
        );
        // A re-apply drains first; an uninstall runs the pre_stop rendered
        // when it was applied.
        let again = deploy(&plan("b.test", &["10.0.0.1", "10.0.0.2"]), &d.target);
        let web = lines(&again, "web");
        assert_eq!(web[0], "0 web_2: write /drain/web_2 (PreStop)");
        assert_eq!(web[1], "0 web_2: monit stop web");
        assert!(
            web.contains(&"2 web_0: write /drain/web_0 (PreStop)".to_owned()),
            "{web:?}"
        );
        let restart = web.iter().position(|l| l == "2 web_0: monit restart web");
        let check = web
            .iter()
            .position(|l| l == "2 web_0: write /check/web_0 (PostStart)");
        assert!(restart.is_some() && check > restart, "{web:?}");
        // A plan's override wins over the catalog's key.
        let mut p = plan("a.test", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        p.plan.rollout.insert(
            "web".to_owned(),
            serde_json::from_str(r#"{"max_in_flight": 2, "canaries": 0}"#).expect("json"),
        );
        let d = deploy(&p, &Applied::default());
        assert_eq!(
            d.rollout
                .get("web")
                .map(|r| (r.canaries, r.max_in_flight, r.watch_secs)),
            Some((0, Some(2), 5))
        );
    }
}
