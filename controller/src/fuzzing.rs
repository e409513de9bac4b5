//! Entry points for the coverage-guided fuzzer (`tests/fuzz/`): each takes
//! bytes an outside party controls and runs them through the controller's
//! real decode and validation path, without a server or a store. They return
//! normally for any input; a panic is a finding (a crash of the decoder, or a
//! broken invariant asserted here).
//!
//! Compiled for the unit tests and with the `fuzzing` feature only, so the
//! controller's public API does not grow.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{Value, json};

use de_common::{EnrollRequest, Hardware, NodeId, Usage, decode};

use crate::agents::nodes::{NodeView, addr};
use crate::agents::pki::{Pki, PkiError, node_id_of};
use crate::agents::quic::client_verifier;
use crate::http::compat::hardware_answer;
use crate::http::logs::{name_in_body, tail_in_query};
use crate::http::operate::parse_targets;
use crate::oplog::{LogHub, tail_lines, valid_file_name};
use crate::plan::StoredPlan;
use crate::plan::catalog::{Catalog, Catalogs};
use crate::plan::validate::validate_plan;

/// The node id certificates are issued to.
pub const NODE_ID: &str = "n-fuzz0001";

/// The name of the catalog directory [`Fixture::catalog`] writes.
pub const CATALOG_NAME: &str = "fuzzcat";

/// The original document's example plan, stored as the current plan (so
/// `"******"` secrets resolve and the original routes have a plan to answer from).
const STORED_PLAN: &str = include_str!("../../tests/fixtures/seed-config-example.json");

/// Why the fixture could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("could not prepare {0}")]
    Io(String, #[source] std::io::Error),
    #[error("the built-in catalogs or the example plan do not load: {0}")]
    Setup(String),
}

/// What the controller holds that these inputs are checked against: its
/// keys, the built-in catalogs, enrolled nodes for the example plans' IPs,
/// the example plan as the stored one, and a log dir with a few files (and a
/// link leading out of it).
pub struct Fixture {
    dir: PathBuf,
    pki: Arc<Pki>,
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
    catalogs: Catalogs,
    nodes: Vec<NodeView>,
    stored: StoredPlan,
    logs: LogHub,
    log_dir: PathBuf,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn node(id: usize, ip: &str, hardware: Hardware) -> NodeView {
    NodeView {
        id: format!("n-{id:08x}"),
        hostname: format!("node-{id}"),
        ips: vec![ip.to_owned()],
        hardware,
        usage: Usage::default(),
        online: true,
        last_seen: None,
        agent_version: "fuzz".to_owned(),
        enrolled_at: "2026-01-01T00:00:00Z".to_owned(),
        revoked: false,
        root: "/".to_owned(),
        components: Vec::new(),
        clock_skew_secs: None,
        allow_nat: false,
        source_ip: None,
        ip_mismatch: None,
        cert_not_after: None,
        identity_conflict: None,
    }
}

/// Nodes for the IPs the seed plans use: 10.10.101.180-199 and
/// 10.0.0.1-8, large enough for every component, and 10.0.0.9, too small
/// for any.
fn nodes() -> Vec<NodeView> {
    let big = Hardware {
        cpus: 64,
        ram_mb: 256 * 1024,
        disk_mb: 10 * 1024 * 1024,
    };
    let mut ips: Vec<String> = (180..=199).map(|i| format!("10.10.101.{i}")).collect();
    ips.extend((1..=8).map(|i| format!("10.0.0.{i}")));
    let mut nodes: Vec<NodeView> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| node(i, ip, big.clone()))
        .collect();
    let small = Hardware {
        cpus: 1,
        ram_mb: 256,
        disk_mb: 1024,
    };
    nodes.push(node(nodes.len(), "10.0.0.9", small));
    nodes
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FixtureError + '_ {
    move |e| FixtureError::Io(path.display().to_string(), e)
}

impl Fixture {
    /// Makes the controller's keys and files in `dir` (empty, the caller's).
    pub fn new(dir: &Path) -> Result<Fixture, FixtureError> {
        let pki_dir = dir.join("pki");
        de_common::ensure_private_dir(&pki_dir).map_err(io(&pki_dir))?;
        let (pki, _) = Pki::load_or_create(&pki_dir)?;
        let pki = Arc::new(pki);
        let revoked = Arc::new(RwLock::new(
            [NodeId::from("n-revoked")].into_iter().collect(),
        ));
        let verifier = client_verifier(&pki, revoked);
        let catalogs = Catalogs::builtin().map_err(|e| FixtureError::Setup(e.to_string()))?;
        let nodes = nodes();
        let plan = validate_plan(
            STORED_PLAN.as_bytes(),
            &catalogs,
            &nodes,
            None,
            &Default::default(),
        )
        .map_err(|p| FixtureError::Setup(format!("{p:?}")))?
        .plan;
        let stored = StoredPlan {
            revision: 1,
            stored_at: "2026-01-01T00:00:00Z".to_owned(),
            plan,
        };
        let log_dir = dir.join("logs");
        let logs = LogHub::open(&log_dir).map_err(io(&log_dir))?;
        logs.line(None, "controller started");
        let lines: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
        logs.lines(Some("nats_0"), &lines);
        logs.line(Some("nats_1"), &"x".repeat(70_000));
        // A secret beside the log dir, a link to it and a directory inside it:
        // none of them may be served.
        let secret = dir.join("secret.log");
        std::fs::write(&secret, "secret\n").map_err(io(&secret))?;
        std::os::unix::fs::symlink(&secret, log_dir.join("outside.log")).map_err(io(&log_dir))?;
        std::fs::create_dir(log_dir.join("dir.log")).map_err(io(&log_dir))?;
        Ok(Fixture {
            dir: dir.to_owned(),
            ca_pem: pki.ca_pem(),
            server_cert: pki.server_cert(),
            pki,
            verifier,
            catalogs,
            nodes,
            stored,
            logs,
            log_dir,
        })
    }

    /// The CA the controller's certificates chain to (what a grant carries).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The certificate the controller shows on its QUIC endpoint.
    pub fn server_cert_der(&self) -> &[u8] {
        self.server_cert.as_ref()
    }

    /// A CSR as an enrolling agent sends it, through `issue_node_cert`.
    /// Asserts that an issued certificate takes nothing but the key from
    /// the CSR: it names the node, is no CA, is for client auth only, and
    /// passes the controller's own client verifier. Returns the certificate
    /// issued (PEM), if any.
    pub fn csr(&self, csr_pem: &str) -> Option<String> {
        let node_id = NodeId::from(NODE_ID);
        let pem = self.pki.issue_node_cert(&node_id, csr_pem).ok()?;
        let der = {
            use rustls_pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap_or_else(|e| panic!("an issued certificate is not PEM: {e}"))
        };
        assert_eq!(
            node_id_of(&der),
            Some(node_id),
            "the certificate names another node"
        );
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .unwrap_or_else(|e| panic!("an issued certificate does not parse: {e}"));
        assert!(!x509.is_ca(), "an issued certificate is a CA");
        let eku = x509
            .extended_key_usage()
            .ok()
            .flatten()
            .map(|e| e.value.clone());
        assert!(
            eku.is_some_and(|e| e.client_auth && !e.server_auth && !e.any),
            "an issued certificate is not for client auth only"
        );
        assert!(
            self.verifier
                .verify_client_cert(&der, &[], UnixTime::now())
                .is_ok(),
            "the controller refuses a certificate it issued"
        );
        Some(pem)
    }

    /// A client certificate as an agent shows it on `de-agent/1`: the
    /// controller's TLS verifier, and the node id it reads from it.
    pub fn client_cert(&self, der: &[u8]) {
        let der = CertificateDer::from(der);
        let verified = self.verifier.verify_client_cert(&der, &[], UnixTime::now());
        let named = node_id_of(&der);
        if verified.is_ok() {
            assert!(
                named.is_some(),
                "a certificate without a node id was accepted"
            );
            assert_ne!(
                named,
                Some(NodeId::from("n-revoked")),
                "a revoked node was accepted"
            );
        }
    }

    /// An enrolment request after its seal was opened: decoded, its CSR
    /// through [`Fixture::csr`] and its IPs read as enrolment reads them.
    pub fn enroll_request(&self, payload: &[u8]) {
        let Ok(req) = decode::<EnrollRequest>(payload) else {
            return;
        };
        for ip in &req.ips {
            let _ = addr(ip);
        }
        let _ = self.csr(&req.csr_pem);
    }

    /// A plan as `POST /deployment-engine/config` or `/api/v1/plan/validate`
    /// gets it, through `validate_plan` (which renders every instance).
    /// Asserts that a valid plan's components and IPs are the catalog's and
    /// the nodes', and that it validates again as the controller stores it.
    /// Returns whether the plan was valid.
    pub fn plan(&self, body: &[u8]) -> bool {
        self.check_plan(body, &self.catalogs)
    }

    fn check_plan(&self, body: &[u8], catalogs: &Catalogs) -> bool {
        let Ok(valid) = validate_plan(
            body,
            catalogs,
            &self.nodes,
            Some(&self.stored.plan),
            &Default::default(),
        ) else {
            return false;
        };
        for (component, ips) in &valid.plan.components {
            assert!(
                valid.catalog.component(component).is_some(),
                "the valid plan has {component}, which its catalog lacks"
            );
            for ip in ips {
                assert!(
                    valid.nodes.contains_key(ip),
                    "the valid plan places {component} on {ip}, which no node has"
                );
            }
        }
        // The install order holds every component placed on a node; one
        // given no IPs (`"nginx": []`, scaled in to none) has nothing to install.
        let mut order = valid.order.clone();
        order.sort();
        let names: Vec<String> = valid
            .plan
            .components
            .iter()
            .filter(|(_, ips)| !ips.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        assert_eq!(
            order, names,
            "the install order is not the plan's placed components"
        );
        let again = serde_json::to_vec(&valid.plan)
            .unwrap_or_else(|e| panic!("a valid plan does not serialize: {e}"));
        match validate_plan(
            &again,
            catalogs,
            &self.nodes,
            Some(&self.stored.plan),
            &Default::default(),
        ) {
            Ok(v) => assert_eq!(v.plan, valid.plan, "the stored plan validates differently"),
            Err(p) => panic!("the plan as stored does not validate: {p:?}"),
        }
        true
    }

    /// A catalog directory as an operator puts it in `DATA/catalogs/`:
    /// `data` holds its files, each introduced by a line `--- NAME` (see
    /// [`catalog_files`]). They are written to a directory, loaded and their
    /// templates compiled; a catalog that loads is then used by a plan that
    /// places each of its components on a node, through validation and
    /// rendering. Returns `None` when the catalog did not load, else
    /// whether that plan was valid.
    pub fn catalog(&self, data: &[u8]) -> Option<bool> {
        let dir = self.dir.join("catalogs").join(CATALOG_NAME);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        for (name, contents) in catalog_files(data) {
            std::fs::File::create(dir.join(name))
                .and_then(|mut f| f.write_all(contents))
                .ok()?;
        }
        let catalog = Catalog::from_dir(&dir).ok()?;
        let components: BTreeMap<String, Value> = catalog
            .components()
            .map(|c| (c.name.clone(), json!(["10.0.0.1"])))
            .collect();
        let mut properties = json!({
            "domain": "fuzz.local", "catalog": catalog.name(), "checkdisk": 1, "disksize": 1,
            "adduser": 1, "user": "vcap", "password": "password", "root": "123456",
        });
        for name in catalog.required() {
            if let Some(p) = properties.as_object_mut() {
                p.entry(name.clone()).or_insert(json!("x"));
            }
        }
        let plan = json!({"components": components, "properties": properties});
        let catalogs = self.catalogs.clone().with(catalog);
        Some(self.check_plan(plan.to_string().as_bytes(), &catalogs))
    }

    /// The original API's request bodies, through the functions their
    /// routes use: `data[0]` picks `GET /hardware` (0), `PUT /restart`,
    /// `/stop` or `/start` (1), or `PUT /download` (2); the rest is the body.
    pub fn compat(&self, data: &[u8]) {
        let Some((route, body)) = data.split_first() else {
            return;
        };
        match route % 3 {
            0 => {
                let _ = hardware_answer(&self.stored, &self.nodes, body);
            }
            1 => {
                if let Ok((_, targets)) = parse_targets(&self.stored, body) {
                    for (component, ip) in targets {
                        assert!(
                            self.stored
                                .plan
                                .components
                                .get(&component)
                                .is_some_and(|ips| ips.contains(&ip)),
                            "{component} on {ip} is not in the plan"
                        );
                    }
                }
            }
            _ => {
                if let Ok(name) = name_in_body(body) {
                    self.open_log(&name);
                }
            }
        }
    }

    /// Log names and paths: `data[0]` picks a `PUT /download` body (0), a
    /// `GET /api/v1/logs/{name}` name (1) or a `?tail=` query (2) read from
    /// `nats_0.log`; the rest is that input.
    pub fn logs(&self, data: &[u8]) {
        let Some((kind, input)) = data.split_first() else {
            return;
        };
        match kind % 3 {
            0 => {
                if let Ok(name) = name_in_body(input) {
                    self.open_log(&name);
                }
            }
            1 => self.open_log(&String::from_utf8_lossy(input)),
            _ => {
                let query = String::from_utf8_lossy(input);
                if let Ok(Some(n)) = tail_in_query(Some(&query))
                    && let Ok((_, mut file)) = self.logs.open_file("nats_0.log")
                    && let Ok(text) = tail_lines(&mut file, n)
                {
                    assert!(text.lines().count() <= n, "tail={n} answered more lines");
                }
            }
        }
    }

    /// Opens a log file by name; asserts only plain files directly in the
    /// log dir are served.
    fn open_log(&self, name: &str) {
        if let Ok((path, _)) = self.logs.open_file(name) {
            assert!(valid_file_name(name), "opened the invalid name {name:?}");
            let dir = self.log_dir.canonicalize().ok();
            assert_eq!(
                path.parent(),
                dir.as_deref(),
                "{name:?} opened {path:?}, outside the log dir"
            );
            assert!(path.is_file(), "{name:?} opened {path:?}, not a file");
        }
    }
}

/// The files of a catalog directory encoded in `data`: each file is a line
/// `--- NAME` followed by its contents, up to the next such line. Names that
/// are not plain file names (`[A-Za-z0-9_.-]`, 1-64 bytes, no leading dot)
/// are skipped; at most 64 files.
pub fn catalog_files(data: &[u8]) -> Vec<(&str, &[u8])> {
    const MARK: &[u8] = b"--- ";
    let mut files = Vec::new();
    let mut starts: Vec<usize> = Vec::new();
    if data.starts_with(MARK) {
        starts.push(0);
    }
    starts.extend(
        data.windows(MARK.len() + 1)
            .enumerate()
            .filter(|(_, w)| w[0] == b'\n' && &w[1..] == MARK)
            .map(|(i, _)| i + 1),
    );
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(data.len(), |next| next - 1);
        let block = &data[start + MARK.len()..end.max(start + MARK.len())];
        let (name, contents) = match block.iter().position(|b| *b == b'\n') {
            Some(nl) => (&block[..nl], &block[nl + 1..]),
            None => (block, &block[block.len()..]),
        };
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let plain = (1..=64).contains(&name.len())
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if plain && files.len() < 64 {
            files.push((name, contents));
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_in_catalog_written_as_the_fuzzer_writes_it_loads_and_renders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fixture::new(dir.path()).expect("fixture");
        for name in ["cf-v170", "debian-demo"] {
            let mut data = Vec::new();
            for (catalog, file, text) in crate::plan::catalog::BUILTIN {
                if *catalog == name {
                    data.extend_from_slice(format!("--- {file}\n{text}\n").as_bytes());
                }
            }
            assert_eq!(f.catalog(&data), Some(true), "{name}");
        }
    }

    #[test]
    fn catalog_files_are_split_on_their_marks() {
        let data = b"--- a.toml\nx = 1\n--- ../b.toml\nno\n--- c.toml\n";
        let files = catalog_files(data);
        assert_eq!(files, vec![("a.toml", &b"x = 1"[..]), ("c.toml", &b""[..])]);
        assert!(catalog_files(b"no mark").is_empty());
    }

    #[test]
    fn every_entry_runs_on_its_seed_shapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fixture::new(dir.path()).expect("fixture");
        assert!(f.plan(STORED_PLAN.as_bytes()));
        assert!(!f.plan(b"{"));
        f.compat(b"\x00{\"Comp\":\"nats\",\"Ip\":\"10.10.101.182\"}");
        f.compat(b"\x01{\"name\":\"all\",\"ip\":\"0.0.0.0\"}");
        f.compat(b"\x02local.log");
        f.logs(b"\x01outside.log");
        f.logs(b"\x02tail=5");
        assert_eq!(f.csr("not a csr"), None);
        f.client_cert(f.server_cert_der());
        assert_eq!(f.catalog(b"--- catalog.toml\nname = 1\n"), None);
        f.enroll_request(&[0, 1, 0]);
    }

    /// Found by the fuzzer: a component given no IPs is in the plan but has
    /// nothing to install, so it is not in the install order.
    #[test]
    fn a_component_placed_nowhere_validates_and_is_not_installed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fixture::new(dir.path()).expect("fixture");
        let plan = br#"{"components":{"haproxy":["10.0.0.1"],"nats":["10.0.0.4","10.0.0.5","10.0.0.6"],"nginx":[]},"properties":{"catalog":"debian-demo","checkdisk":1,"disksize":1,"domain":"demo.test","nginx_user":"root"}}"#;
        assert!(f.plan(plan));
    }
}
