//! The debian-demo catalog deployed for real (nginx, haproxy, nats-server
//! from Debian packages) on four agents with private monit (127.0.9.x):
//! haproxy balances to every nginx, nats answers, status is RUNNING, nginx
//! scales out and in, and a change of `greeting` rolls nginx one node at a
//! time, drained from haproxy, without a failed request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{DeployState, DeploymentView, StatusRow};
use de_tests::{TestController, cluster, in_flight_spans, most_overlapping, wait_until};
use serde_json::json;

const DEPLOY_WAIT: Duration = Duration::from_secs(600);

fn http_get(ip: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&format!("{ip}:80").parse().ok()?, Duration::from_secs(3))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: demo.test\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.").then_some(out)
}

/// The nginx node IPs seen behind haproxy in `tries` requests.
fn backends(haproxy: &str, tries: usize) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..tries {
        if let Some(page) = http_get(haproxy)
            && let Some(ip) = page
                .split("nginx on node ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
            && !seen.iter().any(|s| s == ip)
        {
            seen.push(ip.to_owned());
        }
    }
    seen.sort();
    seen
}

fn deploy_and_wait(ctl: &TestController, plan: &serde_json::Value) -> Result<DeploymentView> {
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan refused: {}", a.body);
    let id = ctl.deploy()?.id;
    ctl.finished(&id, DEPLOY_WAIT)
}

fn all_running(ctl: &TestController, n: usize) -> Result<Vec<StatusRow>> {
    let mut last = Vec::new();
    wait_until(Duration::from_secs(90), "every instance RUNNING", || {
        let rows = ctl.status().ok()?;
        last = rows.clone();
        (rows.len() == n && rows.iter().all(|r| r.status == "RUNNING")).then_some(rows)
    })
    .with_context(|| format!("last status: {last:?}"))
}

#[test]
fn debian_demo_deploys_for_real_and_nginx_scales_out_and_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ips = ["127.0.9.1", "127.0.9.2", "127.0.9.3", "127.0.9.4"];
    let (ctl, _agents) = cluster(dir.path(), &ips, true)?;
    let plan_saying = |nginx: &[&str], greeting: &str| {
        json!({
            "components": {"haproxy": [ips[0]], "nats": [ips[0]], "nginx": nginx},
            // Node roots live in private temp dirs: let nginx workers run as root to read them.
            "properties": {"domain": "demo.test", "catalog": "debian-demo", "nginx_user": "root", "checkdisk": 1, "disksize": 1, "greeting": greeting},
        })
    };
    let plan = |nginx: &[&str]| plan_saying(nginx, "hello");

    let d = deploy_and_wait(&ctl, &plan(&ips[1..3]))?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    let outputs: Vec<&str> = d
        .steps
        .iter()
        .flatten()
        .filter_map(|s| s.output.as_deref())
        .collect();
    assert!(
        outputs
            .iter()
            .any(|o| o.contains(&format!("disk check on {}", ips[1]))),
        "checkdisk ran: {outputs:?}"
    );
    all_running(&ctl, 4)?;
    let seen = wait_until(
        Duration::from_secs(60),
        "haproxy to reach both nginx",
        || {
            let b = backends(ips[0], 12);
            (b == [ips[1], ips[2]]).then_some(b)
        },
    )?;
    assert_eq!(seen, [ips[1], ips[2]]);
    // nats answers with its INFO line.
    let mut nats =
        TcpStream::connect_timeout(&format!("{}:4222", ips[0]).parse()?, Duration::from_secs(5))?;
    nats.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 5];
    nats.read_exact(&mut buf)?;
    assert_eq!(&buf, b"INFO ");

    // Scale out to a third nginx: haproxy is reconfigured and balances to it.
    let d = deploy_and_wait(&ctl, &plan(&ips[1..4]))?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    wait_until(
        Duration::from_secs(60),
        "haproxy to reach three nginx",
        || (backends(ips[0], 18) == [ips[1], ips[2], ips[3]]).then_some(()),
    )?;
    all_running(&ctl, 5)?;

    // Scale in: nginx leaves the fourth node, which stops serving.
    let d = deploy_and_wait(&ctl, &plan(&ips[1..3]))?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    wait_until(
        Duration::from_secs(60),
        "nginx on the fourth node stopped",
        || http_get(ips[3]).is_none().then_some(()),
    )?;
    wait_until(Duration::from_secs(60), "haproxy back to two nginx", || {
        (backends(ips[0], 12) == [ips[1], ips[2]]).then_some(())
    })?;
    all_running(&ctl, 4)?;

    // A new greeting rolls nginx alone, one node at a time, drained from
    // haproxy first, while a client asks haproxy for its page every 20 ms.
    assert!(
        http_get(ips[0]).is_some_and(|p| p.contains("<p class=\"greeting\">hello</p>")),
        "the page shows the default greeting"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, haproxy) = (stop.clone(), ips[0].to_owned());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match http_get(&haproxy) {
                    Some(page)
                        if page.starts_with("HTTP/1.1 200") || page.starts_with("HTTP/1.0 200") =>
                    {
                        ok += 1
                    }
                    other => failed.push(other.map_or_else(
                        || "no answer".to_owned(),
                        |p| p.lines().next().unwrap_or_default().to_owned(),
                    )),
                }
                // The pace of the client, not a wait for a condition.
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };
    let rolled = deploy_and_wait(&ctl, &plan_saying(&ips[1..3], "bonjour"));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?;
    let d = rolled?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    assert!(
        failed.is_empty(),
        "{} of {} requests through haproxy failed during the roll: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "the client asked throughout: {ok} answers");
    let components: std::collections::BTreeSet<&str> = d
        .steps
        .iter()
        .flatten()
        .map(|s| s.component.as_str())
        .collect();
    assert_eq!(
        components.into_iter().collect::<Vec<_>>(),
        ["nginx"],
        "only nginx changed"
    );
    let spans = in_flight_spans(&d, "nginx");
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(
        most_overlapping(&spans),
        1,
        "nginx instances were changed together: {spans:?}"
    );
    let rollout = d.rollout.iter().find(|r| r.component == "nginx");
    assert_eq!(rollout.and_then(|r| r.max_in_flight), Some(1));
    assert!(
        d.steps
            .iter()
            .flatten()
            .any(|s| s.hook == Some(de_common::api::Hook::PreStop)
                && s.output
                    .as_deref()
                    .is_some_and(|o| o.contains("drained from haproxy"))),
        "pre_stop drained nginx from haproxy"
    );
    assert!(
        d.watches
            .iter()
            .all(|w| w.state == de_common::api::PhaseState::Done)
            && d.watches.len() == 2,
        "{:?}",
        d.watches
    );
    wait_until(Duration::from_secs(30), "both nginx say bonjour", || {
        let pages: Vec<String> = (0..6).filter_map(|_| http_get(ips[0])).collect();
        (pages.len() == 6 && pages.iter().all(|p| p.contains(">bonjour<"))).then_some(())
    })?;
    Ok(())
}
