//! Every fuzz seed (`fuzz/seeds/<target>/`) and every input that once made
//! a target fail (`fuzz/regressions/<target>/`) goes through its target's
//! entry point on every `cargo test`: a fixed finding stays fixed, and the
//! seeds themselves hold the targets' properties.

use std::path::Path;

#[test]
fn seeds_and_regressions_pass_their_targets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut ran = 0;
    for (name, target) in kaping::fuzzing::TARGETS {
        let mut seeds = 0;
        for kind in ["seeds", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
            paths.sort();
            for path in paths {
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{} fails target {name}", path.display());
                if kind == "seeds" {
                    seeds += 1;
                }
                ran += 1;
            }
        }
        assert!(seeds > 0, "target {name} has no seeds in fuzz/seeds/{name}");
    }
    println!("{ran} inputs passed");
}
