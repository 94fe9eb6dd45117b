//! `reshard`: offline tensor-parallel resharding of Hugging Face encoder-decoder checkpoints
//! (BART, Whisper, mllama) into the per-rank layout of vLLM's `sharded_state` loader.
//!
//! The pipeline is: [`checkpoint::CheckpointMeta::read`] (headers only) →
//! [`mapping::Mapping`] (declarative rules, one JSON file per family) → [`plan::resolve`] and
//! [`plan::Resolved::plan`] (pure: what every rank's files hold, byte range by byte range) →
//! [`write::write_plan`] (streams the bytes from memory-mapped sources, atomically).
//!
//! ```no_run
//! # fn main() -> Result<(), reshard::Error> {
//! use reshard::{Source, plan::PlanOptions};
//! let src = Source::new("fixtures/bart-tiny");
//! let (_meta, plan) = reshard::make_plan(&src, &PlanOptions::new(2))?;
//! for f in &plan.files {
//!     println!("{} holds {} tensors", f.name, f.tensors.len());
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod checkpoint;
pub mod dtype;
pub mod exit_code;
pub mod failure;
pub mod gpu;
pub mod input;
pub mod mapping;
pub mod plan;
pub mod progress;
pub mod text;
pub mod verify;
pub mod write;

use checkpoint::{Checkpoint, CheckpointError, CheckpointMeta};
use mapping::{Mapping, MappingError};
use plan::{PlanError, ShardPlan};
use std::path::{Path, PathBuf};
use write::{WriteError, WriteOptions, WriteSummary};

/// Any error of the library; [`Error::exit_code`] maps it to the documented exit code.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum Error {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    #[error("verification of the new output failed ({} finding(s)); nothing was written to --out{}", .0.findings.len(), .0.findings.iter().take(10).map(|f| format!("\n  {f}")).collect::<String>())]
    VerifyFailed(Box<verify::VerifyReport>),
}

impl Error {
    /// The process exit code for this error (see [`exit_code`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Checkpoint(_) | Error::Mapping(_) | Error::Plan(_) => exit_code::BAD_INPUT,
            Error::Write(w) if w.is_input_error() => exit_code::BAD_INPUT,
            Error::Write(_) => exit_code::OUTPUT_FAILED,
            Error::Verify(_) => exit_code::BAD_INPUT,
            Error::VerifyFailed(_) => exit_code::CHECK_FAILED,
            // A bad `--layers`, `--tp` for `--shape`, or a layer without cross-attention.
            Error::Gpu(gpu::GpuError::Setup(_)) => exit_code::BAD_INPUT,
            Error::Gpu(_) => exit_code::GPU_UNAVAILABLE,
        }
    }
}

/// Where a checkpoint and its mapping come from.
#[derive(Clone, Debug)]
pub struct Source {
    /// Checkpoint directory, or a single `.safetensors` file.
    pub input: PathBuf,
    /// Explicit config.json (required for a single file).
    pub config: Option<PathBuf>,
    /// Explicit mapping file; by default the bundled one matching `model_type`.
    pub mapping: Option<PathBuf>,
    /// Use [`Source::mapping`] even when its `model_types` does not list config.json's
    /// `model_type` (`--force-mapping`).
    pub force_mapping: bool,
}

impl Source {
    /// A checkpoint directory with its own config.json and the bundled mapping.
    pub fn new(input: impl AsRef<Path>) -> Source {
        Source { input: input.as_ref().to_owned(), config: None, mapping: None, force_mapping: false }
    }

    /// Reads the checkpoint's headers and picks or loads the mapping.
    pub fn load(&self) -> Result<(CheckpointMeta, Mapping), Error> {
        let meta = CheckpointMeta::read(&self.input, self.config.as_deref())?;
        let mapping = match &self.mapping {
            Some(p) => {
                let m = Mapping::load(p)?;
                if !self.force_mapping {
                    m.check_family(p, &meta.config, &text::qp(&meta.config_path))?;
                }
                m
            }
            None => Mapping::detect(&meta.config, &text::qp(&meta.config_path))?,
        };
        Ok((meta, mapping))
    }
}

/// Reads the checkpoint and plans a conversion to `tp` ranks.
pub fn make_plan(src: &Source, opts: &plan::PlanOptions) -> Result<(CheckpointMeta, ShardPlan), Error> {
    let (meta, mapping) = src.load()?;
    let plan = plan::plan(&meta, &mapping, opts)?;
    Ok((meta, plan))
}

/// Plans and writes a conversion. Everything that can be checked is checked before the first
/// byte is written: the plan, `--out`, and tied copies in the source.
pub fn convert(
    src: &Source,
    plan_opts: &plan::PlanOptions,
    opts: &WriteOptions,
) -> Result<(ShardPlan, WriteSummary), Error> {
    let (meta, plan) = make_plan(src, plan_opts)?;
    let (summary, _) = execute(meta, &plan, opts, None)?;
    Ok((plan, summary))
}

/// Writes a plan made by [`make_plan`] from `meta`. With `verify`, the finished output is
/// verified against `src` in its staging directory and published only if every check holds.
pub fn execute(
    meta: CheckpointMeta,
    plan: &ShardPlan,
    opts: &WriteOptions,
    verify: Option<(&Source, &verify::VerifyOptions)>,
) -> Result<(WriteSummary, Option<verify::VerifyReport>), Error> {
    let ckpt = Checkpoint::open(meta)?;
    let staged = write::write_staged(&ckpt, plan, opts)?;
    let report = match verify {
        Some((src, vopts)) => {
            write::crash_point_labelled("verifying");
            let report = verify::verify(src, staged.path(), vopts)?;
            if !report.ok {
                return Err(Error::VerifyFailed(Box::new(report)));
            }
            Some(report)
        }
        None => None,
    };
    Ok((staged.publish()?, report))
}
