//! The layers of ARCHITECTURE.md, checked on the source: a module of `src/` may name
//! (`crate::…`) only modules of a lower rank. Vocabulary first, then the stages in pipeline
//! order, then orchestration; a new top-level module must be given its place here.

use std::collections::BTreeSet;
use std::path::Path;

/// Top-level modules by rank. A module may import those of a lower rank only.
const RANKS: &[(&str, u32)] = &[
    // Vocabulary: plain data shared by every layer.
    ("vocab", 0),
    ("config", 1),
    // The simulated replica stands alone.
    ("sim", 1),
    // Stages, in pipeline order. The catalog answers from the config alone.
    ("auth", 10),
    ("body", 11),
    ("translate", 12),
    ("catalog", 12),
    ("limits", 13),
    ("route", 14),
    // Media checks run after route, against the model it found.
    ("media", 14),
    ("forward", 15),
    ("account", 16),
    ("metrics", 17),
    // The signature and delivery every outbound webhook shares.
    ("webhook", 17),
    ("alerts", 18),
    // Deployed models' wake actions: like alerts, outbound work off the request path.
    ("wake", 18),
    // Async predict's queue, store and result webhooks: outbound work off the request path.
    ("async_queue", 18),
    // Orchestration: the only layer that knows the request context or writes responses.
    ("logs", 20),
    ("error", 20),
    ("runtime", 20),
    ("respond", 21),
    // Async predict's dispatcher: reads the runtime, runs queued requests off any request.
    ("dispatch", 21),
    ("ctx", 21),
    ("reclaim", 21),
    ("access_log", 22),
    ("conn", 22),
    // The deployed-model surface, beside the Model API's stages in proxy.rs.
    ("predict", 22),
    ("proxy", 23),
    ("reload", 23),
    ("admin", 24),
    ("server", 25),
    ("demo", 26),
];

fn rank(module: &str) -> Option<u32> {
    RANKS.iter().find(|(m, _)| *m == module).map(|&(_, r)| r)
}

/// The top-level modules a source text names after `crate::`, in paths and in groups.
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first word of each item at the group's own depth.
            let (mut depth, mut item_start) = (1, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        let word: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        out.insert(word);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(word);
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs");
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = rank(top) else {
            wrong.push(format!("{top}: not placed in a layer (add it to RANKS)"));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for module in named(&text) {
            if module == top {
                continue;
            }
            match rank(&module) {
                Some(r) if r < own => {}
                _ => wrong.push(format!("{} names crate::{module}", rel.display())),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_paths_and_groups() {
    let text =
        "use crate::config::Key;\nuse crate::{auth, limits::{self, Ask}};\nx(crate::vocab::Usage)";
    let names: Vec<_> = named(text).into_iter().collect();
    assert_eq!(names, ["auth", "config", "limits", "vocab"]);
}
