//! Issue #15: the validate kernels compile with NVRTC for the architectures we claim, on a machine
//! without a GPU (NVRTC runs on the host). Needs libnvrtc.so.13 on `LD_LIBRARY_PATH`; `.ci/run`
//! gets it from the PyPI wheel with `scripts/nvrtc-lib.sh`:
//!
//! ```sh
//! LD_LIBRARY_PATH=$(scripts/nvrtc-lib.sh) cargo test --features cuda --test nvrtc
//! ```
//!
//! Without the library the test says NOT RUN; under `CI=true` that is a failure.

use reshard::gpu::device::{KERNELS, KERNEL_NAMES};

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[test]
fn kernels_compile_for_sm80_and_sm90_and_every_name_resolves() {
    if !nvrtc_present() {
        let msg = "NOT RUN: libnvrtc (CUDA 13) not found; put its folder on LD_LIBRARY_PATH \
                   (LD_LIBRARY_PATH=$(scripts/nvrtc-lib.sh) cargo test --features cuda --test nvrtc)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("{msg}");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = reshard::gpu::compile_kernels(Some(arch)).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let src = ptx.to_src();
        assert!(src.contains(&format!(".target {arch}")), "{arch}: {}", &src[..src.len().min(400)]);
        let entries: Vec<&str> = src
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or("").trim())
            .collect();
        for name in KERNEL_NAMES {
            assert!(entries.contains(&name), "{arch}: kernel `{name}` not in the PTX entries {entries:?}");
        }
        assert_eq!(entries.len(), KERNEL_NAMES.len(), "{arch}: {entries:?}");
        eprintln!("{arch}: {} entries, {} bytes of PTX", entries.len(), src.len());
    }
}

#[test]
fn a_broken_kernel_source_is_a_compile_error_not_a_pass() {
    if !nvrtc_present() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "NOT RUN: libnvrtc not found");
        eprintln!("NOT RUN: libnvrtc not found");
        return;
    }
    let bad = KERNELS.replace("acc += qp[d] * kp[d];", "acc += qp[d] * kp[d]");
    let r = cudarc::nvrtc::compile_ptx_with_opts(
        bad,
        cudarc::nvrtc::CompileOptions { arch: Some("sm_90"), ..Default::default() },
    );
    assert!(r.is_err(), "a missing semicolon must not compile");
}
