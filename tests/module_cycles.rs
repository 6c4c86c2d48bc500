//! The module graph of every crate in the workspace has no cycle: a module
//! may use the modules below it, never one that uses it back (directly or
//! through others). Edges are read from `crate::` paths in the source (`use`
//! lines and inline paths), test modules included; a module and its own
//! submodules may use each other.
//!
//! Cycles that are known and not cut yet are listed in `KNOWN`; a new one
//! fails the test, and so does a listed one that is gone (so the list only
//! shrinks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Source roots of the workspace's crates, relative to the workspace root.
const CRATES: &[&str] = &["src", "sidecore/src", "shm-proto/src", "guest-agent/src"];

/// Cycles not cut yet, each as its sorted member list (none left).
const KNOWN: &[&[&str]] = &[];

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `a/b.rs` and `a/b/mod.rs` are `a::b`;
/// `lib.rs` and `main.rs` are the crate root (empty).
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap_or(file);
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_string();
        if !matches!(stem.as_str(), "mod" | "lib" | "main") {
            parts.push(stem);
        }
    }
    parts
}

/// The `crate::...` paths in `text`, as segment lists, with `use` groups
/// (`crate::a::{b, c::D}`) expanded to their first segment after the brace.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            // A `crate::` that is the tail of a longer name (`sidecore_crate::`) is not one.
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let mut segs = Vec::new();
            let mut grouped = false;
            let mut s = rest;
            loop {
                let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
                if end == 0 {
                    break;
                }
                segs.push(s[..end].to_string());
                s = &s[end..];
                match s.strip_prefix("::") {
                    Some(t) if !t.starts_with('{') => s = t,
                    Some(t) => {
                        // A group: each member is a path of its own.
                        let inner = t[1..].split('}').next().unwrap_or("");
                        for member in inner.split(',') {
                            let head = member.trim().split("::").next().unwrap_or("").trim();
                            if !head.is_empty() && head != "self" {
                                let mut p = segs.clone();
                                p.push(head.to_string());
                                out.push(p);
                            }
                        }
                        grouped = true;
                        break;
                    }
                    None => break,
                }
            }
            if !segs.is_empty() && !grouped {
                out.push(segs);
            }
        }
    }
    out
}

/// The longest prefix of `path` that names a module of the crate.
fn target_module(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains(p))
}

fn is_prefix(a: &[String], b: &[String]) -> bool {
    a.len() <= b.len() && b[..a.len()] == *a
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let edges = t.edges;
        for w in edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v.as_str());
        }
    }
    t.out.sort();
    t.out
}

/// The module graph of the crate whose sources are under `root`, nodes
/// named `label:a::b`.
fn graph(label: &str, root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(root, f)).collect();
    let name = |m: &[String]| format!("{label}:{}", m.join("::"));
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(root, f);
        if from.is_empty() {
            continue; // the crate root declares and re-exports everything
        }
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for p in crate_paths(&text) {
            if let Some(to) = target_module(&modules, &p) {
                if !is_prefix(&to, &from) && !is_prefix(&from, &to) {
                    edges.entry(name(&from)).or_default().insert(name(&to));
                }
            }
        }
        edges.entry(name(&from)).or_default();
    }
    edges
}

#[test]
fn no_module_uses_a_module_that_uses_it_back() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for c in CRATES {
        let root = ws.join(c);
        assert!(root.is_dir(), "{} is not a directory: update CRATES", root.display());
        found.extend(cycles(&graph(c, &root)));
    }
    let known: Vec<Vec<String>> = KNOWN.iter().map(|k| k.iter().map(|s| s.to_string()).collect()).collect();
    let new: Vec<_> = found.iter().filter(|c| !known.contains(c)).collect();
    let gone: Vec<_> = known.iter().filter(|k| !found.contains(k)).collect();
    assert!(new.is_empty(), "module cycles (each module uses the next, the last the first): {new:?}");
    assert!(gone.is_empty(), "cycles listed in KNOWN are cut now: remove them from the list: {gone:?}");
}

#[test]
fn the_checker_sees_a_cycle_and_a_group() {
    let paths = crate_paths("use crate::a::{b::C, d};\nlet x = crate::e::f(); // crate::g::h\nmy_crate::z::y;");
    assert_eq!(
        paths,
        vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["a".to_string(), "d".to_string()],
            vec!["e".to_string(), "f".to_string()],
        ]
    );
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("x".into()).or_default().insert("y".into());
    e.entry("y".into()).or_default().insert("z".into());
    e.entry("z".into()).or_default().insert("x".into());
    e.entry("w".into()).or_default().insert("x".into());
    assert_eq!(cycles(&e), vec![vec!["x".to_string(), "y".to_string(), "z".to_string()]]);
    e.get_mut("z").map(|s| s.remove("x"));
    assert!(cycles(&e).is_empty());
}
