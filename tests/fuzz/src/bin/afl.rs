//! The AFL++ engine binary: `de-fuzz-afl TARGET`, run by `cargo afl fuzz`
//! (see `run.sh`). Built only with the `afl` feature, by `cargo afl build`.

use std::panic::AssertUnwindSafe;

fn main() -> anyhow::Result<()> {
    let target = std::env::args().nth(1).unwrap_or_default();
    if !de_fuzz::TARGETS.contains(&target.as_str()) {
        anyhow::bail!("usage: de-fuzz-afl TARGET, one of {:?}", de_fuzz::TARGETS);
    }
    // Made once, before the fork server starts: every run shares it. Kept
    // on exit, since the fork server's next child still uses it (run.sh
    // points TMPDIR into the run's own directory).
    let dir = tempfile::Builder::new()
        .prefix("de-fuzz-")
        .tempdir()?
        .keep();
    let targets = AssertUnwindSafe(de_fuzz::Targets::new(&dir)?);
    afl::fuzz(true, |data: &[u8]| {
        let _ = targets.run(&target, data);
    });
    Ok(())
}
