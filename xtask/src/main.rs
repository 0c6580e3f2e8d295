//! `cargo xtask`: the project's automation, in Rust (the alias lives in `.cargo/config.toml`).
//!
//! | command | module |
//! |---|---|
//! | `test-matrix`: run every cell of the test matrix, or `--list` the capability verdicts | [`test_matrix`], [`cell_processes`] with `--launch processes` |
//! | `matrix-doc`: print the capability matrix, or `--write` it into README.md | [`matrix_doc`] |
//! | `gpu-bundle`: the GPU test binaries and a `run.sh` in one folder for a GPU host | [`gpu_bundle`] |
//! | `bench`: the GPU benchmarks on this machine's GPUs (backends, quantization kernel) | [`gpu_bundle::bench`] |
//! | `launch`: the ranks of one world as processes, with the launchers' environment | [`launch`] |
//!
//! Flags and the usage text are in [`flags`]. Hygiene checks (`tidy`) and the README check are
//! ordinary tests of this crate.
//!
//! xtask links the example backend `example-gather-ep` besides the built-in ones, so the matrix
//! shows a third-party backend exactly as an engine that links one would see it.

mod cell_processes;
mod flags;
mod gpu_bundle;
mod json;
mod launch;
mod matrix_doc;
mod test_matrix;
#[cfg(test)]
mod tidy;

use std::process::ExitCode;

// Naming the crate keeps its `inventory` registration in this binary.
use example_gather_ep as _;

use flags::Command;

fn main() -> ExitCode {
    // A rank of a test-matrix cell run with `--launch processes`.
    if let Ok(cell) = std::env::var(cell_processes::CELL_ENV) {
        return cell_processes::act_as_rank(moe_a2a::registry(), &cell);
    }
    let command = match flags::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}\n\n{}", flags::USAGE);
            return ExitCode::from(2);
        }
    };
    let registry = moe_a2a::registry();
    let result = match &command {
        Command::Help => {
            print!("{}", flags::USAGE);
            Ok(ExitCode::SUCCESS)
        }
        Command::TestMatrix(f) => test_matrix::run(f, registry),
        Command::MatrixDoc(f) => matrix_doc::run(f, registry),
        Command::GpuBundle => gpu_bundle::run(),
        Command::Bench => gpu_bundle::bench(),
        Command::Launch(f) => launch::run(f),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_builtin_backends_and_the_example_are_registered() {
        let mut want: Vec<&str> = moe_a2a::BUILTIN_BACKENDS.to_vec();
        want.push(example_gather_ep::NAME);
        want.sort_unstable();
        assert_eq!(
            moe_a2a::registry().names(),
            want,
            "a backend crate is not linked into xtask"
        );
    }
}
