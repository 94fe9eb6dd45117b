//! `model.safetensors.index.json`: routing tensor names to files, and cross-checking that routing
//! against the files' own headers.

use super::{CheckpointError, TensorInfo};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

/// The index file name transformers writes for sharded checkpoints.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// A parsed index.
#[derive(Debug, Deserialize)]
pub struct Index {
    /// Free-form metadata (`total_size`, ...); not trusted for anything.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Tensor name -> file name relative to the checkpoint directory.
    pub weight_map: BTreeMap<String, String>,
}

impl Index {
    /// The distinct files the index names, sorted.
    pub fn files(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.weight_map.values().collect();
        set.into_iter().cloned().collect()
    }
}

/// Whether an index's file name is a relative path that stays inside the checkpoint directory
/// (no `..`, no root, not empty). The check is on the name as written: a plain name that is a
/// symlink (the Hugging Face cache keeps snapshot files as links into `blobs/`) is fine.
pub fn is_inside(file: &str) -> bool {
    !file.is_empty() && !file.contains('\0') && Path::new(file).components().all(|c| matches!(c, Component::Normal(_)))
}

/// Parses index JSON (`path` only names it in errors) and checks every file name with [`is_inside`].
pub fn parse_index(text: &[u8], path: &Path) -> Result<Index, CheckpointError> {
    let de = &mut serde_json::Deserializer::from_slice(text);
    let index: Index = serde_path_to_error::deserialize(de).map_err(|e| CheckpointError::Json {
        path: path.to_owned(),
        msg: format!("at `{}`: {}", e.path(), e.inner()),
    })?;
    for file in index.files() {
        if !is_inside(&file) {
            return Err(CheckpointError::IndexEscapes { index: path.to_owned(), file });
        }
    }
    Ok(index)
}

/// Reads `path` and checks that every file it names is a relative path inside `dir` that exists
/// and is a regular file (after following links; a broken link is named as such).
pub fn read_index(path: &Path, dir: &Path) -> Result<Index, CheckpointError> {
    let text = crate::input::read_regular(path)?;
    let index = parse_index(&text, path)?;
    for file in index.files() {
        let p = dir.join(Path::new(&file));
        match crate::input::stat(&p) {
            Err(e) if e.is_not_found() => {
                return Err(CheckpointError::IndexMissingFile { index: path.to_owned(), file })
            }
            Err(e) => return Err(e.into()),
            Ok(md) if !md.is_file() => {
                let problem = crate::input::Problem::NotRegular(crate::input::kind(&md));
                return Err(crate::input::FileError { path: p, problem }.into());
            }
            Ok(_) => {}
        }
    }
    Ok(index)
}

/// Checks that the index and the files' headers agree tensor for tensor.
pub fn cross_check(
    path: &Path,
    index: &Index,
    tensors: &BTreeMap<String, TensorInfo>,
    files: &[String],
) -> Result<(), CheckpointError> {
    for (name, file) in &index.weight_map {
        let found = tensors.get(name).map(|t| &files[t.file]);
        if found != Some(file) {
            return Err(CheckpointError::IndexTensorNotInFile {
                index: path.to_owned(),
                tensor: name.clone(),
                file: file.clone(),
            });
        }
    }
    for (name, t) in tensors {
        if !index.weight_map.contains_key(name) {
            return Err(CheckpointError::TensorNotInIndex {
                index: path.to_owned(),
                tensor: name.clone(),
                file: files[t.file].clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::header::tests::image;
    use super::super::CheckpointMeta;
    use super::*;
    use std::fs;

    fn sharded(dir: &Path, index: &str) {
        fs::write(dir.join("config.json"), "{}").unwrap();
        fs::write(dir.join("a.safetensors"), image(&[("x", "F32", &[1], &[0; 4])])).unwrap();
        fs::write(dir.join("b.safetensors"), image(&[("y", "F32", &[1], &[0; 4])])).unwrap();
        fs::write(dir.join(INDEX_NAME), index).unwrap();
    }

    fn err(index: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        sharded(d.path(), index);
        CheckpointMeta::read(d.path(), None).unwrap_err().to_string()
    }

    #[test]
    fn reads_a_sharded_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        sharded(d.path(), r#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#);
        let m = CheckpointMeta::read(d.path(), None).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files[m.tensors["y"].file].name, "b.safetensors");
    }

    #[test]
    fn rejects_bad_indexes() {
        assert!(err(r#"{"weight_map":{"x":"../a.safetensors","y":"b.safetensors"}}"#).contains("outside"));
        assert!(err(r#"{"weight_map":{"x":"/etc/passwd","y":"b.safetensors"}}"#).contains("outside"));
        assert!(err(r#"{"weight_map":{"x":"a.safetensors","y":"c.safetensors"}}"#).contains("does not exist"));
        assert!(err(r#"{"weight_map":{"x":"b.safetensors","y":"b.safetensors"}}"#).contains("does not contain"));
        let d = tempfile::tempdir().unwrap();
        sharded(d.path(), r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#);
        let two = image(&[("y", "F32", &[1], &[0; 4]), ("z", "F32", &[1], &[0; 4])]);
        fs::write(d.path().join("b.safetensors"), two).unwrap();
        let e = CheckpointMeta::read(d.path(), None).unwrap_err().to_string();
        assert!(e.contains("`z` in `b.safetensors` is not listed in the index"), "{e}");
        assert!(err(r#"{"weight_map":{"x":3}}"#).contains("weight_map.x"));
    }

    #[test]
    fn tensor_in_two_files() {
        let d = tempfile::tempdir().unwrap();
        sharded(d.path(), r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#);
        fs::write(d.path().join("b.safetensors"), image(&[("x", "F32", &[1], &[0; 4])])).unwrap();
        let e = CheckpointMeta::read(d.path(), None).unwrap_err().to_string();
        assert!(e.contains("in two files"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn follows_hf_cache_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let blobs = root.path().join("blobs");
        let snap = root.path().join("snapshots").join("abc");
        fs::create_dir_all(&blobs).unwrap();
        fs::create_dir_all(&snap).unwrap();
        fs::write(blobs.join("1111"), image(&[("x", "F32", &[1], &[0; 4])])).unwrap();
        fs::write(blobs.join("2222"), r#"{"weight_map":{"x":"model-00001-of-00001.safetensors"}}"#).unwrap();
        fs::write(blobs.join("3333"), "{}").unwrap();
        std::os::unix::fs::symlink("../../blobs/1111", snap.join("model-00001-of-00001.safetensors")).unwrap();
        std::os::unix::fs::symlink("../../blobs/2222", snap.join(INDEX_NAME)).unwrap();
        std::os::unix::fs::symlink("../../blobs/3333", snap.join("config.json")).unwrap();
        let m = CheckpointMeta::read(&snap, None).unwrap();
        assert_eq!(m.tensors.len(), 1);
        assert_eq!(m.extra_files, vec!["config.json"]);
    }
}
