//! Plan validation: the original config JSON in, a checked [`Plan`] or every
//! problem with it out. Pure (no I/O): the caller passes the catalogs, the
//! enrolled nodes and the stored plan (for `"******"` secrets).
//!
//! Invariant: a plan that validates can be rendered for every node it names,
//! so a deployment never fails on a template or an unknown node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::agents::nodes::NodeView;
use crate::plan::catalog::{Cardinality, Catalog, Catalogs, DEFAULT_CATALOG, STANDARD_PROPERTIES};
use crate::plan::render::NodeContext;
use crate::plan::rollout::RolloutSpec;
use crate::plan::{DnsRecord, Plan, Properties, REDACTED, Secret};

pub(crate) use de_common::api::Problem;
use de_common::api::{ProblemKind, Resolved};

/// A plan that passed every check.
#[derive(Debug, Clone)]
pub struct ValidPlan {
    pub plan: Plan,
    pub catalog: Arc<Catalog>,
    /// The record `*.<domain>` -> entry component IP, when the plan has the entry component.
    pub dns: Option<DnsRecord>,
    /// The plan's components in install order.
    pub order: Vec<String>,
    /// Plan IP -> id of the node that has it.
    pub nodes: BTreeMap<String, String>,
}

/// Checks a plan as posted (`body`, any JSON text) against the catalogs and
/// the enrolled `nodes`. `stored` supplies secrets posted as `"******"`.
pub fn validate_plan(
    body: &[u8],
    catalogs: &Catalogs,
    nodes: &[NodeView],
    stored: Option<&Plan>,
    artifacts: &crate::artifacts::ArtifactIndex,
) -> Result<ValidPlan, Vec<Problem>> {
    let mut problems = Vec::new();
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if crate::util::is_blank(body) {
        return Err(vec![Problem::new(
            ProblemKind::MalformedJson,
            "the body is empty: send the plan as JSON, {\"components\": {...}, \"properties\": {...}}",
        )
        .found("an empty body")
        .needed("a JSON object")]);
    }
    let json: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![
                Problem::new(
                    ProblemKind::MalformedJson,
                    format!(
                        "the body is not valid JSON: {e}; fix the JSON there and send it again"
                    ),
                )
                .found(format!("{e}"))
                .needed("a JSON object {\"components\": {...}, \"properties\": {...}}"),
            ]);
        }
    };
    let Value::Object(top) = json else {
        return Err(vec![
            Problem::new(
                ProblemKind::InvalidStructure,
                "the plan must be a JSON object with \"components\" and \"properties\"",
            )
            .found(json_type(&json))
            .needed("an object"),
        ]);
    };
    for key in top.keys() {
        if key != "components" && key != "properties" && key != "rollout" {
            problems.push(
                Problem::new(
                    ProblemKind::UnknownField,
                    format!("the plan has an unknown field {key:?}; a plan has only \"components\", \"properties\" and the optional \"rollout\""),
                )
                .found(key.clone())
                .needed("components, properties, rollout"),
            );
        }
    }

    // Properties first: they name the catalog the components come from.
    let empty = Map::new();
    let props = match top.get("properties") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => {
            problems.push(
                Problem::new(
                    ProblemKind::MissingProperty,
                    "the plan has no \"properties\" object",
                )
                .property("properties")
                .needed("\"properties\": {\"domain\": ..., ...}"),
            );
            &empty
        }
        Some(other) => {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidStructure,
                    "\"properties\" must be an object",
                )
                .property("properties")
                .found(json_type(other))
                .needed("an object"),
            );
            &empty
        }
    };
    let catalog_name = match props.get("catalog") {
        None | Some(Value::Null) => Some(DEFAULT_CATALOG.to_owned()),
        Some(Value::String(s)) => Some(s.trim().to_owned()),
        Some(other) => {
            problems.push(
                Problem::new(
                    ProblemKind::InvalidProperty,
                    "\"catalog\" must be a catalog name",
                )
                .property("catalog")
                .found(other.to_string())
                .needed(format!("one of {}", catalogs.names().join(", "))),
            );
            None
        }
    };
    let catalog = catalog_name.as_deref().and_then(|name| {
        let c = catalogs.get(name).cloned();
        if c.is_none() {
            problems.push(
                Problem::new(
                    ProblemKind::UnknownCatalog,
                    format!("there is no catalog {name:?}; GET /api/v1/catalogs lists them"),
                )
                .property("catalog")
                .found(name)
                .needed(format!("one of {}", catalogs.names().join(", "))),
            );
        }
        c
    });
    let (properties, disk_gb) = check_properties(props, catalog.as_deref(), stored, &mut problems);

    // Components.
    let mut components: BTreeMap<String, Vec<String>> = BTreeMap::new();
    match top.get("components") {
        None | Some(Value::Null) => problems.push(
            Problem::new(
                ProblemKind::InvalidStructure,
                "the plan has no \"components\" object (component name -> list of node IPs)",
            )
            .needed("\"components\": {\"nats\": [\"10.0.0.1\"], ...}"),
        ),
        Some(Value::Object(m)) => {
            for (name, ips) in m {
                if let Some(ips) = check_component(name, ips, catalog.as_deref(), &mut problems) {
                    components.insert(name.clone(), ips);
                }
            }
        }
        Some(other) => problems.push(
            Problem::new(
                ProblemKind::InvalidStructure,
                "\"components\" must be an object",
            )
            .found(json_type(other))
            .needed("an object: component name -> list of node IPs"),
        ),
    }

    // Nodes and hardware.
    let index = NodeIndex::new(nodes);
    let mut assigned: BTreeMap<String, &NodeView> = BTreeMap::new();
    let mut unresolved: BTreeSet<&str> = BTreeSet::new();
    for (name, ips) in &components {
        let def = catalog.as_deref().and_then(|c| c.component(name));
        for ip in ips {
            let node = match assigned.get(ip) {
                Some(n) => Some(*n),
                None if unresolved.contains(ip.as_str()) => None,
                None => match index.resolve(ip) {
                    Ok(n) => {
                        assigned.insert(ip.clone(), n);
                        Some(n)
                    }
                    Err(p) => {
                        unresolved.insert(ip);
                        problems.push((*p).component(name));
                        None
                    }
                },
            };
            if let (Some(node), Some(def)) = (node, def) {
                check_minimum(name, ip, node, &def.minimum, &mut problems);
            }
        }
    }
    if let Some(gb) = disk_gb {
        let needed_mb = gb.saturating_mul(1024);
        for (ip, node) in &assigned {
            if node.hardware.disk_mb < needed_mb {
                let on: Vec<&str> = components
                    .iter()
                    .filter(|(_, ips)| ips.contains(ip))
                    .map(|(c, _)| c.as_str())
                    .collect();
                problems.push(
                    Problem::new(
                        ProblemKind::DiskBelowDisksize,
                        format!(
                            "node {} ({ip}) has {} MB of disk, less than disksize {gb} GB: give it a bigger disk, lower disksize, or set checkdisk to 0",
                            node.id, node.hardware.disk_mb
                        ),
                    )
                    .component(&on.join(", "))
                    .ip(ip)
                    .property("disksize")
                    .found(format!("{} MB", node.hardware.disk_mb))
                    .needed(format!("{needed_mb} MB ({gb} GB)")),
                );
            }
        }
    }

    let (Some(catalog), Some(properties)) = (catalog, properties) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }

    let rollout = check_rollout(top.get("rollout"), &catalog, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let plan = Plan {
        components,
        properties,
        rollout,
    };
    // Render every instance now, so a template that fails for this plan is
    // reported here and not in the middle of a deployment.
    let renderer = catalog.for_plan(&plan).with_artifacts(artifacts);
    for (name, ip) in plan.instances() {
        let Some(node) = assigned.get(ip) else {
            continue;
        };
        if let Err(e) = renderer.render(name, &NodeContext::from_view(node, ip)) {
            problems.push(
                Problem::new(
                    ProblemKind::RenderFailed,
                    format!(
                        "catalog {} cannot render {name} for {ip}: {}; fix the plan's properties or the catalog",
                        catalog.name(),
                        de_common::ErrorChain(&e)
                    ),
                )
                .component(name)
                .ip(ip),
            );
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let order = catalog
        .install_order()
        .iter()
        .filter(|c| plan.components.get(*c).is_some_and(|ips| !ips.is_empty()))
        .cloned()
        .collect();
    let dns = DnsRecord::for_plan(&plan, &catalog);
    let nodes = assigned
        .into_iter()
        .map(|(ip, n)| (ip, n.id.clone()))
        .collect();
    Ok(ValidPlan {
        plan,
        catalog,
        dns,
        order,
        nodes,
    })
}

fn json_type(v: &Value) -> String {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
    .to_owned()
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `home` is the package mirror: an IP or host name, optionally with `:port`.
fn valid_home(s: &str) -> bool {
    if s.parse::<IpAddr>().is_ok() {
        return true;
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (valid_hostname(host) || host.parse::<IpAddr>().is_ok())
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
}

fn valid_user(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 32
}

/// A number, or a string holding one (the original's table says "string").
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// 0/1 as a number, a string or a boolean.
fn as_flag(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        other => match as_u64(other) {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
    }
}

/// The checked properties (None when any is wrong) and, independently, the
/// disk rule (`disksize` in GB when `checkdisk` is 1), so node disks are
/// checked even when another property has a problem.
fn check_properties(
    props: &Map<String, Value>,
    catalog: Option<&Catalog>,
    stored: Option<&Plan>,
    problems: &mut Vec<Problem>,
) -> (Option<Properties>, Option<u64>) {
    let before = problems.len();
    let invalid = |key: &str, v: &Value, needed: &str| {
        Problem::new(
            ProblemKind::InvalidProperty,
            format!("property {key:?} must be {needed}"),
        )
        .property(key)
        .found(v.to_string())
        .needed(needed)
    };
    let mut text = |key: &str, check: fn(&str) -> bool, needed: &str| -> Option<String> {
        match props.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) if check(s.trim()) => Some(s.trim().to_owned()),
            Some(v) => {
                problems.push(invalid(key, v, needed));
                None
            }
        }
    };
    let domain = text(
        "domain",
        valid_hostname,
        "a DNS domain such as cf.local (letters, digits, '-' and '.')",
    );
    let home = text(
        "home",
        valid_home,
        "the package mirror's IP or host name (optionally :port)",
    );
    let user = text(
        "user",
        valid_user,
        "a user name (lowercase letters, digits, '_' and '-', at most 32)",
    );
    let mut number = |key: &str| -> Option<u64> {
        match props.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => as_u64(v).or_else(|| {
                problems.push(invalid(key, v, "a whole number (or a string holding one)"));
                None
            }),
        }
    };
    let disksize = number("disksize");
    let mut flag = |key: &str| -> bool {
        match props.get(key) {
            None | Some(Value::Null) => false,
            Some(v) => as_flag(v).unwrap_or_else(|| {
                problems.push(invalid(key, v, "0 or 1 (a number or a string)"));
                false
            }),
        }
    };
    let checkdisk = flag("checkdisk");
    let adduser = flag("adduser");
    let mut secret = |key: &str| -> Option<Secret> {
        match props.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == REDACTED => {
                let kept = stored.and_then(|p| match key {
                    "password" => p.properties.password.clone(),
                    _ => p.properties.root.clone(),
                });
                if kept.is_none() {
                    problems.push(
                        Problem::new(
                            ProblemKind::InvalidProperty,
                            format!("property {key:?} is \"{REDACTED}\" (which keeps the stored value) but no value is stored: send the real one"),
                        )
                        .property(key)
                        .found(REDACTED)
                        .needed("the password itself"),
                    );
                }
                kept
            }
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(Secret::new(s.clone())),
            Some(v) => {
                // Not echoed back: it may be a secret in the wrong type.
                problems.push(
                    Problem::new(
                        ProblemKind::InvalidProperty,
                        format!("property {key:?} must be a string"),
                    )
                    .property(key)
                    .found(json_type(v))
                    .needed("a string"),
                );
                None
            }
        }
    };
    let password = secret("password");
    let root = secret("root");

    let mut extra = BTreeMap::new();
    for (key, v) in props {
        if STANDARD_PROPERTIES.contains(&key.as_str()) {
            continue;
        }
        let Some(c) = catalog else {
            continue;
        };
        if c.extra_properties().contains_key(key) {
            if !v.is_null() {
                extra.insert(key.clone(), v.clone());
            }
            continue;
        }
        let mut known: Vec<&str> = STANDARD_PROPERTIES.to_vec();
        known.extend(c.extra_properties().keys().map(String::as_str));
        problems.push(
            Problem::new(
                ProblemKind::UnknownProperty,
                format!("catalog {} has no property {key:?}", c.name()),
            )
            .property(key)
            .found(key.clone())
            .needed(format!("one of {}", known.join(", "))),
        );
    }

    let reported = |key: &str, problems: &[Problem]| {
        problems[before..]
            .iter()
            .any(|p| p.property.as_deref() == Some(key))
    };
    let mut missing = Vec::new();
    if domain.is_none() {
        missing.push(("domain", "(the cluster's domain, e.g. cf.local)"));
    }
    if checkdisk && disksize.is_none() {
        missing.push((
            "disksize",
            "when checkdisk is 1 (the least disk per node, in GB)",
        ));
    }
    if adduser && user.is_none() {
        missing.push(("user", "when adduser is 1 (the user to create)"));
    }
    if adduser && password.is_none() {
        missing.push(("password", "when adduser is 1 (the new user's password)"));
    }
    for (key, why) in missing {
        if !reported(key, problems) {
            problems.push(
                Problem::new(
                    ProblemKind::MissingProperty,
                    format!("property {key:?} is required {why}"),
                )
                .property(key)
                .needed(format!("a value for {key:?}")),
            );
        }
    }
    if let Some(c) = catalog {
        for key in c.required() {
            let present = match key.as_str() {
                "domain" => domain.is_some(),
                "home" => home.is_some(),
                "disksize" => disksize.is_some(),
                "checkdisk" | "adduser" | "catalog" => true,
                "user" => user.is_some(),
                "password" => password.is_some(),
                "root" => root.is_some(),
                other => extra.contains_key(other),
            };
            if !present && !reported(key, problems) {
                problems.push(
                    Problem::new(
                        ProblemKind::MissingProperty,
                        format!("catalog {} requires property {key:?}", c.name()),
                    )
                    .property(key)
                    .needed(format!("a value for {key:?}")),
                );
            }
        }
    }
    let disk_gb = disksize.filter(|_| checkdisk);
    let properties = match (catalog, domain) {
        (Some(catalog), Some(domain)) if problems.len() == before => Some(Properties {
            domain,
            home,
            disksize,
            checkdisk,
            adduser,
            user,
            password,
            root,
            catalog: catalog.name().to_owned(),
            extra,
        }),
        _ => None,
    };
    (properties, disk_gb)
}

/// Checks one `components` entry; returns its IPs in canonical form.
fn check_component(
    name: &str,
    ips: &Value,
    catalog: Option<&Catalog>,
    problems: &mut Vec<Problem>,
) -> Option<Vec<String>> {
    let def = match catalog {
        Some(c) => match c.component(name) {
            Some(d) => Some(d),
            None => {
                let known: Vec<&str> = c.components().map(|d| d.name.as_str()).collect();
                problems.push(
                    Problem::new(
                        ProblemKind::UnknownComponent,
                        format!("catalog {} has no component {name:?}", c.name()),
                    )
                    .component(name)
                    .found(name)
                    .needed(format!("one of {}", known.join(", "))),
                );
                return None;
            }
        },
        None => None,
    };
    let Value::Array(list) = ips else {
        problems.push(
            Problem::new(
                ProblemKind::InvalidStructure,
                format!("component {name:?} must map to a list of node IPs"),
            )
            .component(name)
            .found(json_type(ips))
            .needed("a list such as [\"10.0.0.1\"]"),
        );
        return None;
    };
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    let mut ok = true;
    for item in list {
        let parsed = item.as_str().and_then(|s| s.trim().parse::<IpAddr>().ok());
        match parsed {
            Some(ip) => {
                let ip = ip.to_string();
                if out.contains(&ip) {
                    problems.push(
                        Problem::new(
                            ProblemKind::DuplicateIp,
                            format!("component {name:?} lists {ip} more than once; one node runs one instance of a component"),
                        )
                        .component(name)
                        .ip(&ip)
                        .found(ip.clone())
                        .needed("each IP once"),
                    );
                    ok = false;
                } else {
                    out.push(ip);
                }
            }
            None => {
                problems.push(
                    Problem::new(
                        ProblemKind::InvalidIp,
                        format!("component {name:?} lists {item}, which is not an IP address"),
                    )
                    .component(name)
                    .found(item.to_string())
                    .needed("an IPv4 or IPv6 address as a string"),
                );
                ok = false;
            }
        }
    }
    if let Some(def) = def
        && def.cardinality == Cardinality::One
        && list.len() > 1
    {
        problems.push(
            Problem::new(
                ProblemKind::Cardinality,
                format!(
                    "component {name:?} runs on exactly one node, but the plan lists {}: keep one IP",
                    list.len()
                ),
            )
            .component(name)
            .found(format!("{} IPs", list.len()))
            .needed("1 IP"),
        );
        ok = false;
    }
    ok.then_some(out)
}

fn check_minimum(
    component: &str,
    ip: &str,
    node: &NodeView,
    min: &crate::plan::catalog::Minimum,
    problems: &mut Vec<Problem>,
) {
    let hw = &node.hardware;
    let mut short = |what: &str, found: String, needed: String| {
        problems.push(
            Problem::new(
                ProblemKind::BelowMinimum,
                format!(
                    "node {} ({ip}) has {found} but {component} needs at least {needed}: choose a bigger node",
                    node.id
                ),
            )
            .component(component)
            .ip(ip)
            .property(what)
            .found(found)
            .needed(needed),
        );
    };
    if hw.cpus < min.cpus {
        short(
            "cpus",
            format!("{} CPUs", hw.cpus),
            format!("{} CPUs", min.cpus),
        );
    }
    if hw.ram_mb < min.ram_mb {
        short(
            "ram_mb",
            format!("{} MB RAM", hw.ram_mb),
            format!("{} MB RAM", min.ram_mb),
        );
    }
    if hw.disk_mb < min.disk_mb {
        short(
            "disk_mb",
            format!("{} MB disk", hw.disk_mb),
            format!("{} MB disk", min.disk_mb),
        );
    }
}

/// Enrolled nodes by IP and by id (as [`NodeView::is_named`] reads them),
/// so that looking up every instance of a plan does not scan every node
/// for each.
pub(crate) struct NodeIndex<'a> {
    nodes: &'a [NodeView],
    /// Positions in `nodes`, in order.
    by_ip: HashMap<IpAddr, Vec<usize>>,
    by_id: HashMap<&'a str, Vec<usize>>,
}

impl<'a> NodeIndex<'a> {
    pub(crate) fn new(nodes: &'a [NodeView]) -> NodeIndex<'a> {
        let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::with_capacity(nodes.len());
        let mut by_id: HashMap<&str, Vec<usize>> = HashMap::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            by_id.entry(n.id.as_str()).or_default().push(i);
            for ip in &n.ips {
                if let Ok(ip) = ip.parse() {
                    let at = by_ip.entry(ip).or_default();
                    if at.last() != Some(&i) {
                        at.push(i);
                    }
                }
            }
        }
        NodeIndex {
            nodes,
            by_ip,
            by_id,
        }
    }

    /// The nodes with the IP `ip`, in the given order.
    fn with_ip(&self, ip: &str) -> impl Iterator<Item = &'a NodeView> + '_ {
        ip.parse::<IpAddr>()
            .ok()
            .and_then(|a| self.by_ip.get(&a))
            .into_iter()
            .flatten()
            .map(|i| &self.nodes[*i])
    }

    /// The enrolled node `target` (an IP or id) names now, by the API's
    /// rule ([`de_common::api::resolve`]), or, failing that, the first node
    /// that ever had it (a revoked one still has its last reported hardware).
    pub(crate) fn find(&self, target: &str) -> Option<&'a NodeView> {
        let mut at: Vec<usize> = self.by_id.get(target).cloned().unwrap_or_default();
        if let Some(ips) = target
            .parse::<IpAddr>()
            .ok()
            .and_then(|a| self.by_ip.get(&a))
        {
            at.extend(ips);
        }
        at.sort_unstable();
        at.dedup();
        let named: Vec<&NodeView> = at.into_iter().map(|i| &self.nodes[i]).collect();
        Resolved::among(named.iter().copied())
            .node()
            .or_else(|| named.first().copied())
    }

    /// The node a plan IP names, by the API's rule ([`Resolved`]), or the
    /// problem that says why there is none.
    fn resolve(&self, ip: &str) -> Result<&'a NodeView, Box<Problem>> {
        let named = self.with_ip(ip);
        let ids = |ns: &[&NodeView]| {
            ns.iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match Resolved::among(named) {
            Resolved::Node(n) => Ok(n),
            Resolved::Revoked(all) => Err(Box::new(Problem::new(
                ProblemKind::RevokedNode,
                format!(
                    "the node with {ip} ({}) was revoked: enrol it again (de-agent enroll with a new install code) or choose another node",
                    ids(&all)
                ),
            )
            .ip(ip)
            .found("a revoked node")
            .needed("an enrolled node"))),
            Resolved::Unknown => Err(Box::new(Problem::new(
                ProblemKind::UnknownNode,
                format!("no enrolled node has the IP {ip}: install de-agent there and enrol it with an install code (GET /api/v1/nodes lists the nodes)"),
            )
            .ip(ip)
            .found("no node")
            .needed("an enrolled node with this IP"))),
            Resolved::Ambiguous(live) => Err(Box::new(Problem::new(
                ProblemKind::AmbiguousNode,
                format!(
                    "several enrolled nodes have the IP {ip} ({}): revoke the stale ones with DELETE /api/v1/nodes/{{id}}",
                    ids(&live)
                ),
            )
            .ip(ip)
            .found(format!("{} nodes", live.len()))
            .needed("exactly one node"))),
        }
    }
}

/// The plan's optional `"rollout"`: component -> [`RolloutSpec`] overriding
/// the catalog's `[rollout]` (docs/CATALOGS.md).
fn check_rollout(
    value: Option<&Value>,
    catalog: &Catalog,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, RolloutSpec> {
    let mut out = BTreeMap::new();
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return out;
    };
    let Value::Object(map) = value else {
        problems.push(
            Problem::new(
                ProblemKind::InvalidStructure,
                "\"rollout\" must be an object: component name -> {\"canaries\", \"max_in_flight\", \"watch_secs\", \"serial\"}",
            )
            .property("rollout")
            .found(json_type(value))
            .needed("an object"),
        );
        return out;
    };
    for (component, spec) in map {
        if catalog.component(component).is_none() {
            problems.push(
                Problem::new(
                    ProblemKind::UnknownComponent,
                    format!(
                        "\"rollout\" names {component:?}, which catalog {} does not have",
                        catalog.name()
                    ),
                )
                .component(component)
                .property("rollout"),
            );
            continue;
        }
        match serde_json::from_value::<RolloutSpec>(spec.clone()) {
            Ok(r) => match r.problem() {
                Some(p) => problems.push(
                    Problem::new(ProblemKind::InvalidStructure, format!("rollout of {component}: {p}"))
                        .component(component)
                        .property("rollout"),
                ),
                None => {
                    out.insert(component.clone(), r);
                }
            },
            Err(e) => problems.push(
                Problem::new(
                    ProblemKind::InvalidStructure,
                    format!("rollout of {component}: {e}; keys: canaries, max_in_flight (a number or \"N%\"), watch_secs, serial"),
                )
                .component(component)
                .property("rollout")
                .found(spec.to_string()),
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::node;
    use serde_json::json;

    fn seed() -> Value {
        serde_json::from_str(&crate::testkit::seed_json()).expect("seed JSON")
    }

    fn nodes() -> Vec<NodeView> {
        let mut old = node("n-old", "10.0.0.30", 4, 16384, 100_000);
        old.revoked = true;
        let mut a = node("n-a", "10.0.0.40", 4, 16384, 100_000);
        a.online = false;
        let mut b = node("n-b", "10.0.0.40", 4, 16384, 100_000);
        b.online = false;
        vec![
            node("n-big1", "10.0.0.1", 4, 16384, 100_000),
            node("n-big2", "10.0.0.2", 4, 16384, 100_000),
            node("n-big3", "10.0.0.3", 4, 16384, 100_000),
            node("n-small", "10.0.0.20", 1, 512, 4000),
            old,
            a,
            b,
        ]
    }

    #[test]
    fn the_index_names_the_node_the_api_rule_names() {
        let mut all = nodes();
        let mut c = node("10.0.0.2", "10.0.0.9", 1, 1, 1);
        c.online = false;
        all.push(c);
        let index = NodeIndex::new(&all);
        let found = |t: &str| index.find(t).map(|n| n.id.as_str());
        // The one live node; by id too; of an IP and an id, the online one.
        assert_eq!(found("10.0.0.1"), Some("n-big1"));
        assert_eq!(found("n-big3"), Some("n-big3"));
        assert_eq!(found("10.0.0.2"), Some("n-big2"));
        // Only revoked, or ambiguous: the first that ever had it.
        assert_eq!(found("10.0.0.30"), Some("n-old"));
        assert_eq!(found("10.0.0.40"), Some("n-a"));
        assert_eq!(found("10.0.0.99"), None);
        for t in [
            "10.0.0.1",
            "n-big3",
            "10.0.0.2",
            "10.0.0.30",
            "10.0.0.40",
            "x",
        ] {
            let by_scan = de_common::api::resolve(&all, t)
                .node()
                .or_else(|| all.iter().find(|n| n.is_named(t)));
            assert_eq!(index.find(t).map(|n| &n.id), by_scan.map(|n| &n.id), "{t}");
        }
    }

    fn run(body: &str, stored: Option<&Plan>) -> Result<ValidPlan, Vec<Problem>> {
        let catalogs = Catalogs::builtin().expect("catalogs");
        validate_plan(
            body.as_bytes(),
            &catalogs,
            &nodes(),
            stored,
            &Default::default(),
        )
    }

    /// A problem kind as the API words it.
    fn code(kind: ProblemKind) -> String {
        serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The seed with `edit` applied, validated; the problems as "kind component ip".
    fn check(edit: impl FnOnce(&mut Value), expected: &[&str]) {
        let mut v = seed();
        edit(&mut v);
        check_body(&v.to_string(), expected);
    }

    fn check_body(body: &str, expected: &[&str]) {
        let got: Vec<String> = match run(body, None) {
            Ok(_) => Vec::new(),
            Err(ps) => ps
                .iter()
                .map(|p| {
                    assert!(!p.problem.is_empty());
                    format!(
                        "{} {} {}",
                        code(p.kind),
                        p.component.as_deref().unwrap_or("-"),
                        p.ip.as_deref().unwrap_or("-")
                    )
                })
                .collect(),
        };
        assert_eq!(got, expected, "body: {body}");
    }

    #[test]
    fn the_original_example_is_accepted() {
        let v = run(&seed().to_string(), None).expect("valid");
        assert_eq!(v.catalog.name(), "cf-v170");
        assert_eq!(v.plan.components.len(), 14);
        assert_eq!(v.plan.properties.disksize, Some(15));
        assert!(v.plan.properties.checkdisk && v.plan.properties.adduser);
        assert_eq!(v.order.last().map(String::as_str), Some("dea"));
        let dns = v.dns.expect("dns");
        assert_eq!(
            (dns.name.as_str(), dns.value.as_str()),
            ("*.cf.local", "10.0.0.1")
        );
        assert_eq!(v.nodes.len(), 3);
    }

    #[test]
    fn every_problem_class_is_named() {
        check(|_| {}, &[]);
        check(
            |v| v["components"]["web"] = json!(["10.0.0.1"]),
            &["unknown_component web -"],
        );
        check(
            |v| v["components"]["haproxy"] = json!(["10.0.0.1", "10.0.0.2"]),
            &["cardinality haproxy -"],
        );
        check(
            |v| v["components"]["nats"] = json!(["10.0.0.9"]),
            &["unknown_node nats 10.0.0.9"],
        );
        check(
            |v| v["components"]["nats"] = json!(["10.0.0.30"]),
            &["revoked_node nats 10.0.0.30"],
        );
        check(
            |v| v["components"]["nats"] = json!(["10.0.0.40"]),
            &["ambiguous_node nats 10.0.0.40"],
        );
        check(
            |v| {
                v["components"]["dea"] = json!(["10.0.0.20"]);
                v["properties"]["checkdisk"] = json!(0);
            },
            &[
                "below_minimum dea 10.0.0.20",
                "below_minimum dea 10.0.0.20",
                "below_minimum dea 10.0.0.20",
            ],
        );
        check(
            |v| v["properties"]["disksize"] = json!(200),
            &[
                "disk_below_disksize cloud_controller_ng, collector, dea, haproxy, hm9000, nfs_server, uaa 10.0.0.1",
                "disk_below_disksize database, etcd, hm9000, nats, syslog_aggregator, uaa 10.0.0.2",
                "disk_below_disksize cloud_controller_ng, gorouter, loggregator, login, nats, uaa 10.0.0.3",
            ],
        );
        check(
            |v| {
                if let Some(p) = v["properties"].as_object_mut() {
                    p.remove("domain");
                }
            },
            &["missing_property - -"],
        );
        check(
            |v| v["properties"]["home"] = json!(null),
            &["missing_property - -"],
        );
        check(
            |v| v["properties"]["checkdisk"] = json!("yes"),
            &["invalid_property - -"],
        );
        check(
            |v| v["properties"]["colour"] = json!("blue"),
            &["unknown_property - -"],
        );
        check(
            |v| v["properties"]["catalog"] = json!("cf-v999"),
            &["unknown_catalog - -"],
        );
        check(
            |v| v["components"]["nats"] = json!(["10.0.0.1", "not-an-ip", 7]),
            &["invalid_ip nats -", "invalid_ip nats -"],
        );
        check(
            |v| v["components"]["nats"] = json!(["10.0.0.1", "10.0.0.1"]),
            &["duplicate_ip nats 10.0.0.1"],
        );
        check(|v| v["components"] = json!([]), &["invalid_structure - -"]);
        check(|v| v["extra"] = json!(1), &["unknown_field - -"]);
        check_body("", &["malformed_json - -"]);
        check_body("[1]", &["invalid_structure - -"]);
    }

    #[test]
    fn several_problems_come_back_together_with_details() {
        let mut v = seed();
        v["components"]["web"] = json!(["10.0.0.1"]);
        v["components"]["etcd"] = json!(["10.0.0.1", "10.0.0.2"]);
        v["components"]["dea"] = json!(["10.0.0.20"]);
        v["properties"]["domain"] = json!("not a domain");
        let ps = run(&v.to_string(), None).expect_err("invalid");
        let kinds: Vec<ProblemKind> = ps.iter().map(|p| p.kind).collect();
        for k in [
            ProblemKind::InvalidProperty,
            ProblemKind::UnknownComponent,
            ProblemKind::Cardinality,
            ProblemKind::BelowMinimum,
            ProblemKind::DiskBelowDisksize,
        ] {
            assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
        }
        let ram = ps
            .iter()
            .find(|p| {
                p.kind == ProblemKind::BelowMinimum && p.property.as_deref() == Some("ram_mb")
            })
            .expect("ram problem");
        assert_eq!(ram.component.as_deref(), Some("dea"));
        assert_eq!(ram.ip.as_deref(), Some("10.0.0.20"));
        assert_eq!(ram.found.as_deref(), Some("512 MB RAM"));
        assert_eq!(ram.needed.as_deref(), Some("4096 MB RAM"));
        assert!(ram.problem.contains("n-small"), "{}", ram.problem);
    }

    #[test]
    fn malformed_json_says_where() {
        let ps = run("{\"components\": {\"nats\": [\"10.0.0.1\",]}}", None).expect_err("bad");
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].kind, ProblemKind::MalformedJson);
        assert!(ps[0].problem.contains("line 1 column"), "{}", ps[0].problem);
    }

    #[test]
    fn numbers_may_be_strings_as_the_original_table_says() {
        let mut v = seed();
        v["properties"]["disksize"] = json!("15");
        v["properties"]["checkdisk"] = json!("1");
        v["properties"]["adduser"] = json!("0");
        let p = run(&v.to_string(), None).expect("valid").plan;
        assert_eq!(p.properties.disksize, Some(15));
        assert!(p.properties.checkdisk && !p.properties.adduser);
    }

    #[test]
    fn redacted_secrets_keep_the_stored_ones_and_need_one_stored() {
        let first = run(&seed().to_string(), None).expect("valid").plan;
        let mut v = seed();
        v["properties"]["password"] = json!(REDACTED);
        v["properties"]["root"] = json!(REDACTED);
        let again = run(&v.to_string(), Some(&first)).expect("valid").plan;
        assert_eq!(
            again.properties.password.as_ref().map(Secret::expose),
            Some("password")
        );
        assert_eq!(
            again.properties.root.as_ref().map(Secret::expose),
            Some("123456")
        );
        let ps = run(&v.to_string(), None).expect_err("nothing stored");
        assert_eq!(
            ps.iter()
                .map(|p| (p.kind, p.property.as_deref()))
                .collect::<Vec<_>>(),
            [
                (ProblemKind::InvalidProperty, Some("password")),
                (ProblemKind::InvalidProperty, Some("root"))
            ]
        );
        // A secret of the wrong type is named but not echoed.
        let mut v = seed();
        v["properties"]["password"] = json!(123_456_789);
        let ps = run(&v.to_string(), None).expect_err("number");
        assert_eq!(ps[0].found.as_deref(), Some("a number"));
    }

    #[test]
    fn a_template_that_fails_for_this_plan_is_a_problem_before_anything_runs() {
        let mut catalogs = Catalogs::builtin().expect("catalogs");
        let web = "description = \"w\"\ncardinality = \"many\"\nmonit_check = \"check process web with pidfile /p\"\n[[install]]\naction = \"script\"\nrun = \"echo {{ components.db[0] }}\"\n";
        let cat = Catalog::from_files("t", "/x", false, &[("web.toml".to_owned(), web.to_owned())])
            .expect("load");
        catalogs = catalogs.with(cat);
        let body = json!({"components": {"web": ["10.0.0.1"]}, "properties": {"domain": "x.local", "catalog": "t"}});
        let ps = validate_plan(
            body.to_string().as_bytes(),
            &catalogs,
            &nodes(),
            None,
            &Default::default(),
        )
        .expect_err("render fails");
        assert_eq!(ps[0].kind, ProblemKind::RenderFailed);
        assert!(
            ps[0].problem.contains("web.toml: install[0].run"),
            "{}",
            ps[0].problem
        );
    }
}
