//! What the node has and how busy it is, read with sysinfo.

use std::path::{Path, PathBuf};

use de_common::{Hardware, Usage};

const MIB: u64 = 1024 * 1024;

/// sysinfo could not read this system.
#[derive(Debug, thiserror::Error)]
#[error("cannot read this node's hardware: {0}")]
pub struct HardwareError(String);

/// Samples the node. Keeps one sysinfo `System` so CPU usage is measured
/// between two consecutive samples (sysinfo needs two refreshes).
pub struct Sampler {
    sys: sysinfo::System,
    root: PathBuf,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("root", &self.root).finish()
    }
}

/// The disk whose mount point is the longest prefix of `root`: (total, available) bytes.
fn disk_for(root: &Path) -> Option<(u64, u64)> {
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| root.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.total_space(), d.available_space()))
}

impl Sampler {
    /// `root` is the agent's node root: the disk that holds it is the node's disk.
    pub fn new(root: &Path) -> Result<Sampler, HardwareError> {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
        let mut sys = sysinfo::System::new().map_err(|e| HardwareError(e.to_string()))?;
        sys.refresh_cpu_all();
        sys.refresh_memory();
        Ok(Sampler { sys, root })
    }

    pub fn hardware(&self) -> Hardware {
        Hardware {
            cpus: u32::try_from(self.sys.cpus().len()).unwrap_or(u32::MAX),
            ram_mb: self.sys.total_memory() / MIB,
            disk_mb: disk_for(&self.root).map(|(t, _)| t / MIB).unwrap_or(0),
        }
    }

    /// Usage since the previous call.
    pub fn usage(&mut self) -> Usage {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let total = self.sys.total_memory();
        let mem_pct = if total == 0 {
            0.0
        } else {
            (total.saturating_sub(self.sys.available_memory())) as f32 * 100.0 / total as f32
        };
        let disk_pct = match disk_for(&self.root) {
            Some((t, a)) if t > 0 => (t.saturating_sub(a)) as f32 * 100.0 / t as f32,
            _ => 0.0,
        };
        Usage {
            cpu_pct: self.sys.global_cpu_usage(),
            mem_pct,
            disk_pct,
        }
    }
}

pub fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_this_machines_cpus_memory_and_disk() {
        let mut s = Sampler::new(Path::new("/")).expect("sampler");
        let hw = s.hardware();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        assert!(hw.cpus as usize >= cpus, "{hw:?}");
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        let kb: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("MemTotal");
        assert_eq!(hw.ram_mb, kb * 1024 / MIB);
        assert!(hw.disk_mb > 0);
        let u = s.usage();
        assert!(
            (0.0..=100.0).contains(&u.mem_pct) && u.mem_pct > 0.0,
            "{u:?}"
        );
        assert!((0.0..=100.0).contains(&u.disk_pct), "{u:?}");
    }
}
