//! Rotating the controller's keys on an operator's request: the step key
//! (agents keep the previous one for the steps it signed) and the CA (both
//! trusted until the old one is retired), and the view of both.
//!
//! Invariant: the agents learn the new keys over their authenticated links
//! only: every link is closed after a rotation, and the agents' next `Hello`
//! is answered with the anchors as they stand (`ControllerMsg::Trust`).

use std::time::{Duration, SystemTime};

use de_common::NodeId;
use de_common::api::PkiView;

use crate::Controller;
use crate::agents::pki::PkiError;
use crate::store::StoreError;
use crate::util::rfc3339;

/// Why a rotation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RotationError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no CA rotation is under way: there is no old CA to retire")]
    NothingToRetire,
    #[error(
        "nodes {} still hold a certificate of the old CA: wait until they renewed (they do on their next link), revoke them, or retire with {{\"force\": true}} (they must then be enrolled again)",
        .0.iter().map(NodeId::as_str).collect::<Vec<_>>().join(", ")
    )]
    NodesOnOldCa(Vec<NodeId>),
}

/// The keys as the operator sees them.
pub(crate) fn view(ctl: &Controller) -> PkiView {
    let s = ctl.pki.summary();
    let nodes_on_previous_ca = if s.previous_ca.is_some() {
        ctl.nodes
            .not_on_ca(&s.ca)
            .into_iter()
            .map(|n| n.to_string())
            .collect()
    } else {
        Vec::new()
    };
    PkiView {
        ca: s.ca,
        previous_ca: s.previous_ca,
        step_key: s.step_key,
        previous_step_key: s.previous_step_key.as_ref().map(|(k, _)| k.clone()),
        previous_step_key_until: s
            .previous_step_key
            .map(|(_, until)| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(until))),
        nodes_on_previous_ca,
    }
}

/// A new step key signs every step queued from now on; the agents accept
/// the previous one for the steps queued before, for a day and an hour at
/// most (`PREVIOUS_STEP_KEY_OVERLAP`).
pub(crate) fn rotate_step_key(ctl: &Controller) -> Result<PkiView, RotationError> {
    ctl.steps
        .rotate_key(|last| ctl.pki.rotate_step_key(last).map_err(RotationError::from))?;
    ctl.nodes
        .reconnect_all(b"the controller's step key changed: connect again");
    Ok(view(ctl))
}

/// A new CA issues node certificates from now on; both are trusted until
/// [`retire_old_ca`]. The agents learn the new CA on their next link and
/// renew their certificate from it at once.
pub(crate) fn rotate_ca(ctl: &Controller) -> Result<PkiView, RotationError> {
    ctl.pki.rotate_ca()?;
    ctl.nodes
        .reconnect_all(b"the controller's CA changed: connect again");
    Ok(view(ctl))
}

/// Stops trusting the old CA, once every node not revoked renewed from the
/// new one (or when `force`d); the controller's QUIC certificate is issued
/// anew from the new CA, and every link reconnects with it.
pub(crate) fn retire_old_ca(ctl: &Controller, force: bool) -> Result<PkiView, RotationError> {
    let s = ctl.pki.summary();
    if s.previous_ca.is_none() {
        return Err(RotationError::NothingToRetire);
    }
    let behind = ctl.nodes.not_on_ca(&s.ca);
    if !behind.is_empty() && !force {
        return Err(RotationError::NodesOnOldCa(behind));
    }
    if !ctl.pki.retire_previous_ca()? {
        return Err(RotationError::NothingToRetire);
    }
    ctl.nodes
        .reconnect_all(b"the controller's certificate changed: connect again");
    Ok(view(ctl))
}
