//! Compiles every kernel module and specialization through NVRTC for sm_90a. Needs libnvrtc, not a GPU:
//! CI installs the `nvidia-cuda-nvrtc` wheel and sets `MOE_REQUIRE_NVRTC=1`, so a kernel that
//! does not compile fails CI. Elsewhere, without NVRTC, each trial is reported as ignored with
//! the reason.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_kernels::probe;
use moe_kernels::source::Module;

fn main() {
    let args = Arguments::from_args();
    let skip = match probe::nvrtc_status() {
        Err(reason) if !probe::required(probe::REQUIRE_NVRTC_ENV) => Some(reason),
        _ => None,
    };
    let trials = Module::all()
        .into_iter()
        .map(|module| {
            let name = match &skip {
                Some(reason) => format!("nvrtc_compiles {module} [ignored: {reason}]"),
                None => format!("nvrtc_compiles {module}"),
            };
            Trial::test(name, move || compile(module)).with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(feature = "cuda")]
fn compile(module: Module) -> Result<(), Failed> {
    let ptx = moe_kernels::nvrtc::compile(&module, "sm_90a").map_err(|e| e.to_string())?;
    let text = ptx.to_src();
    for entry in module.entries() {
        if !text.contains(&format!(".entry {entry}")) {
            return Err(format!("{module}: PTX has no entry point {entry}").into());
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn compile(_: Module) -> Result<(), Failed> {
    Err(probe::nvrtc_status()
        .expect_err("no NVRTC without the cuda feature")
        .into())
}
