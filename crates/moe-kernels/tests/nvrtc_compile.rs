//! Compiles every kernel module and specialization through NVRTC for sm_90a, and checks that the
//! PTX cache compiles a module once per architecture. Needs libnvrtc, not a GPU: CI installs the
//! `nvidia-cuda-nvrtc` wheel and sets `MOE_REQUIRE_NVRTC=1`, so a kernel that does not compile
//! fails CI. Elsewhere, without NVRTC, each trial is reported as ignored with the reason.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_kernels::probe;
use moe_kernels::source::Module;

fn main() {
    let args = Arguments::from_args();
    let skip = match probe::nvrtc_status() {
        Err(reason) if !probe::required(probe::REQUIRE_NVRTC_ENV) => Some(reason),
        _ => None,
    };
    let label = |name: String| match &skip {
        Some(reason) => format!("{name} [ignored: {reason}]"),
        None => name,
    };
    let mut trials: Vec<Trial> = Module::all()
        .into_iter()
        .map(|module| {
            Trial::test(label(format!("nvrtc_compiles {module}")), move || compile(module))
                .with_ignored_flag(skip.is_some())
        })
        .collect();
    trials.push(
        Trial::test(
            label("ptx_cache_compiles_once_per_module_and_arch".to_string()),
            cache::once_per_module_and_arch,
        )
        .with_ignored_flag(skip.is_some()),
    );
    trials.push(
        Trial::test(
            label("ptx_cache_callers_racing_for_a_module_share_one_compilation".to_string()),
            cache::racing_callers_share_one_compilation,
        )
        .with_ignored_flag(skip.is_some()),
    );
    trials.push(
        Trial::test(
            label("ptx_cache_global_returns_the_same_ptx".to_string()),
            cache::global_returns_the_same_ptx,
        )
        .with_ignored_flag(skip.is_some()),
    );
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

#[cfg(feature = "cuda")]
mod cache {
    use std::sync::{Arc, Barrier};
    use std::thread;

    use libtest_mimic::Failed;
    use moe_kernels::nvrtc::PtxCache;
    use moe_kernels::source::{COPY_16B, Module};

    fn check(ok: bool, what: &str) -> Result<(), Failed> {
        if ok { Ok(()) } else { Err(what.into()) }
    }

    pub fn once_per_module_and_arch() -> Result<(), Failed> {
        let cache = PtxCache::new();
        let hopper = cache.get(&Module::Copy, "sm_90a")?;
        let again = cache.get(&Module::Copy, "sm_90a")?;
        check(Arc::ptr_eq(&hopper, &again), "the second get returned another PTX")?;
        check(cache.compilations() == 1, "the second get compiled again")?;
        check(
            hopper.to_src().contains(&format!(".entry {COPY_16B}")) && hopper.to_src().contains(".target sm_90a"),
            "the cached PTX is not copy.cu for sm_90a",
        )?;
        let blackwell = cache.get(&Module::Copy, "sm_100a")?;
        check(cache.compilations() == 2, "another architecture was not compiled")?;
        check(
            blackwell.to_src().contains(".target sm_100a"),
            "the sm_100a entry holds PTX of another architecture",
        )?;
        let batched = cache.get(&Module::Batched, "sm_90a")?;
        check(cache.compilations() == 3, "another module was not compiled")?;
        check(!Arc::ptr_eq(&hopper, &batched), "two modules share one PTX")
    }

    pub fn racing_callers_share_one_compilation() -> Result<(), Failed> {
        let cache = PtxCache::new();
        let start = Barrier::new(4);
        let ptx = thread::scope(|s| {
            let ranks: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        cache.get(&Module::Copy, "sm_90a")
                    })
                })
                .collect();
            ranks
                .into_iter()
                .map(|r| r.join().expect("a rank panicked"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        check(cache.compilations() == 1, "racing callers compiled more than once")?;
        check(
            ptx.iter().all(|p| Arc::ptr_eq(p, &ptx[0])),
            "racing callers got different PTX",
        )
    }

    pub fn global_returns_the_same_ptx() -> Result<(), Failed> {
        let first = PtxCache::global().get(&Module::Copy, "sm_90a")?;
        let again = PtxCache::global().get(&Module::Copy, "sm_90a")?;
        check(Arc::ptr_eq(&first, &again), "the process cache compiled copy.cu twice")
    }
}

#[cfg(not(feature = "cuda"))]
mod cache {
    use libtest_mimic::Failed;
    use moe_kernels::probe;

    fn no_nvrtc() -> Result<(), Failed> {
        Err(probe::nvrtc_status()
            .expect_err("no NVRTC without the cuda feature")
            .into())
    }

    pub fn once_per_module_and_arch() -> Result<(), Failed> {
        no_nvrtc()
    }

    pub fn racing_callers_share_one_compilation() -> Result<(), Failed> {
        no_nvrtc()
    }

    pub fn global_returns_the_same_ptx() -> Result<(), Failed> {
        no_nvrtc()
    }
}
