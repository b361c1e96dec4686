//! The layout of `src/`: files of at most 550 lines, and no import cycle between them.
//! For the cycles, it reads each file's top-level
//! `use crate::…` and `use super::…` lines (nested ones, such as a test module's
//! `use super::*`, are indented and skipped), resolves each path to the file of the
//! longest module prefix it names, and fails on a cycle, naming its files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module path (`["orchestrator", "registry"]`) and the file it lives in.
type Modules = BTreeMap<Vec<String>, String>;

#[test]
fn no_file_of_src_imports_itself_through_others() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = Modules::new();
    collect(&src, &src, &mut modules);
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(module, file)| (file.clone(), imports(&src, module, file, &modules)))
        .collect();
    assert!(
        graph.values().any(|edges| !edges.is_empty()),
        "no import was found at all: the reader is broken"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in src/: {}", cycle.join(" → "));
    }
}

/// The most lines a file of `src/` may have: past that, split it by concern.
const MAX_LINES: usize = 550;

#[test]
fn no_file_of_src_is_over_the_line_limit() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = Modules::new();
    collect(&src, &src, &mut modules);
    let long: Vec<String> = modules
        .values()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(src.join(file))
                .unwrap()
                .lines()
                .count();
            (lines > MAX_LINES).then(|| format!("{file} ({lines} lines)"))
        })
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines: {}",
        long.join(", ")
    );
}

/// Every `.rs` file below `dir` (but the binary's `main.rs`) by its module path.
fn collect(src: &Path, dir: &Path, modules: &mut Modules) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(src, &path, modules);
            continue;
        }
        let relative = path
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let Some(stem) = relative.strip_suffix(".rs") else {
            continue;
        };
        let mut module: Vec<String> = stem.split('/').map(str::to_string).collect();
        match module.last().map(String::as_str) {
            Some("main") if module.len() == 1 => continue,
            Some("lib") if module.len() == 1 => module.clear(),
            Some("mod") => {
                module.pop();
            }
            _ => {}
        }
        modules.insert(module, relative);
    }
}

/// The files of `src/` that `file` (module `module`) imports, itself left out.
fn imports(src: &Path, module: &[String], file: &str, modules: &Modules) -> BTreeSet<String> {
    let text = std::fs::read_to_string(src.join(file)).unwrap();
    let mut found = BTreeSet::new();
    let mut statement = String::new();
    for line in text.lines() {
        if statement.is_empty() {
            let Some(rest) = line
                .strip_prefix("use ")
                .or_else(|| line.strip_prefix("pub use "))
            else {
                continue;
            };
            statement.push_str(rest);
        } else {
            statement.push_str(line);
        }
        let Some(done) = statement.strip_suffix(';') else {
            continue;
        };
        let tree: String = without_aliases(done)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        statement.clear();
        for path in expand(&tree) {
            let mut segments: Vec<String> = path.split("::").map(str::to_string).collect();
            let absolute = match segments.first().map(String::as_str) {
                Some("crate") => segments.split_off(1),
                Some("super") => {
                    // `super` of a `mod.rs` module and of a plain file module alike is
                    // the parent module.
                    let mut base = module.to_vec();
                    base.pop();
                    base.extend(segments.split_off(1));
                    base
                }
                _ => continue,
            };
            let target = (0..=absolute.len())
                .rev()
                .find_map(|n| modules.get(&absolute[..n]))
                .expect("the crate root is a module");
            if target != file {
                found.insert(target.clone());
            }
        }
    }
    found
}

/// `text` without its ` as NAME` renames.
fn without_aliases(text: &str) -> String {
    let mut out = String::new();
    let mut words = text.split_whitespace().peekable();
    while let Some(word) = words.next() {
        if word == "as" {
            // Keep what follows the alias name (`,` or `}`).
            if let Some(name) = words.next() {
                out.extend(name.chars().filter(|c| !c.is_alphanumeric() && *c != '_'));
            }
            continue;
        }
        out.push(' ');
        out.push_str(word);
    }
    out
}

/// The paths of a `use` tree without whitespace: `a::{b, c::{d, self}}` gives `a::b`,
/// `a::c::d` and `a::c`.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.strip_suffix("::self").unwrap_or(tree).to_string()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|part| !part.is_empty())
        .flat_map(|part| {
            if part == "self" {
                vec![prefix.trim_end_matches("::").to_string()]
            } else {
                expand(&format!("{prefix}{part}"))
            }
        })
        .collect()
}

/// A cycle in `graph` (as its files, the first repeated at the end), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        file: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(file) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|f| f == file).unwrap();
                let mut cycle = stack[from..].to_vec();
                cycle.push(file.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(file.to_string(), Mark::Open);
        stack.push(file.to_string());
        for next in graph.get(file).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(file.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|file| visit(file, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn use_trees_expand_to_their_paths() {
    assert_eq!(
        expand("crate::a::{self,b,c::{d,e}}"),
        [
            "crate::a",
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e"
        ]
    );
    assert_eq!(expand("super::x::Y"), ["super::x::Y"]);
    assert_eq!(
        without_aliases("crate::a::{B as C, d as e};").replace(' ', ""),
        "crate::a::{B,d};"
    );
}
