//! The house keeps its shape (docs/ARCHITECTURE.md): no import circle
//! between files of `src/`, the protocol importing nothing above it, no
//! library code ending the process, no file over 800 lines and no
//! function over 150 (a file's own tests aside).
//!
//! Imports are read as text, as a reviewer reads them: every
//! `crate::a::b` and `super::…` path (and `use crate::a::{b, c::d}`
//! groups) names the longest existing module file it reaches. Test
//! modules (`tests.rs`, `*_tests.rs`) and a file's own `#[cfg(test)]`
//! module are left out: they are not part of the room (and a test
//! module's `super` is its file, not the file's parent).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/` files (as `a/b.rs`) and what they import, by file.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    /// Each file's text without comments.
    texts: BTreeMap<String, String>,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "tests") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != "tests.rs" && !name.ends_with("_tests.rs") {
                out.push(path);
            }
        }
    }
}

/// The module path of a file: `server/scheduler.rs` → [server,
/// scheduler]; `server/mod.rs` → [server]; `lib.rs` → [].
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// Block comments out; line comments out where the line has no string.
fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("/*") {
        out.push_str(&rest[..at]);
        rest = rest[at..]
            .find("*/")
            .map_or("", |end| &rest[at + end + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|l| match l.find("//") {
            Some(at) if !l.contains('"') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Parses a use tree at `s` (after a `::`): `a::b`, `a::{b, c::{d}}`,
/// `*`, `a as b`; pushes each full path onto `out`, prefixed by `base`.
fn use_tree(s: &[char], mut i: usize, base: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = base;
    loop {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        if i < s.len() && s[i] == '{' {
            i += 1;
            loop {
                while i < s.len() && (s[i].is_whitespace() || s[i] == ',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == '}' {
                    out.push(path.clone());
                    return i + 1;
                }
                i = use_tree(s, i, path.clone(), out);
            }
        }
        let start = i;
        while i < s.len() && (is_ident(s[i]) || s[i] == '*') {
            i += 1;
        }
        if i > start {
            path.push(s[start..i].iter().collect());
        }
        if s.len() > i + 2 && s[i] == ':' && s[i + 1] == ':' {
            i += 2;
            continue;
        }
        // `x as y`: the path is x's.
        let mut j = i;
        while j < s.len() && s[j].is_whitespace() {
            j += 1;
        }
        if s[j..].starts_with(&['a', 's']) && s.get(j + 2).is_some_and(|c| c.is_whitespace()) {
            j += 3;
            while j < s.len() && (s[j].is_whitespace() || is_ident(s[j])) {
                j += 1;
            }
            i = j;
        }
        out.push(path);
        return i;
    }
}

/// Every `crate::…` and `super::…` path in `text`, as segments from the
/// crate root.
fn paths(text: &str, here: &[String]) -> Vec<Vec<String>> {
    let s: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let word_start = i == 0 || !is_ident(s[i - 1]);
        let rest: String = s[i..s.len().min(i + 7)].iter().collect();
        if word_start && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let mut base: Vec<String> = Vec::new();
            let mut j = i;
            if rest.starts_with("crate::") {
                j += 7;
            } else {
                base = here.to_vec();
                while s[j..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':']) {
                    base.pop();
                    j += 7;
                }
            }
            let mut found = Vec::new();
            i = use_tree(&s, j, base, &mut found);
            out.extend(found);
        } else {
            i += 1;
        }
    }
    out
}

/// The graph of `src/`, read once for all the tests here.
fn graph() -> &'static Graph {
    static GRAPH: std::sync::OnceLock<Graph> = std::sync::OnceLock::new();
    GRAPH.get_or_init(read_graph)
}

fn read_graph() -> Graph {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .expect("under src/")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let modules: BTreeMap<Vec<String>, String> =
        names.iter().map(|f| (module_of(f), f.clone())).collect();
    let resolve = |path: &[String]| -> Option<String> {
        let path: Vec<String> = path
            .iter()
            .filter(|s| *s != "self" && *s != "*")
            .cloned()
            .collect();
        (1..=path.len())
            .rev()
            .find_map(|n| modules.get(&path[..n]).cloned())
    };
    let mut edges = BTreeMap::new();
    let mut texts = BTreeMap::new();
    for (file, path) in names.iter().zip(&files) {
        let source = std::fs::read_to_string(path).expect("readable source");
        let text = without_comments(&room(&source).join("\n"));
        let here = module_of(file);
        let targets: BTreeSet<String> = paths(&text, &here)
            .iter()
            .filter_map(|p| resolve(p))
            .filter(|t| t != file)
            .collect();
        edges.insert(file.clone(), targets);
        texts.insert(file.clone(), text);
    }
    Graph { edges, texts }
}

/// The strongly connected components of more than one file (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in &self.edges[v] {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn no_file_of_src_imports_itself_through_others() {
    let g = graph();
    assert!(g.edges.len() > 50, "src/ was read: {} files", g.edges.len());
    let found = circles(&g.edges);
    assert!(
        found.is_empty(),
        "import circles between files of src/ (docs/ARCHITECTURE.md says which way each layer points): {found:#?}"
    );
}

#[test]
fn the_circle_check_finds_a_circle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.insert("a.rs".into(), ["b.rs".to_string()].into());
    edges.insert("b.rs".into(), ["c.rs".to_string()].into());
    edges.insert("c.rs".into(), ["a.rs".to_string()].into());
    edges.insert("d.rs".into(), ["a.rs".to_string()].into());
    assert_eq!(
        circles(&edges),
        vec![vec!["a.rs".to_string(), "b.rs".into(), "c.rs".into()]]
    );
    let here = module_of("server/scheduler.rs");
    let found = paths(
        "use crate::protocol::{self, Body, limits::{MAX_SEQ as M}};\nsuper::x::y(); crate::a as b;",
        &here,
    );
    assert!(found.contains(&vec!["protocol".to_string(), "self".into()]));
    assert!(found.contains(&vec![
        "protocol".to_string(),
        "limits".into(),
        "MAX_SEQ".into()
    ]));
    assert!(found.contains(&vec!["server".to_string(), "x".into(), "y".into()]));
    assert!(found.contains(&vec!["a".to_string()]));
}

#[test]
fn the_protocol_imports_nothing_above_it() {
    let g = graph();
    let above: Vec<(String, String)> = g
        .edges
        .iter()
        .filter(|(f, _)| f.starts_with("protocol/"))
        .flat_map(|(f, ts)| ts.iter().map(move |t| (f.clone(), t.clone())))
        .filter(|(_, t)| !t.starts_with("protocol/"))
        .collect();
    assert!(
        above.is_empty(),
        "protocol/ is pure data and imports only itself: {above:?}"
    );
}

#[test]
fn only_the_binaries_and_the_panic_hook_end_the_process() {
    let g = graph();
    let exits: Vec<&String> = g
        .texts
        .iter()
        .filter(|(f, text)| {
            // A file's own tests may exit a child process they forked.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            f.as_str() != "fatal.rs" && code.contains("process::exit")
        })
        .map(|(f, _)| f)
        .collect();
    assert!(
        exits.is_empty(),
        "library code ends the process; return a typed error through the handle instead: {exits:?}"
    );
}

/// Lines of a file up to its own test module (`#[cfg(test)]` then
/// `mod …`), which is not part of the room.
fn room(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].trim_start() == "#[cfg(test)]"
                && lines[i + 1..]
                    .iter()
                    .find(|l| !l.trim().is_empty())
                    .is_some_and(|l| {
                        let l = l.trim_start();
                        l.starts_with("mod ") || l.starts_with("pub mod ")
                    })
        })
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// A line that starts a function (`pub(crate) async fn name`, …).
fn starts_fn(line: &str) -> bool {
    let mut rest = line.trim_start();
    for prefix in ["pub", "async", "const", "unsafe"] {
        if let Some(r) = rest.strip_prefix(prefix) {
            let r = if prefix == "pub" && r.starts_with('(') {
                r.split_once(')').map_or(r, |(_, after)| after)
            } else {
                r
            };
            if r.starts_with(char::is_whitespace) {
                rest = r.trim_start();
            }
        }
    }
    rest.strip_prefix("fn ")
        .is_some_and(|r| r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
}

/// Braces of a line, strings and character literals left out.
fn brace_depth(line: &str) -> i64 {
    let mut depth = 0;
    let mut chars = line.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_string => {
                chars.next();
            }
            '"' => in_string = !in_string,
            '\'' if !in_string => {
                // 'x' or '\x': skip a character literal, not a lifetime.
                let mut look = chars.clone();
                let first = look.next();
                let second = if first == Some('\\') {
                    look.nth(1)
                } else {
                    look.next()
                };
                if second == Some('\'') {
                    chars = look;
                }
            }
            '{' if !in_string => depth += 1,
            '}' if !in_string => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// (file:line, length) of every function of `lines` longer than `limit`.
fn long_functions(file: &str, lines: &[&str], limit: usize) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !starts_fn(lines[i]) {
            i += 1;
            continue;
        }
        let (mut depth, mut opened, mut j) = (0, false, i);
        while j < lines.len() {
            if !opened && lines[j].contains(';') && !lines[j].contains('{') {
                break;
            }
            depth += brace_depth(lines[j]);
            opened |= lines[j].contains('{');
            if opened && depth <= 0 {
                break;
            }
            j += 1;
        }
        let length = j - i + 1;
        if opened && length > limit {
            found.push((format!("{file}:{}", i + 1), length));
        }
        i = if opened { j + 1 } else { i + 1 };
    }
    found
}

#[test]
fn every_room_fits_in_one_look() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut big_rooms = Vec::new();
    let mut long = Vec::new();
    for path in &files {
        let file = path
            .strip_prefix(&root)
            .expect("under src/")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(path).expect("readable source");
        let lines = room(&text);
        if lines.len() > 800 {
            big_rooms.push((file.clone(), lines.len()));
        }
        long.extend(long_functions(&file, &lines, 150));
    }
    assert!(
        big_rooms.is_empty() && long.is_empty(),
        "split these (docs/ARCHITECTURE.md): files over 800 lines {big_rooms:?}, functions over 150 lines {long:?}"
    );
}

#[test]
fn the_size_check_measures_functions() {
    let mut text = String::from("pub(crate) async fn long(x: u8) -> u8 {\n");
    for _ in 0..160 {
        text.push_str("    let s = \"}\"; let c = '{';\n");
    }
    text.push_str("    x\n}\nfn short() {}\n");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        long_functions("x.rs", &lines, 150),
        vec![("x.rs:1".to_string(), 163)]
    );
    assert!(long_functions("x.rs", &lines, 200).is_empty());
}
