//! Hygiene checks over the workspace's sources, run as ordinary tests (`cargo test -p xtask`);
//! each failure says how to fix it.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, skipping build output and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !(name.starts_with('.') || name == "target" || name == "gpu-bundle") {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() > 10,
        "found only {} .rs files under {}",
        files.len(),
        root.display()
    );
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` module doc; add one line saying what the file is for:\n  {}",
        missing.join("\n  ")
    );
}

/// The `members` of the root Cargo.toml's `[workspace]`, as paths relative to the root; a
/// trailing `/*` glob is expanded to the directories under it that hold a Cargo.toml.
fn workspace_members(root: &Path) -> Vec<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("the root Cargo.toml is readable");
    let mut members = Vec::new();
    let mut in_list = false;
    for line in manifest.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if !in_list {
            in_list = line.starts_with("members") && line.contains('[');
        }
        if in_list {
            members.extend(line.split('"').skip(1).step_by(2).map(str::to_string));
            if line.contains(']') {
                break;
            }
        }
    }
    let mut expanded = Vec::new();
    for member in members {
        let Some(dir) = member.strip_suffix("/*") else {
            expanded.push(member);
            continue;
        };
        let mut found: Vec<String> = std::fs::read_dir(root.join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("Cargo.toml").is_file())
            .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
            .collect();
        found.sort();
        expanded.extend(found);
    }
    expanded
}

/// The `name` of a member's `[package]`.
fn package_name(member_dir: &Path) -> Option<String> {
    let manifest = std::fs::read_to_string(member_dir.join("Cargo.toml")).ok()?;
    let package = manifest.split("[package]").nth(1)?;
    let line = package
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .find(|l| l.split('=').next().is_some_and(|k| k.trim() == "name"))?;
    line.split('"').nth(1).map(str::to_string)
}

/// The section of a Markdown document under the first heading that contains `` `path` ``, up to
/// the next heading of the same or a higher level (its subsections included); `None` if no
/// heading names `path`.
fn section<'a>(doc: &'a str, path: &str) -> Option<&'a str> {
    let tag = format!("`{path}`");
    let level = |line: &str| {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        (hashes > 0 && line[hashes..].starts_with(' ')).then_some(hashes)
    };
    let mut start = None;
    let mut offset = 0;
    let mut fenced = false;
    for line in doc.split_inclusive('\n') {
        let here = offset;
        offset += line.len();
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let Some(l) = level(line).filter(|_| !fenced) else {
            continue;
        };
        match start {
            None if line.contains(&tag) => start = Some((here, l)),
            Some((from, at)) if l <= at => return Some(&doc[from..here]),
            _ => {}
        }
    }
    start.map(|(from, _)| &doc[from..])
}

/// The inline code spans of Markdown text (between single backticks), fenced blocks left out.
fn code_spans(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// Whether a code span names the file `file` of module `module`: `module`, `file`, a path ending
/// in `/file` or `::module`.
fn names(span: &str, module: &str, file: &str) -> bool {
    span == module || span == file || span.ends_with(&format!("/{file}")) || span.ends_with(&format!("::{module}"))
}

/// Every file under `dir` (recursively) whose name ends with one of `suffixes`.
fn files_ending(dir: &Path, suffixes: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            files_ending(&path, suffixes, out);
        } else if suffixes.iter().any(|s| name.ends_with(s)) {
            out.push(path);
        }
    }
}

#[test]
fn architecture_md_names_every_crate_module_and_kernel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md is readable");
    let members = workspace_members(&root);
    assert!(
        members.len() > 5,
        "found only {} workspace members in the root Cargo.toml ({members:?}); fix workspace_members in xtask/src/tidy.rs",
        members.len()
    );
    let mut missing = Vec::new();
    for member in &members {
        let dir = root.join(member);
        match package_name(&dir) {
            Some(name) if !doc.contains(&format!("`{name}`")) => {
                missing.push(format!("crate `{name}` ({member}): its package name in backticks"));
            }
            Some(_) => {}
            None => missing.push(format!(
                "{member}/Cargo.toml: no [package] name (is the member list right?)"
            )),
        }
        let Some(text) = section(&doc, member) else {
            missing.push(format!(
                "{member}: a code-map heading naming it, such as \"### `{member}`\""
            ));
            continue;
        };
        let spans = code_spans(text);
        let mut sources = Vec::new();
        files_ending(&dir.join("src"), &[".rs"], &mut sources);
        sources.sort();
        for file in sources {
            let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name == "lib.rs" || name == "main.rs" {
                continue;
            }
            let module = if name == "mod.rs" {
                file.parent()
                    .and_then(Path::file_name)
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            } else {
                name.trim_end_matches(".rs").to_string()
            };
            if !spans.iter().any(|s| names(s, &module, &name)) {
                let rel = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
                missing.push(format!("{rel}: module `{module}` in the `{member}` section"));
            }
        }
        let mut kernels = Vec::new();
        files_ending(&dir.join("kernels"), &[".cu", ".cuh"], &mut kernels);
        kernels.sort();
        for file in kernels {
            let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if !spans.iter().any(|s| names(s, &name, &name)) {
                let rel = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
                missing.push(format!("{rel}: kernel file `{name}` in the `{member}` section"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md does not describe these parts of the workspace; describe each in its code map \
         (a heading naming the member's path in backticks, and under it every `src/` module as `name` or \
         `name.rs` and every kernel file as `file.cu`):\n  {}",
        missing.join("\n  ")
    );
}
