//! The machine-readable form of an [`Error`]: what `--json` prints on stdout when a command fails.
//!
//! [`Failure::new`] names the error's kind (`checkpoint.header`, `plan.bad_tp`, ...) and its culprit:
//! the file, tensor and config/mapping key the message is about, where the error knows them.

use crate::checkpoint::{CheckpointError, HeaderProblem};
use crate::gpu::GpuError;
use crate::mapping::dims::DimError;
use crate::mapping::MappingError;
use crate::plan::PlanError;
use crate::verify::VerifyError;
use crate::write::WriteError;
use crate::Error;
use serde::Serialize;
use std::path::Path;

/// Version of the error object's fields; bumped when a field changes meaning or goes away.
pub const ERROR_FORMAT_VERSION: u32 = 1;

/// What an error is about. Each field is `null` when the error does not concern one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Culprit {
    /// A file or directory (absolute when the path could be made absolute), or a mapping's origin.
    pub file: Option<String>,
    /// A tensor name, as written in the checkpoint.
    pub tensor: Option<String>,
    /// A config.json key, a mapping key path, or a command-line option.
    pub key: Option<String>,
}

impl Culprit {
    fn file(p: &Path) -> Culprit {
        Culprit { file: Some(abs(p)), ..Default::default() }
    }
    fn tensor(t: &str) -> Culprit {
        Culprit { tensor: Some(t.to_string()), ..Default::default() }
    }
    fn key(k: &str) -> Culprit {
        Culprit { key: Some(k.to_string()), ..Default::default() }
    }
    fn with_tensor(mut self, t: &str) -> Culprit {
        self.tensor = Some(t.to_string());
        self
    }
}

/// A path made absolute (lexically; nothing is resolved on disk), as a string.
pub fn abs(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned()).to_string_lossy().into_owned()
}

/// The JSON error object of a failed command.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// [`ERROR_FORMAT_VERSION`].
    pub format_version: u32,
    /// Always `false`.
    pub ok: bool,
    /// The process exit code (see [`crate::exit_code`]).
    pub exit_code: u8,
    /// `area.variant` in snake_case, e.g. `checkpoint.no_config`, `plan.bad_tp`, `usage.invalid_value`.
    pub kind: String,
    /// The message printed on stderr.
    pub message: String,
    /// What the error is about.
    pub culprit: Culprit,
}

impl Failure {
    /// The error object of a library error.
    pub fn new(e: &Error) -> Failure {
        Failure::other(e.exit_code(), kind(e), e.to_string(), culprit(e))
    }

    /// An error object for a failure that is not a library error (command-line usage, stdout).
    pub fn other(exit_code: u8, kind: String, message: String, culprit: Culprit) -> Failure {
        Failure { format_version: ERROR_FORMAT_VERSION, ok: false, exit_code, kind, message, culprit }
    }
}

/// `area.variant` from the error's variant names (the Debug form starts `Area(Variant ...`).
fn kind(e: &Error) -> String {
    let debug = format!("{e:?}");
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric()).collect::<String>();
    let area = ident(&debug);
    let inner = ident(debug.get(area.len() + 1..).unwrap_or(""));
    let area = snake(&area);
    match inner.as_str() {
        "" => area,
        _ if matches!(e, Error::VerifyFailed(_)) => area,
        _ => format!("{area}.{}", snake(&inner)),
    }
}

/// `BadTp` -> `bad_tp`.
pub fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn culprit(e: &Error) -> Culprit {
    match e {
        Error::Checkpoint(e) => checkpoint(e),
        Error::Mapping(e) => mapping(e),
        Error::Plan(e) => plan(e),
        Error::Write(e) => write(e),
        Error::Verify(e) => match e {
            VerifyError::NoShards { dir } => Culprit::file(dir),
            VerifyError::Io { path, .. } => Culprit::file(path),
            VerifyError::NoTokens => Culprit::key("--tokens"),
            VerifyError::Forward { .. } => Culprit::default(),
        },
        Error::Gpu(e) => match e {
            GpuError::NotCompiled | GpuError::Unavailable { .. } | GpuError::Cuda { .. } | GpuError::Setup(_) => {
                Culprit::default()
            }
        },
        Error::VerifyFailed(r) => match r.findings.first() {
            Some(f) => Culprit { file: f.file.clone(), tensor: f.tensor.clone(), key: None },
            None => Culprit::default(),
        },
    }
}

fn checkpoint(e: &CheckpointError) -> Culprit {
    use CheckpointError as C;
    match e {
        C::Io { path, .. } | C::Json { path, .. } | C::Pickle { path, .. } | C::Empty { path } => Culprit::file(path),
        C::FileNeedsConfig { path, .. } => Culprit { key: Some("--config".into()), ..Culprit::file(path) },
        C::File(f) | C::SideFile { source: f } => Culprit::file(&f.path),
        C::Header { path, problem } => {
            let c = Culprit::file(path);
            match problem {
                HeaderProblem::Entry { tensor, .. }
                | HeaderProblem::UnknownDtype { tensor, .. }
                | HeaderProblem::SizeMismatch { tensor, .. }
                | HeaderProblem::BeyondEnd { tensor, .. }
                | HeaderProblem::Overlap { a: tensor, .. }
                | HeaderProblem::Gap { before: tensor, .. } => c.with_tensor(tensor),
                _ => c,
            }
        }
        C::NoWeights { dir, .. } | C::HfCacheRoot { dir, .. } | C::Ambiguous { dir } => Culprit::file(dir),
        C::NoConfig { dir } => Culprit { key: Some("--config".into()), ..Culprit::file(dir) },
        C::IndexEscapes { index, .. } | C::IndexMissingFile { index, .. } => Culprit::file(index),
        C::DuplicateTensor { tensor, .. } => Culprit::tensor(tensor),
        C::IndexTensorNotInFile { index, tensor, .. } | C::TensorNotInIndex { index, tensor, .. } => {
            Culprit::file(index).with_tensor(tensor)
        }
        C::Sharded(e) => {
            use crate::checkpoint::sharded::ShardedError as S;
            match e {
                S::Tp { dir, .. } | S::Manifest { dir, .. } | S::NotACheckpoint { dir } => Culprit::file(dir),
                S::Changed { dir, file, .. } | S::Stray { dir, file } => Culprit::file(&dir.join(file)),
                S::Duplicate { dir, tensor, a, .. } => Culprit::file(&dir.join(a)).with_tensor(tensor),
            }
        }
    }
}

fn mapping(e: &MappingError) -> Culprit {
    match e {
        MappingError::Io { path, .. } => Culprit::file(path),
        MappingError::File(f) => Culprit::file(&f.path),
        MappingError::Invalid { origin, at, .. } => {
            Culprit { file: Some(origin.clone()), key: Some(at.clone()), tensor: None }
        }
        MappingError::UnknownFamily { .. } | MappingError::NoModelType { .. } => Culprit::key("model_type"),
        MappingError::WrongFamily { path, .. } => Culprit { key: Some("model_type".into()), ..Culprit::file(path) },
    }
}

fn plan(e: &PlanError) -> Culprit {
    use PlanError as P;
    match e {
        P::Dim { mapping, source, .. } => {
            let key = match source.as_ref() {
                DimError::MissingKey { key, .. } | DimError::NotInteger { key, .. } | DimError::NotList { key, .. } => {
                    key.clone()
                }
                DimError::Arithmetic { dim, .. } | DimError::Cycle { dim } => format!("dims.{dim}"),
            };
            Culprit { file: Some(mapping.clone()), key: Some(key), tensor: None }
        }
        P::Unclaimed { names, .. } => names.first().map(|n| Culprit::tensor(n)).unwrap_or_default(),
        P::Ambiguous { tensor, .. }
        | P::Shape { tensor, .. }
        | P::DtypeMismatch { tensor, .. }
        | P::Cast { tensor, .. } => Culprit::tensor(tensor),
        P::DeadRule { mapping, rule } => Culprit { file: Some(mapping.clone()), key: Some(rule.clone()), tensor: None },
        P::MissingPart { missing, .. } => Culprit::tensor(missing),
        P::TargetCollision { a, .. } => Culprit::tensor(a),
        P::AliasMismatch { alias, .. } => Culprit::tensor(alias),
        P::Layers(m) => Culprit { file: Some(m.mapping.clone()), key: Some(m.check.clone()), tensor: None },
        P::ShapeCheck(m) => Culprit { tensor: Some(m.tensor.clone()), key: Some(m.check.clone()), file: None },
        P::CheckExpr { check, .. } => Culprit::key(check),
        P::Config { key, .. } => Culprit::key(key),
        P::BadTp { .. } => Culprit::key("--tp"),
        P::ZeroPartSize => Culprit::key("--max-part-size"),
        P::Target { mapping, .. } => {
            Culprit { file: Some(mapping.clone()), key: Some("--target".into()), tensor: None }
        }
        P::Ranks(_) => Culprit::key("--ranks"),
        P::Backward(b) => {
            use crate::plan::backward::BackwardError as B;
            match b.as_ref() {
                B::Unclaimed { dir, names, .. } => {
                    let c = Culprit::file(dir);
                    match names.first() {
                        Some(n) => c.with_tensor(n),
                        None => c,
                    }
                }
                B::Ambiguous { dir, tensor, .. } | B::Shape { dir, tensor, .. } | B::Check { dir, tensor, .. } => {
                    Culprit::file(dir).with_tensor(tensor)
                }
                B::Target { dir, .. } | B::Layout { dir, .. } => Culprit::file(dir),
                B::Plan { source, .. } => plan(source),
            }
        }
    }
}

fn write(e: &WriteError) -> Culprit {
    use WriteError as W;
    match e {
        W::OutExists { path } | W::OutNotDir { path } | W::OutIsSymlink { path, .. } | W::OutChanged { path, .. } => {
            Culprit { key: Some("--out".into()), ..Culprit::file(path) }
        }
        W::OutInsideInput { out, .. } | W::InputInsideOut { out, .. } => {
            Culprit { key: Some("--out".into()), ..Culprit::file(out) }
        }
        W::Io { path, .. } | W::Busy { path, .. } => Culprit::file(path),
        W::AliasDiffers { alias, .. } => Culprit::tensor(alias),
        W::Internal { tensor, .. } => Culprit::tensor(tensor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_culprits() {
        let e = Error::Plan(PlanError::BadTp { tp: 3, reason: "x".into(), valid: vec![1, 2] });
        let f = Failure::new(&e);
        assert_eq!((f.kind.as_str(), f.exit_code, f.ok), ("plan.bad_tp", 2, false));
        assert_eq!(f.culprit, Culprit::key("--tp"));
        let e = Error::Gpu(GpuError::NotCompiled);
        assert_eq!(Failure::new(&e).kind, "gpu.not_compiled");
        let e = Error::Checkpoint(CheckpointError::NoConfig { dir: "rel/dir".into() });
        let c = Failure::new(&e).culprit;
        assert!(Path::new(c.file.as_deref().unwrap_or("")).is_absolute(), "{c:?}");
        assert_eq!(snake("HfCacheRoot"), "hf_cache_root");
    }
}
