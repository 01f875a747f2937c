//! The layering ARCHITECTURE.md describes, checked on the source: no import cycle among the
//! crate's modules, `src/simd/` depends on nothing outside it but `float` and `error`, and only
//! `src/blas.rs` names the cblas bindings.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("readable src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level module a file belongs to: `src/layer.rs` → `layer`, `src/simd/x86.rs` → `simd`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// The code of a file without comments (line comments and doc comments).
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(|l| match l.find("//") {
        Some(i) => &l[..i],
        None => l,
    })
}

/// The top-level modules a file refers to as `crate::name`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in code_lines(text) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// Module → the other modules it refers to, over every file in `src/` except `lib.rs` (the
/// root, which declares and re-exports everything).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let module = module_of(&src, &file);
        if module == "lib" || module == "bin" {
            continue;
        }
        let text = fs::read_to_string(&file).expect("readable source");
        let refs = crate_refs(&text);
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(refs.into_iter().filter(|r| *r != module));
    }
    graph
}

/// A cycle through `node`, if any (depth-first search).
fn find_cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == node) {
        let mut cycle = path[i..].to_vec();
        cycle.push(node.to_owned());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_owned());
    for dep in graph.get(node).into_iter().flatten() {
        if let Some(c) = find_cycle(graph, dep, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(node.to_owned());
    None
}

#[test]
fn no_import_cycle_among_modules() {
    let graph = graph();
    for (module, deps) in &graph {
        println!("{module} → {deps:?}");
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let cycle = find_cycle(&graph, module, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" → ")
        );
    }
}

#[test]
fn the_cycle_check_can_fail() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    let cycle = find_cycle(&g, "a", &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(cycle.unwrap(), ["a", "b", "c", "a"]);
    assert!(find_cycle(&g, "d", &mut Vec::new(), &mut BTreeSet::new()).is_none());
    let refs = crate_refs("use crate::layer::X; // crate::model\nlet v = crate::check::f();");
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["check", "layer"]);
}

#[test]
fn simd_depends_only_on_float_and_error() {
    let graph = graph();
    let outside: BTreeSet<_> = graph["simd"]
        .iter()
        .filter(|m| !matches!(m.as_str(), "float" | "error"))
        .collect();
    assert!(outside.is_empty(), "src/simd/ refers to {outside:?}");
}

#[test]
fn only_blas_rs_names_the_cblas_bindings() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let offenders: Vec<_> = rust_files(&src)
        .into_iter()
        .filter(|f| !f.ends_with("blas.rs"))
        .filter(|f| {
            let text = fs::read_to_string(f).expect("readable source");
            let named = code_lines(&text)
                .any(|l| l.contains("cblas_sys") || l.contains("extern \"C\" fn cblas"));
            named
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "cblas named outside blas.rs: {offenders:?}"
    );
}
