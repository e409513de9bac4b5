//! Replays inputs through a target without the engine:
//! `de-fuzz-replay TARGET FILE...` (a crash the engine found, a corpus file).
//! Prints one line per file; a finding panics with its message and backtrace.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(target), files) = (args.next(), args.collect::<Vec<_>>()) else {
        anyhow::bail!("usage: de-fuzz-replay TARGET FILE...");
    };
    let dir = tempfile::tempdir()?;
    let targets = de_fuzz::Targets::new(dir.path())?;
    for file in files {
        let data = std::fs::read(&file)?;
        targets.run(&target, &data)?;
        println!("{target} {file}: ok ({} bytes)", data.len());
    }
    Ok(())
}
