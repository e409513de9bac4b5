//! Writes the seed corpora (`corpus/<target>/`) from the project's real
//! encoders and files: `de-fuzz-seeds [DIR]` (default: `corpus/` beside
//! this crate). Every seed is a valid input of its kind (a frame the agent
//! or controller would send, a CSR the agent makes, the seed documents'
//! plans, the built-in catalogs), so the engine starts deep in each decoder.
//! The monit answers in `corpus/monit/` were captured from a live monit
//! (see README.md) and are not written here.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use de_common::{
    AgentMsg, ComponentStatus, ControllerMsg, EnrollClientMsg, EnrollGrant, EnrollRefusal,
    EnrollRequest, EnrollServerMsg, Hardware, Heartbeat, Hello, InstanceState, Lane, LinkRefusal,
    MonitOp, OutStream, SignedStep, Step, StepAction, StepEvent, StepEventKind, StepOutcome,
    StepRefusal, Usage, Welcome, encode, sign_step,
};
use de_install_codes::{AgentHandshake, InstallCode};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use ring::signature::Ed25519KeyPair;

/// A corpus being written: one directory per target.
struct Corpus {
    dir: PathBuf,
}

impl Corpus {
    fn put(&self, target: &str, name: &str, data: &[u8]) -> anyhow::Result<()> {
        let dir = self.dir.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), data).with_context(|| format!("{target}/{name}"))
    }
}

/// A frame as it travels: u32 BE length, then the body.
fn framed<T: serde::Serialize>(msg: &T) -> anyhow::Result<Vec<u8>> {
    let body = encode(msg)?;
    let mut out = u32::try_from(body.len())?.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

fn hardware() -> Hardware {
    Hardware {
        cpus: 4,
        ram_mb: 8192,
        disk_mb: 51200,
    }
}

fn usage() -> Usage {
    Usage {
        cpu_pct: 12.5,
        mem_pct: 40.0,
        disk_pct: 7.0,
    }
}

/// Every kind of step the controller sends, for the fixture's node.
fn steps() -> Vec<(&'static str, Lane, StepAction)> {
    vec![
        (
            "script",
            Lane::Deploy,
            StepAction::Script {
                script: "set -eu\necho \"$DE_ROOT\"\n".into(),
                user: Some("vcap".into()),
                env: vec![("DE_ROOT".into(), "/".into())],
                timeout_secs: 600,
            },
        ),
        (
            "write_file",
            Lane::Deploy,
            StepAction::WriteFile {
                path: "/var/vcap/jobs/nats/config/nats.yml".into(),
                contents: b"net: 10.10.101.182\nport: 4222\n".to_vec(),
                mode: 0o640,
                owner: Some("vcap:vcap".into()),
            },
        ),
        (
            "monit_add",
            Lane::Deploy,
            StepAction::MonitAdd {
                name: "nats".into(),
                check: "check process nats with pidfile /var/vcap/sys/run/nats.pid\n".into(),
            },
        ),
        (
            "monit_remove",
            Lane::Deploy,
            StepAction::MonitRemove {
                name: "nats".into(),
            },
        ),
        (
            "monit_restart",
            Lane::Adhoc,
            StepAction::Monit {
                name: "nats".into(),
                op: MonitOp::Restart,
            },
        ),
        (
            "collect_logs",
            Lane::Adhoc,
            StepAction::CollectLogs {
                paths: vec!["/var/vcap/sys/log/nats/nats.log".into()],
                max_bytes: 65536,
            },
        ),
        (
            "cancel",
            Lane::Control,
            StepAction::Cancel {
                step_ids: vec!["s-00000001".into(), "s-00000002".into()],
            },
        ),
        (
            "mark_applied",
            Lane::Deploy,
            StepAction::MarkApplied {
                instance: "nats_0".into(),
                fingerprint: "5f2b".into(),
                files: vec!["/var/vcap/jobs/nats/config/nats.yml".into()],
                check: Some("nats".into()),
            },
        ),
        (
            "unmark",
            Lane::Deploy,
            StepAction::Unmark {
                instance: "nats_0".into(),
            },
        ),
    ]
}

fn step(lane: Lane, action: StepAction) -> Step {
    Step {
        id: "s-0000002a".into(),
        deployment_id: Some("d-00000001".into()),
        node_id: de_agent::fuzzing::NODE_ID.into(),
        lane,
        seq: 5,
        issued_at: 1_800_000_000,
        not_after: 1_800_003_600,
        action,
    }
}

/// A step target input: flags, last done, now, [signature], body.
fn step_input(flags: u8, signed: &SignedStep) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&4u64.to_be_bytes());
    v.extend_from_slice(&1_800_000_100u64.to_be_bytes());
    if flags & de_agent::fuzzing::STEP_SIGN == 0 {
        v.extend_from_slice(&signed.signature);
    }
    v.extend_from_slice(&signed.body);
    v
}

fn lane_flag(lane: Lane) -> u8 {
    let i = Lane::ALL.iter().position(|l| *l == lane).unwrap_or(0);
    u8::try_from(i).unwrap_or(0) << 1
}

/// A CSR as the agent makes one at enrolment.
fn agent_csr() -> anyhow::Result<String> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "node-1");
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A CSR asking for everything the controller must not give.
fn greedy_csr() -> anyhow::Result<String> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["de-controller".to_owned()])?;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
        .distinguished_name
        .push(DnType::CommonName, "n-other");
    Ok(params.serialize_request(&key)?.pem()?)
}

fn frames(c: &Corpus, signed: &SignedStep) -> anyhow::Result<()> {
    let hello = AgentMsg::Hello(Hello {
        node_id: de_agent::fuzzing::NODE_ID.into(),
        agent_version: "0.1.0".into(),
        hostname: "node-1".into(),
        ips: vec!["10.10.101.182".into()],
        hardware: hardware(),
        usage: usage(),
        root: "/".into(),
        heartbeat_secs: 10,
        last_done: vec![(Lane::Deploy, 4), (Lane::Adhoc, 2), (Lane::Control, 0)],
    });
    let heartbeat = AgentMsg::Heartbeat(Heartbeat {
        usage: usage(),
        components: vec![ComponentStatus {
            name: "nats".into(),
            status: "RUNNING".into(),
            pid: Some(4242),
            cpu_pct: Some(0.5),
            mem_kb: Some(20480),
        }],
    });
    let event = |kind| {
        AgentMsg::Event(StepEvent {
            step_id: "s-0000002a".into(),
            lane: Lane::Deploy,
            seq: 5,
            kind,
        })
    };
    let agent: Vec<(&str, AgentMsg)> = vec![
        ("hello", hello),
        ("heartbeat", heartbeat),
        (
            "pull",
            AgentMsg::Pull {
                lane: Lane::Adhoc,
                after_seq: 7,
            },
        ),
        ("event_started", event(StepEventKind::Started)),
        (
            "event_output",
            event(StepEventKind::Output {
                stream: OutStream::Stderr,
                lines: vec!["installing nats".into(), "done".into()],
            }),
        ),
        (
            "event_finished",
            event(StepEventKind::Finished(StepOutcome {
                exit_code: Some(0),
                error: None,
                timed_out: false,
                duration_ms: 1234,
                stdout_tail: "ok\n".into(),
                stderr_tail: String::new(),
                files: vec![("/var/log/nats.log".into(), b"started\n".to_vec())],
            })),
        ),
        (
            "event_refused",
            event(StepEventKind::Refused(StepRefusal::Replayed {
                lane: "deploy".into(),
                seq: 5,
                last: 5,
            })),
        ),
        (
            "inventory",
            AgentMsg::Inventory {
                last_done: vec![(Lane::Deploy, 5)],
                instances: vec![InstanceState {
                    instance: "nats_0".into(),
                    fingerprint: "5f2b".into(),
                    drift: vec!["file /etc/nats.yml changed since it was applied".into()],
                }],
            },
        ),
        (
            "clock",
            AgentMsg::Clock {
                unix_ms: 1_800_000_000_123,
            },
        ),
    ];
    let mut all = Vec::new();
    for (name, msg) in &agent {
        let f = framed(msg)?;
        all.extend_from_slice(&f);
        c.put("frames", &format!("agent_{name}"), &f)?;
    }
    c.put("frames", "agent_stream", &all)?;
    let controller: Vec<(&str, ControllerMsg)> = vec![
        (
            "welcome",
            ControllerMsg::Welcome(Welcome {
                controller_version: "0.1.0".into(),
            }),
        ),
        (
            "refused",
            ControllerMsg::Refused(LinkRefusal::IdentityMismatch),
        ),
        ("step", ControllerMsg::Step(signed.clone())),
        ("idle", ControllerMsg::Idle),
        (
            "ack",
            ControllerMsg::Ack {
                step_id: "s-0000002a".into(),
            },
        ),
        (
            "clock_query",
            ControllerMsg::ClockQuery {
                unix_ms: 1_800_000_000_000,
            },
        ),
    ];
    for (name, msg) in &controller {
        c.put("frames", &format!("controller_{name}"), &framed(msg)?)?;
    }
    Ok(())
}

fn enroll(c: &Corpus, t: &de_fuzz::Targets, csr: &str, cert_pem: &str) -> anyhow::Result<()> {
    let code = InstallCode::parse("0427")?;
    let (_, spake) = AgentHandshake::start(&code, t.binding().clone());
    let with_mode = |mode: u8, bytes: Vec<u8>| {
        let mut v = vec![mode];
        v.extend_from_slice(&bytes);
        v
    };
    let mut wire = framed(&EnrollClientMsg::Start { spake })?;
    wire.extend_from_slice(&framed(&EnrollClientMsg::Confirm {
        mac: vec![0x42; 32],
    })?);
    wire.extend_from_slice(&framed(&EnrollClientMsg::Request {
        sealed: vec![0x17; 64],
    })?);
    c.put("enroll", "controller_wire", &with_mode(0, wire))?;
    let mut wire = framed(&EnrollServerMsg::Challenge {
        reply: vec![0x33; 65],
    })?;
    wire.extend_from_slice(&framed(&EnrollServerMsg::Granted {
        sealed: vec![0x17; 64],
    })?);
    c.put("enroll", "agent_wire", &with_mode(1, wire))?;
    let refused = framed(&EnrollServerMsg::Refused(EnrollRefusal::RateLimited {
        retry_after_secs: 30,
    }))?;
    c.put("enroll", "agent_refused", &with_mode(1, refused))?;
    let request = EnrollRequest {
        csr_pem: csr.to_owned(),
        hostname: "node-1".into(),
        ips: vec!["10.10.101.182".into(), "fe80::1".into()],
        hardware: hardware(),
        agent_version: "0.1.0".into(),
    };
    c.put("enroll", "request", &with_mode(2, encode(&request)?))?;
    let grant = EnrollGrant {
        node_id: de_agent::fuzzing::NODE_ID.into(),
        cert_pem: cert_pem.to_owned(),
        ca_pem: t.ca_pem().to_owned(),
        step_public_key: vec![0x5e; 32],
    };
    c.put("enroll", "grant", &with_mode(3, encode(&grant)?))?;
    Ok(())
}

fn cert(c: &Corpus, t: &de_fuzz::Targets, csr: &str, cert_pem: &str) -> anyhow::Result<()> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let with_mode = |mode: u8, bytes: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(bytes);
        v
    };
    c.put("cert", "csr_agent", &with_mode(0, csr.as_bytes()))?;
    c.put(
        "cert",
        "csr_greedy",
        &with_mode(0, greedy_csr()?.as_bytes()),
    )?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())?;
    c.put("cert", "client_cert", &with_mode(1, der.as_ref()))?;
    c.put("cert", "ca", &with_mode(2, t.ca_pem().as_bytes()))?;
    c.put("cert", "server_cert", &with_mode(3, t.server_cert_der()))?;
    Ok(())
}

fn plan(c: &Corpus, repo: &Path) -> anyhow::Result<()> {
    let example = std::fs::read_to_string(repo.join("tests/fixtures/seed-config-example.json"))?;
    c.put("plan", "original_example", example.as_bytes())?;
    let one_line: serde_json::Value = serde_json::from_str(&example)?;
    c.put("plan", "original_one_line", one_line.to_string().as_bytes())?;
    let lenient = example
        .replace("\"disksize\": 15", "\"disksize\": \"15\"")
        .replace("\"checkdisk\": 1", "\"checkdisk\": \"1\"")
        .replace("\"password\": \"password\"", "\"password\": \"******\"")
        .replace("\"root\": \"123456\"", "\"root\": \"******\"");
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(lenient.as_bytes());
    c.put("plan", "original_lenient_bom", &bom)?;
    let demo = serde_json::json!({
        "components": {
            "haproxy": ["10.0.0.1"],
            "nginx": ["10.0.0.2", "10.0.0.3"],
            "nats": ["10.0.0.4", "10.0.0.5", "10.0.0.6"]
        },
        "properties": {
            "domain": "demo.test", "catalog": "debian-demo", "nginx_user": "root",
            "checkdisk": 1, "disksize": 1
        }
    });
    c.put("plan", "debian_demo", demo.to_string().as_bytes())?;
    let wrong = serde_json::json!({
        "components": {"nats": ["10.0.0.9", "10.0.0.77"], "redis": ["10.0.0.1"]},
        "properties": {"domain": "", "disksize": -1, "extra": true}
    });
    c.put(
        "plan",
        "invalid_many_problems",
        wrong.to_string().as_bytes(),
    )?;
    Ok(())
}

fn catalogs(c: &Corpus, repo: &Path) -> anyhow::Result<()> {
    let root = repo.join("controller/catalogs");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut data = Vec::new();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            data.extend_from_slice(format!("--- {}\n", name.unwrap_or_default()).as_bytes());
            data.extend_from_slice(&std::fs::read(&f)?);
            if data.last() != Some(&b'\n') {
                data.push(b'\n');
            }
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        c.put("catalog", &name.unwrap_or_default(), &data)?;
    }
    Ok(())
}

fn bodies(c: &Corpus) -> anyhow::Result<()> {
    let routed = |route: u8, body: &str| {
        let mut v = vec![route];
        v.extend_from_slice(body.as_bytes());
        v
    };
    let compat: [(&str, u8, &str); 9] = [
        ("hardware_one", 0, r#"{"Comp":"nats","Ip":"10.10.101.183"}"#),
        ("hardware_all", 0, r#"{"Comp":"all","Ip":"0.0.0.0"}"#),
        ("hardware_none", 0, ""),
        (
            "restart_original",
            1,
            r#"{ "Comp":"nats","Ip":"10.10.101.183"}"#,
        ),
        ("stop_all", 1, r#"{"name":"all","ip":"0.0.0.0"}"#),
        ("download_plain", 2, "local.log"),
        ("download_string", 2, "\"local.log\""),
        ("download_original", 2, "{ \"local.log\"}"),
        ("download_named", 2, r#"{"name": "nats_0.log"}"#),
    ];
    for (name, route, body) in compat {
        c.put("compat", name, &routed(route, body))?;
    }
    let logs: [(&str, u8, &str); 6] = [
        ("body_plain", 0, "local.log\n"),
        ("body_original", 0, "{ \"nats_0.log\"}"),
        ("path_name", 1, "nats_1.log"),
        ("path_link", 1, "outside.log"),
        ("tail_query", 2, "tail=20"),
        ("tail_query_more", 2, "x=1&tail=10000"),
    ];
    for (name, kind, input) in logs {
        c.put("logs", name, &routed(kind, input))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = here.join("../..");
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| here.join("corpus"), PathBuf::from);
    let c = Corpus { dir };
    let work = tempfile::tempdir()?;
    let t = de_fuzz::Targets::new(work.path())?;
    if !de_fuzz::pki_dir().exists() {
        // The first run makes the fixture's keys; later runs reuse them.
        let pki = work.path().join("controller").join("pki");
        for name in ["ca.pem", "ca.key", "controller.pem", "controller.key"] {
            std::fs::create_dir_all(de_fuzz::pki_dir())?;
            std::fs::copy(pki.join(name), de_fuzz::pki_dir().join(name))?;
        }
    }
    let key = Ed25519KeyPair::from_seed_unchecked(&de_fuzz::STEP_SEED)
        .map_err(|e| anyhow::anyhow!("step key: {e}"))?;

    let mut first = None;
    for (name, lane, action) in steps() {
        let signed = sign_step(&step(lane, action), &key)?;
        let flags = de_agent::fuzzing::STEP_SIGN | lane_flag(lane);
        c.put("step", name, &step_input(flags, &signed))?;
        first.get_or_insert(signed);
    }
    let signed = first.context("no steps")?;
    c.put("step", "script_with_signature", &step_input(0, &signed))?;

    let csr = agent_csr()?;
    let cert_pem = t.issue(&csr).context("the fixture issues no certificate")?;
    frames(&c, &signed)?;
    enroll(&c, &t, &csr, &cert_pem)?;
    cert(&c, &t, &csr, &cert_pem)?;
    plan(&c, &repo)?;
    catalogs(&c, &repo)?;
    bodies(&c)?;
    println!("seeds written to {}", c.dir.display());
    Ok(())
}
