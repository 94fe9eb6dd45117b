//! `reshard`: offline tensor-parallel resharding of Hugging Face encoder-decoder checkpoints
//! (BART, Whisper, mllama) into the per-rank layout of vLLM's `sharded_state` loader.
//!
//! A sharded directory (a reshard output or a vLLM `save_sharded_state`) is an input too: it is
//! read back into the checkpoint it was made from ([`plan::backward`]), and the same pipeline runs.
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
//! let (_input, plan) = reshard::make_plan(&src, &PlanOptions::new(2))?;
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

    /// Reads the checkpoint's headers and picks or loads the mapping (a Hugging Face checkpoint
    /// only; [`Source::read`] takes a sharded directory too).
    pub fn load(&self) -> Result<(CheckpointMeta, Mapping), Error> {
        if checkpoint::sharded::is_sharded(&self.input) {
            let dir = self.input.clone();
            return Err(CheckpointError::from(checkpoint::sharded::ShardedError::NotACheckpoint { dir }).into());
        }
        let meta = CheckpointMeta::read(&self.input, self.config.as_deref())?;
        let mapping = self.mapping_for(&meta.config, &meta.config_path)?;
        Ok((meta, mapping))
    }

    /// The mapping: `--mapping` (checked against config.json's `model_type` unless forced), or
    /// the bundled one for it.
    fn mapping_for(&self, config: &serde_json::Value, config_path: &Path) -> Result<Mapping, Error> {
        Ok(match &self.mapping {
            Some(p) => {
                let m = Mapping::load(p)?;
                if !self.force_mapping {
                    m.check_family(p, config, &text::qp(config_path))?;
                }
                m
            }
            None => Mapping::detect(config, &text::qp(config_path))?,
        })
    }

    /// Reads the input's headers: a Hugging Face checkpoint, or a sharded directory (rank files
    /// and no `model.safetensors` or index), read back into the checkpoint it was made from.
    pub fn read(&self) -> Result<Input, Error> {
        if !checkpoint::sharded::is_sharded(&self.input) {
            let (meta, mapping) = self.load()?;
            return Ok(Input { meta, mapping, backward: None });
        }
        let sm = checkpoint::sharded::ShardedMeta::read(&self.input, self.config.as_deref())?;
        let mapping = self.mapping_for(&sm.config, &sm.config_path)?;
        let backward = plan::backward::Backward::read(&sm, &mapping)?;
        Ok(Input { meta: sm.physical(), mapping, backward: Some(backward) })
    }
}

/// An input read for planning ([`Source::read`]).
pub struct Input {
    /// The files that are read: the checkpoint's, or every rank file of a sharded directory with
    /// its tensors named `NAME@rankR` ([`checkpoint::sharded::rank_tensor`]).
    pub meta: CheckpointMeta,
    /// The mapping.
    pub mapping: Mapping,
    /// For a sharded directory: how it is read back.
    pub backward: Option<plan::backward::Backward>,
}

impl Input {
    /// The checkpoint plans are made from: the source's tensor names, dtypes and shapes.
    pub fn logical(&self) -> &CheckpointMeta {
        self.backward.as_ref().map_or(&self.meta, |b| &b.logical)
    }

    /// [`plan::resolve`] of [`Input::logical`].
    pub fn resolve(&self) -> Result<plan::Resolved, PlanError> {
        match &self.backward {
            Some(b) => Ok(b.resolved.clone()),
            None => plan::resolve(&self.meta, &self.mapping),
        }
    }

    /// A plan made from [`Input::logical`], rewritten to read [`Input::meta`]'s files.
    pub fn reads(&self, plan: ShardPlan) -> ShardPlan {
        match &self.backward {
            Some(b) => b.compose(&plan),
            None => plan,
        }
    }

    /// The plan of a conversion to `opts.tp` ranks.
    pub fn plan(&self, opts: &plan::PlanOptions) -> Result<ShardPlan, Error> {
        Ok(self.reads(self.resolve()?.plan(opts)?))
    }

    /// The plan of a Hugging Face checkpoint of every source tensor (`reshard merge`).
    pub fn plan_hf(&self, max_part_size: u64) -> Result<ShardPlan, Error> {
        let shapes = self.logical().tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        let name = |n: &str| self.mapping.hf_name(n);
        Ok(self.reads(self.resolve()?.plan_hf(max_part_size, &shapes, &name)?))
    }

    /// Maps the files; for a sharded directory, checks every copy the plans do not read
    /// ([`plan::backward::Backward::check`]).
    pub fn open(self) -> Result<Opened, Error> {
        let ckpt = Checkpoint::open(self.meta)?;
        if let Some(b) = &self.backward {
            b.check(&ckpt).map_err(PlanError::Backward)?;
        }
        Ok(Opened { ckpt, mapping: self.mapping, backward: self.backward })
    }
}

/// An input with its files mapped ([`Input::open`]).
pub struct Opened {
    /// The files read.
    pub ckpt: Checkpoint,
    /// The mapping.
    pub mapping: Mapping,
    /// For a sharded directory: how it is read back.
    pub backward: Option<plan::backward::Backward>,
}

impl Opened {
    /// The checkpoint plans are made from (see [`Input::logical`]).
    pub fn logical(&self) -> &CheckpointMeta {
        self.backward.as_ref().map_or(&self.ckpt.meta, |b| &b.logical)
    }

    /// The source fingerprint: of the checkpoint's tensors, or, for a sharded directory, of the
    /// tensors it was made from (the same as that checkpoint's own, aliases aside).
    pub fn fingerprint(&self) -> checkpoint::fingerprint::Fingerprint {
        match &self.backward {
            None => checkpoint::fingerprint::fingerprint(&self.ckpt),
            Some(b) => checkpoint::fingerprint::fingerprint_with(&b.logical.tensors, &|name, _, off, len, out| {
                b.read_logical(&self.ckpt, name, off, len, out)
            }),
        }
    }
}

/// Reads the input and plans a conversion to `opts.tp` ranks.
pub fn make_plan(src: &Source, opts: &plan::PlanOptions) -> Result<(Input, ShardPlan), Error> {
    let input = src.read()?;
    let plan = input.plan(opts)?;
    Ok((input, plan))
}

/// Plans and writes a conversion. Everything that can be checked is checked before the first
/// byte is written: the plan, `--out`, tied copies in the source, and a sharded input's copies.
pub fn convert(
    src: &Source,
    plan_opts: &plan::PlanOptions,
    opts: &WriteOptions,
) -> Result<(ShardPlan, WriteSummary), Error> {
    let (input, plan) = make_plan(src, plan_opts)?;
    let (summary, _) = execute(input, &plan, opts, None)?;
    Ok((plan, summary))
}

/// Writes a plan made from `input` ([`make_plan`], [`Input::plan_hf`]). With `verify`, the
/// finished output is verified against `src` in its staging directory and published only if
/// every check holds.
pub fn execute(
    input: Input,
    plan: &ShardPlan,
    opts: &WriteOptions,
    verify: Option<(&Source, &verify::VerifyOptions)>,
) -> Result<(WriteSummary, Option<verify::VerifyReport>), Error> {
    let opened = input.open()?;
    let staged = write::write_staged(&opened.ckpt, plan, opened.fingerprint(), opts)?;
    let report = match verify {
        Some((src, vopts)) => {
            write::crash_point_labelled("verifying");
            let report = verify::verify_opened(&opened, &src.input, staged.path(), vopts)?;
            if !report.ok {
                return Err(Error::VerifyFailed(Box::new(report)));
            }
            Some(report)
        }
        None => None,
    };
    Ok((staged.publish()?, report))
}
