//! Planted symbolic links on a real agent (127.0.14.x): a component's user
//! who owns a directory in the node root links from it to files outside;
//! `WriteFile` steps sent through the API never write through the links
//! (a linked directory fails the step, naming it; a link at the old fixed
//! temporary name is ignored) and `CollectLogs` does not read through them.

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;

use anyhow::{Context, Result};
use de_common::StepAction;
use de_common::api::{StepRecordView, StepRequest, StepState};
use de_tests::{TestController, cluster};

const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";

/// Gives `path` (a link itself, not what it points to) to `nobody`, as the
/// component's user would own what it planted, when the test runs as root
/// (`as_root`); unprivileged, it already belongs to a user other than root.
fn give_away(path: &Path, as_root: bool) -> Result<()> {
    if as_root {
        std::os::unix::fs::lchown(path, Some(65534), Some(65534))
            .with_context(|| format!("lchown {}", path.display()))?;
    }
    Ok(())
}

/// Sends `action` to `node` and waits for its end.
fn run_step(ctl: &TestController, node: &str, action: StepAction) -> Result<StepRecordView> {
    let req = StepRequest {
        action,
        lane: None,
        wait_secs: Some(60),
    };
    ctl.api(
        "POST",
        &format!("/api/v1/nodes/{node}/steps"),
        Some(&serde_json::to_string(&req)?),
    )?
    .expect(200)
}

fn write(path: &str) -> StepAction {
    StepAction::WriteFile {
        path: path.to_owned(),
        contents: b"name: cf\n".to_vec(),
        mode: 0o600,
        owner: Some("root".to_owned()),
    }
}

#[test]
fn steps_never_write_or_read_through_a_link_planted_in_the_node_root() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let outside = tempfile::tempdir()?;
    let (ctl, agents) = cluster(dir.path(), &["127.0.14.1"], false)?;
    let agent = agents.first().context("an agent")?;
    let node = agent.node_id()?;
    let passwd = outside.path().join("passwd");
    std::fs::write(&passwd, PASSWD)?;
    let as_root = std::fs::metadata(&passwd)?.uid() == 0;
    // A prepare step gave /var/vcap/deploy to the component's user, who
    // links a directory in it to one outside.
    let deploy = agent.root.join("var/vcap/deploy");
    std::fs::create_dir_all(&deploy)?;
    give_away(&deploy, as_root)?;
    let linked = deploy.join("conf");
    symlink(outside.path(), &linked)?;
    give_away(&linked, as_root)?;

    let r = run_step(&ctl, &node, write("/var/vcap/deploy/conf/passwd"))?;
    assert_eq!(r.state, StepState::Failed, "{r:?}");
    let error = r.outcome.and_then(|o| o.error).unwrap_or_default();
    assert!(
        error.contains(&format!("{} is a symbolic link", linked.display())),
        "{error}"
    );
    assert_eq!(std::fs::read(&passwd)?, PASSWD);
    assert_eq!(std::fs::read_dir(outside.path())?.count(), 1);

    // The link the issue describes: at the temporary name root used to write.
    let old_tmp = deploy.join(".cf.yml.de-tmp");
    symlink(&passwd, &old_tmp)?;
    give_away(&old_tmp, as_root)?;
    let r = run_step(&ctl, &node, write("/var/vcap/deploy/cf.yml"))?;
    assert_eq!(r.state, StepState::Done, "{r:?}");
    assert_eq!(std::fs::read(deploy.join("cf.yml"))?, b"name: cf\n");
    assert_eq!(std::fs::read(&passwd)?, PASSWD);
    assert!(
        std::fs::symlink_metadata(&old_tmp)?
            .file_type()
            .is_symlink()
    );

    // A log "file" that is a link to a file only root may read.
    let logs = agent.root.join("var/vcap/sys/log/cf");
    std::fs::create_dir_all(&logs)?;
    give_away(&logs, as_root)?;
    let stolen = logs.join("cf.log");
    symlink(&passwd, &stolen)?;
    give_away(&stolen, as_root)?;
    let r = run_step(
        &ctl,
        &node,
        StepAction::CollectLogs {
            paths: vec!["/var/vcap/sys/log/cf/cf.log".to_owned()],
            max_bytes: 4096,
        },
    )?;
    let out = r.outcome.context("an outcome")?;
    assert!(out.files.is_empty(), "{out:?}");
    assert!(
        out.stderr_tail
            .contains(&format!("{}: a symbolic link", stolen.display())),
        "{out:?}"
    );
    assert!(!format!("{out:?}").contains("root:x:0:0"), "{out:?}");
    Ok(())
}
