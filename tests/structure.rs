//! The shape of the source, held: imports run one way and files stay readable.
//!
//! - **No import cycle between files.** File A imports file B when A names an item of B's
//!   module (`use crate::…`, `use super::…`, or a `crate::…` path in code). A file naming its
//!   own ancestors (a child using the types its parent module declares or re-exports) is the
//!   language's idiom and not counted; `pub use` re-exports are not imports.
//! - **Imports run down `lib.rs`'s map**: a top-level module imports only modules declared
//!   before it in `lib.rs`, except the one upward import named in [`UPWARD`] (its reason is in
//!   docs/architecture.md).
//! - **No source file over [`MAX_LINES`] lines**, except tests (`tests.rs`) and data.
//!
//! The source is read as text with a small tokenizer (comments and string literals removed,
//! `use` trees expanded): no new dependency for a check this size.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

/// The upward imports allowed: (importing module, imported module). At most one.
const UPWARD: &[(&str, &str)] = &[];

/// A source file: its module path (`["store", "sqlite"]` for `src/store/sqlite/mod.rs`) and
/// its code without comments, strings and test modules.
struct File {
    path: PathBuf,
    module: Vec<String>,
    code: String,
    lines: usize,
}

/// The source read: this repository's, or the tree `BATON_STRUCTURE_SRC` names (to measure
/// another revision with the same checks).
fn src() -> PathBuf {
    std::env::var_os("BATON_STRUCTURE_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The library's files (not `main.rs` and the command's own modules).
fn library_files() -> Vec<File> {
    let mut files = Vec::new();
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    for top in declared_modules(&strip(&lib)) {
        let single = src().join(format!("{top}.rs"));
        if single.exists() {
            collect(&single, vec![top.clone()], &mut files);
        }
        let folder = src().join(&top);
        if folder.join("mod.rs").exists() {
            collect(&folder.join("mod.rs"), vec![top.clone()], &mut files);
        }
    }
    files
}

/// Reads `path` (the file of `module`) and, recursively, the files of the modules it declares.
fn collect(path: &Path, module: Vec<String>, files: &mut Vec<File>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let code = without_test_modules(&strip(&text));
    let dir = if path.file_name().is_some_and(|n| n == "mod.rs") {
        path.parent().expect("folder").to_path_buf()
    } else {
        path.with_extension("")
    };
    for child in declared_modules(&code) {
        let mut child_module = module.clone();
        child_module.push(child.clone());
        for candidate in [
            dir.join(format!("{child}.rs")),
            dir.join(&child).join("mod.rs"),
        ] {
            if candidate.exists() {
                collect(&candidate, child_module.clone(), files);
            }
        }
    }
    files.push(File {
        path: path.to_path_buf(),
        module,
        code,
        lines: text.lines().count(),
    });
}

/// Code without comments and the contents of string and char literals.
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('"') | Some('#')) && !ident_char(prev(&chars, i))
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && !ident_char(prev(&chars, i)) {
            // A char literal ('a', '\n', '\u{..}') — or a lifetime, kept as it is.
            let close = if next == Some('\\') {
                chars[i + 2..]
                    .iter()
                    .position(|&c| c == '\'')
                    .map(|p| i + 2 + p)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev(chars: &[char], i: usize) -> char {
    if i == 0 { ' ' } else { chars[i - 1] }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The code before a trailing `#[cfg(test)] mod …` (a file's unit tests import what they like).
fn without_test_modules(code: &str) -> String {
    let mut rest = code;
    let mut out = String::new();
    while let Some(at) = rest.find("#[cfg(test)]") {
        let after = rest[at + "#[cfg(test)]".len()..].trim_start();
        if after.starts_with("mod ") && after.contains('{') {
            out.push_str(&rest[..at]);
            return out;
        }
        out.push_str(&rest[..at + 1]);
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out
}

/// `mod name;` declarations (file modules, not inline ones), in order.
fn declared_modules(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for statement in code.split([';', '{', '}']) {
        let words: Vec<&str> = statement.split_whitespace().collect();
        if let Some(at) = words.iter().position(|w| *w == "mod")
            && at + 1 == words.len() - 1
            && words[..at]
                .iter()
                .all(|w| w.starts_with("pub") || w.starts_with("#[") || w.ends_with(']'))
        {
            found.push(words[at + 1].to_string());
        }
    }
    // Inline modules end with `{`: the split keeps only `mod name` before `;` or `{`, so tell
    // them apart by what follows.
    found
        .into_iter()
        .filter(|name| {
            let pattern = format!("mod {name}");
            code.match_indices(&pattern)
                .any(|(at, _)| code[at + pattern.len()..].trim_start().starts_with(';'))
        })
        .collect()
}

/// Every path a file names through `use` (not `pub use`) or inline `crate::`, as segments
/// from the crate root.
fn named_paths(file: &File) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let code = &file.code;
    let mut uses_spans = Vec::new();
    let mut search = 0;
    while let Some(found) = code[search..].find("use ") {
        let at = search + found;
        search = at + 4;
        if code[..at].chars().next_back().is_some_and(ident_char) {
            continue;
        }
        let end = code[at..].find(';').map_or(code.len(), |e| at + e);
        let head = code[..at].trim_end();
        let reexport = head.ends_with("pub") || head.ends_with(')') && head.contains("pub(");
        let tree = code[at + 4..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        uses_spans.push((at, end));
        if reexport {
            continue;
        }
        for path in expand(&tree) {
            if let Some(resolved) = resolve(&file.module, &path) {
                paths.push(resolved);
            }
        }
    }
    // Inline `crate::a::b` paths outside `use` statements.
    let mut search = 0;
    while let Some(found) = code[search..].find("crate::") {
        let at = search + found;
        search = at + 7;
        if uses_spans.iter().any(|(s, e)| at >= *s && at < *e) {
            continue;
        }
        let segments: Vec<String> = code[at..]
            .split(|c: char| !(ident_char(c) || c == ':'))
            .next()
            .unwrap_or("")
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(resolved) = resolve(&file.module, &segments) {
            paths.push(resolved);
        }
    }
    paths
}

/// The paths of a `use` tree (`a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`).
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn split_top(list: &str) -> Vec<&str> {
        let (mut depth, mut start, mut parts) = (0, 0, Vec::new());
        for (i, c) in list.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&list[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&list[start..]);
        parts.into_iter().filter(|p| !p.is_empty()).collect()
    }
    fn segments(path: &str) -> Vec<String> {
        path.split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
    let tree = tree.trim().trim_start_matches("::");
    match tree.find('{') {
        None => vec![segments(tree.split(" as ").next().unwrap_or(tree))],
        Some(open) => {
            let prefix = segments(&tree[..open]);
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            split_top(inner)
                .into_iter()
                .flat_map(expand)
                .map(|rest| {
                    let mut path = prefix.clone();
                    path.extend(rest.into_iter().filter(|s| s != "self"));
                    path
                })
                .collect()
        }
    }
}

/// A path as segments from the crate root; `None` for another crate's path.
fn resolve(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "super" => {
            let mut base = module.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        "self" => {
            let mut base = module.to_vec();
            base.extend(path[1..].iter().cloned());
            Some(base)
        }
        _ => None,
    }
}

/// The file whose module is the longest prefix of `path`.
fn file_of<'a>(files: &'a [File], path: &[String]) -> Option<&'a File> {
    files
        .iter()
        .filter(|f| path.starts_with(&f.module))
        .max_by_key(|f| f.module.len())
}

/// File → the files it imports (ancestors and itself left out).
fn file_graph(files: &[File]) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut graph = BTreeMap::new();
    for file in files {
        let edges: BTreeSet<PathBuf> = named_paths(file)
            .iter()
            .filter_map(|path| file_of(files, path))
            .filter(|target| !file.module.starts_with(&target.module))
            .map(|target| target.path.clone())
            .collect();
        graph.insert(file.path.clone(), edges);
    }
    graph
}

/// One cycle of the graph, if there is any.
fn find_cycle(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        node: &PathBuf,
        graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        done: &mut BTreeSet<PathBuf>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

fn shown(path: &Path) -> String {
    path.strip_prefix(src())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The files that are on some cycle (the strongly connected components of more than one).
fn files_on_cycles(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> BTreeSet<PathBuf> {
    let reaches = |from: &PathBuf, to: &PathBuf| {
        let (mut seen, mut todo) = (BTreeSet::new(), vec![from.clone()]);
        while let Some(node) = todo.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        false
    };
    graph
        .keys()
        .filter(|node| {
            graph[*node]
                .iter()
                .any(|next| next != *node && reaches(next, node))
        })
        .cloned()
        .collect()
}

#[test]
fn no_import_cycle_between_files() {
    let files = library_files();
    assert!(files.len() > 30, "the library's files were not found");
    let graph = file_graph(&files);
    let mut largest: Vec<(usize, String)> =
        files.iter().map(|f| (f.lines, shown(&f.path))).collect();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    println!(
        "structure: {} files, {} imports between files, {} files on import cycles {:?}; largest {:?}",
        files.len(),
        graph.values().map(BTreeSet::len).sum::<usize>(),
        files_on_cycles(&graph).len(),
        files_on_cycles(&graph)
            .iter()
            .map(|p| shown(p))
            .collect::<Vec<_>>(),
        &largest[..5]
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle: {}",
            cycle
                .iter()
                .map(|p| shown(p))
                .collect::<Vec<_>>()
                .join(" → ")
        );
    }
}

#[test]
fn imports_run_down_the_map_of_lib_rs() {
    let lib = strip(&std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs"));
    let order = declared_modules(&lib);
    let rank = |module: &str| order.iter().position(|m| m == module);
    let files = library_files();
    let mut upward: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = &file.module[0];
        for path in named_paths(file) {
            let Some(to) = path.first() else { continue };
            if let (Some(a), Some(b)) = (rank(from), rank(to))
                && b > a
            {
                upward
                    .entry((from.clone(), to.clone()))
                    .or_default()
                    .insert(shown(&file.path));
            }
        }
    }
    let unexpected: Vec<String> = upward
        .iter()
        .filter(|((from, to), _)| !UPWARD.contains(&(from.as_str(), to.as_str())))
        .map(|((from, to), files)| format!("{from} → {to} (in {files:?})"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "upward imports (lib.rs's map: {order:?}): {unexpected:#?}"
    );
    assert!(UPWARD.len() <= 1, "at most one upward import");
}

#[test]
fn no_source_file_is_over_the_line_limit() {
    let long: Vec<String> = library_files()
        .iter()
        .chain(command_files().iter())
        .filter(|f| f.path.file_name().is_none_or(|n| n != "tests.rs"))
        .filter(|f| f.lines > MAX_LINES)
        .map(|f| format!("{} ({} lines)", shown(&f.path), f.lines))
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

/// `main.rs` and the command's own modules (the load generator).
fn command_files() -> Vec<File> {
    let mut files = Vec::new();
    collect(&src().join("main.rs"), Vec::new(), &mut files);
    files
}

/// The checker itself, on code whose answer is known.
#[test]
fn the_checker_sees_uses_paths_and_cycles() {
    let file = File {
        path: PathBuf::from("a/b.rs"),
        module: vec!["a".into(), "b".into()],
        code: strip(
            "use crate::x::{Y, z::{W, V as U}};\n// use crate::commented::Out;\n\
             pub use crate::reexported::R;\nuse super::c::D;\nfn f() { crate::q::r(); \
             let s = \"crate::in_string\"; }",
        ),
        lines: 1,
    };
    let mut named: Vec<String> = named_paths(&file).iter().map(|p| p.join("::")).collect();
    named.sort();
    assert_eq!(named, ["a::c::D", "q::r", "x::Y", "x::z::V", "x::z::W"]);
    assert_eq!(
        declared_modules(&strip("pub mod a;\nmod b { }\n#[macro_use]\npub mod c;")),
        ["a", "c"]
    );
    let mut graph = BTreeMap::new();
    graph.insert(PathBuf::from("p"), BTreeSet::from([PathBuf::from("q")]));
    graph.insert(PathBuf::from("q"), BTreeSet::from([PathBuf::from("p")]));
    assert!(find_cycle(&graph).is_some());
    graph.insert(PathBuf::from("q"), BTreeSet::new());
    assert!(find_cycle(&graph).is_none());
}
