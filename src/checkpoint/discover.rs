//! What to tell a user whose path is not a checkpoint: what is there instead, and what to pass
//! (issue #14, class 8). Called only once reading has failed, so nothing here is on the path of
//! a good checkpoint.
//!
//! Entry points: [`diagnose_dir`] (a directory without `model.safetensors` or the index) and
//! [`is_pickle`] (a file name of PyTorch's pickle format). Every search is bounded: [`DEPTH`]
//! levels, [`MAX_DIRS`] directories read, [`MAX_LISTED`] names printed. Nothing is opened but
//! directories and `refs/main` (through [`crate::input::read_regular`], so a FIFO there cannot
//! block), and names read from disk are escaped when printed.

use super::{index, CheckpointError};
use crate::input;
use crate::text::{natural_cmp, q, qp};
use std::fs;
use std::path::{Path, PathBuf};

/// Levels below the given directory searched for checkpoints.
pub const DEPTH: usize = 2;
/// Directories read at most while searching.
pub const MAX_DIRS: usize = 1000;
/// Names listed at most in one message.
pub const MAX_LISTED: usize = 20;

/// Trainer state files that are pickles but not model weights.
const TRAINER_FILES: &[&str] = &["training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"];

/// Whether `name` is a PyTorch pickle weight file (or its index).
pub fn is_pickle(name: &str) -> bool {
    let weights = name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") || name.ends_with(".ckpt");
    (weights && !TRAINER_FILES.contains(&name) && !name.starts_with("rng_state"))
        || name == "pytorch_model.bin.index.json"
}

/// Whether `dir` holds a checkpoint's weights (an entry `model.safetensors` or the index, even a
/// broken link: reading it will then say what is wrong with it).
pub fn has_weights(dir: &Path) -> bool {
    input::entry_exists(&dir.join("model.safetensors")) || input::entry_exists(&dir.join(index::INDEX_NAME))
}

/// Whether `dir` looks like a Hugging Face cache root (`models--org--name`): `snapshots/` beside
/// `refs/` or `blobs/`.
pub fn is_cache_root(dir: &Path) -> bool {
    dir.join("snapshots").is_dir() && (dir.join("refs").is_dir() || dir.join("blobs").is_dir())
}

/// The entries of `dir` (names, sorted naturally), skipping hidden ones; empty when unreadable.
fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return vec![] };
    let mut v: Vec<String> =
        rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
    v.sort_by(|a, b| natural_cmp(a, b));
    v
}

/// The subdirectories of `dir` (following links), sorted.
fn subdirs(dir: &Path) -> Vec<String> {
    names(dir).into_iter().filter(|n| dir.join(n).is_dir()).collect()
}

/// The error for a directory that has neither `model.safetensors` nor the index.
pub fn diagnose_dir(dir: &Path) -> CheckpointError {
    if is_cache_root(dir) {
        let snapshots = subdirs(&dir.join("snapshots"));
        let main = input::read_regular(&dir.join("refs").join("main"))
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && snapshots.contains(s));
        return CheckpointError::HfCacheRoot { dir: dir.to_owned(), snapshots, main };
    }
    let all = names(dir);
    let pickles: Vec<String> = all.iter().filter(|n| is_pickle(n)).cloned().collect();
    if !pickles.is_empty() {
        return CheckpointError::Pickle { path: dir.to_owned(), files: pickles };
    }
    let safetensors: Vec<String> = all.into_iter().filter(|n| n.ends_with(".safetensors")).collect();
    let mut below = Vec::new();
    let mut budget = MAX_DIRS;
    walk(dir, 1, &mut below, &mut budget);
    CheckpointError::NoWeights { dir: dir.to_owned(), below, safetensors }
}

/// Collects the checkpoint directories below `dir` (down to [`DEPTH`]), and the snapshots of
/// cache roots found on the way, without descending into a checkpoint.
fn walk(dir: &Path, depth: usize, found: &mut Vec<PathBuf>, budget: &mut usize) {
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    for name in subdirs(dir) {
        let sub = dir.join(&name);
        if has_weights(&sub) {
            found.push(sub);
        } else if is_cache_root(&sub) {
            let snaps = sub.join("snapshots");
            found.extend(subdirs(&snaps).into_iter().map(|s| snaps.join(s)).filter(|s| has_weights(s)));
        } else if depth < DEPTH {
            walk(&sub, depth + 1, found, budget);
        }
    }
}

/// `names` quoted and joined with `, `, at most [`MAX_LISTED`], then how many more.
pub fn list(names: &[String]) -> String {
    let mut s: Vec<String> = names.iter().take(MAX_LISTED).map(|n| q(n).to_string()).collect();
    if names.len() > MAX_LISTED {
        s.push(format!("and {} more", names.len() - MAX_LISTED));
    }
    s.join(", ")
}

/// The message of [`CheckpointError::NoWeights`].
pub fn no_weights(dir: &Path, below: &[PathBuf], safetensors: &[String]) -> String {
    let mut m = format!("{}: neither `model.safetensors` nor `{}` found", qp(dir), index::INDEX_NAME);
    if !below.is_empty() {
        m += &format!("; checkpoints below it (searched {DEPTH} levels down):");
        for p in below.iter().take(MAX_LISTED) {
            m += &format!("\n  {}", qp(p));
        }
        if below.len() > MAX_LISTED {
            m += &format!("\n  and {} more", below.len() - MAX_LISTED);
        }
        m += "\n(hint: pass one of them)";
    } else if let Some(first) = safetensors.first() {
        m += &format!(
            "; it has {}\n(hint: pass one file with its config, e.g. {} --config {})",
            list(safetensors),
            qp(&dir.join(first)),
            qp(&dir.join("config.json"))
        );
    } else {
        m += "\n(hint: pass the checkpoint directory, or one .safetensors file with --config)";
    }
    m
}

/// The message of [`CheckpointError::HfCacheRoot`].
pub fn cache_root(dir: &Path, snapshots: &[String], main: Option<&str>) -> String {
    let mut m = format!(
        "{} is a Hugging Face cache root (`snapshots/`, `refs/`, `blobs/`), not a checkpoint directory",
        qp(dir)
    );
    let snap = |s: &str| qp(&dir.join("snapshots").join(s));
    match (main, snapshots) {
        (_, []) => m += "\n(hint: it has no snapshots; download the model again)",
        (Some(main), _) => {
            m += &format!("\n(hint: pass `snapshots/<revision>`: {} is refs/main", snap(main));
            if snapshots.len() > 1 {
                m += &format!("; snapshots: {}", list(snapshots));
            }
            m += ")";
        }
        (None, [one]) => m += &format!("\n(hint: pass `snapshots/<revision>`: {})", snap(one)),
        (None, _) => m += &format!("\n(hint: pass `snapshots/<revision>`, one of {})", list(snapshots)),
    }
    m
}

/// The message of [`CheckpointError::Pickle`].
pub fn pickle(path: &Path, files: &[String]) -> String {
    let what = if files.is_empty() {
        format!("{} is a PyTorch pickle checkpoint", qp(path))
    } else {
        format!("{} holds only PyTorch pickle weights ({})", qp(path), list(files))
    };
    format!(
        "{what}, which reshard does not read: unpickling runs arbitrary code from the file, and pickled \
         tensors cannot be memory-mapped, so every byte would have to be loaded and copied\n(hint: convert it \
         to safetensors with transformers: load it with its model class (`BartForConditionalGeneration`, \
         `WhisperForConditionalGeneration`, `MllamaForConditionalGeneration`) and call \
         `model.save_pretrained(NEW_DIR, safe_serialization=True)`; then pass NEW_DIR)"
    )
}

/// The message of [`CheckpointError::FileNeedsConfig`].
pub fn needs_config(path: &Path, beside: Option<&Path>) -> String {
    let mut m = format!("{}: a single .safetensors file needs --config FILE", qp(path));
    if let Some(c) = beside {
        m += &format!("\n(hint: a config.json is beside it: add --config {}", qp(c));
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if path.file_name().is_some_and(|n| n == "model.safetensors") {
            m += &format!(", or pass the directory {}", qp(dir));
        }
        m += ")";
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_names() {
        for n in ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "consolidated.00.pth", "model.pt"] {
            assert!(is_pickle(n), "{n}");
        }
        for n in ["training_args.bin", "rng_state_0.pth", "model.safetensors", "config.json"] {
            assert!(!is_pickle(n), "{n}");
        }
    }

    #[test]
    fn the_search_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..25 {
            let c = d.path().join(format!("m{i}"));
            fs::create_dir(&c).unwrap();
            fs::write(c.join("model.safetensors"), "").unwrap();
        }
        // Deeper than DEPTH: not found.
        let deep = d.path().join("a/b/c");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("model.safetensors"), "").unwrap();
        let CheckpointError::NoWeights { below, .. } = diagnose_dir(d.path()) else { panic!() };
        assert_eq!(below.len(), 25);
        assert_eq!(below[2], d.path().join("m2"), "natural order");
        let m = no_weights(d.path(), &below, &[]);
        assert_eq!(m.lines().count(), 1 + MAX_LISTED + 2, "{m}");
        assert!(m.contains("and 5 more") && !m.contains("a/b/c"), "{m}");
    }
}
