//! Replays every committed input through its target without the engine:
//! the seed corpora (`corpus/<target>/`) and the crashes found and fixed
//! (`regressions/<target>/`). A decoder that panics on one fails the test,
//! naming the file.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

#[test]
fn every_seed_and_regression_input_runs_clean() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    let targets = de_fuzz::Targets::new(work.path()).expect("fixtures");
    for target in de_fuzz::TARGETS {
        let seeds = inputs(&here.join("corpus").join(target));
        assert!(!seeds.is_empty(), "target {target} has no seed corpus");
        for file in seeds
            .iter()
            .chain(&inputs(&here.join("regressions").join(target)))
        {
            let data = std::fs::read(file).expect("read input");
            if let Err(e) = targets.run(target, &data) {
                panic!("{}: {e}", file.display());
            }
        }
    }
}

#[test]
fn an_unknown_target_is_refused_by_name() {
    let work = tempfile::tempdir().expect("tempdir");
    let targets = de_fuzz::Targets::new(work.path()).expect("fixtures");
    let err = targets.run("nope", b"").expect_err("refused");
    assert!(err.to_string().contains("no fuzz target \"nope\""), "{err}");
}
