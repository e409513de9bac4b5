//! Rendering one component of a plan for one node: the catalog's templates in,
//! [`StepAction`]s (what agents execute, once signed) out.
//!
//! Template context (see docs/CATALOGS.md): `properties` (standard ones with
//! defaults filled in, plus the catalog's extras), `node` (`id`, `ip`,
//! `hostname`, `root`, `hardware`), `component`, `index` (this node's place in
//! the component's IP list), `instance` (`nats_0`), and `components` (every
//! component of the catalog -> its IPs in the plan, empty when absent).

use std::collections::BTreeMap;

use minijinja::{Value, context};
use serde::Serialize;

use de_common::{Hardware, MonitOp, StepAction, Unpack};

use crate::artifacts::ArtifactIndex;

use crate::agents::nodes::NodeView;
use crate::plan::Plan;
use crate::plan::catalog::{Catalog, StepSpec, UnpackSpec};

/// The node a component is rendered for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeContext {
    pub id: String,
    /// The node's IP as the plan names it.
    pub ip: String,
    pub hostname: String,
    /// The node root its agent reported (`/` on a real node).
    pub root: String,
    pub hardware: Hardware,
}

impl NodeContext {
    /// The context of an enrolled node, as the plan addresses it at `ip`.
    pub fn from_view(view: &NodeView, ip: &str) -> NodeContext {
        NodeContext {
            id: view.id.clone(),
            ip: ip.to_owned(),
            hostname: view.hostname.clone(),
            root: view.root.clone(),
            hardware: view.hardware.clone(),
        }
    }
}

/// One component instance, ready to be turned into signed steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedComponent {
    pub component: String,
    pub ip: String,
    /// This node's position in the component's IP list.
    pub index: usize,
    /// `<component>_<index>`, the name the original used for its log files.
    pub instance: String,
    /// The catalog's `prepare` steps, then the component's install steps.
    pub install: Vec<StepAction>,
    pub uninstall: Vec<StepAction>,
    /// Hooks (docs/CATALOGS.md): before it is changed or uninstalled, after
    /// it starts, once after a deployment that changed the component.
    pub pre_stop: Vec<StepAction>,
    pub post_start: Vec<StepAction>,
    pub post_deploy: Vec<StepAction>,
    /// The name of the monit check (the component's name).
    pub monit_name: String,
    pub monit_check: String,
    /// Absolute paths on the node.
    pub logs: Vec<String>,
}

/// Why a component could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("catalog {catalog} has no component {component:?}")]
    UnknownComponent { catalog: String, component: String },
    #[error("the plan does not place {component} on {ip}")]
    NotInPlan { component: String, ip: String },
    #[error("template {template} failed to render")]
    Template {
        template: String,
        #[source]
        source: Box<minijinja::Error>,
    },
    #[error(
        "the monit check of {component} must begin with 'check <type> {component} ...', found {found:?}"
    )]
    MonitName { component: String, found: String },
    #[error(
        "it needs the artifact {name:?}, which the controller does not hold: upload it with `dectl artifacts upload FILE --name {name}` (POST /api/v1/artifacts?name={name})"
    )]
    MissingArtifact { name: String },
}

/// Renders components of one plan; the plan-wide context is built once.
#[derive(Debug)]
pub struct PlanRenderer<'a> {
    catalog: &'a Catalog,
    plan: &'a Plan,
    properties: Value,
    components: Value,
    /// The artifacts `fetch` steps may name (none unless given).
    artifacts: Option<&'a ArtifactIndex>,
}

/// The properties templates see: standard ones with defaults, then extras.
fn template_properties(plan: &Plan, catalog: &Catalog) -> BTreeMap<String, serde_json::Value> {
    use serde_json::Value as J;
    let p = &plan.properties;
    let text = |v: &Option<String>| J::String(v.clone().unwrap_or_default());
    let secret = |v: &Option<crate::plan::Secret>| {
        J::String(
            v.as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_default(),
        )
    };
    let mut out = catalog.extra_properties().clone();
    for (k, v) in &p.extra {
        out.insert(k.clone(), v.clone());
    }
    out.insert("domain".into(), J::String(p.domain.clone()));
    out.insert("home".into(), text(&p.home));
    out.insert("disksize".into(), J::from(p.disksize.unwrap_or(0)));
    out.insert("checkdisk".into(), J::from(u8::from(p.checkdisk)));
    out.insert("adduser".into(), J::from(u8::from(p.adduser)));
    out.insert("user".into(), text(&p.user));
    out.insert("password".into(), secret(&p.password));
    out.insert("root".into(), secret(&p.root));
    out.insert("catalog".into(), J::String(p.catalog.clone()));
    out
}

impl Catalog {
    /// A renderer for many components of `plan` (validation and deployment
    /// render every instance; the plan-wide context is shared).
    pub fn for_plan<'a>(&'a self, plan: &'a Plan) -> PlanRenderer<'a> {
        let mut components: BTreeMap<&str, &[String]> = self
            .components()
            .map(|c| (c.name.as_str(), &[][..]))
            .collect();
        for (name, ips) in &plan.components {
            components.insert(name, ips);
        }
        PlanRenderer {
            catalog: self,
            plan,
            properties: Value::from_serialize(template_properties(plan, self)),
            components: Value::from_serialize(components),
            artifacts: None,
        }
    }

    /// Renders `component` of `plan` for `node`.
    pub fn render(
        &self,
        component: &str,
        plan: &Plan,
        node: &NodeContext,
    ) -> Result<RenderedComponent, RenderError> {
        self.for_plan(plan).render(component, node)
    }
}

impl<'a> PlanRenderer<'a> {
    /// `fetch` steps resolve their artifact in `index` (by name, or by
    /// SHA-256); without one, every artifact is missing.
    pub fn with_artifacts(mut self, index: &'a ArtifactIndex) -> PlanRenderer<'a> {
        self.artifacts = Some(index);
        self
    }

    /// Renders `component` for `node`, which the plan must list for it.
    pub fn render(
        &self,
        component: &str,
        node: &NodeContext,
    ) -> Result<RenderedComponent, RenderError> {
        let catalog = self.catalog;
        let def = catalog
            .component(component)
            .ok_or_else(|| RenderError::UnknownComponent {
                catalog: catalog.name().to_owned(),
                component: component.to_owned(),
            })?;
        let index = self
            .plan
            .components
            .get(component)
            .and_then(|ips| ips.iter().position(|ip| *ip == node.ip))
            .ok_or_else(|| RenderError::NotInPlan {
                component: component.to_owned(),
                ip: node.ip.clone(),
            })?;
        let instance = format!("{component}_{index}");
        let ctx = context! {
            properties => self.properties.clone(),
            components => self.components.clone(),
            node => Value::from_serialize(node),
            component => component,
            index => index,
            instance => instance.clone(),
        };
        let r = Renderer {
            env: catalog.env(),
            ctx: &ctx,
            artifacts: self.artifacts,
        };

        let monit_check = r.render(&Catalog::template_name(Some(component), "monit_check"))?;
        check_monit_name(component, &monit_check)?;
        let logs = (0..def.logs.len())
            .map(|i| {
                r.render(&Catalog::template_name(
                    Some(component),
                    &format!("logs[{i}]"),
                ))
                .map(|s| s.trim().to_owned())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fixed = Fixed {
            name: component,
            check: &monit_check,
            logs: &logs,
        };
        let mut install = Vec::new();
        for (i, step) in catalog.prepare().iter().enumerate() {
            install.extend(r.steps(None, &format!("prepare[{i}]"), step, &fixed)?);
        }
        for (i, step) in def.install.iter().enumerate() {
            install.extend(r.steps(Some(component), &format!("install[{i}]"), step, &fixed)?);
        }
        let mut uninstall = Vec::new();
        for (i, step) in def.uninstall.iter().enumerate() {
            uninstall.extend(r.steps(Some(component), &format!("uninstall[{i}]"), step, &fixed)?);
        }
        let list = |name: &str, steps: &[StepSpec]| -> Result<Vec<StepAction>, RenderError> {
            let mut out = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                out.extend(r.steps(Some(component), &format!("{name}[{i}]"), step, &fixed)?);
            }
            Ok(out)
        };
        let pre_stop = list("pre_stop", &def.pre_stop)?;
        let post_start = list("post_start", &def.post_start)?;
        let post_deploy = list("post_deploy", &def.post_deploy)?;
        Ok(RenderedComponent {
            component: component.to_owned(),
            ip: node.ip.clone(),
            index,
            instance,
            install,
            uninstall,
            pre_stop,
            post_start,
            post_deploy,
            monit_name: component.to_owned(),
            monit_check,
            logs,
        })
    }
}

/// What steps without templates of their own refer to.
struct Fixed<'a> {
    name: &'a str,
    check: &'a str,
    logs: &'a [String],
}

struct Renderer<'a> {
    env: &'a minijinja::Environment<'static>,
    ctx: &'a Value,
    artifacts: Option<&'a ArtifactIndex>,
}

impl Renderer<'_> {
    fn render(&self, template: &str) -> Result<String, RenderError> {
        let err = |source| RenderError::Template {
            template: template.to_owned(),
            source: Box::new(source),
        };
        self.env
            .get_template(template)
            .map_err(err)?
            .render(self.ctx)
            .map_err(err)
    }

    fn field(&self, component: Option<&str>, at: &str, field: &str) -> Result<String, RenderError> {
        self.render(&Catalog::template_name(component, &format!("{at}.{field}")))
    }

    /// The actions one catalog step renders to: one, except `apt_repo`
    /// (a fetch per package, the index and the source list; none when its
    /// `when` is not true).
    fn steps(
        &self,
        component: Option<&str>,
        at: &str,
        step: &StepSpec,
        fixed: &Fixed<'_>,
    ) -> Result<Vec<StepAction>, RenderError> {
        let StepSpec::AptRepo { when, .. } = step else {
            return Ok(vec![self.step(component, at, step, fixed)?]);
        };
        if when.is_some() {
            let w = self.field(component, at, "when")?;
            if !matches!(w.trim(), "1" | "true" | "True") {
                return Ok(Vec::new());
            }
        }
        let dir = self
            .field(component, at, "dir")?
            .trim()
            .trim_end_matches('/')
            .to_owned();
        let mut out = Vec::new();
        let mut index = String::new();
        for (name, e) in self.artifacts.into_iter().flatten() {
            let Some(control) = &e.deb_control else {
                continue;
            };
            out.push(StepAction::Fetch {
                artifact: name.clone(),
                sha256: e.sha256.clone(),
                size: e.size,
                path: format!("{dir}/{name}"),
                mode: 0o644,
                owner: None,
                unpack: None,
            });
            index.push_str(&format!(
                "{control}\nFilename: ./{name}\nSize: {}\nSHA256: {}\n\n",
                e.size, e.sha256
            ));
        }
        // The index is in the signed step, and holds every package's
        // SHA-256, which apt checks: the source is pinned without a key.
        out.push(StepAction::WriteFile {
            path: format!("{dir}/Packages"),
            contents: index.into_bytes(),
            mode: 0o644,
            owner: None,
        });
        out.push(StepAction::WriteFile {
            path: format!("{dir}/sources.list"),
            contents: format!("deb [trusted=yes] file:{dir} ./\n").into_bytes(),
            mode: 0o644,
            owner: None,
        });
        Ok(out)
    }

    fn step(
        &self,
        component: Option<&str>,
        at: &str,
        step: &StepSpec,
        fixed: &Fixed<'_>,
    ) -> Result<StepAction, RenderError> {
        let name = fixed.name.to_owned();
        let monit = |op| StepAction::Monit {
            name: name.clone(),
            op,
        };
        let optional = |s: String| {
            let t = s.trim();
            (!t.is_empty()).then(|| t.to_owned())
        };
        Ok(match step {
            StepSpec::Script {
                user,
                env,
                timeout_secs,
                ..
            } => StepAction::Script {
                script: self.field(component, at, "run")?,
                user: match user {
                    Some(_) => optional(self.field(component, at, "user")?),
                    None => None,
                },
                env: env
                    .keys()
                    .map(|k| Ok((k.clone(), self.field(component, at, &format!("env.{k}"))?)))
                    .collect::<Result<Vec<_>, RenderError>>()?,
                timeout_secs: *timeout_secs,
            },
            StepSpec::WriteFile { mode, owner, .. } => StepAction::WriteFile {
                path: self.field(component, at, "path")?.trim().to_owned(),
                contents: self.field(component, at, "contents")?.into_bytes(),
                mode: *mode,
                owner: match owner {
                    Some(_) => optional(self.field(component, at, "owner")?),
                    None => None,
                },
            },
            StepSpec::MonitAdd => StepAction::MonitAdd {
                name: name.clone(),
                check: fixed.check.to_owned(),
            },
            StepSpec::MonitRemove => StepAction::MonitRemove { name: name.clone() },
            StepSpec::MonitStart => monit(MonitOp::Start),
            StepSpec::MonitStop => monit(MonitOp::Stop),
            StepSpec::MonitRestart => monit(MonitOp::Restart),
            StepSpec::CollectLogs { max_bytes } => StepAction::CollectLogs {
                paths: fixed.logs.to_vec(),
                max_bytes: *max_bytes,
            },
            StepSpec::Fetch {
                mode,
                owner,
                unpack,
                ..
            } => {
                let name = self.field(component, at, "artifact")?.trim().to_owned();
                let found = self.artifacts.and_then(|index| {
                    index
                        .get(&name)
                        .map(|e| (name.clone(), e.sha256.clone(), e.size))
                        .or_else(|| {
                            index
                                .iter()
                                .find(|(_, e)| e.sha256 == name)
                                .map(|(n, e)| (n.clone(), e.sha256.clone(), e.size))
                        })
                });
                let (artifact, sha256, size) =
                    found.ok_or(RenderError::MissingArtifact { name })?;
                StepAction::Fetch {
                    artifact,
                    sha256,
                    size,
                    path: self.field(component, at, "path")?.trim().to_owned(),
                    mode: *mode,
                    owner: match owner {
                        Some(_) => optional(self.field(component, at, "owner")?),
                        None => None,
                    },
                    unpack: unpack.map(|u| match u {
                        UnpackSpec::TarGz => Unpack::TarGz,
                        UnpackSpec::Zip => Unpack::Zip,
                    }),
                }
            }
            // Rendered by `steps`, into several actions.
            StepSpec::AptRepo { .. } => {
                return Err(RenderError::Template {
                    template: at.to_owned(),
                    source: Box::new(minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        "apt_repo renders into several steps",
                    )),
                });
            }
        })
    }
}

/// The check must be named after the component, or monit start/stop by name would miss it.
fn check_monit_name(component: &str, check: &str) -> Result<(), RenderError> {
    let first = check
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default();
    let mut words = first.split_whitespace();
    let ok =
        words.next() == Some("check") && words.next().is_some() && words.next() == Some(component);
    if ok {
        Ok(())
    } else {
        Err(RenderError::MonitName {
            component: component.to_owned(),
            found: first.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::catalog::Catalogs;
    use crate::testkit;

    fn ctx(id: &str, ip: &str, root: &str) -> NodeContext {
        let mut view = testkit::node(id, ip, 2, 4096, 50_000);
        view.root = root.to_owned();
        NodeContext::from_view(&view, ip)
    }

    fn text(a: &StepAction) -> String {
        match a {
            StepAction::Script { script, .. } => script.clone(),
            StepAction::WriteFile { path, contents, .. } => {
                format!("{path}\n{}", String::from_utf8_lossy(contents))
            }
            StepAction::MonitAdd { check, .. } => check.clone(),
            other => other.kind().to_owned(),
        }
    }

    fn file<'a>(r: &'a RenderedComponent, suffix: &str) -> &'a str {
        r.install
            .iter()
            .find_map(|a| match a {
                StepAction::WriteFile { path, contents, .. } if path.ends_with(suffix) => {
                    std::str::from_utf8(contents).ok()
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no file *{suffix} in {r:?}"))
    }

    #[test]
    fn every_built_in_component_renders_for_a_sample_plan() {
        let all = Catalogs::builtin().expect("built-in catalogs");
        let ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
        for catalog in all.iter() {
            let components: Vec<(&str, &[&str])> = catalog
                .components()
                .map(|c| {
                    let list: &[&str] = match c.cardinality {
                        crate::plan::catalog::Cardinality::One => &ips[..1],
                        crate::plan::catalog::Cardinality::Many => &ips[..],
                    };
                    (c.name.as_str(), list)
                })
                .collect();
            let plan = testkit::plan(catalog.name(), &components);
            let r = catalog.for_plan(&plan);
            for (component, list) in &components {
                for (i, ip) in list.iter().enumerate() {
                    let node = ctx(&format!("n{i}"), ip, &format!("/srv/node{i}"));
                    let out = r.render(component, &node).unwrap_or_else(|e| {
                        panic!(
                            "{}/{component}: {}",
                            catalog.name(),
                            de_common::ErrorChain(&e)
                        )
                    });
                    assert_eq!(out.index, i);
                    assert_eq!(out.instance, format!("{component}_{i}"));
                    assert!(!out.install.is_empty(), "{component}");
                    assert!(!out.uninstall.is_empty(), "{component}");
                    assert!(!out.logs.is_empty(), "{component}");
                    assert!(
                        out.install.iter().any(
                            |a| matches!(a, StepAction::MonitAdd { name, .. } if name == component)
                        ),
                        "{component} installs its monit check"
                    );
                    for a in out.install.iter().chain(&out.uninstall) {
                        let t = text(a);
                        assert!(!t.contains("{{") && !t.contains("{%"), "unrendered: {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn debian_demo_files_live_under_the_node_root_and_name_the_cluster() {
        let all = Catalogs::builtin().expect("built-in catalogs");
        let demo = all.get("debian-demo").expect("demo");
        let plan = testkit::plan(
            "debian-demo",
            &[
                ("haproxy", &["127.0.2.1"]),
                ("nginx", &["127.0.2.2", "127.0.2.3"]),
                ("nats", &["127.0.2.2", "127.0.2.3", "127.0.2.4"]),
            ],
        );
        let r = demo.for_plan(&plan);
        let root = "/tmp/agents/n2/root";

        let nginx = r
            .render("nginx", &ctx("n2", "127.0.2.2", root))
            .expect("nginx");
        let conf = file(&nginx, "nginx.conf");
        assert!(conf.contains("listen 127.0.2.2:80;"), "{conf}");
        assert!(
            conf.contains(&format!("pid {root}/var/vcap/sys/run/nginx/nginx.pid;")),
            "{conf}"
        );
        assert!(conf.contains("user www-data;"), "{conf}");
        assert!(file(&nginx, "index.html").contains("node 127.0.2.2"));
        assert!(nginx.monit_check.starts_with(&format!(
            "check process nginx with pidfile {root}/var/vcap/sys/run/nginx/nginx.pid"
        )));
        assert_eq!(
            nginx.logs,
            [
                format!("{root}/var/vcap/sys/log/nginx/error.log"),
                format!("{root}/var/vcap/sys/log/nginx/access.log")
            ]
        );
        for a in nginx.install.iter().chain(&nginx.uninstall) {
            if let StepAction::WriteFile { path, .. } = a {
                assert!(path.starts_with(root), "{path}");
            }
            if let StepAction::Script { script, .. } = a
                && script.contains("apt-get")
            {
                assert!(script.contains("DPkg::Lock::Timeout=600"), "{script}");
            }
        }

        let haproxy = r
            .render("haproxy", &ctx("n1", "127.0.2.1", "/"))
            .expect("haproxy");
        let cfg = file(&haproxy, "haproxy.cfg");
        assert!(cfg.contains("bind 127.0.2.1:80"), "{cfg}");
        assert!(cfg.contains("server nginx_0 127.0.2.2:80 check"), "{cfg}");
        assert!(cfg.contains("server nginx_1 127.0.2.3:80 check"), "{cfg}");
        assert!(
            cfg.contains("pidfile /var/vcap/sys/run/haproxy/haproxy.pid"),
            "{cfg}"
        );

        let nats = r
            .render("nats", &ctx("n3", "127.0.2.3", root))
            .expect("nats");
        let ctl = file(&nats, "nats_ctl");
        assert!(ctl.contains("-a 127.0.2.3 -p 4222"), "{ctl}");
        assert!(
            ctl.contains("--routes nats://127.0.2.2:6222,nats://127.0.2.4:6222 "),
            "routes to the others, not itself: {ctl}"
        );
        assert_eq!(nats.instance, "nats_1");

        let single = testkit::plan("debian-demo", &[("nats", &["127.0.2.2"])]);
        let alone = demo
            .render("nats", &single, &ctx("n2", "127.0.2.2", root))
            .expect("nats alone");
        assert!(!file(&alone, "nats_ctl").contains("--cluster"));
    }

    #[test]
    fn a_typo_in_a_template_is_an_error_naming_it_not_an_empty_string() {
        let cat = Catalog::from_files(
            "t",
            "/x",
            false,
            &[(
                "web.toml".to_owned(),
                "description = \"w\"\ncardinality = \"many\"\nmonit_check = \"check process web with pidfile /p\"\n[[install]]\naction = \"script\"\nrun = \"echo {{ properties.domian }}\"\n".to_owned(),
            )],
        )
        .expect("load");
        let plan = testkit::plan("t", &[("web", &["10.0.0.1"])]);
        let err = cat
            .render("web", &plan, &ctx("n1", "10.0.0.1", "/"))
            .expect_err("undefined");
        let chain = de_common::ErrorChain(&err).to_string();
        assert!(chain.contains("web.toml: install[0].run"), "{chain}");
        assert!(chain.contains("undefined"), "{chain}");
    }

    #[test]
    fn a_monit_check_must_be_named_after_its_component() {
        let cat = Catalog::from_files(
            "t",
            "/x",
            false,
            &[(
                "web.toml".to_owned(),
                "description = \"w\"\ncardinality = \"many\"\nmonit_check = \"check process nginx with pidfile /p\"\n".to_owned(),
            )],
        )
        .expect("load");
        let plan = testkit::plan("t", &[("web", &["10.0.0.1"])]);
        let err = cat
            .render("web", &plan, &ctx("n1", "10.0.0.1", "/"))
            .expect_err("misnamed");
        assert!(matches!(err, RenderError::MonitName { .. }), "{err}");
        let err = cat
            .render("web", &plan, &ctx("n1", "10.0.0.9", "/"))
            .expect_err("not in plan");
        assert!(matches!(err, RenderError::NotInPlan { .. }), "{err}");
    }

    #[test]
    fn secrets_reach_templates_only_where_asked_and_quoted() {
        let all = Catalogs::builtin().expect("built-in catalogs");
        let cf = all.get("cf-v170").expect("cf");
        let plan = testkit::plan("cf-v170", &[("nats", &["10.0.0.1"])]);
        let out = cf
            .render("nats", &plan, &ctx("n1", "10.0.0.1", "/"))
            .expect("nats");
        let StepAction::Script { env, script, .. } = &out.install[0] else {
            panic!("prepare[0] is the adduser script: {:?}", out.install[0]);
        };
        assert!(env.contains(&("DE_PASSWORD".to_owned(), "pass'word".to_owned())));
        assert!(!script.contains("pass'word"), "{script}");
        assert!(script.contains("useradd"), "{script}");
    }
}
