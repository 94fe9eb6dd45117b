//! Read-only view of a Hugging Face checkpoint: `config.json` plus one `model.safetensors`, or
//! several `*.safetensors` files routed by `model.safetensors.index.json`, or one file plus an
//! explicit config.
//!
//! Entry points: [`CheckpointMeta::read`] parses every header (no tensor data is touched, so
//! `plan` is cheap); [`Checkpoint::open`] memory-maps the files for zero-copy reads. Every offset
//! and size is checked; see [`header`] for the per-file checks and [`index`] for the routing checks.

pub mod fingerprint;
pub mod header;
pub mod index;
mod mmap;

pub use mmap::Checkpoint;

use crate::dtype::Dtype;
use crate::text::{q, qp};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// File names never copied to the output and never read as weights by this tool's copier.
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || name == index::INDEX_NAME
        || name == "pytorch_model.bin.index.json"
}

/// What is wrong with one safetensors header.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum HeaderProblem {
    Truncated { size: u64 },
    TooLarge { len: u64 },
    BeyondFile { len: u64, size: u64 },
    Json(String),
    Entry { tensor: String, msg: String },
    UnknownDtype { tensor: String, dtype: String },
    SizeMismatch { tensor: String, dtype: Dtype, shape: Vec<usize>, offsets: [u64; 2], expected: u64 },
    Overlap { a: String, b: String },
    Gap { after: Option<String>, before: String, bytes: u64 },
    BeyondEnd { tensor: String, end: u64, data_len: u64 },
    TrailingBytes { bytes: u64 },
}

/// Errors reading a checkpoint.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum CheckpointError {
    #[error("cannot read {}: {source}", qp(path))]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {problem}", qp(path))]
    Header { path: PathBuf, problem: HeaderProblem },
    #[error("{}: invalid JSON: {msg}", qp(path))]
    Json { path: PathBuf, msg: String },
    #[error("{}: neither `model.safetensors` nor `{}` found\n(hint: pass the checkpoint directory, or one .safetensors file with --config)", qp(dir), index::INDEX_NAME)]
    NoWeights { dir: PathBuf },
    #[error("{}: both `model.safetensors` and `{}` exist; it is unclear which holds the model\n(hint: remove the stale one, or pass the single file with --config)", qp(dir), index::INDEX_NAME)]
    Ambiguous { dir: PathBuf },
    #[error("{}: no config.json\n(hint: pass --config FILE)", qp(dir))]
    NoConfig { dir: PathBuf },
    #[error("{}: a single .safetensors file needs --config FILE", qp(path))]
    FileNeedsConfig { path: PathBuf },
    #[error("{}: names file {} outside the checkpoint directory", qp(index), q(file))]
    IndexEscapes { index: PathBuf, file: String },
    #[error("{}: names file {}, which does not exist", qp(index), q(file))]
    IndexMissingFile { index: PathBuf, file: String },
    #[error("tensor {} is in two files: {} and {}", q(tensor), q(a), q(b))]
    DuplicateTensor { tensor: String, a: String, b: String },
    #[error("{}: maps tensor {} to {}, but that file does not contain it", qp(index), q(tensor), q(file))]
    IndexTensorNotInFile { index: PathBuf, tensor: String, file: String },
    #[error("{}: tensor {} in {} is not listed in the index", qp(index), q(tensor), q(file))]
    TensorNotInIndex { index: PathBuf, tensor: String, file: String },
    #[error("{}: the checkpoint contains no tensors", qp(path))]
    Empty { path: PathBuf },
}

/// One source file of the checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct SourceFile {
    /// Name relative to the checkpoint directory (as in the index).
    pub name: String,
    /// Resolved path on disk.
    #[serde(skip)]
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Index into [`CheckpointMeta::files`].
    pub file: usize,
    /// Absolute byte range within the file.
    pub start: u64,
    /// End of the byte range (exclusive).
    pub end: u64,
}

impl TensorInfo {
    /// Size of the data in bytes.
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

/// Everything known about a checkpoint without reading tensor data.
#[derive(Clone, Debug)]
pub struct CheckpointMeta {
    /// The checkpoint directory (the directory holding the single file, in single-file mode).
    pub dir: PathBuf,
    /// The parsed config.json.
    pub config: serde_json::Value,
    /// Path of the config that was read.
    pub config_path: PathBuf,
    /// The weight files, in a stable order.
    pub files: Vec<SourceFile>,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Non-weight files of the directory to copy into the output (names relative to `dir`).
    pub extra_files: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_owned(), source }
}

impl CheckpointMeta {
    /// Reads the config and every safetensors header of the checkpoint at `input`.
    ///
    /// `input` is a directory, or a single `.safetensors` file (then `config` must be given).
    pub fn read(input: &Path, config: Option<&Path>) -> Result<Self, CheckpointError> {
        let md = fs::metadata(input).map_err(io(input))?;
        let (dir, weight_names, index_path) = if md.is_dir() {
            let single = input.join("model.safetensors");
            let idx = input.join(index::INDEX_NAME);
            match (single.exists(), idx.exists()) {
                (true, true) => return Err(CheckpointError::Ambiguous { dir: input.to_owned() }),
                (true, false) => (input.to_owned(), vec!["model.safetensors".to_string()], None),
                (false, true) => {
                    let files = index::read_index(&idx, input)?.files();
                    (input.to_owned(), files, Some(idx))
                }
                (false, false) => return Err(CheckpointError::NoWeights { dir: input.to_owned() }),
            }
        } else {
            if config.is_none() {
                return Err(CheckpointError::FileNeedsConfig { path: input.to_owned() });
            }
            let dir = input.parent().map(Path::to_path_buf).unwrap_or_default();
            let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (dir, vec![name], None)
        };
        let config_path = match config {
            Some(c) => c.to_owned(),
            None => dir.join("config.json"),
        };
        if !config_path.exists() {
            return Err(CheckpointError::NoConfig { dir: dir.clone() });
        }
        let text = fs::read(&config_path).map_err(io(&config_path))?;
        let config: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| CheckpointError::Json { path: config_path.clone(), msg: e.to_string() })?;

        let mut files = Vec::new();
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for (i, name) in weight_names.iter().enumerate() {
            let path = dir.join(name);
            let header = read_header(&path)?;
            let size = fs::metadata(&path).map_err(io(&path))?.len();
            for (tname, t) in header.tensors {
                if let Some(prev) = tensors.get(&tname) {
                    return Err(CheckpointError::DuplicateTensor {
                        tensor: tname,
                        a: weight_names[prev.file].clone(),
                        b: name.clone(),
                    });
                }
                tensors
                    .insert(tname, TensorInfo { dtype: t.dtype, shape: t.shape, file: i, start: t.start, end: t.end });
            }
            files.push(SourceFile { name: name.clone(), path, size });
        }
        if let Some(idx) = &index_path {
            index::cross_check(idx, &index::read_index(idx, &dir)?, &tensors, &weight_names)?;
        }
        if tensors.is_empty() {
            return Err(CheckpointError::Empty { path: input.to_owned() });
        }
        let extra_files = if md.is_dir() { list_extra_files(&dir)? } else { Vec::new() };
        Ok(CheckpointMeta { dir, config, config_path, files, tensors, extra_files })
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(TensorInfo::nbytes).sum()
    }
}

/// Reads and validates the header of one safetensors file without reading its data.
pub fn read_header(path: &Path) -> Result<header::Header, CheckpointError> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let size = f.metadata().map_err(io(path))?.len();
    let mut prefix = Vec::with_capacity(8);
    (&mut f).take(8).read_to_end(&mut prefix).map_err(io(path))?;
    let n = header::header_len(path, &prefix, size)?;
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(io(path))?;
    header::parse(path, &json, size)
}

fn list_extra_files(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Follows symlinks: Hugging Face cache snapshots hold links into blobs/.
        let is_file = fs::metadata(entry.path()).map(|m| m.is_file()).unwrap_or(false);
        if is_file && !is_weight_file(&name) && !name.starts_with('.') {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::header::tests::image;
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn reads_single_file_and_lists_extras() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "model.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        write(d.path(), "config.json", b"{\"model_type\":\"bart\"}");
        write(d.path(), "tokenizer.json", b"{}");
        write(d.path(), "pytorch_model.bin", b"x");
        let m = CheckpointMeta::read(d.path(), None).unwrap();
        assert_eq!(m.tensors["w"].shape, vec![2]);
        assert_eq!(m.extra_files, vec!["config.json", "tokenizer.json"]);
    }

    #[test]
    fn single_file_needs_config() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "x.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        let err = CheckpointMeta::read(&d.path().join("x.safetensors"), None).unwrap_err();
        assert!(err.to_string().contains("needs --config"));
        write(d.path(), "c.json", b"{}");
        let m = CheckpointMeta::read(&d.path().join("x.safetensors"), Some(&d.path().join("c.json"))).unwrap();
        assert!(m.extra_files.is_empty());
    }

    #[test]
    fn missing_weights_and_config() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(CheckpointMeta::read(d.path(), None), Err(CheckpointError::NoWeights { .. })));
        write(d.path(), "model.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        assert!(matches!(CheckpointMeta::read(d.path(), None), Err(CheckpointError::NoConfig { .. })));
    }
}
