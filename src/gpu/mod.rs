//! `reshard validate`: the cross-attention forward on a GPU, the fused path (one qkv GEMM over the
//! decoder states and another over the encoder states, as before the split) against the split path
//! (per rank: a q GEMM over the decoder states and a kv GEMM over the encoder states), both against
//! a float64 CPU reference, with CUDA-event timings of the projection GEMMs.
//!
//! Entry point: [`validate`]. Host-side work (loading a layer from a checkpoint and its shards, or
//! synthesizing a real-size layer and splitting it by the contract; the f64 reference; comparing
//! and reporting) is always compiled and tested. The device side sits behind the `cuda` feature
//! in `enabled.rs`; without it `disabled.rs` answers [`GpuError::NotCompiled`]. Both expose the
//! same [`Gpu`] type.
//!
//! The fused and split paths are written once, in `device.rs`, against a narrow device interface
//! ([`device::Device`]); `enabled.rs` implements it with cudarc and `cpu.rs` on the host
//! (`--device cpu`, in every build), so the whole flow runs in `cargo test`.

pub mod cpu;
pub mod device;
#[cfg(not(feature = "cuda"))]
mod disabled;
#[cfg(feature = "cuda")]
mod enabled;
#[cfg(test)]
mod mutants;
pub mod problem;

#[cfg(not(feature = "cuda"))]
pub use disabled::Gpu;
#[cfg(feature = "cuda")]
pub use enabled::{compile_kernels, Gpu};

use crate::verify::forward::max_err;
use crate::Error;
use problem::Problem;
use serde::Serialize;

/// Version of the validate report JSON.
pub const REPORT_FORMAT_VERSION: u32 = 1;

/// Why the GPU path cannot run. All map to exit code 3.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum GpuError {
    #[error("this reshard was built without GPU support (hint: rebuild with `cargo build --release --features cuda`)")]
    NotCompiled,
    #[error("no usable {what}: {detail} (hint: install the NVIDIA driver and CUDA 12/13 libraries, or add their directory to LD_LIBRARY_PATH)")]
    Unavailable { what: String, detail: String },
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: String, msg: String },
    #[error("{0}")]
    Setup(String),
}

/// Element type of the GPU GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuDtype {
    /// float32 GEMMs (no TF32).
    F32,
    /// bfloat16 GEMMs with float32 accumulation.
    Bf16,
}

impl GpuDtype {
    /// Relative tolerance (max abs error / max |reference|) of results in this dtype.
    pub fn tolerance(self) -> f64 {
        match self {
            GpuDtype::F32 => 1e-5,
            GpuDtype::Bf16 => 2e-2,
        }
    }
}

/// What the device computed for one problem.
#[derive(Clone, Debug)]
pub struct GpuRun {
    /// Output of the fused path, `[T, d]` row-major.
    pub fused: Vec<f32>,
    /// Output of the split path, `[T, d]` row-major.
    pub split: Vec<f32>,
    /// Median time of the fused path's projection GEMMs, in ms.
    pub fused_ms: f64,
    /// Median time of the split path's projection GEMMs (all ranks), in ms.
    pub split_ms: f64,
    /// Timed iterations.
    pub iters: usize,
}

/// Errors of one comparison.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Err2 {
    /// Max absolute difference.
    pub max_abs: f64,
    /// Max absolute difference / max |reference|.
    pub max_rel: f64,
}

/// The result for one layer or synthetic shape.
#[derive(Clone, Debug, Serialize)]
pub struct ProblemReport {
    /// What was checked.
    pub label: String,
    /// Tensor-parallel ranks of the split path.
    pub tp: usize,
    /// Query heads, kv heads, head size, hidden size.
    pub heads: usize,
    #[allow(missing_docs)]
    pub kv_heads: usize,
    #[allow(missing_docs)]
    pub head_dim: usize,
    #[allow(missing_docs)]
    pub hidden: usize,
    /// Decoder tokens T and encoder tokens S.
    pub tokens: usize,
    #[allow(missing_docs)]
    pub source_tokens: usize,
    /// Fused path vs the f64 reference.
    pub fused_vs_reference: Err2,
    /// Split path vs the f64 reference.
    pub split_vs_reference: Err2,
    /// Fused vs split.
    pub fused_vs_split: Err2,
    /// Relative tolerance applied to all three.
    pub tolerance: f64,
    /// Whether all three are within tolerance.
    pub passed: bool,
    /// Projection GEMM FLOPs of the fused path.
    pub fused_flops: f64,
    /// Projection GEMM FLOPs of the split path (all ranks).
    pub split_flops: f64,
    /// Median projection time of the fused path, ms.
    pub fused_ms: f64,
    /// Median projection time of the split path, ms.
    pub split_ms: f64,
    /// `split_ms / fused_ms`.
    pub time_ratio: f64,
    /// `split_flops / fused_flops`.
    pub flop_ratio: f64,
    /// Timed iterations (after warm-up).
    pub iters: usize,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct ValidateReport {
    /// [`REPORT_FORMAT_VERSION`].
    pub format_version: u32,
    /// The GPU.
    pub device: String,
    /// GEMM dtype.
    pub dtype: GpuDtype,
    /// Whether every problem passed.
    pub ok: bool,
    /// One entry per layer or shape.
    pub problems: Vec<ProblemReport>,
}

/// Which implementation of the device interface runs the paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// cuBLAS and NVRTC kernels on CUDA device 0 (needs `--features cuda` and a GPU).
    Cuda,
    /// The host implementation: cuBLAS-spec GEMM and the kernels transcribed line for line.
    Cpu,
}

/// An open device.
pub enum Backend {
    /// See [`DeviceKind::Cuda`].
    Cuda(Gpu),
    /// See [`DeviceKind::Cpu`].
    Cpu(cpu::Cpu),
}

impl Backend {
    /// Opens the device (for CUDA, fails with [`GpuError`] without one).
    pub fn open(kind: DeviceKind) -> Result<Backend, GpuError> {
        Ok(match kind {
            DeviceKind::Cuda => Backend::Cuda(Gpu::new()?),
            DeviceKind::Cpu => Backend::Cpu(cpu::Cpu),
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        match self {
            Backend::Cuda(g) => g.device_name(),
            Backend::Cpu(c) => c.device_name(),
        }
    }

    /// Runs the fused and split paths of `p`.
    pub fn run(&self, p: &Problem, dtype: GpuDtype, iters: usize) -> Result<GpuRun, GpuError> {
        match (self, dtype) {
            (Backend::Cuda(g), _) => g.run(p, dtype, iters),
            (Backend::Cpu(c), GpuDtype::F32) => device::run_paths::<f32, _>(c, p, iters),
            (Backend::Cpu(c), GpuDtype::Bf16) => device::run_paths::<half::bf16, _>(c, p, iters),
        }
    }
}

/// Options of [`validate`].
#[derive(Clone, Debug)]
pub struct ValidateOptions {
    /// GEMM dtype.
    pub dtype: GpuDtype,
    /// Timed iterations.
    pub iters: usize,
}

fn err2(reference: &[Vec<f64>], other: &[f32], d: usize) -> Err2 {
    let other: Vec<Vec<f64>> = other.chunks(d.max(1)).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
    let (abs, mag) = max_err(&reference.to_vec(), &other);
    Err2 { max_abs: abs, max_rel: if mag > 0.0 { abs / mag } else { abs } }
}

/// Compares a device run with the CPU reference.
pub fn compare(p: &Problem, run: &GpuRun, dtype: GpuDtype) -> ProblemReport {
    let reference = p.reference();
    let d = p.hidden;
    let fr = err2(&reference, &run.fused, d);
    let sr = err2(&reference, &run.split, d);
    let fused64: Vec<Vec<f64>> = run.fused.chunks(d.max(1)).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
    let fs = err2(&fused64, &run.split, d);
    let tol = dtype.tolerance();
    let (ff, sf) = (p.fused_flops(), p.split_flops());
    ProblemReport {
        label: p.label.clone(),
        tp: p.ranks.len(),
        heads: p.heads,
        kv_heads: p.kv_heads,
        head_dim: p.head_dim,
        hidden: p.hidden,
        tokens: p.x.rows,
        source_tokens: p.e.rows,
        fused_vs_reference: fr,
        split_vs_reference: sr,
        fused_vs_split: fs,
        tolerance: tol,
        passed: fr.max_rel <= tol && sr.max_rel <= tol && fs.max_rel <= tol,
        fused_flops: ff,
        split_flops: sf,
        fused_ms: run.fused_ms,
        split_ms: run.split_ms,
        time_ratio: if run.fused_ms > 0.0 { run.split_ms / run.fused_ms } else { 0.0 },
        flop_ratio: sf / ff,
        iters: run.iters,
    }
}

/// Runs every problem on the GPU. The device is opened first, so a machine without one fails fast
/// with [`GpuError`] before any problem is built.
pub fn validate(
    gpu: &Backend,
    problems: impl IntoIterator<Item = Result<Problem, Error>>,
    opts: &ValidateOptions,
) -> Result<ValidateReport, Error> {
    let mut reports = Vec::new();
    for p in problems {
        let p = p?;
        let run = gpu.run(&p, opts.dtype, opts.iters)?;
        reports.push(compare(&p, &run, opts.dtype));
    }
    Ok(ValidateReport {
        format_version: REPORT_FORMAT_VERSION,
        device: gpu.device_name(),
        dtype: opts.dtype,
        ok: reports.iter().all(|r| r.passed),
        problems: reports,
    })
}

/// What `validate` runs on.
#[derive(Clone, Debug)]
pub enum ValidateInput {
    /// A checkpoint and its conversion output; `layers` selects cross-attention layers (all when `None`).
    Checkpoint {
        /// The source checkpoint.
        src: crate::Source,
        /// The output of `convert`.
        out: std::path::PathBuf,
        /// Layer indices, or all.
        layers: Option<Vec<usize>>,
    },
    /// A real model size with synthetic weights, split over `tp` ranks.
    Synthetic {
        /// The shape.
        preset: problem::Preset,
        /// Ranks of the split path.
        tp: usize,
        /// A smaller head size than the model's (same head counts), for a quick check.
        head_dim: Option<usize>,
    },
}

/// A whole `validate` run.
#[derive(Clone, Debug)]
pub struct ValidateJob {
    /// Inputs.
    pub input: ValidateInput,
    /// GEMM dtype and timing iterations.
    pub options: ValidateOptions,
    /// Decoder tokens.
    pub tokens: usize,
    /// Encoder tokens.
    pub source_tokens: usize,
    /// Seed of the random inputs.
    pub seed: u64,
    /// Where the paths run.
    pub device: DeviceKind,
}

/// Runs `validate`: opens the device first (exit code 3 when CUDA is asked for and there is no
/// GPU), then builds and runs every problem.
pub fn run(job: &ValidateJob) -> Result<ValidateReport, Error> {
    let gpu = Backend::open(job.device)?;
    match &job.input {
        ValidateInput::Synthetic { preset, tp, head_dim } => {
            if !preset.valid_tp(*tp) {
                return Err(GpuError::Setup(format!(
                    "tp {tp} does not fit {} (heads and kv heads must divide or replicate evenly)",
                    preset.name()
                ))
                .into());
            }
            if let Some(hd) = *head_dim {
                if hd == 0 || hd > preset.head_dim() {
                    return Err(GpuError::Setup(format!(
                        "--head-dim {hd}: must be from 1 to {}, the head size of {}",
                        preset.head_dim(),
                        preset.name()
                    ))
                    .into());
                }
            }
            let p = Problem::synthetic(*preset, *tp, *head_dim, job.tokens, job.source_tokens, job.seed);
            validate(&gpu, [Ok(p)], &job.options)
        }
        ValidateInput::Checkpoint { src, out, layers } => {
            let (meta, mapping) = src.load()?;
            let dims = crate::plan::resolve(&meta, &mapping)?.dims;
            let ckpt = crate::checkpoint::Checkpoint::open(meta)?;
            let ranks = crate::verify::open_output(out)?;
            let all = crate::verify::forward::layers(&ckpt, &mapping);
            let chosen = match layers {
                None => all,
                Some(want) => {
                    if let Some(bad) = want.iter().find(|l| !all.contains(l)) {
                        return Err(GpuError::Setup(format!(
                            "layer {bad} has no cross-attention; cross-attention layers: {all:?}"
                        ))
                        .into());
                    }
                    want.clone()
                }
            };
            let problems = chosen.into_iter().map(|l| {
                Problem::from_checkpoint(
                    &ckpt,
                    &mapping,
                    &dims,
                    &ranks,
                    l,
                    job.tokens,
                    job.source_tokens,
                    job.seed ^ l as u64,
                )
            });
            validate(&gpu, problems, &job.options)
        }
    }
}
