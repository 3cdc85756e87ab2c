//! The crate's structure, kept by a test: the layers of docs/ARCHITECTURE.md,
//! no import cycles between files, the engine crates named only by their
//! engine, and files small enough to read.
//!
//! It reads src/ itself with a small lexer (comments, doc comments, strings
//! and chars skipped) rather than a parser crate: `use` trees (nested groups,
//! `self`, `as`, globs), inline `crate::`/`super::`/`self::` paths and paths
//! through a child module are resolved, and each one is an edge to the
//! longest module prefix that is a file of the tree.
//!
//! `cargo test --test layers -- --nocapture` prints the layer table, the
//! module graph and the file sizes. The graph and cycles of any tree, an old
//! layout without layer folders included:
//! `PORTAL_LAYERS_SRC=/tmp/before/src cargo test --test layers print_graph -- --ignored --nocapture`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

/// Top-level module → layer, bottom first: a module may import only its own
/// layer or lower. The crate root (lib.rs) and the binary (main.rs) are
/// [`TOP`]. A new top-level module needs a line here and in
/// docs/ARCHITECTURE.md.
const LAYERS: &[(&str, u8, &str)] = &[
    (
        "domain",
        0,
        "ids, roles, every permission rule, merge patch, the error enum",
    ),
    ("config", 0, "the settings"),
    (
        "protocol",
        1,
        "tokens, inbound parsing, every outbound message",
    ),
    (
        "store",
        2,
        "the Store and Admin traits, the SQLite and PostgreSQL engines, the storage threads",
    ),
    (
        "core",
        3,
        "the live server: hub, writer, sessions, revocation, metrics",
    ),
    (
        "broker",
        4,
        "committed changes to and from the other nodes (Redis)",
    ),
    ("engines", 5, "picks the store and broker engines"),
    (
        "http",
        6,
        "accept loop, routes, REST, WebSocket, SSE, pages",
    ),
    ("cli", 7, "the command line"),
];

/// The layer of lib.rs and main.rs, which may import anything.
const TOP: u8 = 8;

/// Rule (d): a file over this many lines fails; the target is [`TARGET_LINES`].
const MAX_LINES: usize = 700;
const TARGET_LINES: usize = 500;

/// Rule (c): crates only one engine file may name (the file itself, or a
/// folder of that name if it is ever split), and why.
const ENGINE_CRATES: &[(&[&str], &[&str], &str)] = &[
    (
        &["rusqlite", "r2d2_sqlite"],
        &["store/sqlite"],
        "SQLite belongs to the store engine: go through the `store::Store`/`Admin` traits",
    ),
    (
        &["postgres", "r2d2_postgres"],
        &["store/postgres"],
        "PostgreSQL belongs to the store engine: go through the `store::Store`/`Admin` traits",
    ),
    (
        &["r2d2"],
        &["store/sqlite", "store/postgres"],
        "the pool belongs to the store engines: go through the `store::Store`/`Admin` traits",
    ),
    (
        &["redis"],
        &["broker/redis"],
        "Redis belongs to the broker engine: go through the `core::broker::Broker` trait",
    ),
];

/// Rule (c): what core, which runs under any transport, never names.
const NOT_IN_CORE: &[&str] = &["warp", "hyper", "hyper_util"];

// ---------------------------------------------------------------------------
// Lexing: only identifiers, `::` and single punctuation survive.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn lex(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Skips a string body from `k` (just past the opening quote) to past the
    // closing quote; `hashes` > 0 or `raw` for raw strings (no escapes).
    let skip_string = |mut k: usize, raw: bool, hashes: usize, line: &mut usize| -> usize {
        while k < c.len() {
            match c[k] {
                '\n' => *line += 1,
                '\\' if !raw => {
                    if at(k + 1) == '\n' {
                        *line += 1;
                    }
                    k += 1;
                }
                '"' if (0..hashes).all(|h| at(k + 1 + h) == '#') => return k + 1 + hashes,
                _ => {}
            }
            k += 1;
        }
        k
    };
    // A raw string whose `r` is at `k - 1`: `k` is at its first `#` or `"`.
    let raw_string = |k: usize, line: &mut usize| -> Option<usize> {
        let mut h = k;
        while at(h) == '#' {
            h += 1;
        }
        (at(h) == '"').then(|| skip_string(h + 1, true, h - k, line))
    };
    // A char literal whose opening quote is at `k`, or `None` for a lifetime.
    let char_literal = |k: usize| -> Option<usize> {
        if at(k + 1) == '\\' {
            let mut e = k + 3;
            while e < c.len() && c[e] != '\'' && c[e] != '\n' {
                e += 1;
            }
            Some(e + 1)
        } else if at(k + 2) == '\'' && at(k + 1) != '\n' {
            Some(k + 3)
        } else {
            None
        }
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(i + 1, false, 0, &mut line);
        } else if ch == '\'' {
            match char_literal(i) {
                Some(end) => i = end,
                // A lifetime or label: its name is no path.
                None => {
                    i += 1;
                    while i < c.len() && is_ident_continue(c[i]) {
                        i += 1;
                    }
                }
            }
        } else if is_ident_start(ch) {
            let next = at(i + 1);
            let prefixed = match (ch, next) {
                ('b', '\'') => char_literal(i + 1),
                ('b' | 'c', '"') => Some(skip_string(i + 2, false, 0, &mut line)),
                ('b' | 'c', 'r') if matches!(at(i + 2), '"' | '#') => raw_string(i + 2, &mut line),
                ('r', '"') => raw_string(i + 1, &mut line),
                ('r', '#') if matches!(at(i + 2), '"' | '#') => raw_string(i + 1, &mut line),
                _ => None,
            };
            if let Some(end) = prefixed {
                i = end;
                continue;
            }
            // `r#type` is the identifier `type`.
            let start = if ch == 'r' && next == '#' { i + 2 } else { i };
            let mut end = start;
            while end < c.len() && is_ident_continue(c[end]) {
                end += 1;
            }
            out.push(Token {
                tok: Tok::Ident(c[start..end].iter().collect()),
                line,
            });
            i = end;
        } else if ch.is_ascii_digit() {
            while i < c.len() && is_ident_continue(c[i]) {
                i += 1;
            }
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::Sep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The tree: files, their modules, and what each imports.

type Module = Vec<String>;

struct SrcFile {
    /// Relative to the source root, `/`-separated: `core/hub/mod.rs`.
    rel: String,
    /// As printed: `src/core/hub/mod.rs`.
    shown: String,
    /// `[]` for lib.rs; `["main"]` for the binary.
    module: Module,
    /// main.rs (or src/bin/*): a crate of its own that names the library as
    /// `portal_sync::`.
    bin: bool,
    lines: usize,
    tokens: Vec<Token>,
}

impl SrcFile {
    fn new(shown: &str, rel: &str, text: &str) -> SrcFile {
        let (module, bin) = module_of(rel);
        SrcFile {
            rel: rel.into(),
            shown: shown.into(),
            module,
            bin,
            lines: text.lines().count(),
            tokens: lex(text),
        }
    }

    fn node(&self) -> String {
        name(&self.module)
    }
}

/// One crate path a file names.
#[derive(Debug, Clone)]
struct Import {
    /// The module it lands in: the longest prefix of the path that is a file.
    to: Module,
    line: usize,
    /// The path as written, `super::` and all.
    written: String,
}

#[derive(Default)]
struct Scan {
    imports: Vec<Import>,
    /// First segments of paths that are not the crate's (extern crates,
    /// `std`, local items), with their lines.
    named: Vec<(String, usize)>,
}

struct Tree {
    files: Vec<SrcFile>,
    scans: Vec<Scan>,
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

fn rank(node: &str) -> Option<u8> {
    let top = node.split("::").next().unwrap_or(node);
    match top {
        "crate" | "main" | "bin" => Some(TOP),
        _ => LAYERS.iter().find(|(m, ..)| *m == top).map(|&(_, r, _)| r),
    }
}

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

fn module_of(rel: &str) -> (Module, bool) {
    let parts: Vec<&str> = rel.split('/').collect();
    let (file, dirs) = parts.split_last().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    let dirs: Module = dirs.iter().map(|d| d.to_string()).collect();
    match (dirs.as_slice(), stem) {
        ([], "lib") => (Vec::new(), false),
        ([], "main") => (vec!["main".into()], true),
        ([bin], _) if bin == "bin" => (vec!["bin".into(), stem.into()], true),
        (_, "mod") => (dirs, false),
        _ => {
            let mut module = dirs;
            module.push(stem.into());
            (module, false)
        }
    }
}

impl Tree {
    fn read(root: &Path) -> Tree {
        let mut paths = Vec::new();
        rs_files(root, &mut paths);
        paths.sort();
        let top = root
            .file_name()
            .map_or("src".into(), |n| n.to_string_lossy().into_owned());
        let files = paths
            .iter()
            .map(|path| {
                let rel = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let text = fs::read_to_string(path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                SrcFile::new(&format!("{top}/{rel}"), &rel, &text)
            })
            .collect();
        Tree::of(files)
    }

    fn of(files: Vec<SrcFile>) -> Tree {
        let modules: BTreeSet<Module> = files
            .iter()
            .filter(|f| !f.bin)
            .map(|f| f.module.clone())
            .collect();
        let collected: Vec<Collected> = files.iter().map(collect).collect();
        let mut facades: BTreeMap<Module, Facade> = BTreeMap::new();
        for (file, c) in files.iter().zip(&collected) {
            // The crate root is no facade: below it, `crate::Error` names lib.rs.
            if file.bin || file.module.is_empty() {
                continue;
            }
            for found in &c.found {
                if let Found::Use {
                    segs,
                    bound,
                    current,
                    public: true,
                    top: true,
                    ..
                } = found
                {
                    let Some(path) = resolve(file, current, segs, &modules) else {
                        continue;
                    };
                    if path.len() > file.module.len() && path.starts_with(&file.module) {
                        let facade = facades.entry(file.module.clone()).or_default();
                        match bound {
                            Some(b) => {
                                facade.names.insert(b.clone(), path);
                            }
                            None => facade.globs.push(path),
                        }
                    }
                }
            }
        }
        let items: BTreeMap<Module, BTreeSet<String>> = files
            .iter()
            .zip(&collected)
            .map(|(f, c)| (f.module.clone(), c.items.clone()))
            .collect();
        let map = Map {
            modules,
            facades,
            items,
        };
        let scans = files
            .iter()
            .zip(&collected)
            .map(|(f, c)| scan(f, c, &map))
            .collect();
        Tree { files, scans }
    }

    /// Module → module → the imports that make the edge (self-edges left out).
    fn graph(&self) -> BTreeMap<String, BTreeMap<String, Vec<(usize, Import)>>> {
        let mut graph: BTreeMap<String, BTreeMap<String, Vec<(usize, Import)>>> = BTreeMap::new();
        for (f, file) in self.files.iter().enumerate() {
            let edges = graph.entry(file.node()).or_default();
            for import in &self.scans[f].imports {
                edges
                    .entry(name(&import.to))
                    .or_default()
                    .push((f, import.clone()));
            }
        }
        graph
    }

    fn at(&self, f: usize, import: &Import) -> String {
        format!("{}:{}", self.files[f].shown, import.line)
    }
}

/// A module that re-exports its own descendants' items (`pub use
/// child::Item;`, `pub use child::*;` in a mod.rs). Such a re-export is no
/// edge of its own (like `mod child;`), and a path through it lands where the
/// item is defined: else a facade and a child that uses the facade's own
/// items would be a false cycle, and every user of the facade would hide
/// which file it needs.
#[derive(Default)]
struct Facade {
    /// Bound name → the path it re-exports.
    names: BTreeMap<String, Module>,
    /// Paths re-exported with `*`.
    globs: Vec<Module>,
}

/// What resolution needs of the whole tree.
struct Map {
    modules: BTreeSet<Module>,
    facades: BTreeMap<Module, Facade>,
    /// The names each file defines or re-exports at its top level.
    items: BTreeMap<Module, BTreeSet<String>>,
}

impl Map {
    /// The longest prefix of `path` that is a file.
    fn prefix(&self, path: &[String]) -> Module {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| self.modules.contains(m))
            .unwrap_or_default()
    }

    /// The module a crate path lands in: its longest file prefix, followed
    /// through facades to where the item is defined.
    fn land(&self, path: &[String]) -> Module {
        let mut path = path.to_vec();
        for _ in 0..8 {
            let at = self.prefix(&path);
            let (Some(item), Some(facade)) = (path.get(at.len()), self.facades.get(&at)) else {
                return at;
            };
            let rest = &path[at.len() + 1..];
            let next = match facade.names.get(item) {
                Some(target) => Some(target.clone()),
                None => facade.globs.iter().find_map(|g| {
                    let defines = self
                        .items
                        .get(&self.prefix(g))
                        .is_some_and(|i| i.contains(item));
                    defines.then(|| {
                        let mut p = g.clone();
                        p.push(item.clone());
                        p
                    })
                }),
            };
            let Some(mut next) = next else {
                return at;
            };
            next.extend(rest.iter().cloned());
            path = next;
        }
        self.prefix(&path)
    }
}

/// What one pass over a file's tokens found, before resolution.
enum Found {
    /// A `use` leaf and the name it binds (`None` for a glob); `public` for
    /// `pub use` (any `pub(…)`), `top` outside inline modules and blocks.
    Use {
        segs: Vec<String>,
        bound: Option<String>,
        line: usize,
        current: Module,
        public: bool,
        top: bool,
    },
    /// A path outside `use`: `crate::a::b`, `super::x`, `child::y`, `redis::cmd`.
    Path {
        segs: Vec<String>,
        line: usize,
        current: Module,
    },
}

struct Collected {
    found: Vec<Found>,
    items: BTreeSet<String>,
}

fn tok(t: &[Token], k: usize) -> Option<&Tok> {
    t.get(k).map(|t| &t.tok)
}

/// Reads a use tree at `k` (after `use`, or inside a group) into its leaves.
fn use_tree(
    t: &[Token],
    k: &mut usize,
    prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, Option<String>, usize)>,
) {
    let mut segs = prefix;
    let line = t.get(*k).map_or(0, |x| x.line);
    if tok(t, *k) == Some(&Tok::Sep) {
        // `::name` is an extern crate, never ours.
        segs.push("::".into());
        *k += 1;
    }
    loop {
        match tok(t, *k) {
            Some(Tok::Ident(s)) => {
                segs.push(s.clone());
                *k += 1;
                if tok(t, *k) == Some(&Tok::Sep) {
                    *k += 1;
                    continue;
                }
                break;
            }
            Some(Tok::Punct('{')) => {
                *k += 1;
                loop {
                    match tok(t, *k) {
                        None => return,
                        Some(Tok::Punct('}')) => {
                            *k += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *k += 1,
                        Some(_) => {
                            let before = *k;
                            use_tree(t, k, segs.clone(), out);
                            if *k == before {
                                *k += 1;
                            }
                        }
                    }
                }
            }
            Some(Tok::Punct('*')) => {
                *k += 1;
                out.push((segs, None, line));
                return;
            }
            _ => break,
        }
    }
    let mut bound = segs.last().cloned();
    if tok(t, *k) == Some(&Tok::Ident("as".into())) {
        if let Some(Tok::Ident(alias)) = tok(t, *k + 1) {
            bound = Some(alias.clone());
        }
        *k += 2;
    }
    if segs.last().is_some_and(|s| s == "self") {
        segs.pop();
        if bound.as_deref() == Some("self") {
            bound = segs.last().cloned();
        }
    }
    if !segs.is_empty() {
        out.push((segs, bound, line));
    }
}

/// The keywords whose next identifier is an item a module defines.
const ITEM_KEYWORDS: &[&str] = &[
    "fn",
    "struct",
    "enum",
    "trait",
    "type",
    "const",
    "static",
    "union",
    "mod",
    "macro_rules",
];

/// One pass over a file's tokens: its `use` leaves, its other paths, and
/// the names it defines at its top level.
fn collect(file: &SrcFile) -> Collected {
    let t = &file.tokens;
    let mut found = Vec::new();
    let mut items = BTreeSet::new();
    // Inline `mod name { … }` blocks: their name and the brace depth inside.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let current = |inline: &[(String, usize)]| -> Module {
        let mut m = file.module.clone();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    let mut k = 0;
    while k < t.len() {
        let path_start = k == 0 || !matches!(tok(t, k - 1), Some(Tok::Sep | Tok::Punct('.')));
        match &t[k].tok {
            Tok::Punct('{') => {
                depth += 1;
                k += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|&(_, d)| d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                k += 1;
            }
            Tok::Ident(w) if w == "mod" && path_start => {
                if let (Some(Tok::Ident(name)), Some(Tok::Punct('{'))) =
                    (tok(t, k + 1), tok(t, k + 2))
                {
                    if depth == 0 {
                        items.insert(name.clone());
                    }
                    depth += 1;
                    inline.push((name.clone(), depth));
                    k += 3;
                } else {
                    if let (0, Some(Tok::Ident(name))) = (depth, tok(t, k + 1)) {
                        items.insert(name.clone());
                    }
                    k += 1;
                }
            }
            Tok::Ident(w) if w == "use" && path_start => {
                let public = is_public(t, k);
                k += 1;
                let mut leaves = Vec::new();
                use_tree(t, &mut k, Vec::new(), &mut leaves);
                while k < t.len() && !matches!(tok(t, k), Some(Tok::Punct(';' | '}'))) {
                    k += 1;
                }
                let here = current(&inline);
                for (segs, bound, line) in leaves {
                    if let (0, true, Some(b)) = (depth, public, &bound) {
                        items.insert(b.clone());
                    }
                    found.push(Found::Use {
                        segs,
                        bound,
                        line,
                        current: here.clone(),
                        public,
                        top: depth == 0,
                    });
                }
            }
            Tok::Ident(first) if path_start && tok(t, k + 1) == Some(&Tok::Sep) => {
                let line = t[k].line;
                let mut segs = vec![first.clone()];
                k += 1;
                while tok(t, k) == Some(&Tok::Sep) {
                    match tok(t, k + 1) {
                        Some(Tok::Ident(s)) => {
                            segs.push(s.clone());
                            k += 2;
                        }
                        _ => break,
                    }
                }
                found.push(Found::Path {
                    segs,
                    line,
                    current: current(&inline),
                });
            }
            Tok::Ident(w) if depth == 0 && ITEM_KEYWORDS.contains(&w.as_str()) => {
                // `macro_rules! name`
                let at = if tok(t, k + 1) == Some(&Tok::Punct('!')) {
                    k + 2
                } else {
                    k + 1
                };
                if let Some(Tok::Ident(name)) = tok(t, at) {
                    items.insert(name.clone());
                }
                k += 1;
            }
            _ => k += 1,
        }
    }
    Collected { found, items }
}

/// Whether the `use` at `k` is `pub` or `pub(…)`.
fn is_public(t: &[Token], k: usize) -> bool {
    let Some(before) = k.checked_sub(1) else {
        return false;
    };
    match tok(t, before) {
        Some(Tok::Ident(w)) => w == "pub",
        Some(Tok::Punct(')')) => (0..before)
            .rev()
            .find(|&j| tok(t, j) == Some(&Tok::Punct('(')))
            .and_then(|j| j.checked_sub(1))
            .is_some_and(|j| tok(t, j) == Some(&Tok::Ident("pub".into()))),
        _ => false,
    }
}

/// The crate path `segs` names from `current` (inline modules included), or
/// `None` when it is not the crate's (an extern crate, `std`, a local item).
fn resolve(
    file: &SrcFile,
    current: &Module,
    segs: &[String],
    modules: &BTreeSet<Module>,
) -> Option<Module> {
    let (first, rest) = segs.split_first()?;
    let mut path = match first.as_str() {
        "portal_sync" if file.bin => Vec::new(),
        _ if file.bin => return None,
        "crate" => Vec::new(),
        "self" => current.clone(),
        "super" => {
            let mut m = current.clone();
            m.pop();
            let mut rest = rest;
            while rest.first().is_some_and(|s| s == "super") {
                m.pop();
                rest = &rest[1..];
            }
            m.extend(rest.iter().cloned());
            return Some(m);
        }
        // Uniform paths: a child module's name starts a path of its own.
        child => {
            let mut m = current.clone();
            m.push(child.to_string());
            if !modules.contains(&m) {
                return None;
            }
            m
        }
    };
    path.extend(rest.iter().cloned());
    Some(path)
}

fn scan(file: &SrcFile, collected: &Collected, map: &Map) -> Scan {
    let mut out = Scan::default();
    let edge = |path: &Module, line: usize, segs: &[String], out: &mut Scan| {
        let to = map.land(path);
        if to != file.module || file.bin {
            out.imports.push(Import {
                to,
                line,
                written: segs.join("::"),
            });
        }
    };
    // Names a `use` bound to a path of the crate: `use crate::broker::redis;`
    // makes `redis::Cluster` ours (not the redis crate's), and an edge to
    // where `crate::broker::redis::Cluster` lands.
    let mut ours: BTreeMap<String, Module> = BTreeMap::new();
    for found in &collected.found {
        let Found::Use {
            segs,
            bound,
            line,
            current,
            public,
            top,
        } = found
        else {
            continue;
        };
        match resolve(file, current, segs, &map.modules) {
            Some(path) => {
                if let Some(bound) = bound {
                    ours.insert(bound.clone(), path.clone());
                }
                let facade = *public
                    && *top
                    && !file.module.is_empty()
                    && path.len() > file.module.len()
                    && path.starts_with(&file.module);
                if !facade {
                    edge(&path, *line, segs, &mut out);
                }
            }
            None => {
                let krate = if segs[0] == "::" {
                    segs.get(1)
                } else {
                    segs.first()
                };
                if let Some(krate) = krate {
                    out.named.push((krate.clone(), *line));
                }
            }
        }
    }
    for found in &collected.found {
        let Found::Path {
            segs,
            line,
            current,
        } = found
        else {
            continue;
        };
        let path = resolve(file, current, segs, &map.modules).or_else(|| {
            let mut path = ours.get(&segs[0])?.clone();
            path.extend(segs[1..].iter().cloned());
            Some(path)
        });
        match path {
            Some(path) => edge(&path, *line, segs, &mut out),
            None => out.named.push((segs[0].clone(), *line)),
        }
    }
    out.imports.sort_by_key(|i| i.line);
    out.named.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    out.named.dedup();
    out
}

// ---------------------------------------------------------------------------
// Cycles: strongly connected components (Tarjan), and one cycle in each.

fn components(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

/// A shortest cycle through the component's first module, as a list of
/// modules that starts and ends with it.
fn one_cycle(graph: &BTreeMap<String, BTreeSet<String>>, component: &[String]) -> Vec<String> {
    let members: BTreeSet<&str> = component.iter().map(String::as_str).collect();
    let start = component[0].as_str();
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if w == start {
                let mut path = vec![start.to_string()];
                let mut at = v;
                while at != start {
                    path.push(at.to_string());
                    at = parent[at];
                }
                path.push(start.to_string());
                let last = path.len() - 1;
                path[1..last].reverse();
                return path;
            }
            if members.contains(w) && !parent.contains_key(w) && w != start {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    component.to_vec()
}

fn simple(tree: &Tree) -> BTreeMap<String, BTreeSet<String>> {
    tree.graph()
        .into_iter()
        .map(|(from, edges)| (from, edges.into_keys().collect()))
        .collect()
}

/// Each cycle of the tree, with the import that makes each of its steps.
fn cycle_reports(tree: &Tree) -> Vec<String> {
    let graph = tree.graph();
    let edges = simple(tree);
    components(&edges)
        .iter()
        .map(|component| {
            let cycle = one_cycle(&edges, component);
            let mut text = format!(
                "import cycle among {{{}}}: {}",
                component.join(", "),
                cycle.join(" → ")
            );
            for step in cycle.windows(2) {
                if let Some((f, import)) = graph[&step[0]].get(&step[1]).and_then(|v| v.first()) {
                    text += &format!(
                        "\n    {} → {}: {} `{}`",
                        step[0],
                        step[1],
                        tree.at(*f, import),
                        import.written
                    );
                }
            }
            text
        })
        .collect()
}

fn fail_on(rule: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "\n{rule}\n{} problem(s):\n  {}\n",
        problems.len(),
        problems.join("\n  ")
    );
}

fn under(rel: &str, place: &str) -> bool {
    rel == format!("{place}.rs") || rel.starts_with(&format!("{place}/"))
}

// ---------------------------------------------------------------------------
// The rules.

/// (a) A module imports only its own layer or lower.
#[test]
fn no_import_reaches_up_a_layer() {
    let tree = Tree::read(&source_root());
    let mut problems = Vec::new();
    for (f, file) in tree.files.iter().enumerate() {
        let from = file.node();
        let Some(from_rank) = rank(&from) else {
            problems.push(format!(
                "{}: the top-level module `{}` has no layer: add it to LAYERS in tests/layers.rs \
                 and to docs/ARCHITECTURE.md",
                file.shown, file.module[0]
            ));
            continue;
        };
        // One line per (file, module reached), naming its first import.
        let mut seen: BTreeMap<&Module, (&Import, usize)> = BTreeMap::new();
        for import in &tree.scans[f].imports {
            let up = rank(&name(&import.to)).is_some_and(|r| r > from_rank);
            if up {
                seen.entry(&import.to).or_insert((import, 0)).1 += 1;
            }
        }
        for (to, (import, count)) in seen {
            let to_rank = rank(&name(to)).unwrap_or(TOP);
            let advice = if to.is_empty() {
                "name the item where it is defined (e.g. crate::domain::error::Error), \
                 not through lib.rs's re-export"
            } else {
                "move what is shared down a layer, or have the upper layer hand it in \
                 (a trait in the lower layer, implemented above)"
            };
            let more = match count {
                1 => String::new(),
                n => format!(" (and {} more use(s) of it)", n - 1),
            };
            problems.push(format!(
                "{} imports `{}`{more}: module {} (layer {to_rank}) from {from} (layer \
                 {from_rank}); {advice}",
                tree.at(f, import),
                import.written,
                name(to)
            ));
        }
    }
    fail_on(
        "rule (a), layers: a module may import only its own layer or lower \
         (domain, config < protocol < store < core < broker < engines < http < cli < lib/main)",
        problems,
    );
}

/// (b) No import cycles between files.
#[test]
fn no_import_cycles() {
    let tree = Tree::read(&source_root());
    fail_on(
        "rule (b), no cycles: files must import each other one way only; move what both \
         need into a third file below both",
        cycle_reports(&tree),
    );
}

/// (c) The engines' crates stay in their engine; core stays transport-free.
#[test]
fn engines_and_transports_stay_in_their_files() {
    let tree = Tree::read(&source_root());
    let mut problems = Vec::new();
    for (f, file) in tree.files.iter().enumerate() {
        for (krate, line) in &tree.scans[f].named {
            for (crates, places, why) in ENGINE_CRATES {
                if crates.contains(&krate.as_str())
                    && !places.iter().any(|place| under(&file.rel, place))
                {
                    problems.push(format!(
                        "{}:{line} names `{krate}`, which only src/{}.rs may: {why}",
                        file.shown,
                        places.join(".rs, src/")
                    ));
                }
            }
            if file.module.first().is_some_and(|m| m == "core")
                && NOT_IN_CORE.contains(&krate.as_str())
            {
                problems.push(format!(
                    "{}:{line} names `{krate}`: core runs under any transport and never names \
                     warp or hyper; keep HTTP in src/http",
                    file.shown
                ));
            }
        }
        if file.module.first().is_some_and(|m| m == "core") {
            for import in &tree.scans[f].imports {
                if import.to.first().is_some_and(|m| m == "http") {
                    problems.push(format!(
                        "{} imports `{}`: core never imports crate::http; http calls core, \
                         not the other way round",
                        tree.at(f, import),
                        import.written
                    ));
                }
            }
        }
    }
    fail_on(
        "rule (c), engines: rusqlite only under src/store/sqlite/, postgres only under \
         src/store/postgres/, r2d2 only in those two, redis only in \
         src/broker/redis.rs, and core names neither warp, hyper nor crate::http",
        problems,
    );
}

/// (d) Files small enough to read.
#[test]
fn no_file_is_too_long() {
    let tree = Tree::read(&source_root());
    let problems = tree
        .files
        .iter()
        .filter(|f| f.lines > MAX_LINES)
        .map(|f| {
            format!(
                "{} has {} lines, over the limit of {MAX_LINES} (the target is ~{TARGET_LINES}): \
                 split it by what its parts own",
                f.shown, f.lines
            )
        })
        .collect();
    fail_on("rule (d), file size", problems);
}

// ---------------------------------------------------------------------------
// The printers.

fn print_edges(tree: &Tree, with_ranks: bool) {
    let graph = simple(tree);
    let mut nodes: Vec<&String> = graph.keys().collect();
    if with_ranks {
        nodes.sort_by_key(|n| (rank(n).unwrap_or(u8::MAX), n.as_str()));
    }
    let width = nodes.iter().map(|n| n.len()).max().unwrap_or(0);
    for node in nodes {
        let targets: Vec<String> = graph[node]
            .iter()
            .map(|to| {
                let up =
                    with_ranks && matches!((rank(node), rank(to)), (Some(a), Some(b)) if b > a);
                if up {
                    format!("{to} (UP!)")
                } else {
                    to.clone()
                }
            })
            .collect();
        println!("  {node:width$} → {}", targets.join(", "));
    }
}

fn print_cycles(tree: &Tree) {
    let cycles = cycle_reports(tree);
    if cycles.is_empty() {
        println!("  none");
    }
    for cycle in cycles {
        println!("  {cycle}");
    }
}

fn print_sizes(tree: &Tree) {
    let mut files: Vec<&SrcFile> = tree.files.iter().collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.lines));
    for f in files {
        let note = if f.lines > MAX_LINES {
            "  over the limit"
        } else if f.lines > TARGET_LINES {
            "  over the target"
        } else {
            ""
        };
        println!("  {:5}  {}{note}", f.lines, f.shown);
    }
}

/// The layer table, the module graph and the file sizes of src/; always passes.
#[test]
fn print_layers() {
    let tree = Tree::read(&source_root());
    println!("\nLayers, bottom first (a module may import only its own layer or lower):");
    let mut rows: Vec<(u8, &str, &str)> = LAYERS.iter().map(|&(m, r, d)| (r, m, d)).collect();
    rows.push((TOP, "lib.rs, main.rs", "the crate root and the binary"));
    for (r, top, what) in rows {
        let files: Vec<&SrcFile> = tree
            .files
            .iter()
            .filter(|f| {
                if r == TOP {
                    rank(&f.node()) == Some(TOP)
                } else {
                    f.module.first().is_some_and(|m| m == top)
                }
            })
            .collect();
        let lines: usize = files.iter().map(|f| f.lines).sum();
        println!(
            "  {r}  {top:16} {:2} files {lines:5} lines  {what}",
            files.len()
        );
    }
    println!("\nModule graph (module → what it imports; UP! breaks rule a):");
    print_edges(&tree, true);
    println!("\nCycles:");
    print_cycles(&tree);
    println!("\nFile sizes (limit {MAX_LINES}, target ~{TARGET_LINES}):");
    print_sizes(&tree);
}

/// The edges and cycles of any tree, layered or not: `PORTAL_LAYERS_SRC`
/// (default src/) names its source root.
#[test]
#[ignore = "a printer: run with --ignored --nocapture"]
fn print_graph() {
    let root = std::env::var_os("PORTAL_LAYERS_SRC").map_or_else(source_root, |p| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
        }
    });
    let tree = Tree::read(&root);
    println!(
        "\nModule graph of {} ({} files):",
        root.display(),
        tree.files.len()
    );
    print_edges(&tree, false);
    println!("\nCycles (strongly connected components):");
    print_cycles(&tree);
    println!("\nFile sizes:");
    print_sizes(&tree);
}

// ---------------------------------------------------------------------------
// The reader's own checks.

#[test]
fn the_reader_resolves_use_trees_facades_and_cycles() {
    let x = r##"//! crate::d in a doc comment
use crate::a::{self, Inner as I};
use super::d;
use child::Something;
use ::redis::Cmd;
use crate::e as renamed;
/* crate::d in /* a nested */ block comment */
fn f<'a>(s: &'a str) -> char {
    let _ = "crate::d in a string";
    let _ = r#"crate::d in a "raw" string"#;
    let _ = b"crate::d";
    let _ = self::inner::thing();
    renamed::go();
    crate::e::go();
    rusqlite::Connection::open();
    x.rusqlite::<T>();
    '\''
}
mod tests {
    use super::*;
    use super::super::a::Outer;
}
"##;
    let files = [
        (
            "lib.rs",
            "pub mod a; pub mod d; pub mod e; pub mod x; pub use a::Outer;",
        ),
        ("a/mod.rs", "mod b; pub use b::Inner; pub struct Outer;"),
        (
            "a/b.rs",
            "use super::Outer; pub struct Inner; pub use crate::d::Far;",
        ),
        ("d.rs", "use crate::a::{Inner, Outer}; pub struct Far;"),
        ("e/mod.rs", "mod f; pub use f::*;"),
        ("e/f.rs", "pub fn go() {}"),
        ("x/mod.rs", x),
        ("x/child.rs", ""),
        ("main.rs", "fn main() { portal_sync::x::run(); }"),
    ];
    let tree = Tree::of(
        files
            .iter()
            .map(|(rel, text)| SrcFile::new(&format!("src/{rel}"), rel, text))
            .collect(),
    );
    let x = tree
        .files
        .iter()
        .position(|f| f.rel == "x/mod.rs")
        .expect("x");
    let imports: Vec<(usize, &str, String)> = tree.scans[x]
        .imports
        .iter()
        .map(|i| (i.line, i.written.as_str(), name(&i.to)))
        .collect();
    let expected: Vec<(usize, &str, String)> = [
        (2, "crate::a", "a"),
        (2, "crate::a::Inner", "a::b"),
        (3, "super::d", "d"),
        (4, "child::Something", "x::child"),
        (6, "crate::e", "e"),
        (13, "renamed::go", "e::f"),
        (14, "crate::e::go", "e::f"),
        (21, "super::super::a::Outer", "a"),
    ]
    .into_iter()
    .map(|(l, w, t)| (l, w, t.to_string()))
    .collect();
    assert_eq!(imports, expected);
    let named: Vec<(&str, usize)> = tree.scans[x]
        .named
        .iter()
        .map(|(n, l)| (n.as_str(), *l))
        .filter(|(n, _)| ["redis", "rusqlite", "renamed"].contains(n))
        .collect();
    assert_eq!(named, [("redis", 5), ("rusqlite", 15)]);

    let graph = simple(&tree);
    let edges = |m: &str| -> Vec<&str> { graph[m].iter().map(String::as_str).collect() };
    assert_eq!(edges("crate"), ["a"]);
    assert!(edges("a").is_empty(), "a facade's re-exports are no edges");
    assert_eq!(edges("a::b"), ["a", "d"]);
    assert_eq!(edges("main"), ["x"]);
    let cycles = components(&graph);
    assert_eq!(cycles, [["a::b", "d"]]);
    assert_eq!(one_cycle(&graph, &cycles[0]), ["a::b", "d", "a::b"]);
}
