//! Holds lb-agent's imports one way: no cycle between modules, and the top-level modules in layers.
//!
//! Reads `src/` with `syn` and collects every path that names something of the crate (`use crate::..`,
//! `super::..`, paths in code and inside macro calls), resolved to the file that defines it (following `pub use`
//! re-exports). Then, at every level of the module tree, the children of one module (a child folder counts as one
//! node with everything under it) must not import each other in a cycle. A folder's own root file (`mod.rs`) is
//! its facade, not a node: it declares, composes and re-exports its children, and they may use the items it
//! defines. Test code (`#[cfg(test)]`, `cfg(any(test, ..))`) is left out: nothing in the agent depends on it.
//!
//! The top-level modules must also keep to [`LAYERS`]: a module imports only from layers below its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// lb-agent's top-level modules, lowest first. A module may import from the layers before its own only.
const LAYERS: &[&[&str]] = &[
    // Leaves: plain values, pure Maglev, the host's interfaces and capabilities; the build's identity, the
    // conntrack keeper table beside kube-proxy and the rendering of the deployment's objects, which import
    // nothing of the crate.
    &[
        "state",
        "maglev",
        "host",
        "build_info",
        "netfilter_keeper",
        "install",
    ],
    // The pure translation and its vocabulary.
    &["model"],
    // Where objects come from (manifests, the API server), producing the model's vocabulary.
    &["source"],
    // The kernel side: load, attach, every map writer, the read-only views.
    &["datapath"],
    // Health, metrics (reading the maps), the config file.
    &["ops"],
    // A private datapath load for `trace`.
    &["trace"],
    // The daemon.
    &["agent"],
    // The command line.
    &["cli"],
];

type ModPath = Vec<String>;

/// One source file: its module path and what it was parsed into.
struct SourceFile {
    path: PathBuf,
    module: ModPath,
    ast: syn::File,
}

fn is_test_cfg(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| tokens_have_ident(l.tokens.clone(), "test"))
    })
}

fn tokens_have_ident(tokens: TokenStream, name: &str) -> bool {
    tokens.into_iter().any(|t| match t {
        TokenTree::Ident(i) => i == name,
        TokenTree::Group(g) => tokens_have_ident(g.stream(), name),
        _ => false,
    })
}

/// Every `.rs` file under `src/` (but `main.rs`, the binary) with its module path.
fn source_files(src: &Path) -> Vec<SourceFile> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading src/") {
            let path = entry.expect("reading src/").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src/");
            let mut module: ModPath = rel
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                Some("main") if module.len() == 1 => continue,
                Some("lib") if module.len() == 1 => module.clear(),
                Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            let text = std::fs::read_to_string(&path).expect("reading a source file");
            let ast = syn::parse_file(&text)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            out.push(SourceFile { path, module, ast });
        }
    }
    out.sort_by(|a, b| a.module.cmp(&b.module));
    out
}

/// Modules declared `#[cfg(test)] mod x;` (and everything under them).
fn test_only_modules(files: &[SourceFile]) -> BTreeSet<ModPath> {
    let mut out = BTreeSet::new();
    for f in files {
        for item in &f.ast.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
                && is_test_cfg(&m.attrs)
            {
                let mut p = f.module.clone();
                p.push(m.ident.to_string());
                out.insert(p);
            }
        }
    }
    out
}

/// One `use` leaf: the name it brings in scope and the path it names (relative as written).
fn use_leaves(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let name = n.ident.to_string();
            let mut path = prefix.clone();
            if name == "self" {
                let last = path.last().cloned().unwrap_or_default();
                out.push((last, path));
            } else {
                path.push(name.clone());
                out.push((name, path));
            }
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix.clone();
            if r.ident != "self" {
                path.push(r.ident.to_string());
            }
            out.push((r.rename.to_string(), path));
        }
        // A glob names the module it reads from.
        syn::UseTree::Glob(_) => out.push((String::new(), prefix.clone())),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, out);
            }
        }
    }
}

/// Collects the crate paths one file names, outside test code, as absolute module paths.
struct Collector<'a> {
    /// The module the code being visited is in (the file's, plus inline `mod`s).
    module: ModPath,
    modules: &'a BTreeSet<ModPath>,
    paths: Vec<ModPath>,
    /// `pub use` leaves: (module, name) -> absolute path.
    reexports: Vec<(ModPath, String, ModPath)>,
}

impl Collector<'_> {
    /// Makes a written path absolute: `crate::`, `super::`, `self::`, or a child module of the current module.
    /// `None` for a path outside the crate (another crate, a local name, a prelude item).
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let first = segments.first()?;
        let mut base = self.module.clone();
        let mut rest = segments;
        match first.as_str() {
            "crate" => {
                base.clear();
                rest = &segments[1..];
            }
            "self" => rest = &segments[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            _ => {
                let mut child = base.clone();
                child.push(first.clone());
                if !self.modules.contains(&child) {
                    return None;
                }
            }
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn add(&mut self, segments: &[String]) {
        if let Some(p) = self.absolute(segments) {
            self.paths.push(p);
        }
    }

    /// Paths inside a macro call's tokens (`tracing::info!`, `tokio::select!`): `crate :: a :: b` or `super :: a`.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let flat: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < flat.len() {
            match &flat[i] {
                TokenTree::Group(g) => self.scan_tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" || id == "super" => {
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    while j + 2 < flat.len() + 1 {
                        let colons = matches!((flat.get(j), flat.get(j + 1)), (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':');
                        match (colons, flat.get(j + 2)) {
                            (true, Some(TokenTree::Ident(next))) => {
                                segments.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    self.add(&segments);
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            syn::Item::Macro(i) => &i.attrs,
            _ => &[],
        };
        if is_test_cfg(attrs) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if let Some((_, items)) = &m.content {
            self.module.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut leaves = Vec::new();
        use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
        let public = !matches!(u.vis, syn::Visibility::Inherited);
        for (name, path) in leaves {
            let Some(abs) = self.absolute(&path) else {
                continue;
            };
            if public && !name.is_empty() {
                self.reexports
                    .push((self.module.clone(), name, abs.clone()));
            }
            self.paths.push(abs);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(&segments);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.scan_tokens(m.tokens.clone());
    }

    fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
        // `#[arg(value_parser = super::args::parse_cidr_arg)]` names code too.
        if let syn::Meta::List(l) = &a.meta {
            self.scan_tokens(l.tokens.clone());
        }
    }
}

/// The file a path lands in: the longest module prefix that is a file, following `pub use` re-exports.
fn resolve(
    path: &[String],
    files: &BTreeSet<ModPath>,
    reexports: &BTreeMap<(ModPath, String), ModPath>,
    depth: usize,
) -> Option<ModPath> {
    let len = (0..=path.len())
        .rev()
        .find(|&n| files.contains(&path[..n].to_vec()))?;
    let module = path[..len].to_vec();
    if let Some(next) = path.get(len)
        && depth < 8
        && let Some(target) = reexports.get(&(module.clone(), next.clone()))
    {
        let mut followed = target.clone();
        followed.extend(path[len + 1..].iter().cloned());
        if followed != path {
            return resolve(&followed, files, reexports, depth + 1);
        }
    }
    Some(module)
}

/// Every import edge between two files, with the files' paths for the message.
fn edges(src: &Path) -> (BTreeSet<(ModPath, ModPath)>, BTreeMap<ModPath, PathBuf>) {
    let files = source_files(src);
    let test_only = test_only_modules(&files);
    let files: Vec<SourceFile> = files
        .into_iter()
        .filter(|f| !test_only.iter().any(|t| f.module.starts_with(t)))
        .collect();
    let modules: BTreeSet<ModPath> = files.iter().map(|f| f.module.clone()).collect();
    let mut reexports = BTreeMap::new();
    let mut raw = Vec::new();
    for f in &files {
        let mut c = Collector {
            module: f.module.clone(),
            modules: &modules,
            paths: Vec::new(),
            reexports: Vec::new(),
        };
        for item in &f.ast.items {
            c.visit_item(item);
        }
        for (m, name, target) in c.reexports {
            reexports.insert((m, name), target);
        }
        raw.push((f.module.clone(), c.paths));
    }
    let mut out = BTreeSet::new();
    for (from, paths) in raw {
        for p in paths {
            if let Some(to) = resolve(&p, &modules, &reexports, 0)
                && to != from
            {
                out.insert((from.clone(), to));
            }
        }
    }
    let names = files.into_iter().map(|f| (f.module, f.path)).collect();
    (out, names)
}

/// The groups of nodes of `graph` that reach each other (strongly connected components of more than one node).
fn tangles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reach = |from: &str, edges: &dyn Fn(&str) -> Vec<String>| {
        let mut seen = BTreeSet::from([from.to_owned()]);
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            for m in edges(&n) {
                if seen.insert(m.clone()) {
                    todo.push(m);
                }
            }
        }
        seen
    };
    let forward = |n: &str| graph.get(n).into_iter().flatten().cloned().collect();
    let backward = |n: &str| {
        graph
            .iter()
            .filter(|(_, to)| to.contains(n))
            .map(|(from, _)| from.clone())
            .collect()
    };
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in graph.keys() {
        if done.contains(n) {
            continue;
        }
        let group: BTreeSet<String> = reach(n, &forward)
            .intersection(&reach(n, &backward))
            .cloned()
            .collect();
        done.extend(group.iter().cloned());
        if group.len() > 1 {
            out.push(group);
        }
    }
    out
}

/// The cycles among the children of each module, described for the failure message.
fn cycles(edges: &BTreeSet<(ModPath, ModPath)>, names: &BTreeMap<ModPath, PathBuf>) -> Vec<String> {
    let parents: BTreeSet<ModPath> = names
        .keys()
        .flat_map(|m| (0..m.len()).map(|n| m[..n].to_vec()))
        .collect();
    let mut out = Vec::new();
    for parent in parents {
        let depth = parent.len();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut witness: BTreeMap<(String, String), (ModPath, ModPath)> = BTreeMap::new();
        for (a, b) in edges {
            if a.len() > depth
                && b.len() > depth
                && a.starts_with(&parent)
                && b.starts_with(&parent)
                && a[depth] != b[depth]
            {
                graph
                    .entry(a[depth].clone())
                    .or_default()
                    .insert(b[depth].clone());
                witness
                    .entry((a[depth].clone(), b[depth].clone()))
                    .or_insert_with(|| (a.clone(), b.clone()));
            }
        }
        for group in tangles(&graph) {
            let steps: Vec<String> = witness
                .iter()
                .filter(|((a, b), _)| group.contains(a) && group.contains(b))
                .map(|(_, (a, b))| format!("{} -> {}", names[a].display(), names[b].display()))
                .collect();
            out.push(format!(
                "in `crate::{}`: {} import each other ({})",
                parent.join("::"),
                group.into_iter().collect::<Vec<_>>().join(", "),
                steps.join(", ")
            ));
        }
    }
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_import_cycle_between_modules() {
    let (edges, names) = edges(&src_dir());
    assert!(
        edges.len() > 50,
        "only {} import edges found: the scanner is broken",
        edges.len()
    );
    let found = cycles(&edges, &names);
    assert!(
        found.is_empty(),
        "import cycles (make one side depend on the other only):\n{}",
        found.join("\n")
    );
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let (edges, names) = edges(&src_dir());
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let mut wrong = BTreeSet::new();
    for top in names.keys().filter_map(|m| m.first()) {
        assert!(
            layer(top).is_some(),
            "module `{top}` is in no layer: add it to LAYERS in {}",
            file!()
        );
    }
    for (a, b) in &edges {
        let (Some(ta), Some(tb)) = (a.first(), b.first()) else {
            continue;
        };
        if ta != tb && layer(ta) <= layer(tb) {
            wrong.insert(format!(
                "{} ({ta}) imports {} ({tb})",
                names[a].display(),
                names[b].display()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers (lowest first: {LAYERS:?}):\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The scanner itself: it must see the cycles this test exists to catch.
#[test]
fn the_scanner_finds_a_planted_cycle() {
    let dir = std::env::temp_dir().join(format!("lb-module-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).expect("temp dir");
    let write = |p: &str, s: &str| std::fs::write(dir.join(p), s).expect("write");
    write("lib.rs", "pub mod a;\npub mod b;\n");
    write(
        "a.rs",
        "pub fn f() { tracing::info!(x = crate::b::g()); }\n",
    );
    write(
        "b/mod.rs",
        "mod g;\nmod h;\npub use g::g;\n#[cfg(test)]\nmod t { use crate::a::f; }\n",
    );
    write("b/g.rs", "pub fn g() -> u32 { super::h::H }\n");
    write(
        "b/h.rs",
        "pub const H: u32 = 1;\nfn k() { crate::a::f() }\n",
    );
    let (edges, names) = edges(&dir);
    let found = cycles(&edges, &names);
    let _ = std::fs::remove_dir_all(&dir);
    // a -> b (through the macro and b's re-export of g) and b/h -> a: a cycle at the top; none inside b.
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("in `crate::`: a, b import each other"),
        "{found:?}"
    );
}
