//! `cargo xtask matrix-doc`: the capability matrix rendered from the backends' records, printed
//! or spliced into README.md between the markers; a test keeps README.md's copy current.

use std::path::PathBuf;
use std::process::ExitCode;

use moe_a2a::Registry;

use crate::flags::MatrixDoc;

/// The line before the generated table in README.md.
pub const START: &str = "<!-- capability-matrix:start -->";
/// The line after the generated table in README.md.
pub const END: &str = "<!-- capability-matrix:end -->";

/// The workspace's README.md.
pub fn readme_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("README.md")
}

/// The byte range between the markers (a newline, then the table).
fn block_range(readme: &str) -> Result<std::ops::Range<usize>, String> {
    let start = readme
        .find(START)
        .ok_or_else(|| format!("README.md has no `{START}` marker"))?
        + START.len();
    let end = readme[start..]
        .find(END)
        .ok_or_else(|| format!("README.md has no `{END}` marker after `{START}`"))?
        + start;
    Ok(start..end)
}

/// The text between the markers.
pub fn current_block(readme: &str) -> Result<&str, String> {
    Ok(&readme[block_range(readme)?])
}

/// What belongs between the markers for `table`.
pub fn block(table: &str) -> String {
    format!("\n{table}")
}

/// `readme` with the text between the markers replaced by `table`.
pub fn splice(readme: &str, table: &str) -> Result<String, String> {
    let r = block_range(readme)?;
    Ok(format!("{}{}{}", &readme[..r.start], block(table), &readme[r.end..]))
}

/// Runs the subcommand.
pub fn run(flags: &MatrixDoc, registry: &Registry) -> Result<ExitCode, String> {
    let table = registry.render_matrix();
    if !flags.write {
        print!("{table}");
        return Ok(ExitCode::SUCCESS);
    }
    let path = readme_path();
    let readme = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if current_block(&readme)? == block(&table) {
        eprintln!("README.md: capability matrix already up to date");
    } else {
        let updated = splice(&readme, &table)?;
        std::fs::write(&path, updated).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("README.md: capability matrix updated");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_holds_the_current_capability_matrix() {
        let readme = std::fs::read_to_string(readme_path()).expect("README.md at the workspace root");
        let want = block(&moe_a2a::registry().render_matrix());
        let got = current_block(&readme)
            .unwrap_or_else(|e| panic!("{e}; run `cargo xtask matrix-doc --write` and commit README.md"));
        assert!(
            got == want,
            "the capability matrix in README.md is out of date; run `cargo xtask matrix-doc --write` and commit README.md\n\
             --- README.md ---{got}--- rendered from the registry ---{want}"
        );
    }

    #[test]
    fn splice_replaces_only_the_block() {
        let readme = format!("intro\n{START}\nold | table\n{END}\noutro\n");
        let new = splice(&readme, "| a |\n").unwrap();
        assert_eq!(new, format!("intro\n{START}\n| a |\n{END}\noutro\n"));
        assert_eq!(splice(&new, "| a |\n").unwrap(), new);
    }
}
