//! The planner: the diff between the last applied plan and the current one,
//! as the ordered steps of a new deployment record. Pure: the catalog, the
//! nodes, the plans and the new record's id and time come in as data.

use std::collections::BTreeMap;

use de_common::{MonitOp, StepAction};

use super::DeployError;
use super::record::{
    Applied, AppliedInstance, DeployState, DeployStep, Deployment, PhaseState, TaskKind,
};
use crate::agents::NodeView;
use crate::plan::render::NodeContext;
use crate::plan::validate::find_node;
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

fn key(component: &str, ip: &str) -> String {
    format!("{component}@{ip}")
}

/// What a new deployment record starts with besides its steps: chosen by
/// the caller, so planning needs no clock and no randomness.
#[derive(Debug, Clone)]
pub(crate) struct NewDeployment {
    pub(crate) id: String,
    pub(crate) created_at: String,
    pub(crate) max_attempts: u32,
}

/// Turns the diff between `applied` and the stored plan into a running
/// deployment: uninstalls of instances the plan dropped (group 0), then the
/// install or reconfigure steps of new and changed instances, one group per
/// component in the catalog's install order. Fails when a node to touch is
/// offline or unknown (naming every one) or a component does not render.
pub(crate) fn plan_deployment(
    catalog: &Catalog,
    stored: &StoredPlan,
    applied: &Applied,
    nodes: &[NodeView],
    new: NewDeployment,
) -> Result<Deployment, DeployError> {
    let (plan, revision) = (&stored.plan, stored.revision);
    // Every node that will be touched must be online.
    let mut offline = Vec::new();
    let mut node_of = |ip: &str| -> Option<NodeView> {
        match find_node(nodes, ip) {
            Some(n) if n.online => Some(n.clone()),
            Some(n) => {
                offline.push(format!("{ip} ({})", n.id));
                None
            }
            None => {
                offline.push(format!("{ip} (no enrolled node)"));
                None
            }
        }
    };
    let renderer = catalog.for_plan(plan);
    let mut target = Applied {
        revision,
        instances: BTreeMap::new(),
    };
    let mut steps = Vec::new();
    // Uninstalls first (group 0, reverse catalog order does not matter: they are independent).
    let mut resolved: Vec<(String, String, NodeView)> = Vec::new();
    for (c, ip) in plan.instances() {
        if let Some(n) = node_of(ip) {
            resolved.push((c.to_owned(), ip.to_owned(), n));
        }
    }
    let removed: Vec<&AppliedInstance> = applied
        .instances
        .iter()
        .filter(|(k, _)| !plan.instances().any(|(c, ip)| key(c, ip) == **k))
        .map(|(_, v)| v)
        .collect();
    let mut removed_nodes = Vec::new();
    for r in &removed {
        if let Some(n) = node_of(&r.ip) {
            removed_nodes.push(((*r).clone(), n));
        }
    }
    if !offline.is_empty() {
        offline.sort();
        offline.dedup();
        return Err(DeployError::Offline(offline.join(", ")));
    }
    let step =
        |component: &str, instance: &str, ip: &str, node: &str, kind, group, action| DeployStep {
            component: component.to_owned(),
            instance: instance.to_owned(),
            ip: ip.to_owned(),
            node_id: node.to_owned(),
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
        };
    for (r, n) in &removed_nodes {
        // The catalog's uninstall steps (stop, clean up) first, then the check goes.
        for a in &r.uninstall {
            steps.push(step(
                &r.component,
                &r.instance,
                &r.ip,
                &n.id,
                TaskKind::Uninstall,
                0,
                a.clone(),
            ));
        }
        steps.push(step(
            &r.component,
            &r.instance,
            &r.ip,
            &n.id,
            TaskKind::Uninstall,
            0,
            StepAction::MonitRemove {
                name: r.monit_name.clone(),
            },
        ));
    }
    for (g, component) in catalog.install_order().iter().enumerate() {
        for (c, ip, n) in resolved.iter().filter(|(c, _, _)| c == component) {
            let rendered = renderer
                .render(c, &NodeContext::from_view(n, ip))
                .map_err(|e| DeployError::Render(e.to_string()))?;
            let fp = fingerprint(&rendered.install);
            let prev = applied.instances.get(&key(c, ip));
            let kind = match prev {
                None => Some(TaskKind::Install),
                Some(p) if p.fingerprint != fp => Some(TaskKind::Reconfigure),
                Some(_) => None,
            };
            if let Some(kind) = kind {
                for a in &rendered.install {
                    steps.push(step(
                        c,
                        &rendered.instance,
                        ip,
                        &n.id,
                        kind,
                        g + 1,
                        a.clone(),
                    ));
                }
                let supervised = rendered
                    .install
                    .iter()
                    .any(|a| matches!(a, StepAction::MonitAdd { .. }));
                if kind == TaskKind::Reconfigure && supervised {
                    steps.push(step(
                        c,
                        &rendered.instance,
                        ip,
                        &n.id,
                        kind,
                        g + 1,
                        StepAction::Monit {
                            name: rendered.monit_name.clone(),
                            op: MonitOp::Restart,
                        },
                    ));
                }
            }
            target.instances.insert(
                key(c, ip),
                AppliedInstance {
                    component: c.clone(),
                    ip: ip.clone(),
                    instance: rendered.instance.clone(),
                    fingerprint: fp,
                    monit_name: rendered.monit_name.clone(),
                    uninstall: rendered.uninstall.clone(),
                },
            );
        }
    }
    Ok(Deployment {
        id: new.id,
        state: DeployState::Running,
        plan_revision: revision,
        created_at: new.created_at,
        finished_at: None,
        error: None,
        max_attempts: new.max_attempts,
        steps,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::view::describe;
    use crate::testkit;

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
            id: id.to_owned(),
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
        plan_deployment(&catalog(), plan, &Applied::default(), &nodes(), new("d-1")).expect("plans")
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
                "1 install base_1 10.0.0.2 n2: script",
                "1 install base_1 10.0.0.2 n2: monit add base",
                "1 install base_1 10.0.0.2 n2: monit start base",
                "2 install app_0 10.0.0.1 n1: write /etc/app.conf",
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
            new("d-2"),
        )
        .expect("plans");
        assert_eq!(
            steps(&d),
            [
                "0 uninstall base_1 10.0.0.2 n2: monit stop base",
                "0 uninstall base_1 10.0.0.2 n2: monit remove base",
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
        let d = plan_deployment(&catalog(), &plan, &applied, &nodes(), new("d-3")).expect("plans");
        assert_eq!(
            steps(&d),
            [
                "1 reconfigure base_0 10.0.0.1 n1: script",
                "1 reconfigure base_0 10.0.0.1 n1: monit add base",
                "1 reconfigure base_0 10.0.0.1 n1: monit start base",
                "1 reconfigure base_0 10.0.0.1 n1: monit restart base",
                "2 reconfigure app_0 10.0.0.1 n1: write /etc/app.conf",
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
        let err = plan_deployment(&catalog(), &plan, &applied, &nodes, new("d-4"))
            .expect_err("a node is offline");
        assert_eq!(
            err.to_string(),
            "nodes of the plan are offline: 10.0.0.2 (n2), 10.0.0.9 (no enrolled node); start their agents (or change the plan) and deploy again"
        );
    }
}
