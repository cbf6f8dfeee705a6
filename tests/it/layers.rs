//! Dependencies point one way (../shared/docs/CONVENTIONS.md, Layers): the web
//! layer and the CLI on top, capabilities below them, the foundation at the
//! bottom. This reads every `crate::…` path in src/ (code, not comments) and
//! fails on an import that points upward — except the known ones listed in
//! `DEBT`, which issue 15 pays off; a new upward import, or a debt that is paid
//! and still listed, fails the test.

use std::collections::{BTreeMap, BTreeSet};

/// The foundation (0), the capabilities and the machinery they share (1), and
/// what sits on top (2). A module missing here fails the test: say where it goes.
const LAYERS: &[(&str, u8)] = &[
    ("auth", 0),
    ("audit", 0),
    ("approvals", 0),
    ("jobs", 0),
    ("targets", 0),
    ("config", 0),
    ("error", 0),
    ("notify", 0),
    ("fmt", 0),
    ("process", 0),
    ("fuzzing", 2),
    ("state", 0),
    ("storage", 0),
    ("backups", 1),
    ("restores", 1),
    ("schedules", 1),
    ("pg_tools", 1),
    ("reports", 1),
    ("redis_tools", 1),
    ("activity", 1),
    ("migration_status", 1),
    ("devcluster", 1),
    ("pitr", 1),
    ("windows", 1),
    ("web", 2),
    ("cli", 2),
    ("app", 2),
    ("demo", 2),
    ("actions", 2),
    ("main", 2),
    ("lib", 2),
];

/// Upward imports that exist today, each with why; issue 15 removes them.
const DEBT: &[(&str, &str, &str)] = &[
    (
        "config",
        "schedules",
        "the config checks backup schedules and time zones with the schedules' parser",
    ),
    (
        "config",
        "reports",
        "the config parses [reports] with the reports' settings type",
    ),
    (
        "config",
        "migration_status",
        "the config parses migration directories with their tool type",
    ),
];

/// Every `crate::NAME` a source text refers to (comments removed; grouped
/// `use crate::{a, b::c}` imports included).
fn references(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let ident = |s: &str| {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item, mut end) = (0, String::new(), group.len());
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = j;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            let _ = end;
            out.insert(ident(item.trim()));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut upward: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let Some(&mine) = layers.get(module.as_str()) else {
            panic!(
                "src/{} is in no layer: add `{module}` to LAYERS",
                rel.display()
            );
        };
        for r in references(&std::fs::read_to_string(f).unwrap()) {
            let Some(&theirs) = layers.get(r.as_str()) else {
                continue;
            };
            if r != module && theirs > mine {
                upward
                    .entry((module.clone(), r))
                    .or_default()
                    .push(format!("src/{}", rel.display()));
            }
        }
    }
    let known: BTreeSet<(String, String)> = DEBT
        .iter()
        .map(|(a, b, _)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<String> = upward
        .iter()
        .filter(|(edge, _)| !known.contains(*edge))
        .map(|((a, b), files)| format!("{a} → {b} (in {})", files.join(", ")))
        .collect();
    assert!(
        new.is_empty(),
        "imports that point upward (move the code down, or the shared piece into the foundation):\n{}",
        new.join("\n")
    );
    let paid: Vec<String> = known
        .iter()
        .filter(|edge| !upward.contains_key(*edge))
        .map(|(a, b)| format!("{a} → {b}"))
        .collect();
    assert!(
        paid.is_empty(),
        "these upward imports are gone: remove them from DEBT: {}",
        paid.join(", ")
    );
}

#[test]
fn grouped_imports_and_comments_are_read_as_the_compiler_would() {
    let refs = references(
        "use crate::{app::{self, X}, web,\n fmt::bytes};\n// crate::cli is only mentioned\nlet x = crate::jobs::run();",
    );
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["app", "fmt", "jobs", "web"]
    );
}

/// Files over 600 lines say why in their opening comment (`//! Over 600
/// lines…`), so a long file is a decision, not an accident (issue 15).
#[test]
fn every_file_over_600_lines_says_why_in_its_opening_comment() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut silent = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if text.lines().count() <= 600 {
            continue;
        }
        let opening: Vec<&str> = text.lines().take_while(|l| l.starts_with("//!")).collect();
        if !opening.iter().any(|l| l.contains("Over 600 lines")) {
            silent.push(f.strip_prefix(&src).unwrap().display().to_string());
        }
    }
    silent.sort();
    assert!(
        silent.is_empty(),
        "files over 600 lines without an \"Over 600 lines: why\" in their opening //! comment: {silent:?}"
    );
}
