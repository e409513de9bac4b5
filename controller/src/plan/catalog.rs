//! Component catalogs: what can be deployed, as data. A catalog is a set of
//! TOML files, one per component (`<component>.toml`), plus an optional
//! `catalog.toml` for the catalog as a whole; the format is documented in
//! `docs/CATALOGS.md`. Built-in catalogs are embedded in the binary; operators
//! add their own as directories under `DATA/catalogs/`.
//!
//! Invariant: a [`Catalog`] that loaded is internally consistent — every
//! `after` and `entry` names one of its components, the order has no cycle,
//! and every template compiles — so only plan-dependent failures (an undefined
//! value, a bad monit check name) are left for rendering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rollout::RolloutSpec;

/// The catalog a plan uses when its properties do not name one.
pub(crate) const DEFAULT_CATALOG: &str = "cf-v170";

/// The catalog-wide file in a catalog directory; every other `*.toml` is a component.
pub(crate) const CATALOG_FILE: &str = "catalog.toml";

macro_rules! builtin {
    ($catalog:literal, $file:literal) => {
        (
            $catalog,
            $file,
            include_str!(concat!("../../catalogs/", $catalog, "/", $file)),
        )
    };
}

/// Built-in catalogs: (catalog, file name, contents).
pub(crate) const BUILTIN: &[(&str, &str, &str)] = &[
    builtin!("cf-v170", "catalog.toml"),
    builtin!("cf-v170", "haproxy.toml"),
    builtin!("cf-v170", "nats.toml"),
    builtin!("cf-v170", "nfs_server.toml"),
    builtin!("cf-v170", "database.toml"),
    builtin!("cf-v170", "cloud_controller_ng.toml"),
    builtin!("cf-v170", "etcd.toml"),
    builtin!("cf-v170", "uaa.toml"),
    builtin!("cf-v170", "login.toml"),
    builtin!("cf-v170", "hm9000.toml"),
    builtin!("cf-v170", "loggregator.toml"),
    builtin!("cf-v170", "collector.toml"),
    builtin!("cf-v170", "syslog_aggregator.toml"),
    builtin!("cf-v170", "gorouter.toml"),
    builtin!("cf-v170", "dea.toml"),
    builtin!("debian-demo", "catalog.toml"),
    builtin!("debian-demo", "haproxy.toml"),
    builtin!("debian-demo", "nginx.toml"),
    builtin!("debian-demo", "nats.toml"),
];

/// Plan properties every catalog knows (`properties` in the original config JSON).
pub(crate) const STANDARD_PROPERTIES: &[&str] = &[
    "domain",
    "home",
    "disksize",
    "checkdisk",
    "adduser",
    "user",
    "password",
    "root",
    "catalog",
];

/// Why a catalog could not be loaded. `file` names the file as the operator knows it.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("could not read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is not a valid catalog file (see docs/CATALOGS.md)")]
    Parse {
        file: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{file}: {problem}")]
    Invalid { file: String, problem: String },
    #[error("{file}: template {template} does not compile")]
    Template {
        file: String,
        template: String,
        #[source]
        source: Box<minijinja::Error>,
    },
}

/// How many instances of a component a plan may list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cardinality {
    /// Exactly one IP when the component is in the plan.
    One,
    /// One or more IPs.
    Many,
}

impl Cardinality {
    pub fn as_str(self) -> &'static str {
        match self {
            Cardinality::One => "one",
            Cardinality::Many => "many",
        }
    }
}

/// The least hardware a node needs to host a component (MB as the original's table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Minimum {
    pub cpus: u32,
    pub ram_mb: u64,
    pub disk_mb: u64,
}

impl Default for Minimum {
    /// The original's default for any node: vCPU >= 1, RAM >= 1024 MB, DISK >= 5120 MB.
    fn default() -> Minimum {
        Minimum {
            cpus: 1,
            ram_mb: 1024,
            disk_mb: 5120,
        }
    }
}

fn default_timeout() -> u32 {
    600
}

fn default_mode() -> u32 {
    0o644
}

fn default_max_bytes() -> u64 {
    1 << 20
}

/// One install or uninstall step as a catalog writes it; its text fields are
/// minijinja templates. Rendering turns it into a [`de_common::StepAction`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepSpec {
    /// A `/bin/sh -c` script, as `user` (root when absent).
    Script {
        run: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
        #[serde(default = "default_timeout")]
        timeout_secs: u32,
    },
    /// Write a file atomically.
    WriteFile {
        path: String,
        contents: String,
        #[serde(default = "default_mode")]
        mode: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Install the component's monit check (`monit_check`) and reload monit.
    MonitAdd,
    /// Remove the component's monit check.
    MonitRemove,
    MonitStart,
    MonitStop,
    MonitRestart,
    /// Collect the tails of the component's `logs`.
    CollectLogs {
        #[serde(default = "default_max_bytes")]
        max_bytes: u64,
    },
    /// Put the controller's artifact `artifact` (a name or a SHA-256,
    /// templated) at `path`, or with `unpack` (`tar.gz`, `tgz`, `zip`)
    /// unpack it into the directory `path`.
    Fetch {
        artifact: String,
        path: String,
        #[serde(default = "default_mode")]
        mode: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unpack: Option<UnpackSpec>,
    },
    /// The controller's Debian repository on the node: every `.deb` artifact
    /// fetched into `dir` (templated), with its `Packages` index and a
    /// `sources.list` naming only it, for `apt-get -o
    /// Dir::Etc::SourceList=DIR/sources.list`. Skipped unless `when`
    /// (templated) renders to `1` or `true`.
    AptRepo {
        #[serde(default = "default_repo_dir")]
        dir: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<String>,
    },
}

fn default_repo_dir() -> String {
    "{{ path(\"var/lib/deployment-engine/repo\") }}".to_owned()
}

/// The archive formats `fetch` unpacks, as a catalog names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnpackSpec {
    #[serde(rename = "tar.gz", alias = "tgz")]
    TarGz,
    #[serde(rename = "zip")]
    Zip,
}

/// The catalog-wide file, `catalog.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    description: String,
    /// Standard or extra properties a plan must set (besides `domain`, always required).
    #[serde(default)]
    required: Vec<String>,
    /// The component `*.<domain>` must resolve to.
    #[serde(default)]
    entry: Option<String>,
    /// Properties beyond the standard ones, with their defaults.
    #[serde(default)]
    properties: BTreeMap<String, serde_json::Value>,
    /// Steps every component's install begins with (node preparation; idempotent).
    #[serde(default)]
    prepare: Vec<StepSpec>,
}

/// One component of a catalog, as its `<component>.toml` defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentDef {
    /// The file stem; not written in the file.
    #[serde(default, skip_deserializing)]
    pub name: String,
    pub description: String,
    pub cardinality: Cardinality,
    #[serde(default)]
    pub minimum: Minimum,
    /// Components that must be installed before this one (when the plan has them).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub install: Vec<StepSpec>,
    #[serde(default)]
    pub uninstall: Vec<StepSpec>,
    /// How its instances change: canaries, max in flight, watch, serial.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Hook: steps before an instance is changed or uninstalled (drain it).
    #[serde(default)]
    pub pre_stop: Vec<StepSpec>,
    /// Hook: steps after an instance is started (a check that must pass).
    #[serde(default)]
    pub post_start: Vec<StepSpec>,
    /// Hook: steps once per deployment that changed the component, after
    /// everything, on its first instance.
    #[serde(default)]
    pub post_deploy: Vec<StepSpec>,
    /// The monit check; it must declare `check <type> <component name>`.
    pub monit_check: String,
    /// Log files to collect (templates; absolute paths on the node).
    #[serde(default)]
    pub logs: Vec<String>,
}

/// A loaded, consistent catalog with its templates compiled.
pub struct Catalog {
    name: String,
    description: String,
    origin: String,
    builtin: bool,
    required: Vec<String>,
    entry: Option<String>,
    properties: BTreeMap<String, serde_json::Value>,
    prepare: Vec<StepSpec>,
    components: BTreeMap<String, ComponentDef>,
    order: Vec<String>,
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("components", &self.order)
            .finish_non_exhaustive()
    }
}

fn valid_catalog_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && name.len() <= 64
}

fn valid_component_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

/// Where a template lives, for its name in the environment and in errors:
/// `nats.toml: install[2].run`.
fn template_name(file: &str, field: &str) -> String {
    format!("{file}: {field}")
}

/// `{ "path": ..., "contents": ... }`-style (field name, template) pairs of a step.
fn step_templates(step: &StepSpec) -> Vec<(String, &str)> {
    match step {
        StepSpec::Script { run, user, env, .. } => {
            let mut out = vec![("run".to_owned(), run.as_str())];
            if let Some(u) = user {
                out.push(("user".to_owned(), u.as_str()));
            }
            for (k, v) in env {
                out.push((format!("env.{k}"), v.as_str()));
            }
            out
        }
        StepSpec::WriteFile {
            path,
            contents,
            owner,
            ..
        } => {
            let mut out = vec![
                ("path".to_owned(), path.as_str()),
                ("contents".to_owned(), contents.as_str()),
            ];
            if let Some(o) = owner {
                out.push(("owner".to_owned(), o.as_str()));
            }
            out
        }
        StepSpec::AptRepo { dir, when } => {
            let mut out = vec![("dir".to_owned(), dir.as_str())];
            if let Some(w) = when {
                out.push(("when".to_owned(), w.as_str()));
            }
            out
        }
        StepSpec::Fetch {
            artifact,
            path,
            owner,
            ..
        } => {
            let mut out = vec![
                ("artifact".to_owned(), artifact.as_str()),
                ("path".to_owned(), path.as_str()),
            ];
            if let Some(o) = owner {
                out.push(("owner".to_owned(), o.as_str()));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The template environment every catalog uses: strict undefined values
/// (a typo is an error, not an empty string), no HTML escaping, block tags
/// that leave no blank lines, the `path()` function, and the `sh` and
/// `hostport` filters.
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("path", path_fn);
    env.add_filter("sh", sh_quote);
    env.add_filter("hostport", hostport);
    env
}

/// `{{ ip | hostport(80) }}`: `10.0.0.1:80`, or `[::1]:80` for IPv6.
fn hostport(ip: String, port: minijinja::Value) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// `path("var/vcap/x")`: the absolute path of `var/vcap/x` under this node's root.
fn path_fn(state: &minijinja::State, rel: String) -> Result<String, minijinja::Error> {
    let root = state
        .lookup("node")
        .and_then(|n| n.get_attr("root").ok())
        .and_then(|r| r.as_str().map(str::to_owned))
        .ok_or_else(|| {
            minijinja::Error::new(
                minijinja::ErrorKind::UndefinedError,
                "path() needs node.root in the context",
            )
        })?;
    Ok(join_root(&root, &rel))
}

/// Joins a node root and a path relative to it: `("/", "var/x")` -> `/var/x`.
pub(crate) fn join_root(root: &str, rel: &str) -> String {
    format!(
        "{}/{}",
        root.trim_end_matches('/'),
        rel.trim_start_matches('/')
    )
}

/// `{{ value | sh }}`: one POSIX shell word, single-quoted.
fn sh_quote(value: String) -> String {
    format!("'{}'", sh_escape(&value))
}

/// What the `sh` filter puts between its quotes: `value` with each `'` as `'\''`.
pub(crate) fn sh_escape(value: &str) -> String {
    value.replace('\'', r#"'\''"#)
}

impl Catalog {
    /// Builds a catalog from its files: (file name, contents), e.g. `("nats.toml", "...")`.
    /// `origin` says where the files are, for messages (`built in` or a directory).
    pub fn from_files(
        name: &str,
        origin: &str,
        builtin: bool,
        files: &[(String, String)],
    ) -> Result<Catalog, CatalogError> {
        let shown = |file: &str| -> String {
            if builtin {
                format!("built-in catalog {name}: {file}")
            } else {
                Path::new(origin).join(file).display().to_string()
            }
        };
        if !valid_catalog_name(name) {
            return Err(CatalogError::Invalid {
                file: origin.to_owned(),
                problem: format!(
                    "{name:?} is not a valid catalog name: use lowercase letters, digits, '.', '_' and '-' (at most 64)"
                ),
            });
        }
        let mut head = CatalogFile::default();
        let mut components = BTreeMap::new();
        for (file, text) in files {
            let parse_err = |source| CatalogError::Parse {
                file: shown(file),
                source: Box::new(source),
            };
            if file == CATALOG_FILE {
                head = toml::from_str(text).map_err(parse_err)?;
                continue;
            }
            let Some(stem) = file.strip_suffix(".toml") else {
                continue;
            };
            if !valid_component_name(stem) {
                return Err(CatalogError::Invalid {
                    file: shown(file),
                    problem: format!(
                        "{stem:?} is not a valid component name: use lowercase letters, digits and '_', starting with a letter"
                    ),
                });
            }
            let mut def: ComponentDef = toml::from_str(text).map_err(parse_err)?;
            def.name = stem.to_owned();
            components.insert(stem.to_owned(), def);
        }
        if components.is_empty() {
            return Err(CatalogError::Invalid {
                file: shown(""),
                problem: "the catalog has no component files (<component>.toml)".to_owned(),
            });
        }
        let known: Vec<&str> = components.keys().map(String::as_str).collect();
        let invalid = |file: &str, problem: String| CatalogError::Invalid {
            file: shown(file),
            problem,
        };
        for key in head.properties.keys() {
            if STANDARD_PROPERTIES.contains(&key.as_str()) {
                return Err(invalid(
                    CATALOG_FILE,
                    format!(
                        "[properties] {key:?} is a standard property; list only extra ones there"
                    ),
                ));
            }
        }
        for r in &head.required {
            if !STANDARD_PROPERTIES.contains(&r.as_str()) && !head.properties.contains_key(r) {
                return Err(invalid(
                    CATALOG_FILE,
                    format!(
                        "required property {r:?} is neither standard ({}) nor declared under [properties]",
                        STANDARD_PROPERTIES.join(", ")
                    ),
                ));
            }
        }
        if let Some(e) = &head.entry
            && !components.contains_key(e)
        {
            return Err(invalid(
                CATALOG_FILE,
                format!(
                    "entry {e:?} is not a component of this catalog ({})",
                    known.join(", ")
                ),
            ));
        }
        for def in components.values() {
            let file = format!("{}.toml", def.name);
            for a in &def.after {
                if !components.contains_key(a) {
                    return Err(invalid(
                        &file,
                        format!(
                            "after names {a:?}, which is not a component of this catalog ({})",
                            known.join(", ")
                        ),
                    ));
                }
            }
            if let Some(problem) = def.rollout.problem() {
                return Err(invalid(&file, format!("[rollout] {problem}")));
            }
            let collects = def
                .install
                .iter()
                .chain(&def.uninstall)
                .any(|s| matches!(s, StepSpec::CollectLogs { .. }));
            if collects && def.logs.is_empty() {
                return Err(invalid(
                    &file,
                    "a collect_logs step needs a non-empty logs list".to_owned(),
                ));
            }
        }
        let order = install_order(&components).map_err(|cycle| {
            invalid(
                "",
                format!(
                    "the 'after' lists form a cycle through {}",
                    cycle.join(", ")
                ),
            )
        })?;

        let mut env = environment();
        let mut add = |file: &str, field: String, src: &str| -> Result<(), CatalogError> {
            let tname = template_name(file, &field);
            env.add_template_owned(tname.clone(), src.to_owned())
                .map_err(|source| CatalogError::Template {
                    file: shown(file),
                    template: tname,
                    source: Box::new(source),
                })
        };
        for (i, step) in head.prepare.iter().enumerate() {
            for (field, src) in step_templates(step) {
                add(CATALOG_FILE, format!("prepare[{i}].{field}"), src)?;
            }
        }
        for def in components.values() {
            let file = format!("{}.toml", def.name);
            for (list, steps) in [
                ("install", &def.install),
                ("uninstall", &def.uninstall),
                ("pre_stop", &def.pre_stop),
                ("post_start", &def.post_start),
                ("post_deploy", &def.post_deploy),
            ] {
                for (i, step) in steps.iter().enumerate() {
                    for (field, src) in step_templates(step) {
                        add(&file, format!("{list}[{i}].{field}"), src)?;
                    }
                }
            }
            add(&file, "monit_check".to_owned(), &def.monit_check)?;
            for (i, log) in def.logs.iter().enumerate() {
                add(&file, format!("logs[{i}]"), log)?;
            }
        }
        Ok(Catalog {
            name: name.to_owned(),
            description: head.description,
            origin: origin.to_owned(),
            builtin,
            required: head.required,
            entry: head.entry,
            properties: head.properties,
            prepare: head.prepare,
            components,
            order,
            env,
        })
    }

    /// Loads a catalog directory: every `*.toml` file in it.
    pub fn from_dir(dir: &Path) -> Result<Catalog, CatalogError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read_err = |path: &Path, source| CatalogError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let entry = entry.map_err(|e| read_err(dir, e))?;
            let path = entry.path();
            let file = entry.file_name().to_string_lossy().into_owned();
            if !file.ends_with(".toml") || !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
            files.push((file, text));
        }
        files.sort();
        Catalog::from_files(&name, &dir.display().to_string(), false, &files)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// `built in`, or the directory the catalog was loaded from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn is_builtin(&self) -> bool {
        self.builtin
    }

    /// Properties a plan must set for this catalog (besides `domain`).
    pub fn required(&self) -> &[String] {
        &self.required
    }

    /// The component `*.<domain>` should resolve to, if the catalog names one.
    pub fn entry(&self) -> Option<&str> {
        self.entry.as_deref()
    }

    /// Extra properties this catalog accepts, with their defaults.
    pub fn extra_properties(&self) -> &BTreeMap<String, serde_json::Value> {
        &self.properties
    }

    pub fn prepare(&self) -> &[StepSpec] {
        &self.prepare
    }

    pub fn component(&self, name: &str) -> Option<&ComponentDef> {
        self.components.get(name)
    }

    /// Every component, by name.
    pub fn components(&self) -> impl Iterator<Item = &ComponentDef> {
        self.components.values()
    }

    /// Component names in install order: each after everything in its `after`.
    pub fn install_order(&self) -> &[String] {
        &self.order
    }

    pub(crate) fn env(&self) -> &minijinja::Environment<'static> {
        &self.env
    }

    pub(crate) fn template_name(component: Option<&str>, field: &str) -> String {
        match component {
            Some(c) => template_name(&format!("{c}.toml"), field),
            None => template_name(CATALOG_FILE, field),
        }
    }
}

/// Kahn's algorithm, alphabetical among the ready ones so the order is stable.
/// On a cycle, returns the components left in it.
fn install_order(components: &BTreeMap<String, ComponentDef>) -> Result<Vec<String>, Vec<String>> {
    let mut waiting: BTreeMap<&str, BTreeSet<&str>> = components
        .values()
        .map(|d| {
            (
                d.name.as_str(),
                d.after.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let mut order = Vec::with_capacity(components.len());
    loop {
        let ready: Vec<&str> = waiting
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            waiting.remove(n);
            for deps in waiting.values_mut() {
                deps.remove(n);
            }
            order.push(n.to_owned());
        }
    }
    if waiting.is_empty() {
        Ok(order)
    } else {
        Err(waiting.keys().map(|k| (*k).to_owned()).collect())
    }
}

/// Every catalog the controller knows: the built-in ones and the operator's.
#[derive(Debug, Clone)]
pub struct Catalogs {
    map: BTreeMap<String, Arc<Catalog>>,
}

impl Catalogs {
    /// Only the catalogs embedded in the binary.
    pub fn builtin() -> Result<Catalogs, CatalogError> {
        let mut by_name: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
        for (catalog, file, text) in BUILTIN {
            by_name
                .entry(catalog)
                .or_default()
                .push(((*file).to_owned(), (*text).to_owned()));
        }
        let mut map = BTreeMap::new();
        for (name, files) in by_name {
            let c = Catalog::from_files(name, "built in", true, &files)?;
            map.insert(name.to_owned(), Arc::new(c));
        }
        Ok(Catalogs { map })
    }

    /// The built-in catalogs and one per directory under `dir` (usually
    /// `DATA/catalogs`; a missing `dir` simply adds none).
    pub fn load(dir: &Path) -> Result<Catalogs, CatalogError> {
        let mut catalogs = Catalogs::builtin()?;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(catalogs),
            Err(source) => {
                return Err(CatalogError::Read {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| CatalogError::Read {
                path: dir.display().to_string(),
                source,
            })?;
            if entry.path().is_dir() {
                dirs.push(entry.path());
            }
        }
        dirs.sort();
        for d in dirs {
            let c = Catalog::from_dir(&d)?;
            if catalogs.map.contains_key(c.name()) {
                return Err(CatalogError::Invalid {
                    file: d.display().to_string(),
                    problem: format!(
                        "{:?} is the name of a built-in catalog: rename the directory",
                        c.name()
                    ),
                });
            }
            catalogs.map.insert(c.name().to_owned(), Arc::new(c));
        }
        Ok(catalogs)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Catalog>> {
        self.map.get(name)
    }

    /// Every catalog, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Catalog>> {
        self.map.values()
    }

    pub fn names(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }

    /// These catalogs and `extra` (replacing one of the same name).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn with(mut self, extra: Catalog) -> Catalogs {
        self.map.insert(extra.name().to_owned(), Arc::new(extra));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
            .collect()
    }

    const WEB: &str = r#"
description = "web"
cardinality = "many"
monit_check = "check process web with pidfile /x"
"#;

    #[test]
    fn cf_v170_has_table_1() {
        let all = Catalogs::builtin().expect("built-in catalogs load");
        let cf = all.get(DEFAULT_CATALOG).expect("cf-v170");
        let table: &[(&str, Cardinality, (u32, u64, u64))] = &[
            ("haproxy", Cardinality::One, (1, 1024, 5120)),
            ("nats", Cardinality::Many, (1, 1024, 5120)),
            ("nfs_server", Cardinality::One, (1, 1024, 20480)),
            ("database", Cardinality::One, (1, 1024, 13312)),
            ("cloud_controller_ng", Cardinality::Many, (1, 4096, 13312)),
            ("etcd", Cardinality::One, (1, 1024, 5120)),
            ("uaa", Cardinality::Many, (1, 1024, 5120)),
            ("login", Cardinality::Many, (1, 1024, 5120)),
            ("hm9000", Cardinality::Many, (1, 1024, 5120)),
            ("loggregator", Cardinality::One, (1, 2048, 10240)),
            ("collector", Cardinality::Many, (1, 1024, 5120)),
            ("syslog_aggregator", Cardinality::One, (1, 1024, 5120)),
            ("gorouter", Cardinality::Many, (1, 2048, 10240)),
            ("dea", Cardinality::Many, (2, 4096, 35840)),
        ];
        assert_eq!(cf.components().count(), table.len());
        for (name, card, (cpus, ram_mb, disk_mb)) in table {
            let c = cf.component(name).expect(name);
            assert_eq!(c.cardinality, *card, "{name}");
            assert_eq!(
                c.minimum,
                Minimum {
                    cpus: *cpus,
                    ram_mb: *ram_mb,
                    disk_mb: *disk_mb
                },
                "{name}"
            );
        }
        let order = cf.install_order();
        let pos = |n: &str| order.iter().position(|o| o == n).expect(n);
        for infra in ["nats", "database", "nfs_server", "etcd"] {
            for later in ["cloud_controller_ng", "gorouter", "dea"] {
                assert!(pos(infra) < pos(later), "{infra} before {later}: {order:?}");
            }
        }
        assert_eq!(order.last().map(String::as_str), Some("dea"));
        assert_eq!(cf.entry(), Some("haproxy"));
    }

    #[test]
    fn debian_demo_is_built_in_and_ordered() {
        let all = Catalogs::builtin().expect("built-in catalogs load");
        let demo = all.get("debian-demo").expect("debian-demo");
        assert_eq!(demo.install_order(), ["nats", "nginx", "haproxy"]);
        assert_eq!(
            demo.component("haproxy").map(|c| c.cardinality),
            Some(Cardinality::One)
        );
        assert_eq!(
            demo.component("nginx").map(|c| c.cardinality),
            Some(Cardinality::Many)
        );
        assert_eq!(
            demo.component("nats").map(|c| c.cardinality),
            Some(Cardinality::Many)
        );
    }

    #[test]
    fn defaults_are_the_original_minimums() {
        let c = Catalog::from_files("t", "/x", false, &files(&[("web.toml", WEB)])).expect("load");
        let web = c.component("web").expect("web");
        assert_eq!(web.minimum, Minimum::default());
        assert_eq!(
            (web.minimum.cpus, web.minimum.ram_mb, web.minimum.disk_mb),
            (1, 1024, 5120)
        );
    }

    /// Loads `list` as catalog "t" and expects an error whose chain contains `expect`.
    fn check(list: &[(&str, &str)], expect: &str) {
        let err = Catalog::from_files("t", "/cat/t", false, &files(list))
            .expect_err(&format!("should fail with {expect:?}"));
        let chain = de_common::ErrorChain(&err).to_string();
        assert!(chain.contains(expect), "expected {expect:?} in: {chain}");
    }

    #[test]
    fn broken_catalogs_are_refused_naming_file_and_problem() {
        check(&[], "no component files");
        check(
            &[("web.toml", &format!("{WEB}after = [\"db\"]\n"))],
            "after names \"db\"",
        );
        check(
            &[
                (
                    "a.toml",
                    &WEB.replace("web", "a")
                        .replace("many\"", "many\"\nafter = [\"b\"]"),
                ),
                (
                    "b.toml",
                    &WEB.replace("web", "b")
                        .replace("many\"", "many\"\nafter = [\"a\"]"),
                ),
            ],
            "cycle through a, b",
        );
        check(
            &[(
                "web.toml",
                &format!("{WEB}[[install]]\naction = \"script\"\nrun = \"{{{{ x \"\n"),
            )],
            "/cat/t/web.toml: template web.toml: install[0].run does not compile",
        );
        check(
            &[(
                "web.toml",
                &format!("{WEB}[[install]]\naction = \"reboot\"\n"),
            )],
            "/cat/t/web.toml is not a valid catalog file",
        );
        check(
            &[("web.toml", &format!("{WEB}colour = \"blue\"\n"))],
            "unknown field `colour`",
        );
        check(
            &[("web.toml", &WEB.replace("many", "several"))],
            "unknown variant `several`",
        );
        check(
            &[(
                "web.toml",
                &format!("{WEB}[[install]]\naction = \"collect_logs\"\n"),
            )],
            "collect_logs step needs a non-empty logs list",
        );
        check(
            &[("Web.toml", WEB)],
            "\"Web\" is not a valid component name",
        );
        check(
            &[("web.toml", WEB), ("catalog.toml", "entry = \"lb\"\n")],
            "entry \"lb\" is not a component",
        );
        check(
            &[
                ("web.toml", WEB),
                ("catalog.toml", "required = [\"colour\"]\n"),
            ],
            "required property \"colour\"",
        );
        check(
            &[
                ("web.toml", WEB),
                ("catalog.toml", "[properties]\ndomain = \"x\"\n"),
            ],
            "\"domain\" is a standard property",
        );
    }

    #[test]
    fn operator_catalogs_load_from_a_directory_and_may_not_shadow_built_ins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let none = Catalogs::load(&dir.path().join("missing")).expect("no dir is fine");
        assert_eq!(none.names(), ["cf-v170", "debian-demo"]);

        let mine = dir.path().join("mine");
        std::fs::create_dir_all(&mine).expect("mkdir");
        std::fs::write(mine.join("web.toml"), WEB).expect("write");
        std::fs::write(mine.join("README"), "not a catalog file").expect("write");
        let cats = Catalogs::load(dir.path()).expect("load");
        assert_eq!(cats.names(), ["cf-v170", "debian-demo", "mine"]);
        let c = cats.get("mine").expect("mine");
        assert!(!c.is_builtin());
        assert_eq!(c.origin(), mine.display().to_string());

        std::fs::create_dir_all(dir.path().join("cf-v170")).expect("mkdir");
        std::fs::write(dir.path().join("cf-v170/web.toml"), WEB).expect("write");
        let err = Catalogs::load(dir.path()).expect_err("shadowing");
        assert!(err.to_string().contains("built-in catalog"), "{err}");
    }

    #[test]
    fn the_sh_filter_quotes_one_word() {
        assert_eq!(sh_quote("a b".into()), "'a b'");
        assert_eq!(sh_quote("it's".into()), r#"'it'\''s'"#);
        assert_eq!(join_root("/", "var/vcap"), "/var/vcap");
        assert_eq!(join_root("/tmp/n1/", "/var/vcap"), "/tmp/n1/var/vcap");
    }
}
