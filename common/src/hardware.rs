//! Facts an agent reports about its node: hardware at start, usage on every heartbeat.

use serde::{Deserialize, Serialize};

/// What a node has, as reported by its agent (from sysinfo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Hardware {
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in MiB.
    pub ram_mb: u64,
    /// Size of the disk holding the agent's root (`/` by default) in MiB.
    pub disk_mb: u64,
}

/// How busy a node is, in percent (0-100).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub cpu_pct: f32,
    pub mem_pct: f32,
    pub disk_pct: f32,
}

/// One supervised component as the node's monit reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ComponentStatus {
    pub name: String,
    /// RUNNING, DOWN, STARTING, STOPPED, ...
    pub status: String,
    pub pid: Option<u32>,
    pub cpu_pct: Option<f32>,
    pub mem_kb: Option<u64>,
}
