//! Deployments: the plan is diffed against the last applied one and turned
//! into a persisted list of steps, which a reconciler drives through the
//! per-node step queues — components in catalog order, nodes in parallel,
//! one step at a time per instance (and the node's deploy lane runs one at a
//! time per node), failed steps retried, progress on disk after every change.
//!
//! Code map: `record.rs` the stored record; `planner.rs` the diff into
//! steps; `reconcile.rs` the reconciler's pure core (record and finished
//! steps in, changed record and effects out); `driver.rs` the [`Deployer`]
//! and the task that does the core's I/O; `view.rs` what the API shows.
//!
//! Invariants: a step's queue id is chosen and stored in the deployment
//! record *before* it is queued (queueing is idempotent on that id), so a
//! controller killed at any moment resumes without running a step twice;
//! nothing after a failed step of the same instance, and nothing of a later
//! component, is queued once a step has failed for good; the applied plan is
//! written before the record that says the deployment succeeded. The core
//! decides all of this; the driver only carries out its effects in order.

use de_common::DeploymentId;

use crate::store::StoreError;

mod driver;
pub(crate) mod intent;
mod planner;
mod reconcile;
mod record;
mod view;

pub use driver::Deployer;
pub(crate) use record::{Deployment, PhaseState};

/// How many times a failed step is tried in all (1 = no retry).
pub const DEFAULT_STEP_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{}", crate::plan::NO_PLAN)]
    NoPlan,
    #[error("deployment {0} is still running: wait for it to finish")]
    Busy(DeploymentId),
    #[error(
        "nodes of the plan are offline: {0}; start their agents (or change the plan) and deploy again"
    )]
    Offline(String),
    #[error("the plan's catalog {0:?} is not loaded")]
    NoCatalog(String),
    #[error("{0}")]
    Render(String),
    #[error("cannot read or write deployments in the store")]
    Store(#[from] StoreError),
    #[error("could not make a deployment id")]
    NoRandomness(#[source] crate::util::NoRandomness),
    #[error("no deployment {0:?}: GET /api/v1/deployments lists them")]
    NotFound(DeploymentId),
    #[error("deployment {id} is not running (it {state}): only a running deployment can be {what}")]
    NotRunning {
        id: DeploymentId,
        state: String,
        what: &'static str,
    },
    #[error("could not cancel the deployment's steps")]
    CancelSteps(#[source] crate::agents::StepsError),
}
