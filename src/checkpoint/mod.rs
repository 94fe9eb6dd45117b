//! Read-only view of a Hugging Face checkpoint: `config.json` plus one `model.safetensors`, or
//! several `*.safetensors` files routed by `model.safetensors.index.json`, or one file plus an
//! explicit config.
//!
//! Entry points: [`CheckpointMeta::read`] parses every header (no tensor data is touched, so
//! `plan` is cheap); [`Checkpoint::open`] memory-maps the files for zero-copy reads. Every offset
//! and size is checked; see [`header`] for the per-file checks and [`index`] for the routing checks.
//! Every file is opened through [`crate::input`] (regular files only, never blocking; broken links
//! named), and a path that is not a checkpoint gets a message saying what is there
//! ([`discover`]).

pub mod discover;
pub mod fingerprint;
pub mod header;
pub mod index;
mod mmap;
pub mod sharded;

pub use mmap::Checkpoint;

use crate::dtype::Dtype;
use crate::input::{self, FileError};
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
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{source}\n(hint: every file beside the weights is copied into the output; make it a readable regular file, or move it out of the checkpoint directory)")]
    SideFile { source: FileError },
    #[error("{}: {problem}", qp(path))]
    Header { path: PathBuf, problem: HeaderProblem },
    #[error("{}: invalid JSON: {msg}", qp(path))]
    Json { path: PathBuf, msg: String },
    #[error("{}", discover::no_weights(dir, below, safetensors))]
    NoWeights { dir: PathBuf, below: Vec<PathBuf>, safetensors: Vec<String> },
    #[error("{}", discover::cache_root(dir, snapshots, main.as_deref()))]
    HfCacheRoot { dir: PathBuf, snapshots: Vec<String>, main: Option<String> },
    #[error("{}", discover::pickle(path, files))]
    Pickle { path: PathBuf, files: Vec<String> },
    #[error("{}: both `model.safetensors` and `{}` exist; it is unclear which holds the model\n(hint: remove the stale one, or pass the single file with --config)", qp(dir), index::INDEX_NAME)]
    Ambiguous { dir: PathBuf },
    #[error("{}: no config.json\n(hint: pass --config FILE)", qp(dir))]
    NoConfig { dir: PathBuf },
    #[error("{}", discover::needs_config(path, beside.as_deref()))]
    FileNeedsConfig { path: PathBuf, beside: Option<PathBuf> },
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
    #[error(transparent)]
    Sharded(#[from] sharded::ShardedError),
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
        let md = input::stat(input)?;
        let (dir, weight_names, index_path) = if md.is_dir() {
            // Entries, not `exists()`: a broken link is there, and reading it says what is wrong.
            let single = input.join("model.safetensors");
            let idx = input.join(index::INDEX_NAME);
            match (input::entry_exists(&single), input::entry_exists(&idx)) {
                (true, true) => {
                    // A broken link beside a good file is named, not called ambiguous.
                    input::stat(&single)?;
                    input::stat(&idx)?;
                    return Err(CheckpointError::Ambiguous { dir: input.to_owned() });
                }
                (true, false) => (input.to_owned(), vec!["model.safetensors".to_string()], None),
                (false, true) => {
                    let files = index::read_index(&idx, input)?.files();
                    (input.to_owned(), files, Some(idx))
                }
                (false, false) => return Err(discover::diagnose_dir(input)),
            }
        } else if !md.is_file() {
            return Err(
                FileError { path: input.to_owned(), problem: input::Problem::NotRegular(input::kind(&md)) }.into()
            );
        } else {
            let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if discover::is_pickle(&name) {
                return Err(CheckpointError::Pickle { path: input.to_owned(), files: vec![] });
            }
            if config.is_none() {
                let beside = input.with_file_name("config.json");
                let beside = input::stat(&beside).is_ok_and(|m| m.is_file()).then_some(beside);
                return Err(CheckpointError::FileNeedsConfig { path: input.to_owned(), beside });
            }
            let dir = input.parent().map(Path::to_path_buf).unwrap_or_default();
            (dir, vec![name], None)
        };
        let (config, config_path) = read_config(&dir, config)?;

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

/// Reads `config` (`--config`), or `dir`'s config.json: the parsed JSON and the path read.
pub(crate) fn read_config(dir: &Path, config: Option<&Path>) -> Result<(serde_json::Value, PathBuf), CheckpointError> {
    let path = config.map(Path::to_owned).unwrap_or_else(|| dir.join("config.json"));
    // An explicit --config that is missing is named by the read below; an implicit one gets the
    // hint.
    if config.is_none() && !input::entry_exists(&path) {
        return Err(CheckpointError::NoConfig { dir: dir.to_owned() });
    }
    let text = input::read_regular(&path)?;
    let value =
        serde_json::from_slice(&text).map_err(|e| CheckpointError::Json { path: path.clone(), msg: e.to_string() })?;
    Ok((value, path))
}

/// Reads and validates the header of one safetensors file without reading its data.
pub fn read_header(path: &Path) -> Result<header::Header, CheckpointError> {
    let mut f = input::open_regular(path)?;
    let size = f.metadata().map_err(io(path))?.len();
    let mut prefix = Vec::with_capacity(8);
    (&mut f).take(8).read_to_end(&mut prefix).map_err(io(path))?;
    let n = header::header_len(path, &prefix, size)?;
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(io(path))?;
    header::parse(path, &json, size)
}

/// The side files of `dir` to copy: every entry but weight files, hidden names and directories.
/// Each is opened here, while planning, so one that cannot be copied (a FIFO, a socket, a device,
/// a broken link, an unreadable file) is refused before the first shard byte is written; it is
/// refused rather than skipped, so an output never silently lacks a file of its input.
pub(crate) fn list_extra_files(dir: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_weight_file(&name) || name.starts_with('.') {
            continue;
        }
        // Follows symlinks: Hugging Face cache snapshots hold links into blobs/.
        let path = entry.path();
        let side = |source| CheckpointError::SideFile { source };
        if input::stat(&path).map_err(side)?.is_dir() {
            continue;
        }
        input::open_regular(&path).map_err(side)?;
        out.push(name);
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
    fn side_file_replaced_after_planning_is_refused_when_opened() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "model.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        write(d.path(), "config.json", b"{}");
        write(d.path(), "tokenizer.json", b"{}");
        let m = CheckpointMeta::read(d.path(), None).unwrap();
        let tok = d.path().join("tokenizer.json");
        fs::remove_file(&tok).unwrap();
        let c = std::ffi::CString::new(tok.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = Checkpoint::open(m).err().expect("a FIFO side file is refused").to_string();
        assert!(e.contains("tokenizer.json` is a FIFO, not a regular file") && e.contains("copied"), "{e}");
    }

    #[test]
    fn a_broken_link_beside_the_index_is_named_not_ambiguous() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "config.json", b"{}");
        write(d.path(), "a.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        write(d.path(), index::INDEX_NAME, br#"{"weight_map":{"w":"a.safetensors"}}"#);
        std::os::unix::fs::symlink("../blobs/old", d.path().join("model.safetensors")).unwrap();
        let e = CheckpointMeta::read(d.path(), None).unwrap_err().to_string();
        assert!(e.ends_with("model.safetensors` is a symlink to `../blobs/old`, which does not exist"), "{e}");
        fs::remove_file(d.path().join("model.safetensors")).unwrap();
        write(d.path(), "model.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        assert!(matches!(CheckpointMeta::read(d.path(), None), Err(CheckpointError::Ambiguous { .. })));
    }

    #[test]
    fn missing_weights_and_config() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(CheckpointMeta::read(d.path(), None), Err(CheckpointError::NoWeights { .. })));
        write(d.path(), "model.safetensors", &image(&[("w", "F32", &[2], &[0; 8])]));
        assert!(matches!(CheckpointMeta::read(d.path(), None), Err(CheckpointError::NoConfig { .. })));
    }
}
