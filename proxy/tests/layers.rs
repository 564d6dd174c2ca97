//! The proxy's modules form layers: no module reaches, through the
//! `crate::` and `super::` paths of its non-test code, back to itself.
//! A cycle is what made one request's path read back and forth between
//! files; this keeps it from coming back. Checked per file and per
//! top-level module (a folder counts as one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`http::outbound`) → its source, without test code and comments.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).expect("under src");
            let mut parts: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source is readable");
            out.insert(parts.join("::"), code_only(&text));
        }
    }
    out
}

/// The text before the first `#[cfg(test)]` (test modules close every
/// file here), line comments removed.
fn code_only(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path `module`'s code names with `crate::` or `super::`, as segments
/// from the crate root (`use` groups expanded one level deep).
fn paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let (mut base, skip) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if starts_word && rest.starts_with("super::") {
            let mut b: Vec<String> = module.split("::").map(String::from).collect();
            b.pop();
            (b, "super::".len())
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let mut j = i + skip;
        while code[j..].starts_with("super::") {
            base.pop();
            j += "super::".len();
        }
        if code[j..].starts_with('{') {
            let group = braced(&code[j..]);
            for item in split_top(group) {
                out.push([base.clone(), segments(item)].concat());
            }
            j += group.len() + 2;
        } else {
            out.push([base, segments(&code[j..])].concat());
        }
        i = j;
    }
    out
}

/// The inside of the `{…}` group `s` starts with.
fn braced(s: &str) -> &str {
    let mut depth = 0;
    for (k, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &s[1..k];
                }
            }
            _ => {}
        }
    }
    &s[1..]
}

/// The comma-separated items of a `use` group, nested groups kept whole.
fn split_top(group: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (k, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(group[start..k].trim());
                start = k + 1;
            }
            _ => {}
        }
    }
    out.push(group[start..].trim());
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// The leading `a::b::c` segments of `s`.
fn segments(s: &str) -> Vec<String> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s[..end]
        .split("::")
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

/// Module → the other modules it uses (the longest known prefix of each
/// path; a module's own ancestors do not count: a parent is its children's
/// facade).
fn graph(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    mods.iter()
        .map(|(name, code)| {
            let deps = paths(name, code)
                .into_iter()
                .filter_map(|p| {
                    (1..=p.len())
                        .rev()
                        .map(|k| p[..k].join("::"))
                        .find(|m| mods.contains_key(m))
                })
                .filter(|m| m != name && !name.starts_with(&format!("{m}::")))
                .collect();
            (name.clone(), deps)
        })
        .collect()
}

/// One cycle of `g`, if it has any.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        v: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == v) {
            let mut c = stack[at..].to_vec();
            c.push(v.to_string());
            return Some(c);
        }
        if done.contains(v) {
            return None;
        }
        stack.push(v.to_string());
        for w in g.get(v).into_iter().flatten() {
            if let Some(c) = visit(g, w, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(v.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|v| visit(g, v, &mut Vec::new(), &mut done))
}

#[test]
fn the_proxy_modules_form_layers_without_a_cycle() {
    let mods = modules();
    assert!(mods.contains_key("http::outbound"), "{:?}", mods.keys());
    let files = graph(&mods);
    // The parser sees what it should: a known edge of the request path.
    assert!(files["http::outbound"].contains("upstream"), "{files:?}");
    if let Some(c) = cycle(&files) {
        panic!("module cycle: {}", c.join(" -> "));
    }
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in &files {
        let head = |s: &str| s.split("::").next().unwrap_or(s).to_string();
        let entry = top.entry(head(m)).or_default();
        entry.extend(deps.iter().map(|d| head(d)).filter(|d| *d != head(m)));
    }
    if let Some(c) = cycle(&top) {
        panic!("cycle between top-level modules: {}", c.join(" -> "));
    }
}

#[test]
fn the_checker_finds_a_cycle_through_a_use_group() {
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), "use crate::{b::{X, Y}, c};".to_string());
    mods.insert("b".to_string(), "fn f() { super::a::g() }".to_string());
    mods.insert("c".to_string(), String::new());
    let g = graph(&mods);
    assert_eq!(g["a"], BTreeSet::from(["b".to_string(), "c".to_string()]));
    assert_eq!(
        cycle(&g),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
    mods.insert("b".to_string(), "use crate::c::Z;".to_string());
    assert_eq!(cycle(&graph(&mods)), None);
}
