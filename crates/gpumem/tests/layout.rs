//! The shape of the code, checked: no import circles in any crate of the workspace, a folder
//! per part of the library with few files left at its top, and no source file so long that a
//! newcomer loses their way in it.
//!
//! An import is any path through `crate::`, `super::` or `self::` in a file's code (in `use`
//! lines and inline), outside comments and its `#[cfg(test)]` module. A file may use its
//! ancestors' items: a child module is part of its parent (PyTorch's engine is one type whose
//! `impl` blocks are split over `torch/*.rs`). Every other import must not lead back, neither
//! between files nor between the crate's top-level parts (`device`, `torch`, `packed`,
//! `report`, ...).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path inside one crate: `["torch", "expandable"]`; the root is `[]`.
type ModPath = Vec<String>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a source file defines.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments, string contents and its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // a char literal such as ':' or '{'
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Parses the path that starts at `s[i..]` (after `crate`, `super` or `self`), with groups
/// `{a, b::{c, d}}`, into full paths appended to `prefix`.
fn parse_path(s: &[u8], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        if !s[i..].starts_with(b"::") {
            out.push(path);
            return i;
        }
        i += 2;
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < s.len() && s[i] == b'{' {
            i += 1;
            loop {
                while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'}' {
                    return i + 1;
                }
                let start = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_' || s[i] == b'*') {
                    i += 1;
                }
                let word = String::from_utf8_lossy(&s[start..i]).into_owned();
                let mut sub = path.clone();
                if word != "self" && word != "*" && !word.is_empty() {
                    sub.push(word);
                }
                i = parse_path(s, i, sub, out);
                // skip `as name` and anything else up to the next separator
                while i < s.len() && s[i] != b',' && s[i] != b'}' {
                    i += 1;
                }
            }
        }
        let start = i;
        while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
            i += 1;
        }
        if start == i {
            out.push(path);
            return i;
        }
        path.push(String::from_utf8_lossy(&s[start..i]).into_owned());
    }
}

/// Every module path a file's code names, resolved against the modules that exist.
fn imports(me: &ModPath, code: &str, modules: &BTreeSet<ModPath>) -> BTreeSet<ModPath> {
    let s = code.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let boundary = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_' || s[i - 1] == b':');
        let mut base: Option<ModPath> = None;
        let mut j = i;
        if boundary && s[i..].starts_with(b"crate::") {
            base = Some(Vec::new());
            j = i + 5;
        } else if boundary && s[i..].starts_with(b"self::") {
            base = Some(me.clone());
            j = i + 4;
        } else if boundary && s[i..].starts_with(b"super::") {
            let mut b = me.clone();
            while s[j..].starts_with(b"super::") {
                b.pop();
                j += 7;
            }
            j -= 2; // back to the `::` that follows the last `super`
            base = Some(b);
        }
        match base {
            Some(b) => i = parse_path(s, j, b, &mut found),
            None => i += 1,
        }
    }
    found
        .into_iter()
        .map(|mut p| {
            while !modules.contains(&p) {
                p.pop();
            }
            p
        })
        .filter(|p| p != me && !me.starts_with(p))
        .collect()
}

/// A cycle in `graph`, if there is one, as the nodes along it.
fn find_cycle<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        n: &N,
        graph: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, u8>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn name(p: &ModPath) -> String {
    if p.is_empty() {
        "crate".to_string()
    } else {
        p.join("::")
    }
}

/// The import graph of one crate's `src`: between modules, and between top-level parts.
fn graphs(src: &Path) -> (BTreeMap<ModPath, BTreeSet<ModPath>>, BTreeMap<String, BTreeSet<String>>) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(src, f)).collect();
    let mut by_module = BTreeMap::new();
    let mut by_part: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let used = imports(&me, &code(&fs::read_to_string(f).unwrap()), &modules);
        if let Some(part) = me.first() {
            let parts = by_part.entry(part.clone()).or_default();
            parts.extend(used.iter().filter_map(|u| u.first()).filter(|u| *u != part).cloned());
        }
        by_module.insert(me, used);
    }
    (by_module, by_part)
}

fn crates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(workspace())
        .unwrap()
        .flatten()
        .map(|e| e.path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    assert!(out.len() >= 3, "expected the workspace's crates beside this one, found {out:?}");
    out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for src in crates() {
        let (by_module, by_part) = graphs(&src);
        if let Some(c) = find_cycle(&by_module) {
            let c: Vec<String> = c.iter().map(name).collect();
            panic!("{}: import circle between modules: {}", src.display(), c.join(" -> "));
        }
        if let Some(c) = find_cycle(&by_part) {
            panic!("{}: import circle between top-level parts: {}", src.display(), c.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_a_circle() {
    let modules: BTreeSet<ModPath> =
        [vec![], vec!["a".into()], vec!["b".into()], vec!["b".into(), "c".into()]].into_iter().collect();
    let a = imports(&vec!["a".into()], "use crate::b::{c::{X, Y as Z}, W};", &modules);
    assert_eq!(a, [vec!["b".to_string(), "c".into()], vec!["b".into()]].into_iter().collect());
    let c = imports(&vec!["b".into(), "c".into()], "fn f() { super::super::a::g(); super::h() }", &modules);
    // `super::h` names the parent `b`: an ancestor, which a child may use
    assert_eq!(c, [vec!["a".to_string()]].into_iter().collect());
    let mut graph = BTreeMap::new();
    graph.insert(vec!["a".to_string()], [vec!["b".to_string(), "c".into()]].into_iter().collect());
    graph.insert(vec!["b".to_string(), "c".into()], c);
    assert!(find_cycle(&graph).is_some());
    // comments and strings are not code
    assert!(imports(&vec!["a".into()], &code("// crate::b\nlet s = \"crate::b\";"), &modules).is_empty());
}

#[test]
fn the_library_has_a_folder_per_part() {
    let src = workspace().join("gpumem/src");
    let top: Vec<String> = fs::read_dir(&src)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(top.len() <= 12, "{} files at the top of crates/gpumem/src: {top:?}", top.len());
    for part in ["device", "torch", "packed", "report"] {
        assert!(src.join(part).join("mod.rs").is_file(), "crates/gpumem/src/{part}/ is missing");
    }
}

#[test]
fn no_source_file_is_over_700_lines() {
    let mut files = Vec::new();
    for src in crates() {
        rust_files(src.parent().unwrap(), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "target"))
        .filter_map(|f| {
            let n = fs::read_to_string(f).unwrap().lines().count();
            (n > 700).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:?}");
}
