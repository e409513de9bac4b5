//! Writing files that hold secrets or identity: atomically, with mode 0600.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` with mode 0600: a temporary file in the same
/// directory is written, synced and renamed over `path`, so a crash leaves
/// either the old file or the new one, never half of one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `dir` (and parents) if missing and sets it to mode 0700.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = std::env::temp_dir().join(format!("de-files-{}", std::process::id()));
        ensure_private_dir(&dir).expect("dir");
        let p = dir.join("secret");
        write_private(&p, b"one").expect("write");
        write_private(&p, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(&dir).expect("meta").permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
