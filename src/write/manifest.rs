//! The manifest written beside the shards (`reshard-manifest.json`): where every output byte came
//! from. Documented in README.md ("Output layout"); `verify` reads it back.

use crate::checkpoint::fingerprint::Fingerprint;
use crate::checkpoint::CheckpointMeta;
use crate::mapping::engine::EngineTarget;
use crate::plan::{FromShards, OutTensor, OutputKind, ShardPlan, PLAN_FORMAT_VERSION};
use serde::{Deserialize, Deserializer, Serialize};

/// One written file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name.
    pub name: String,
    /// Rank.
    pub rank: usize,
    /// Part.
    pub part: usize,
    /// Size in bytes.
    pub size: u64,
    /// CRC-32 (IEEE, as zlib computes it) of the whole file, 8 lowercase hex digits.
    pub crc32: String,
}

/// A source file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// Name relative to the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// A file of the output with its tensors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Checksum entry.
    #[serde(flatten)]
    pub entry: FileEntry,
    /// Tensors with their sources and slices. Written, not read back: `verify` recomputes the
    /// plan, and reading them would hold a second copy of it during the whole comparison (5 MiB
    /// of a Whisper-large-v3 tp-4 verify's 11 MiB of heap).
    #[serde(skip_deserializing, default)]
    pub tensors: Vec<OutTensor>,
}

/// The manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`PLAN_FORMAT_VERSION`].
    pub format_version: u32,
    /// `reshard`.
    pub tool: String,
    /// The tool version that wrote it.
    pub tool_version: String,
    /// Model family.
    pub family: String,
    /// Mapping origin.
    pub mapping: String,
    /// Mapping CRC-32.
    pub mapping_crc32: u32,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Cap on tensor data per file.
    pub max_part_size: u64,
    /// Float tensors cast to this dtype (`null`: as in the source).
    #[serde(default)]
    pub dtype: Option<crate::dtype::Dtype>,
    /// The engine target the output is laid out for (`null`: the mapping declares none).
    #[serde(default, deserialize_with = "lenient_target")]
    pub target: Option<EngineTarget>,
    /// The checkpoint's weight files.
    pub source_files: Vec<SourceEntry>,
    /// Fingerprint of the source's tensors, which `verify` checks first (`None`: a manifest
    /// written before it was recorded).
    #[serde(default)]
    pub source_fingerprint: Option<Fingerprint>,
    /// Non-weight files copied from the checkpoint.
    pub copied_files: Vec<String>,
    /// `[alias, primary]` pairs checked identical and not written.
    pub aliases: Vec<[String; 2]>,
    /// What was written (absent: shards).
    #[serde(default, skip_serializing_if = "OutputKind::is_shards")]
    pub output: OutputKind,
    /// A partial output (`--ranks`): the only ranks it holds (absent: every rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Vec<usize>>,
    /// The sharded input it was made from (absent: a Hugging Face checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_shards: Option<FromShards>,
    /// Output files.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Whether it describes a Hugging Face checkpoint (`reshard merge`).
    pub fn output_is_hf(&self) -> bool {
        self.output == OutputKind::HuggingFace
    }

    /// Builds the manifest of a finished write.
    pub fn new(
        meta: &CheckpointMeta,
        fingerprint: Fingerprint,
        plan: &ShardPlan,
        files: &[FileEntry],
        copied: &[String],
    ) -> Manifest {
        Manifest {
            format_version: PLAN_FORMAT_VERSION,
            tool: "reshard".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            family: plan.family.clone(),
            mapping: plan.mapping.clone(),
            mapping_crc32: plan.mapping_crc32,
            tp: plan.tp,
            max_part_size: plan.max_part_size,
            dtype: plan.dtype,
            target: plan.target.clone(),
            source_files: meta.files.iter().map(|f| SourceEntry { name: f.name.clone(), size: f.size }).collect(),
            source_fingerprint: Some(fingerprint),
            copied_files: copied.to_vec(),
            aliases: plan.aliases.clone(),
            output: plan.output,
            ranks: plan.ranks.clone(),
            from_shards: plan.from_shards.clone(),
            files: plan
                .files
                .iter()
                .zip(files)
                .map(|(p, e)| ManifestFile { entry: e.clone(), tensors: p.tensors.clone() })
                .collect(),
        }
    }
}

/// The fields of [`EngineTarget`] (a test checks the list).
const KNOWN_TARGET_FIELDS: [&str; 6] = ["name", "engine", "min_version", "max_version", "model_code", "evidence"];

/// Reads a manifest's target ignoring fields this build does not know: mapping files are strict
/// about their keys, but a manifest written by a later version may carry more.
fn lenient_target<'de, D: Deserializer<'de>>(d: D) -> Result<Option<EngineTarget>, D::Error> {
    let Some(mut v) = Option::<serde_json::Value>::deserialize(d)? else { return Ok(None) };
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| KNOWN_TARGET_FIELDS.contains(&k.as_str()));
    }
    serde_json::from_value(v).map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_with_fields_of_a_later_version_still_reads() {
        let t = r#"{"name":"vllm-0.14","engine":"vllm","min_version":"0.14.0","max_version":"0.32.0","model_code":"m","evidence":"e","added_later":1}"#;
        let mut de = serde_json::Deserializer::from_str(t);
        assert_eq!(lenient_target(&mut de).unwrap().unwrap().name, "vllm-0.14");
        let mut de = serde_json::Deserializer::from_str("null");
        assert_eq!(lenient_target(&mut de).unwrap(), None);
        // Every field the target has is kept.
        let full: EngineTarget = serde_json::from_str(&t.replace(r#","added_later":1"#, "")).unwrap();
        let keys: Vec<String> = serde_json::to_value(&full).unwrap().as_object().unwrap().keys().cloned().collect();
        let mut known: Vec<&str> = KNOWN_TARGET_FIELDS.to_vec();
        known.sort_unstable();
        assert_eq!(keys, known);
    }
}
