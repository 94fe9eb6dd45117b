//! Reading a sharded directory as an input (issue #16): a `reshard convert` output or a vLLM
//! `save_sharded_state` directory, `model-rank-{r}-part-{p}.safetensors` with `config.json`
//! beside them, and `reshard-manifest.json` when reshard wrote it.
//!
//! Entry points: [`is_sharded`] (does a directory look like one) and [`ShardedMeta::read`] (every
//! header, the manifest, and the tensor-parallel size, checked). Only headers are read here; what
//! the tensors mean is the planner's business (`plan::backward`).
//!
//! The tp is the manifest's when there is one, else the number of ranks the file names give; it
//! is refused ([`ShardedError::Tp`]) when ranks or parts have gaps, when the manifest and the
//! files disagree, or when the manifest says the directory holds only some ranks.

use super::{read_header, CheckpointError, SourceFile, TensorInfo};
use crate::input;
use crate::text::{q, qp};
use crate::write::manifest::Manifest;
use crate::write::MANIFEST_NAME;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a sharded directory cannot be read as an input.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ShardedError {
    #[error("{}: the tensor-parallel size cannot be determined: {why}", qp(dir))]
    Tp { dir: PathBuf, why: String },
    #[error("{}: {} is not valid: {msg}", qp(dir), MANIFEST_NAME)]
    Manifest { dir: PathBuf, msg: String },
    #[error("{}: {} lists {} with size {listed}, but the file has {found} bytes (the shards changed after they were written)", qp(dir), MANIFEST_NAME, q(file))]
    Changed { dir: PathBuf, file: String, listed: u64, found: u64 },
    #[error("{}: weight file {} is not a rank file (`model-rank-R-part-P.safetensors`); refusing to guess what it holds\n(hint: move it out of the directory)", qp(dir), q(file))]
    Stray { dir: PathBuf, file: String },
    #[error("{}: rank {rank}: tensor {} is in two parts: {} and {}", qp(dir), q(tensor), q(a), q(b))]
    Duplicate { dir: PathBuf, rank: usize, tensor: String, a: String, b: String },
    #[error("{} is a sharded directory (rank files), which this command does not take: it needs the Hugging Face checkpoint\n(hint: `reshard merge {} --out DIR` writes it; `plan`, `convert`, `merge` and `verify` take the shards as they are)", qp(dir), qp(dir))]
    NotACheckpoint { dir: PathBuf },
}

/// `(rank, part)` of a file name `model-rank-R-part-P.safetensors`.
pub fn rank_file(name: &str) -> Option<(usize, usize)> {
    let (r, p) = name.strip_prefix("model-rank-")?.strip_suffix(".safetensors")?.split_once("-part-")?;
    let canonical = |s: &str| s.parse::<usize>().ok().filter(|n| n.to_string() == s);
    Some((canonical(r)?, canonical(p)?))
}

/// Whether `dir` holds rank files and no Hugging Face weights (`model.safetensors` or the index).
pub fn is_sharded(dir: &Path) -> bool {
    if super::discover::has_weights(dir) {
        return false;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    rd.flatten().any(|e| rank_file(&e.file_name().to_string_lossy()).is_some())
}

/// The name under which the physical view lists tensor `name` of rank `rank`: `NAME@rankR`.
pub fn rank_tensor(name: &str, rank: usize) -> String {
    format!("{name}@rank{rank}")
}

/// A sharded directory's headers, manifest and tp.
#[derive(Clone, Debug)]
pub struct ShardedMeta {
    /// The directory.
    pub dir: PathBuf,
    /// The parsed config.json.
    pub config: serde_json::Value,
    /// Path of the config that was read.
    pub config_path: PathBuf,
    /// Tensor-parallel size.
    pub tp: usize,
    /// How the tp was determined, in words.
    pub how: String,
    /// reshard's manifest, when present.
    pub manifest: Option<Manifest>,
    /// Every rank file, rank-major then part.
    pub files: Vec<SourceFile>,
    /// Per rank: its tensors by name ([`TensorInfo::file`] indexes [`ShardedMeta::files`]).
    pub ranks: Vec<BTreeMap<String, TensorInfo>>,
    /// Side files to copy (config, tokenizer, ...), as for a Hugging Face checkpoint.
    pub extra_files: Vec<String>,
}

impl ShardedMeta {
    /// Reads every rank file's header, the manifest and config.json (`config` overrides the one
    /// beside the shards).
    pub fn read(dir: &Path, config: Option<&Path>) -> Result<ShardedMeta, CheckpointError> {
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| CheckpointError::Io { path: p, source }
        };
        let mut by_rank: BTreeMap<usize, Vec<(usize, String)>> = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let name = e.map_err(io(dir))?.file_name().to_string_lossy().into_owned();
            match rank_file(&name) {
                Some((r, p)) => by_rank.entry(r).or_default().push((p, name)),
                None if super::is_weight_file(&name) => {
                    return Err(ShardedError::Stray { dir: dir.to_owned(), file: name }.into())
                }
                None => {}
            }
        }
        for parts in by_rank.values_mut() {
            parts.sort();
        }
        let found: Vec<usize> = by_rank.keys().copied().collect();
        let tp_err = |why: String| -> CheckpointError { ShardedError::Tp { dir: dir.to_owned(), why }.into() };
        let manifest = match input::read_regular(&dir.join(MANIFEST_NAME)) {
            Ok(bytes) => Some(
                serde_json::from_slice::<Manifest>(&bytes)
                    .map_err(|e| ShardedError::Manifest { dir: dir.to_owned(), msg: e.to_string() })?,
            ),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let n = found.len();
        let (tp, how) = match &manifest {
            Some(m) => {
                if let Some(ranks) = &m.ranks {
                    return Err(tp_err(format!(
                        "{MANIFEST_NAME} says it holds only rank(s) {} of tp {} (written with --ranks); resharding needs every rank\n(hint: gather every rank's files in one directory)",
                        crate::text::ranges(ranks),
                        m.tp
                    )));
                }
                if m.output_is_hf() {
                    return Err(tp_err(format!("{MANIFEST_NAME} describes a Hugging Face checkpoint, not shards")));
                }
                (m.tp, format!("tp {} from {MANIFEST_NAME}", m.tp))
            }
            None => (n, format!("tp {n} from the file names (ranks 0-{}; no {MANIFEST_NAME})", n.saturating_sub(1))),
        };
        if found.iter().enumerate().any(|(i, r)| i != *r) || n != tp {
            // Bounded: a rank number in a file name can be anything up to usize::MAX.
            let upto = tp.max(found.last().map_or(0, |l| l.saturating_add(1))).min(found.len() + 4096);
            let mut missing: Vec<usize> = (0..upto).filter(|r| !by_rank.contains_key(r)).take(65).collect();
            let more = if missing.len() > 64 { ", ..." } else { "" };
            missing.truncate(64);
            let mut why = format!("files for rank(s) {}", crate::text::ranges(&found));
            if manifest.is_some() {
                why += &format!(", but {MANIFEST_NAME} says tp {tp}");
            }
            if !missing.is_empty() {
                why += &format!("; rank(s) {}{more} have no files", crate::text::ranges(&missing));
            }
            return Err(tp_err(why));
        }
        for (r, parts) in &by_rank {
            if let Some((i, (p, _))) = parts.iter().enumerate().find(|(i, (p, _))| i != p) {
                return Err(tp_err(format!("rank {r} has part {p} where part {i} was expected (parts must be 0..n)")));
            }
        }
        let (config, config_path) = super::read_config(dir, config)?;
        let mut files = Vec::new();
        let mut ranks = Vec::new();
        for (r, parts) in &by_rank {
            let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
            for (_, name) in parts {
                let path = dir.join(name);
                let header = read_header(&path)?;
                let size = std::fs::metadata(&path).map_err(io(&path))?.len();
                if let Some(e) = manifest.as_ref().and_then(|m| m.files.iter().find(|f| &f.entry.name == name)) {
                    if e.entry.size != size {
                        return Err(ShardedError::Changed {
                            dir: dir.to_owned(),
                            file: name.clone(),
                            listed: e.entry.size,
                            found: size,
                        }
                        .into());
                    }
                }
                let file = files.len();
                for (t, h) in header.tensors {
                    if let Some(prev) = tensors.get(&t) {
                        let a: &SourceFile = &files[prev.file];
                        return Err(ShardedError::Duplicate {
                            dir: dir.to_owned(),
                            rank: *r,
                            tensor: t,
                            a: a.name.clone(),
                            b: name.clone(),
                        }
                        .into());
                    }
                    tensors.insert(t, TensorInfo { dtype: h.dtype, shape: h.shape, file, start: h.start, end: h.end });
                }
                files.push(SourceFile { name: name.clone(), path, size });
            }
            ranks.push(tensors);
        }
        let extra_files = super::list_extra_files(dir)?;
        Ok(ShardedMeta { dir: dir.to_owned(), config, config_path, tp, how, manifest, files, ranks, extra_files })
    }

    /// The physical view: every rank file as one checkpoint, each tensor named
    /// [`rank_tensor`]`(name, rank)`.
    pub fn physical(&self) -> super::CheckpointMeta {
        let tensors = self
            .ranks
            .iter()
            .enumerate()
            .flat_map(|(r, t)| t.iter().map(move |(n, info)| (rank_tensor(n, r), info.clone())))
            .collect();
        super::CheckpointMeta {
            dir: self.dir.clone(),
            config: self.config.clone(),
            config_path: self.config_path.clone(),
            files: self.files.clone(),
            tensors,
            extra_files: self.extra_files.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_file_names() {
        assert_eq!(rank_file("model-rank-3-part-0.safetensors"), Some((3, 0)));
        assert_eq!(rank_file("model-rank-12-part-10.safetensors"), Some((12, 10)));
        for bad in ["model-rank-03-part-0.safetensors", "model-rank-x-part-0.safetensors", "model.safetensors"] {
            assert_eq!(rank_file(bad), None, "{bad}");
        }
    }
}
