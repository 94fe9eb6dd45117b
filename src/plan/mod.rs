//! The planner: a pure function from (checkpoint metadata, mapping, tp) to a [`ShardPlan`] that
//! says, byte range by byte range, what every rank's files will hold. No I/O happens here.
//!
//! It runs in two steps. [`resolve`] binds every checkpoint tensor to exactly one mapping rule and
//! checks shapes against config.json (independent of tp). [`Resolved::plan`] then checks that tp
//! divides what must divide and expands every parameter into per-rank pieces. Splitting the two
//! makes [`Resolved::valid_tps`] cheap, so a bad `--tp` is answered with the values that work.

pub mod backward;
pub mod split;

use crate::checkpoint::CheckpointMeta;
use crate::dtype::{CastRule, Dtype};
use crate::mapping::dims::{self, DimError, Dims};
use crate::mapping::engine::{self, EngineTarget};
use crate::mapping::pattern::Bindings;
use crate::mapping::{Check, CheckKind, LayerExpect, Mapping, Reshape, ShapeEntry, SplitSpec};
use crate::text::{natural_cmp, q, shape as fmt_shape};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the plan/manifest JSON layout.
pub const PLAN_FORMAT_VERSION: u32 = 1;

/// Default cap on one output file's tensor data: 5 GiB.
pub const DEFAULT_MAX_PART_SIZE: u64 = 5 << 30;

/// Why no plan can be made.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum PlanError {
    #[error("mapping {mapping}: {source} (config {config})")]
    Dim { mapping: String, config: String, source: Box<DimError> },
    #[error("{} checkpoint tensor(s) claimed by no rule of mapping {mapping}: {}\n(hint: every tensor must be mapped; add a rule, or an alias if it duplicates another tensor)", names.len(), list(names))]
    Unclaimed { mapping: String, names: Vec<String> },
    #[error("tensor {} is claimed by two rules of mapping {mapping}: {a} and {b}", q(tensor))]
    Ambiguous { mapping: String, tensor: String, a: String, b: String },
    #[error("mapping {mapping}: rule {rule} matches no tensor of the checkpoint\n(hint: a rule that matches nothing usually means a typo or the wrong family)")]
    DeadRule { mapping: String, rule: String },
    #[error("tensor {} is missing: rule {rule} needs it as part `{part}` alongside {}", q(missing), q(present))]
    MissingPart { rule: String, part: String, missing: String, present: String },
    #[error("tensors {} and {} both map to output {}", q(a), q(b), q(target))]
    TargetCollision { target: String, a: String, b: String },
    #[error("tensor {}: {msg}", q(tensor))]
    Shape { tensor: String, msg: String },
    #[error("tensor {} has dtype {found}, but {} in the same parameter has {expected}", q(tensor), q(other))]
    DtypeMismatch { tensor: String, found: Dtype, other: String, expected: Dtype },
    #[error("alias {} differs from {} in {what}", q(alias), q(primary))]
    AliasMismatch { alias: String, primary: String, what: String },
    #[error("{0}")]
    Layers(Box<LayerMismatch>),
    #[error("{0}")]
    ShapeCheck(Box<ShapeMismatch>),
    #[error("{check}: `{expr}`: {msg} (config {config})")]
    CheckExpr { check: String, expr: String, msg: String, config: String },
    #[error("config.json `{key}`: {msg} (config {config})")]
    Config { key: String, msg: String, config: String },
    #[error("tp {tp} does not fit this model: {reason}\n(hint: valid tp values: {})", if valid.is_empty() { "none up to 512".to_string() } else { valid.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ") })]
    BadTp { tp: usize, reason: String, valid: Vec<usize> },
    #[error("--max-part-size must be at least 1 byte")]
    ZeroPartSize,
    #[error("--dtype {}: tensor {} is {dtype}, which --dtype does not cast: {reason}{}\n(hint: convert without --dtype to keep every tensor's dtype as it is)", to.name().to_lowercase(), q(tensor), if *more > 0 { format!(" ({more} more tensor(s) of dtypes --dtype does not cast)") } else { String::new() })]
    Cast { tensor: String, dtype: Dtype, to: Dtype, reason: String, more: usize },
    #[error("--target: {msg} in mapping {mapping}\n(hint: {hint})")]
    Target { mapping: String, msg: String, hint: String },
    #[error("--ranks: {0}")]
    Ranks(String),
    #[error(transparent)]
    Backward(#[from] Box<backward::BackwardError>),
}

/// A `layer_count` or `layer_set` check failed: the layers config.json gives are not those present.
#[derive(Debug, thiserror::Error)]
#[error(
    "{expected}, but tensors matching {} exist for {}{detail} ({check} of mapping {mapping}; config {config})",
    q(pattern),
    layer_list(found)
)]
pub struct LayerMismatch {
    /// What config.json gives, with the keys.
    pub expected: String,
    /// The pattern of the failing group, `{i}` left in.
    pub pattern: String,
    /// The layer numbers present, as written in the names.
    pub found: Vec<String>,
    /// The missing and the unexpected layers, with an example name each.
    pub detail: String,
    /// `checks[N]`.
    pub check: String,
    /// The mapping's origin.
    pub mapping: String,
    /// The quoted path of config.json.
    pub config: String,
}

/// A `shape` check failed: a tensor's shape is not what config.json implies.
#[derive(Debug, thiserror::Error)]
#[error(
    "tensor {} has shape {}{}, but config.json implies {}{}: {detail} ({check} of mapping {mapping}; config {config})",
    q(tensor), fmt_shape(found),
    if found.len() == expected.len() { String::new() } else { format!(" ({}-d)", found.len()) },
    if found.len() == expected.len() { String::new() } else { format!("a {}-d ", expected.len()) },
    fmt_shape(&expected.iter().map(|&e| e as usize).collect::<Vec<_>>())
)]
pub struct ShapeMismatch {
    /// The tensor, as named in the file.
    pub tensor: String,
    /// Its shape.
    pub found: Vec<usize>,
    /// The shape config.json implies.
    pub expected: Vec<u64>,
    /// Each differing dim with the config keys behind it.
    pub detail: String,
    /// `checks[N]`.
    pub check: String,
    /// The mapping's origin.
    pub mapping: String,
    /// The quoted path of config.json.
    pub config: String,
}

/// Layer numbers as `[0, 1, 2]`, the first 16 and how many in all beyond that.
fn layer_list(layers: &[String]) -> String {
    if layers.is_empty() {
        return "no layer".into();
    }
    let shown: Vec<&str> = layers.iter().take(16).map(String::as_str).collect();
    let more = if layers.len() > 16 { format!(", ... ({} in all)", layers.len()) } else { String::new() };
    format!("layer(s) [{}{more}]", shown.join(", "))
}

fn list(names: &[String]) -> String {
    let shown: Vec<String> = names.iter().take(12).map(|n| q(n).to_string()).collect();
    let more = names.len().saturating_sub(12);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// How a resolved parameter is split; numbers already bound from config.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Layout {
    Replicated,
    Column,
    Row,
    MergedColumn,
    FusedQkv { heads: usize, kv_heads: usize, head_dim: usize },
    Kv { heads: usize, kv_heads: usize, head_dim: usize },
    Vocab { rows: usize, pad_to: usize },
}

impl Layout {
    /// Short name as in mapping files.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Replicated => "replicated",
            Layout::Column => "column",
            Layout::Row => "row",
            Layout::MergedColumn => "merged_column",
            Layout::FusedQkv { .. } => "fused_qkv",
            Layout::Kv { .. } => "kv",
            Layout::Vocab { .. } => "vocab",
        }
    }
}

/// One input of a parameter: a checkpoint tensor, or zeros shaped like a sibling.
#[derive(Clone, Debug)]
pub struct Input {
    /// Shard id (`q`, `k`, `v`, `gate`, ...; empty for single-source rules).
    pub shard_id: String,
    /// Checkpoint name (as in the file), or `None` for synthesized zeros.
    pub source: Option<String>,
    /// Shape after the rule's reshape.
    pub shape: Vec<usize>,
}

/// A checkpoint parameter bound to its rule, ready to be expanded per rank.
#[derive(Clone, Debug)]
pub struct Param {
    /// Index of the rule in the mapping.
    pub rule: usize,
    /// Output names (several for tied weights).
    pub targets: Vec<String>,
    /// Split layout.
    pub layout: Layout,
    /// Inputs in stacking order.
    pub inputs: Vec<Input>,
    /// Element type.
    pub dtype: Dtype,
}

/// The tp-independent result of matching a checkpoint against a mapping.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Mapping family.
    pub family: String,
    /// Mapping origin.
    pub mapping: String,
    /// Mapping digest.
    pub mapping_crc32: u32,
    /// Resolved dims.
    pub dims: Dims,
    /// Parameters, in target-name order.
    pub params: Vec<Param>,
    /// `(alias, primary)` source pairs that must be byte-identical.
    pub aliases: Vec<(String, String)>,
    /// Total bytes of source tensor data.
    pub source_bytes: u64,
    /// Constant tensors (engine buffers), for every target; [`Resolved::plan`] keeps those of
    /// the chosen target.
    pub constants: Vec<ConstParam>,
    /// The mapping's targets.
    pub engines: Vec<EngineTarget>,
    /// The mapping's default target.
    pub default_engine: Option<String>,
    /// The mapping's `engine_status`.
    pub engine_status: Option<String>,
}

/// A constant tensor bound to its names.
#[derive(Clone, Debug)]
pub struct ConstParam {
    /// Output names.
    pub targets: Vec<String>,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// The value of every element.
    pub value: f64,
    /// The targets it is written for (`None`: all).
    pub engines: Option<Vec<String>>,
}

/// One piece of an output tensor, stacked along dim 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Piece {
    /// A slice of a checkpoint tensor.
    Copy {
        /// Checkpoint tensor name, as in its file.
        source: String,
        /// The source's shape as sliced (after any reshape).
        source_shape: Vec<usize>,
        /// Sliced dimension of the source.
        dim: usize,
        /// First index along `dim`.
        start: usize,
        /// One past the last index along `dim`.
        end: usize,
        /// Rows `[first, end)` of the output tensor (dim 0) this piece fills.
        rows: [usize; 2],
    },
    /// Zero padding or a synthesized zero part.
    Zeros {
        /// Rows `[first, end)` of the output tensor (dim 0) this piece fills.
        rows: [usize; 2],
        /// Why: `padding` or `synthesized k`.
        reason: String,
    },
    /// Every element the same value, in the tensor's dtype (a constant of the mapping: an
    /// engine buffer no checkpoint tensor feeds). A 0-d tensor counts as one row.
    Constant {
        /// Rows `[first, end)` of the output tensor (dim 0) this piece fills.
        rows: [usize; 2],
        /// The value.
        value: Value,
    },
    /// Slices of several tensors side by side along `dim` (at least 1): for every index of the
    /// dims before `dim`, each part's slice in turn. A row-parallel weight read from the input
    /// ranks that hold its columns ([`backward`]); planned from a Hugging Face checkpoint, a
    /// piece is always one [`Piece::Copy`].
    Concat {
        /// Rows `[first, end)` of the output tensor (dim 0) this piece fills.
        rows: [usize; 2],
        /// The dimension the parts are side by side in.
        dim: usize,
        /// The parts, in order along `dim`.
        parts: Vec<Slice>,
    },
}

/// A slice `start..end` along the dim of a [`Piece::Concat`] of one source tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Source tensor name.
    pub source: String,
    /// The source's shape.
    pub source_shape: Vec<usize>,
    /// First index along the dim.
    pub start: usize,
    /// One past the last index.
    pub end: usize,
}

impl Piece {
    /// Rows `[first, end)` of the output tensor this piece fills.
    pub fn rows(&self) -> [usize; 2] {
        match self {
            Piece::Copy { rows, .. }
            | Piece::Zeros { rows, .. }
            | Piece::Constant { rows, .. }
            | Piece::Concat { rows, .. } => *rows,
        }
    }

    /// The source slices the piece reads, as `(source, source_shape, dim, start, end)`, in the
    /// order their bytes are laid out one outer index at a time; empty for zeros and constants.
    pub fn slices(&self) -> Vec<(&str, &[usize], usize, usize, usize)> {
        match self {
            Piece::Copy { source, source_shape, dim, start, end, .. } => {
                vec![(source.as_str(), source_shape.as_slice(), *dim, *start, *end)]
            }
            Piece::Concat { dim, parts, .. } => {
                parts.iter().map(|p| (p.source.as_str(), p.source_shape.as_slice(), *dim, p.start, p.end)).collect()
            }
            Piece::Zeros { .. } | Piece::Constant { .. } => vec![],
        }
    }
}

/// What a plan writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Per-rank files `model-rank-R-part-P.safetensors` in the engine's layout.
    #[default]
    Shards,
    /// A Hugging Face checkpoint: the source's names, `model.safetensors` or an index and parts
    /// (`reshard merge`).
    HuggingFace,
}

impl OutputKind {
    /// Whether this is [`OutputKind::Shards`] (the default, not serialized).
    pub fn is_shards(&self) -> bool {
        *self == OutputKind::Shards
    }
}

/// The sharded input a plan reads (issue #16), as recorded in the plan and the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromShards {
    /// The input's tensor-parallel size.
    pub tp: usize,
    /// The engine target it is laid out for (`null`: the mapping declares none).
    pub target: Option<String>,
    /// How the tp and the target were determined.
    pub how: String,
    /// The cast its own manifest records (`null`: none, or no manifest): the tensors read back
    /// are in this dtype, not the original checkpoint's.
    #[serde(default)]
    pub cast: Option<Dtype>,
}

/// A constant's value. Two are equal when their bits are, so plans compare as plain values.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Value(pub f64);

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Value {}

/// One tensor of an output file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutTensor {
    /// Target name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Split kind that produced it.
    pub split: String,
    /// Data bytes.
    pub nbytes: u64,
    /// Pieces in row order; they tile dim 0 exactly.
    pub pieces: Vec<Piece>,
}

/// One output file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePlan {
    /// File name, `model-rank-{rank}-part-{part}.safetensors`.
    pub name: String,
    /// Rank.
    pub rank: usize,
    /// Part.
    pub part: usize,
    /// Exact size of the file in bytes (header included).
    pub size: u64,
    /// Tensors in file order.
    pub tensors: Vec<OutTensor>,
}

/// What to plan for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Cap on tensor data per output file.
    pub max_part_size: u64,
    /// Cast float tensors to this dtype (`None`: keep each tensor's dtype).
    pub dtype: Option<Dtype>,
    /// The engine target: a target name of the mapping, or `ENGINE==VERSION` (`None`: the
    /// mapping's default).
    pub target: Option<String>,
    /// Write only these ranks (`--ranks`; `None`: all). Everything is planned either way, so the
    /// files written are those a full run writes.
    pub ranks: Option<Vec<usize>>,
}

impl PlanOptions {
    /// `tp` ranks, the default part size, no cast, the default target, every rank.
    pub fn new(tp: usize) -> PlanOptions {
        PlanOptions { tp, max_part_size: DEFAULT_MAX_PART_SIZE, dtype: None, target: None, ranks: None }
    }
}

/// The plan: every output file of every rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// [`PLAN_FORMAT_VERSION`].
    pub format_version: u32,
    /// Model family (from the mapping).
    pub family: String,
    /// Mapping origin (path or `built-in NAME.json`).
    pub mapping: String,
    /// CRC-32 of the mapping text.
    pub mapping_crc32: u32,
    /// Tensor-parallel size.
    pub tp: usize,
    /// Cap on tensor data per file.
    pub max_part_size: u64,
    /// Float tensors cast to this dtype (`null`: as in the source).
    pub dtype: Option<Dtype>,
    /// The engine and release range the output is laid out for (`null`: the mapping declares
    /// no targets).
    #[serde(default)]
    pub target: Option<EngineTarget>,
    /// Without a target: the mapping's word on which engine loads the output, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_status: Option<String>,
    /// Total bytes of source tensor data.
    pub source_bytes: u64,
    /// `[alias, primary]` source tensors checked byte-identical and not written.
    pub aliases: Vec<[String; 2]>,
    /// What is written (absent: shards).
    #[serde(default, skip_serializing_if = "OutputKind::is_shards")]
    pub output: OutputKind,
    /// With `--ranks`: the only ranks written; the others are planned but not written (absent:
    /// every rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Vec<usize>>,
    /// The sharded input read (absent: a Hugging Face checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_shards: Option<FromShards>,
    /// Output files, rank-major then part (only those of [`ShardPlan::ranks`]).
    pub files: Vec<FilePlan>,
}

impl ShardPlan {
    /// Bytes written over all files.
    pub fn output_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Whether rank `r`'s files are written.
    pub fn writes_rank(&self, r: usize) -> bool {
        self.ranks.as_ref().is_none_or(|v| v.contains(&r))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Part(usize),
    Alias(usize),
}

/// Binds every checkpoint tensor to a rule and checks shapes; see the module docs.
pub fn resolve(meta: &CheckpointMeta, mapping: &Mapping) -> Result<Resolved, PlanError> {
    let config_label = crate::text::qp(&meta.config_path);
    let dims = dims::resolve(&mapping.file.dims, &meta.config).map_err(|source| PlanError::Dim {
        mapping: mapping.origin.clone(),
        config: config_label.clone(),
        source: Box::new(source),
    })?;
    let cv = ConfigView { specs: &mapping.file.dims, config: &meta.config, dims: &dims, label: config_label };
    // canonical name -> original name
    let mut canon: BTreeMap<String, String> = BTreeMap::new();
    for name in meta.tensors.keys() {
        let c = mapping.canonical(name).into_owned();
        if let Some(prev) = canon.insert(c.clone(), name.clone()) {
            return Err(PlanError::TargetCollision { target: c, a: prev, b: name.clone() });
        }
    }
    // (rule, bindings) -> role -> original name
    type Inst = BTreeMap<(usize, Bindings), Vec<(Role, String)>>;
    let mut instances: Inst = BTreeMap::new();
    let mut unclaimed = Vec::new();
    for (cname, orig) in &canon {
        let mut hit: Option<(usize, Role, Bindings)> = None;
        for rule in &mapping.rules {
            let roles = rule
                .parts
                .iter()
                .enumerate()
                .map(|(j, p)| (Role::Part(j), &p.pattern))
                .chain(rule.aliases.iter().enumerate().map(|(j, p)| (Role::Alias(j), p)));
            for (role, pat) in roles {
                if let Some(b) = pat.matches(cname) {
                    if let Some((r0, _, _)) = &hit {
                        return Err(PlanError::Ambiguous {
                            mapping: mapping.origin.clone(),
                            tensor: orig.clone(),
                            a: mapping.rules[*r0].label(),
                            b: rule.label(),
                        });
                    }
                    hit = Some((rule.index, role, b));
                }
            }
        }
        match hit {
            Some((r, role, b)) => instances.entry((r, b)).or_default().push((role, orig.clone())),
            None => unclaimed.push(orig.clone()),
        }
    }
    if !unclaimed.is_empty() {
        unclaimed.sort_by(|a, b| natural_cmp(a, b));
        return Err(PlanError::Unclaimed { mapping: mapping.origin.clone(), names: unclaimed });
    }
    for rule in &mapping.rules {
        if !instances.keys().any(|(r, _)| *r == rule.index) {
            return Err(PlanError::DeadRule { mapping: mapping.origin.clone(), rule: rule.label() });
        }
    }

    let mut params = Vec::new();
    let mut aliases = Vec::new();
    let mut targets_seen: BTreeMap<String, String> = BTreeMap::new();
    for ((r, binding), members) in &instances {
        let rule = &mapping.rules[*r];
        let find = |role: Role| members.iter().find(|(ro, _)| *ro == role).map(|(_, n)| n.clone());
        let Some(anchor_name) = find(Role::Part(rule.anchor)) else {
            let (_, present) = &members[0];
            let missing = rule.parts[rule.anchor].pattern.render(binding);
            return Err(PlanError::MissingPart {
                rule: rule.label(),
                part: rule.parts[rule.anchor].shard_id.clone(),
                missing,
                present: present.clone(),
            });
        };
        let info = |n: &str| &meta.tensors[n];
        let view = |n: &str| -> Result<Vec<usize>, PlanError> {
            let s = &info(n).shape;
            match rule.reshape {
                None => Ok(s.clone()),
                Some(Reshape::Flatten2d) if !s.is_empty() => Ok(vec![s[0], s[1..].iter().product()]),
                Some(Reshape::Flatten2d) => {
                    Err(PlanError::Shape { tensor: n.into(), msg: "cannot flatten a 0-d tensor".into() })
                }
            }
        };
        let dtype = info(&anchor_name).dtype;
        let mut inputs = Vec::new();
        for (j, part) in rule.parts.iter().enumerate() {
            let id = &part.shard_id;
            let synthesize =
                part.zeros_like.as_ref().is_some_and(|(_, when)| when.iter().all(|(k, v)| binding.get(k) == Some(v)));
            match (find(Role::Part(j)), synthesize) {
                (Some(n), _) => {
                    if info(&n).dtype != dtype {
                        return Err(PlanError::DtypeMismatch {
                            tensor: n.clone(),
                            found: info(&n).dtype,
                            other: anchor_name.clone(),
                            expected: dtype,
                        });
                    }
                    inputs.push(Input { shard_id: id.clone(), source: Some(n.clone()), shape: view(&n)? });
                }
                (None, true) => inputs.push(Input { shard_id: id.clone(), source: None, shape: vec![] }),
                (None, false) => {
                    return Err(PlanError::MissingPart {
                        rule: rule.label(),
                        part: id.clone(),
                        missing: part.pattern.render(binding),
                        present: anchor_name.clone(),
                    })
                }
            }
        }
        // Synthesized parts take their sibling's shape.
        for j in 0..inputs.len() {
            if inputs[j].source.is_none() {
                let like = rule.parts[j].zeros_like.as_ref().expect("only zeros_like parts may be absent").0;
                inputs[j].shape = inputs[like].shape.clone();
            }
        }
        for (k, _) in rule.aliases.iter().enumerate() {
            if let Some(a) = find(Role::Alias(k)) {
                let (ia, ip) = (info(&a), info(&anchor_name));
                if ia.dtype != ip.dtype || ia.shape != ip.shape {
                    return Err(PlanError::AliasMismatch {
                        alias: a,
                        primary: anchor_name.clone(),
                        what: format!("{} {} vs {} {}", ia.dtype, fmt_shape(&ia.shape), ip.dtype, fmt_shape(&ip.shape)),
                    });
                }
                aliases.push((a, anchor_name.clone()));
            }
        }
        let layout = layout_of(rule.split.clone(), &cv, &inputs, &anchor_name)?;
        let targets: Vec<String> = rule.targets.iter().map(|t| t.render(binding)).collect();
        for t in &targets {
            if let Some(prev) = targets_seen.insert(t.clone(), anchor_name.clone()) {
                return Err(PlanError::TargetCollision { target: t.clone(), a: prev, b: anchor_name.clone() });
            }
        }
        params.push(Param { rule: *r, targets, layout, inputs, dtype });
    }
    // The declared checks, after the rules' own (a missing part, stacking, head rows): what they
    // add is what config.json implies beyond the splits.
    for check in &mapping.checks {
        run_check(check, meta, mapping, &canon, &cv)?;
    }
    params.sort_by(|a, b| natural_cmp(&a.targets[0], &b.targets[0]));
    let mut constants = Vec::new();
    for c in &mapping.constants {
        let mut names = std::collections::BTreeSet::new();
        for b in canon.keys().filter_map(|n| c.for_each.matches(n)) {
            names.insert(c.targets.iter().map(|t| t.render(&b)).collect::<Vec<_>>());
        }
        if names.is_empty() {
            return Err(PlanError::DeadRule { mapping: mapping.origin.clone(), rule: c.label() });
        }
        for targets in names {
            for t in &targets {
                if let Some(prev) = targets_seen.insert(t.clone(), c.label()) {
                    return Err(PlanError::TargetCollision { target: t.clone(), a: prev, b: c.label() });
                }
            }
            constants.push(ConstParam {
                targets,
                dtype: c.dtype,
                shape: c.shape.clone(),
                value: c.value,
                engines: c.engines.clone(),
            });
        }
    }
    Ok(Resolved {
        family: mapping.file.family.clone(),
        mapping: mapping.origin.clone(),
        mapping_crc32: mapping.digest,
        dims,
        params,
        aliases,
        source_bytes: meta.total_bytes(),
        constants,
        engines: mapping.file.engines.clone(),
        default_engine: mapping.file.default_engine.clone(),
        engine_status: mapping.file.engine_status.clone(),
    })
}

/// config.json as the checks see it: the mapping's dims, their values, and the file's name.
struct ConfigView<'a> {
    specs: &'a BTreeMap<String, crate::mapping::DimSpec>,
    config: &'a serde_json::Value,
    dims: &'a Dims,
    /// The quoted path of config.json.
    label: String,
}

impl ConfigView<'_> {
    /// A dim or expression with the config.json keys it comes from:
    /// `` `encoder_ffn_dim` = 64 (dim `encoder_ffn`) ``, `` `max_positions + 2` = 42 (`max_position_embeddings` = 40) ``.
    fn explain(&self, expr: &str) -> String {
        let expr = expr.trim();
        if let Ok(n) = expr.parse::<u64>() {
            return n.to_string();
        }
        let keys = dims::provenance(expr, self.specs, self.config);
        let value = dims::eval(expr, self.dims).map(|v| v.to_string()).unwrap_or_else(|e| e);
        match (self.specs.get(expr), keys.as_slice()) {
            (Some(s), [k]) if s.expr.is_none() => {
                let default = if k.defaulted { "; absent from config.json: the default" } else { "" };
                format!("`{}`{} (dim `{expr}`{default})", k.key, k.value)
            }
            (_, []) => format!("`{expr}` = {value}"),
            _ => format!("`{expr}` = {value} ({})", dims::provenance_text(expr, self.specs, self.config)),
        }
    }

    /// Evaluates an expression of check `c`, or the error naming the check and the keys.
    fn eval(&self, expr: &str, c: &Check, mapping: &Mapping) -> Result<u64, PlanError> {
        dims::eval(expr, self.dims).map_err(|msg| {
            let keys = dims::provenance_text(expr, self.specs, self.config);
            PlanError::CheckExpr {
                check: format!("checks[{}] of mapping {}", c.index, mapping.origin),
                expr: expr.to_string(),
                msg: if keys.is_empty() { msg } else { format!("{msg} ({keys})") },
                config: self.label.clone(),
            }
        })
    }
}

/// Which layers a layer check expects.
enum Expected {
    /// `0..n`, without those in the set.
    Range(u64, std::collections::BTreeSet<u64>),
    /// Exactly these.
    Set(std::collections::BTreeSet<u64>),
}

impl Expected {
    fn contains(&self, v: u64) -> bool {
        match self {
            Expected::Range(n, minus) => v < *n && !minus.contains(&v),
            Expected::Set(s) => s.contains(&v),
        }
    }

    /// Up to `k` expected layers `found` lacks, and how many it lacks in all (without walking a
    /// huge range: every expected value before the k-th missing one is in `found` or the set).
    fn missing(&self, found: &std::collections::BTreeSet<u64>, k: usize) -> (Vec<u64>, u64) {
        let hits = found.iter().filter(|v| self.contains(**v)).count() as u64;
        let (size, first): (u64, Vec<u64>) = match self {
            Expected::Range(n, minus) => {
                let size = n - minus.iter().filter(|v| **v < *n).count() as u64;
                let first = (0..*n).filter(|v| self.contains(*v) && !found.contains(v)).take(k).collect();
                (size, first)
            }
            Expected::Set(s) => (s.len() as u64, s.iter().filter(|v| !found.contains(v)).take(k).copied().collect()),
        };
        (first, size - hits)
    }
}

/// Runs one declared check against the tensors (canonical name -> name in the file).
fn run_check(
    c: &Check,
    meta: &CheckpointMeta,
    mapping: &Mapping,
    canon: &BTreeMap<String, String>,
    cv: &ConfigView<'_>,
) -> Result<(), PlanError> {
    match &c.kind {
        CheckKind::Shape { shape } => {
            let mut matched = false;
            for (cname, orig) in canon {
                let Some(b) = c.pattern.matches(cname) else { continue };
                matched = true;
                let mut expected = Vec::new();
                let mut texts = Vec::new();
                for e in shape {
                    let (v, text) = match e {
                        ShapeEntry::Size(n) => (*n, n.to_string()),
                        ShapeEntry::Expr(t) => {
                            let text = t.render(&b);
                            (cv.eval(&text, c, mapping)?, text)
                        }
                    };
                    expected.push(v);
                    texts.push(text);
                }
                let found = &meta.tensors[orig].shape;
                if found.len() == expected.len() && found.iter().zip(&expected).all(|(f, e)| *f as u64 == *e) {
                    continue;
                }
                let detail: Vec<String> = if found.len() == expected.len() {
                    (0..found.len())
                        .filter(|&d| found[d] as u64 != expected[d])
                        .map(|d| format!("dim {d} is {}, not {}", found[d], cv.explain(&texts[d])))
                        .collect()
                } else {
                    texts.iter().filter(|t| t.parse::<u64>().is_err()).map(|t| cv.explain(t)).collect()
                };
                return Err(PlanError::ShapeCheck(Box::new(ShapeMismatch {
                    tensor: orig.clone(),
                    found: found.clone(),
                    expected,
                    detail: detail.join("; "),
                    check: format!("checks[{}]", c.index),
                    mapping: mapping.origin.clone(),
                    config: cv.label.clone(),
                })));
            }
            if !matched {
                return Err(PlanError::DeadRule { mapping: mapping.origin.clone(), rule: c.label() });
            }
        }
        CheckKind::Layers { var, groups, expect } => {
            // other bindings -> values of the layer variable, as written in the names
            let mut seen: BTreeMap<Bindings, Vec<String>> = BTreeMap::new();
            for cname in canon.keys() {
                if let Some(mut b) = c.pattern.matches(cname) {
                    let v = b.remove(var).unwrap_or_default();
                    seen.entry(b).or_default().push(v);
                }
            }
            let list = match expect {
                LayerExpect::List { config, .. } => Some(layer_list_at(config, meta, cv)?),
                LayerExpect::Count(_) => None,
            };
            for g in groups {
                let mut found = seen.remove(g).unwrap_or_default();
                found.sort_by(|a, b| natural_cmp(a, b));
                found.dedup();
                let (expected, what, verb) = match (expect, &list) {
                    (LayerExpect::Count(t), _) => {
                        let text = t.render(g);
                        let n = cv.eval(&text, c, mapping)?;
                        let what = format!("config.json gives {n} layer(s): {}", cv.explain(&text));
                        (Expected::Range(n, Default::default()), what, "expected")
                    }
                    (LayerExpect::List { config, complement: None }, Some(l)) => {
                        let what = format!("config.json `{config}` lists {l:?}");
                        (Expected::Set(l.iter().copied().collect()), what, "listed")
                    }
                    (LayerExpect::List { config, complement: Some(t) }, Some(l)) => {
                        let text = t.render(g);
                        let n = cv.eval(&text, c, mapping)?;
                        let what = format!(
                            "config.json gives the layers of 0..{n} ({}) that `{config}` ({l:?}) does not list",
                            cv.explain(&text)
                        );
                        (Expected::Range(n, l.iter().copied().collect()), what, "expected")
                    }
                    (LayerExpect::List { .. }, None) => unreachable!("read above"),
                };
                // A layer number is one written as Rust writes it (`01` or a 30-digit one is not).
                let canonical = |v: &str| v.parse::<u64>().ok().filter(|n| n.to_string() == v);
                let found_n: std::collections::BTreeSet<u64> = found.iter().filter_map(|v| canonical(v)).collect();
                let extra: Vec<&String> =
                    found.iter().filter(|v| !canonical(v).is_some_and(|n| expected.contains(n))).collect();
                let (missing, n_missing) = expected.missing(&found_n, 12);
                if extra.is_empty() && n_missing == 0 {
                    continue;
                }
                let mut rendered = g.clone();
                let mut detail = String::new();
                if let Some(first) = missing.first() {
                    let more = if n_missing > missing.len() as u64 {
                        format!(", ... ({n_missing} in all)")
                    } else {
                        String::new()
                    };
                    let shown: Vec<String> = missing.iter().map(u64::to_string).collect();
                    rendered.insert(var.clone(), first.to_string());
                    detail += &format!(
                        "; layer(s) [{}{more}] are {verb} but have no such tensors (no {})",
                        shown.join(", "),
                        q(&c.pattern.render(&rendered))
                    );
                }
                if let Some(first) = extra.first() {
                    let shown: Vec<&str> = extra.iter().take(12).map(|s| s.as_str()).collect();
                    let more = if extra.len() > 12 { format!(", ... ({} in all)", extra.len()) } else { String::new() };
                    rendered.insert(var.clone(), (*first).clone());
                    let example = canon.get(&c.pattern.render(&rendered)).cloned().unwrap_or_default();
                    detail += &format!(
                        "; layer(s) [{}{more}] have such tensors but are not {verb} ({})",
                        shown.join(", "),
                        q(&example)
                    );
                }
                let mut group_pattern = g.clone();
                group_pattern.insert(var.clone(), format!("{{{var}}}"));
                return Err(PlanError::Layers(Box::new(LayerMismatch {
                    expected: what,
                    pattern: c.pattern.render(&group_pattern),
                    found,
                    detail,
                    check: format!("checks[{}]", c.index),
                    mapping: mapping.origin.clone(),
                    config: cv.label.clone(),
                })));
            }
        }
    }
    Ok(())
}

/// The list of integers at a config key, sorted and without duplicates.
fn layer_list_at(key: &str, meta: &CheckpointMeta, cv: &ConfigView<'_>) -> Result<Vec<u64>, PlanError> {
    let config_err = |msg: String| PlanError::Config { key: key.to_string(), msg, config: cv.label.clone() };
    let value = dims::lookup(&meta.config, key)
        .ok_or_else(|| config_err("missing (the mapping checks it against the tensors)".into()))?;
    let list: Option<Vec<u64>> = value.as_array().and_then(|a| a.iter().map(|v| v.as_u64()).collect());
    let Some(mut list) = list else {
        return Err(config_err(format!("expected a list of integers, found {value}")));
    };
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

fn dim(dims: &Dims, name: &str) -> usize {
    dims.get(name).map(|&v| v as usize).unwrap_or(0)
}

fn layout_of(split: SplitSpec, cv: &ConfigView<'_>, inputs: &[Input], anchor: &str) -> Result<Layout, PlanError> {
    let dims = cv.dims;
    let at = |what: String| format!("{what}; config {}", cv.label);
    let shape_err = |tensor: &str, msg: String| PlanError::Shape { tensor: tensor.to_string(), msg };
    let name_of = |i: &Input| i.source.clone().unwrap_or_else(|| anchor.to_string());
    let rows = |i: &Input| i.shape.first().copied();
    // All stacked inputs must agree beyond dim 0 and have at least one dim.
    for i in inputs {
        if i.shape.is_empty() && !matches!(split, SplitSpec::Replicated {} | SplitSpec::Row {}) {
            return Err(shape_err(&name_of(i), format!("a 0-d tensor cannot be split as {split:?}")));
        }
        if i.shape.get(1..) != inputs[0].shape.get(1..) {
            return Err(shape_err(
                &name_of(i),
                format!(
                    "shape {} does not stack with {} of {}",
                    fmt_shape(&i.shape),
                    fmt_shape(&inputs[0].shape),
                    q(&name_of(&inputs[0]))
                ),
            ));
        }
    }
    let heads_check =
        |heads_dim: &str, kv_dim: &str, hd_dim: &Option<String>, q_in: Option<&Input>, kv_in: &[&Input]| {
            let (heads, kv) = (dim(dims, heads_dim), dim(dims, kv_dim));
            let keys = if heads_dim == kv_dim {
                cv.explain(heads_dim)
            } else {
                format!("{}, {}", cv.explain(heads_dim), cv.explain(kv_dim))
            };
            if heads == 0 || kv == 0 {
                return Err(shape_err(anchor, format!("head counts must be positive ({})", at(keys))));
            }
            if heads % kv != 0 {
                return Err(shape_err(
                    anchor,
                    format!(
                        "{heads} heads (`{heads_dim}`) are not a multiple of {kv} kv heads (`{kv_dim}`) ({})",
                        at(keys)
                    ),
                ));
            }
            let (basis, basis_heads, basis_dim) = match q_in {
                Some(qi) => (qi, heads, heads_dim),
                None => (kv_in[0], kv, kv_dim),
            };
            let hd = match hd_dim {
                Some(d) => dim(dims, d),
                None => {
                    let r = rows(basis).unwrap_or(0);
                    if r % basis_heads != 0 || r == 0 {
                        return Err(shape_err(
                            &name_of(basis),
                            format!("{r} rows do not split into {basis_heads} heads ({})", at(cv.explain(basis_dim))),
                        ));
                    }
                    r / basis_heads
                }
            };
            let mut want = vec![];
            if let Some(qi) = q_in {
                want.push((qi, heads, heads_dim));
            }
            for k in kv_in {
                want.push((k, kv, kv_dim));
            }
            for (i, n, dname) in want {
                if rows(i) != Some(n * hd) {
                    return Err(shape_err(
                        &name_of(i),
                        format!(
                            "has {} rows, but config.json gives {n} heads (`{dname}`) x head_dim {hd} = {} rows ({})",
                            rows(i).unwrap_or(0),
                            n * hd,
                            at(match hd_dim {
                                Some(d) => format!("{}, {}", cv.explain(dname), cv.explain(d)),
                                None if dname == basis_dim => cv.explain(dname),
                                None => format!(
                                    "{}; head_dim {hd} = {} rows of {} / {basis_heads} heads, {}",
                                    cv.explain(dname),
                                    rows(basis).unwrap_or(0),
                                    q(&name_of(basis)),
                                    cv.explain(basis_dim)
                                ),
                            })
                        ),
                    ));
                }
            }
            Ok((heads, kv, hd))
        };
    Ok(match split {
        SplitSpec::Replicated {} => Layout::Replicated,
        SplitSpec::Column {} => Layout::Column,
        SplitSpec::Row {} => Layout::Row,
        SplitSpec::MergedColumn {} => Layout::MergedColumn,
        SplitSpec::FusedQkv { heads, kv_heads, head_dim } => {
            let (h, k, d) = heads_check(&heads, &kv_heads, &head_dim, Some(&inputs[0]), &[&inputs[1], &inputs[2]])?;
            Layout::FusedQkv { heads: h, kv_heads: k, head_dim: d }
        }
        SplitSpec::Kv { heads, kv_heads, head_dim } => {
            let (h, k, d) = heads_check(&heads, &kv_heads, &head_dim, None, &[&inputs[0], &inputs[1]])?;
            Layout::Kv { heads: h, kv_heads: k, head_dim: d }
        }
        SplitSpec::Vocab { pad_to, rows: want } => {
            let r = rows(&inputs[0]).unwrap_or(0);
            if let Some(w) = want {
                if r != dim(dims, &w) {
                    return Err(shape_err(
                        anchor,
                        format!("has {r} rows, but config.json implies {}: {}", dim(dims, &w), at(cv.explain(&w))),
                    ));
                }
            }
            Layout::Vocab { rows: r, pad_to: pad_to as usize }
        }
    })
}

impl Resolved {
    /// Checks that `tp` divides everything that must divide; the error names the first offender.
    pub fn check_tp(&self, tp: usize) -> Result<(), String> {
        if tp == 0 {
            return Err("tp must be at least 1".into());
        }
        for p in &self.params {
            let t = q(&p.targets[0]);
            let div = |n: usize, what: &str| {
                if n % tp == 0 {
                    Ok(())
                } else {
                    Err(format!("{t} ({}): {what} {n} is not divisible by {tp}", p.layout.name()))
                }
            };
            match &p.layout {
                Layout::Replicated => {}
                Layout::Column => div(p.inputs[0].shape[0], "dim 0 of size")?,
                Layout::Row => {
                    if p.inputs[0].shape.len() >= 2 {
                        div(p.inputs[0].shape[1], "dim 1 of size")?
                    }
                }
                Layout::MergedColumn => {
                    for i in &p.inputs {
                        div(i.shape[0], &format!("part `{}` dim 0 of size", i.shard_id))?;
                    }
                }
                Layout::FusedQkv { heads, kv_heads, .. } | Layout::Kv { heads, kv_heads, .. } => {
                    div(*heads, "head count")?;
                    if !split::kv_heads_fit(*kv_heads, tp) {
                        return Err(format!(
                            "{t} ({}): {kv_heads} kv heads can be neither split evenly over {tp} ranks nor replicated evenly across them",
                            p.layout.name()
                        ));
                    }
                }
                Layout::Vocab { rows, pad_to } => div(
                    split::padded_rows(*rows, *pad_to),
                    &format!("{rows} rows padded to a multiple of {pad_to} give"),
                )?,
            }
        }
        Ok(())
    }

    /// The target `want` selects (see [`engine::select`]).
    pub fn target(&self, want: Option<&str>) -> Result<Option<EngineTarget>, PlanError> {
        engine::select(&self.engines, self.default_engine.as_deref(), want).map(|t| t.cloned()).map_err(|msg| {
            PlanError::Target { mapping: self.mapping.clone(), msg, hint: engine::known_hint(&self.engines) }
        })
    }

    /// Every tp from 1 to `max` that [`Resolved::check_tp`] accepts.
    pub fn valid_tps(&self, max: usize) -> Vec<usize> {
        (1..=max).filter(|&tp| self.check_tp(tp).is_ok()).collect()
    }

    /// Whether `--dtype to` applies to every parameter: each is cast or kept
    /// ([`Dtype::cast_rule`]); the first (in name order) that would be refused is the error.
    pub fn check_cast(&self, to: Dtype) -> Result<(), PlanError> {
        let mut refused = self.params.iter().filter_map(|p| match p.dtype.cast_rule() {
            CastRule::Refuse(reason) => Some((p, reason)),
            _ => None,
        });
        let Some((p, reason)) = refused.next() else { return Ok(()) };
        let sources = |p: &Param| p.inputs.iter().filter(|i| i.source.is_some()).count();
        let tensor = p.inputs.iter().find_map(|i| i.source.clone()).unwrap_or_else(|| p.targets[0].clone());
        let more = sources(p).saturating_sub(1) + refused.map(|(p, _)| sources(p)).sum::<usize>();
        Err(PlanError::Cast { tensor, dtype: p.dtype, to, reason: reason.to_string(), more })
    }

    /// Expands every parameter for every rank and assigns tensors to parts.
    pub fn plan(&self, opts: &PlanOptions) -> Result<ShardPlan, PlanError> {
        let PlanOptions { tp, max_part_size, dtype: cast, ref target, ref ranks } = *opts;
        if max_part_size == 0 {
            return Err(PlanError::ZeroPartSize);
        }
        if let Some(bad) = ranks.iter().flatten().find(|r| **r >= tp) {
            return Err(PlanError::Ranks(format!("rank {bad} is not below tp {tp} (ranks are 0 to {})", tp - 1)));
        }
        if ranks.as_ref().is_some_and(|r| r.is_empty()) {
            return Err(PlanError::Ranks("no rank selected".into()));
        }
        let target = self.target(target.as_deref())?;
        if let Err(reason) = self.check_tp(tp) {
            return Err(PlanError::BadTp { tp, reason, valid: self.valid_tps(512) });
        }
        if let Some(to) = cast {
            self.check_cast(to)?;
        }
        let mut files = Vec::new();
        for rank in 0..tp {
            let mut tensors: Vec<OutTensor> = Vec::new();
            for p in &self.params {
                let (shape, pieces) = expand(p, tp, rank);
                // check_cast refused every dtype that is neither cast nor kept.
                let dtype = match cast {
                    Some(c) if p.dtype.cast_rule() == CastRule::Cast => c,
                    _ => p.dtype,
                };
                let nbytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
                for name in &p.targets {
                    tensors.push(OutTensor {
                        name: name.clone(),
                        dtype,
                        shape: shape.clone(),
                        split: p.layout.name().to_string(),
                        nbytes,
                        pieces: pieces.clone(),
                    });
                }
            }
            for c in self.constants.iter().filter(|c| engine::applies(&c.engines, target.as_ref())) {
                let rows = c.shape.first().copied().unwrap_or(1);
                let nbytes = c.shape.iter().product::<usize>() as u64 * c.dtype.size() as u64;
                for name in &c.targets {
                    tensors.push(OutTensor {
                        name: name.clone(),
                        dtype: c.dtype,
                        shape: c.shape.clone(),
                        split: "constant".into(),
                        nbytes,
                        pieces: vec![Piece::Constant { rows: [0, rows], value: Value(c.value) }],
                    });
                }
            }
            tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
            let mut part: Vec<OutTensor> = Vec::new();
            let mut bytes = 0u64;
            for t in tensors {
                if !part.is_empty() && bytes + t.nbytes > max_part_size {
                    files.push(file_plan(rank, files_of_rank(&files, rank), std::mem::take(&mut part)));
                    bytes = 0;
                }
                bytes += t.nbytes;
                part.push(t);
            }
            if !part.is_empty() {
                files.push(file_plan(rank, files_of_rank(&files, rank), part));
            }
        }
        Ok(ShardPlan {
            format_version: PLAN_FORMAT_VERSION,
            family: self.family.clone(),
            mapping: self.mapping.clone(),
            mapping_crc32: self.mapping_crc32,
            tp,
            max_part_size,
            dtype: cast,
            engine_status: if target.is_none() { self.engine_status.clone() } else { None },
            target,
            source_bytes: self.source_bytes,
            aliases: self.aliases.iter().map(|(a, p)| [a.clone(), p.clone()]).collect(),
            output: OutputKind::Shards,
            ranks: ranks.as_ref().map(|r| {
                let mut r = r.clone();
                r.sort_unstable();
                r.dedup();
                r
            }),
            from_shards: None,
            files: files.into_iter().filter(|f| ranks.as_ref().is_none_or(|r| r.contains(&f.rank))).collect(),
        })
    }

    /// The plan of a Hugging Face checkpoint holding every source tensor whole, under its own
    /// name (aliases and synthesized parts are not sources), in natural name order, split into
    /// parts of at most `max_part_size` bytes as transformers does: `model.safetensors`, or
    /// `model-00001-of-0000N.safetensors` and an index (`reshard merge`). `shapes` gives each
    /// source's shape as stored (before a mapping's reshape), `hf_name` the name it is written
    /// under ([`Mapping::hf_name`]).
    pub fn plan_hf(
        &self,
        max_part_size: u64,
        shapes: &BTreeMap<String, Vec<usize>>,
        hf_name: &dyn Fn(&str) -> String,
    ) -> Result<ShardPlan, PlanError> {
        if max_part_size == 0 {
            return Err(PlanError::ZeroPartSize);
        }
        let mut tensors = Vec::new();
        for p in &self.params {
            for i in p.inputs.iter().filter(|i| i.source.is_some()) {
                let name = i.source.clone().expect("filtered");
                // Split as the rule splits it, so that a sharded input's slices line up.
                let dim = if p.layout == Layout::Row && i.shape.len() >= 2 { 1 } else { 0 };
                let rows = i.shape.first().copied().unwrap_or(1);
                let end = i.shape.get(dim).copied().unwrap_or(1);
                let shape = shapes.get(&name).cloned().unwrap_or_else(|| i.shape.clone());
                let nbytes = shape.iter().product::<usize>() as u64 * p.dtype.size() as u64;
                let piece = Piece::Copy {
                    source: name.clone(),
                    source_shape: i.shape.clone(),
                    dim,
                    start: 0,
                    end,
                    rows: [0, rows],
                };
                tensors.push(OutTensor {
                    name: hf_name(&name),
                    dtype: p.dtype,
                    shape,
                    split: "whole".into(),
                    nbytes,
                    pieces: vec![piece],
                });
            }
        }
        tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        let mut parts: Vec<Vec<OutTensor>> = vec![];
        let mut bytes = 0u64;
        for t in tensors {
            match parts.last_mut() {
                Some(last) if bytes + t.nbytes <= max_part_size => {
                    bytes += t.nbytes;
                    last.push(t);
                }
                _ => {
                    bytes = t.nbytes;
                    parts.push(vec![t]);
                }
            }
        }
        let n = parts.len();
        let files = parts
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| {
                let mut f = file_plan(0, i, tensors);
                f.name = if n == 1 {
                    "model.safetensors".into()
                } else {
                    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
                };
                f
            })
            .collect();
        Ok(ShardPlan {
            format_version: PLAN_FORMAT_VERSION,
            family: self.family.clone(),
            mapping: self.mapping.clone(),
            mapping_crc32: self.mapping_crc32,
            tp: 1,
            max_part_size,
            dtype: None,
            target: None,
            engine_status: None,
            source_bytes: self.source_bytes,
            aliases: self.aliases.iter().map(|(a, p)| [a.clone(), p.clone()]).collect(),
            output: OutputKind::HuggingFace,
            ranks: None,
            from_shards: None,
            files,
        })
    }
}

fn files_of_rank(files: &[FilePlan], rank: usize) -> usize {
    files.iter().filter(|f| f.rank == rank).count()
}

fn file_plan(rank: usize, part: usize, tensors: Vec<OutTensor>) -> FilePlan {
    let header = crate::write::header_bytes(&tensors);
    let size = header.len() as u64 + tensors.iter().map(|t| t.nbytes).sum::<u64>();
    FilePlan { name: format!("model-rank-{rank}-part-{part}.safetensors"), rank, part, size, tensors }
}

/// The pieces of parameter `p` on `rank`, and the resulting shape.
fn expand(p: &Param, tp: usize, rank: usize) -> (Vec<usize>, Vec<Piece>) {
    let mut pieces = Vec::new();
    let mut row = 0usize;
    let mut push = |input: &Input, dim: usize, start: usize, end: usize, pieces: &mut Vec<Piece>| {
        let rows_here = if dim == 0 { end - start } else { input.shape.first().copied().unwrap_or(1) };
        let rows = [row, row + rows_here];
        row += rows_here;
        pieces.push(match &input.source {
            Some(s) => Piece::Copy { source: s.clone(), source_shape: input.shape.clone(), dim, start, end, rows },
            None => Piece::Zeros { rows, reason: format!("synthesized {}", input.shard_id) },
        });
    };
    let first = &p.inputs[0];
    let whole = |i: &Input| i.shape.first().copied().unwrap_or(1);
    match &p.layout {
        Layout::Replicated => push(first, 0, 0, whole(first), &mut pieces),
        Layout::Row if first.shape.len() < 2 => push(first, 0, 0, whole(first), &mut pieces),
        Layout::Row => {
            let n = first.shape[1] / tp;
            push(first, 1, rank * n, (rank + 1) * n, &mut pieces)
        }
        Layout::Column | Layout::MergedColumn => {
            for i in &p.inputs {
                let n = i.shape[0] / tp;
                push(i, 0, rank * n, (rank + 1) * n, &mut pieces)
            }
        }
        Layout::FusedQkv { heads, kv_heads, head_dim } | Layout::Kv { heads, kv_heads, head_dim } => {
            let (kv_first, kv_n) = split::kv_heads_of_rank(*kv_heads, tp, rank);
            for i in &p.inputs {
                if i.shard_id == "q" {
                    let per = heads / tp * head_dim;
                    push(i, 0, rank * per, (rank + 1) * per, &mut pieces);
                } else {
                    push(i, 0, kv_first * head_dim, (kv_first + kv_n) * head_dim, &mut pieces);
                }
            }
        }
        Layout::Vocab { rows, pad_to } => {
            let (start, real, zeros) = split::vocab_rows_of_rank(*rows, *pad_to, tp, rank);
            if real > 0 {
                push(first, 0, start, start + real, &mut pieces);
            }
            if zeros > 0 {
                let r = [row, row + zeros];
                row += zeros;
                pieces.push(Piece::Zeros { rows: r, reason: "padding".into() });
            }
        }
    }
    let mut shape = first.shape.clone();
    if shape.is_empty() {
        return (shape, pieces);
    }
    shape[0] = row;
    if let (Layout::Row, true) = (&p.layout, first.shape.len() >= 2) {
        shape[1] /= tp;
    }
    (shape, pieces)
}

/// Convenience: resolve and plan in one call.
pub fn plan(meta: &CheckpointMeta, mapping: &Mapping, opts: &PlanOptions) -> Result<ShardPlan, PlanError> {
    resolve(meta, mapping)?.plan(opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointMeta, SourceFile, TensorInfo};
    use proptest::prelude::*;
    use serde_json::json;

    /// Metadata for tensors laid out back to back in one imaginary F32 file.
    pub(crate) fn meta(config: serde_json::Value, tensors: &[(&str, &[usize])]) -> CheckpointMeta {
        let mut map = BTreeMap::new();
        let mut off = 0u64;
        for (name, shape) in tensors {
            let n = shape.iter().product::<usize>() as u64 * 4;
            map.insert(
                name.to_string(),
                TensorInfo { dtype: Dtype::F32, shape: shape.to_vec(), file: 0, start: off, end: off + n },
            );
            off += n;
        }
        CheckpointMeta {
            dir: "/nonexistent".into(),
            config,
            config_path: "/nonexistent/config.json".into(),
            files: vec![SourceFile {
                name: "model.safetensors".into(),
                path: "/nonexistent/model.safetensors".into(),
                size: off,
            }],
            tensors: map,
            extra_files: vec![],
        }
    }

    fn gqa_mapping() -> Mapping {
        Mapping::parse(
            r#"{"format_version":1,"family":"t","model_types":["t"],
            "dims":{"heads":{"config":"heads"},"kv":{"config":"kv"}},
            "params":[
              {"target":"l.{i}.qkv.weight","parts":[
                 {"shard_id":"q","source":"l.{i}.q.weight"},{"shard_id":"k","source":"l.{i}.k.weight"},{"shard_id":"v","source":"l.{i}.v.weight"}],
               "split":{"kind":"fused_qkv","heads":"heads","kv_heads":"kv"}},
              {"source":"l.{i}.o.weight","split":{"kind":"row"}},
              {"source":"emb","split":{"kind":"vocab","pad_to":64}}
            ]}"#,
            "gqa.json",
        )
        .unwrap()
    }

    fn gqa_meta(heads: usize, kv: usize, hd: usize) -> CheckpointMeta {
        let d = heads * hd;
        meta(
            json!({"heads": heads, "kv": kv}),
            &[
                ("l.0.q.weight", &[d, d]),
                ("l.0.k.weight", &[kv * hd, d]),
                ("l.0.v.weight", &[kv * hd, d]),
                ("l.0.o.weight", &[d, d]),
                ("emb", &[150, d]),
            ],
        )
    }

    fn pieces_of<'a>(plan: &'a ShardPlan, rank: usize, name: &str) -> &'a OutTensor {
        plan.files.iter().filter(|f| f.rank == rank).flat_map(|f| &f.tensors).find(|t| t.name == name).unwrap()
    }

    #[test]
    fn gqa_replicates_kv_heads_when_tp_exceeds_them() {
        // 8 q heads, 2 kv heads, head_dim 4, tp 8: ranks 0-3 hold kv head 0, ranks 4-7 kv head 1.
        let plan = plan(&gqa_meta(8, 2, 4), &gqa_mapping(), &PlanOptions::new(8)).unwrap();
        for rank in 0..8 {
            let t = pieces_of(&plan, rank, "l.0.qkv.weight");
            assert_eq!(t.shape, vec![4 + 4 + 4, 32]);
            let kv_head = rank / 4;
            let want = [
                ("l.0.q.weight", rank * 4, rank * 4 + 4, [0, 4]),
                ("l.0.k.weight", kv_head * 4, kv_head * 4 + 4, [4, 8]),
                ("l.0.v.weight", kv_head * 4, kv_head * 4 + 4, [8, 12]),
            ];
            for (p, (src, s, e, rows)) in t.pieces.iter().zip(want) {
                assert_eq!(
                    p,
                    &Piece::Copy { source: src.into(), source_shape: plan_shape(src), dim: 0, start: s, end: e, rows },
                    "rank {rank}"
                );
            }
        }
        fn plan_shape(src: &str) -> Vec<usize> {
            if src.contains(".q.") {
                vec![32, 32]
            } else {
                vec![8, 32]
            }
        }
    }

    #[test]
    fn gqa_splits_kv_heads_when_tp_is_smaller() {
        let plan = plan(&gqa_meta(8, 4, 2), &gqa_mapping(), &PlanOptions::new(2)).unwrap();
        let t = pieces_of(&plan, 1, "l.0.qkv.weight");
        assert_eq!(t.shape, vec![8 + 4 + 4, 16]);
        assert!(matches!(&t.pieces[1], Piece::Copy { start: 4, end: 8, .. }));
        let o = pieces_of(&plan, 1, "l.0.o.weight");
        assert_eq!(o.shape, vec![16, 8]);
        assert!(matches!(&o.pieces[0], Piece::Copy { dim: 1, start: 8, end: 16, .. }));
    }

    #[test]
    fn bad_tp_lists_valid_values() {
        let r = resolve(&gqa_meta(12, 3, 8), &gqa_mapping()).unwrap();
        assert_eq!(r.valid_tps(16), vec![1, 3, 6, 12]);
        let err = r.plan(&PlanOptions::new(8)).unwrap_err().to_string();
        assert!(err.contains("tp 8 does not fit") && err.contains("head count 12 is not divisible by 8"), "{err}");
        assert!(err.contains("valid tp values: 1, 3, 6, 12"), "{err}");
        let err = r.plan(&PlanOptions::new(4)).unwrap_err().to_string();
        assert!(err.contains("3 kv heads can be neither split evenly over 4 ranks"), "{err}");
    }

    #[test]
    fn head_count_disagreeing_with_shape_names_both() {
        let mut m = gqa_meta(8, 2, 4);
        m.config = json!({"heads": 8, "kv": 4});
        let err = resolve(&m, &gqa_mapping()).unwrap_err().to_string();
        assert!(err.contains("`l.0.k.weight`: has 8 rows") && err.contains("4 heads (`kv`)"), "{err}");
    }

    #[test]
    fn unclaimed_and_dead_rules_are_errors() {
        let mut m = gqa_meta(8, 2, 4);
        m.tensors.insert("stray.weight".into(), m.tensors["emb"].clone());
        let err = resolve(&m, &gqa_mapping()).unwrap_err().to_string();
        assert!(err.contains("1 checkpoint tensor(s) claimed by no rule") && err.contains("`stray.weight`"), "{err}");
        let mut m = gqa_meta(8, 2, 4);
        m.tensors.remove("emb");
        let err = resolve(&m, &gqa_mapping()).unwrap_err().to_string();
        assert!(err.contains("params[2] (emb) matches no tensor"), "{err}");
        let mut m = gqa_meta(8, 2, 4);
        m.tensors.remove("l.0.v.weight");
        let err = resolve(&m, &gqa_mapping()).unwrap_err().to_string();
        assert!(err.contains("`l.0.v.weight` is missing"), "{err}");
    }

    #[test]
    fn parts_respect_the_size_cap_and_are_never_empty() {
        let m = gqa_meta(8, 2, 4);
        let plan = plan(&m, &gqa_mapping(), &PlanOptions { max_part_size: 1, ..PlanOptions::new(2) }).unwrap();
        // A cap below every tensor's size puts each tensor in its own part.
        assert_eq!(plan.files.len(), 2 * 3);
        assert!(plan.files.iter().all(|f| f.tensors.len() == 1));
        let one = plan_default(&m, 2);
        assert_eq!(one.files.len(), 2);
    }

    fn plan_default(m: &CheckpointMeta, tp: usize) -> ShardPlan {
        plan(m, &gqa_mapping(), &PlanOptions::new(tp)).unwrap()
    }

    #[test]
    fn layer_set_check_names_config_and_tensors() {
        let mapping = Mapping::parse(
            r#"{"format_version":1,"family":"t","model_types":["t"],
            "params":[{"source":"l.{i}.{k:x|y}.w","split":{"kind":"replicated"}}],
            "checks":[{"kind":"layer_set","config":"cross","pattern":"l.{i}.x.w","var":"i"}]}"#,
            "t.json",
        )
        .unwrap();
        let m = meta(json!({"cross": [1, 3]}), &[("l.0.y.w", &[1]), ("l.1.x.w", &[1]), ("l.2.x.w", &[1])]);
        let err = resolve(&m, &mapping).unwrap_err().to_string();
        assert!(
            err.contains("`cross` lists [1, 3]") && err.contains("[3] are listed but have no such tensors"),
            "{err}"
        );
        assert!(err.contains("[2] have such tensors but are not listed"), "{err}");
    }

    fn checked_mapping(checks: &str) -> Mapping {
        Mapping::parse(
            &format!(
                r#"{{"format_version":1,"family":"t","model_types":["t"],
                "dims":{{"d":{{"config":"d"}},"encoder_ffn":{{"config":"ffn.enc"}},"decoder_ffn":{{"config":"ffn.dec","default":12}},
                         "encoder_layers":{{"config":"enc"}},"decoder_layers":{{"config":"dec"}},"rows":{{"expr":"d + 2"}}}},
                "params":[{{"source":"{{side:encoder|decoder}}.{{i}}.{{t:fc|norm}}","split":{{"kind":"replicated"}}}},
                          {{"source":"emb","split":{{"kind":"replicated"}}}}],
                "checks":[{checks}]}}"#
            ),
            "t.json",
        )
        .unwrap()
    }

    fn two_sides(enc: usize, dec: usize, ffn: usize) -> Vec<(String, Vec<usize>)> {
        let mut t = vec![("emb".to_string(), vec![10, 8])];
        for (side, n) in [("encoder", enc), ("decoder", dec)] {
            for i in 0..n {
                t.push((format!("{side}.{i}.fc"), vec![ffn, 8]));
                t.push((format!("{side}.{i}.norm"), vec![8]));
            }
        }
        t
    }

    fn meta_of(config: serde_json::Value, t: &[(String, Vec<usize>)]) -> CheckpointMeta {
        let refs: Vec<(&str, &[usize])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        meta(config, &refs)
    }

    #[test]
    fn shape_checks_name_the_key_the_tensor_and_both_values() {
        let m = checked_mapping(
            r#"{"kind":"shape","pattern":"emb","shape":["rows","d"]},
               {"kind":"shape","pattern":"{side:encoder|decoder}.{i}.fc","shape":["{side}_ffn","d"]},
               {"kind":"shape","pattern":"{side:encoder|decoder}.{i}.norm","shape":["d"]}"#,
        );
        let cfg = |d: u64, enc: u64, dec: Option<u64>| {
            let mut c = json!({"d": d, "ffn": {"enc": enc}, "enc": 2, "dec": 2});
            if let Some(v) = dec {
                c["ffn"]["dec"] = v.into();
            }
            c
        };
        assert!(resolve(&meta_of(cfg(8, 12, None), &two_sides(2, 2, 12)), &m).is_ok());
        let err = resolve(&meta_of(cfg(8, 16, None), &two_sides(2, 2, 12)), &m).unwrap_err().to_string();
        assert!(err.contains("tensor `encoder.0.fc` has shape [12, 8], but config.json implies [16, 8]"), "{err}");
        assert!(err.contains("dim 0 is 12, not `ffn.enc` = 16 (dim `encoder_ffn`)"), "{err}");
        assert!(err.contains("checks[1] of mapping t.json; config `/nonexistent/config.json`"), "{err}");
        // The default is named as such.
        let err = resolve(&meta_of(cfg(8, 12, None), &two_sides(2, 2, 16)), &m).unwrap_err().to_string();
        assert!(err.contains("`ffn.dec` = 12 (dim `decoder_ffn`; absent from config.json: the default)"), "{err}");
        // Expressions name the keys they come from; every wrong dim is listed.
        let err = resolve(&meta_of(cfg(9, 12, None), &two_sides(2, 2, 12)), &m).unwrap_err().to_string();
        assert!(err.contains("`emb` has shape [10, 8], but config.json implies [11, 9]"), "{err}");
        assert!(err.contains("dim 0 is 10, not `rows` = 11 (`d` = 9); dim 1 is 8, not `d` = 9 (dim `d`)"), "{err}");
        // Another rank: the error says so.
        let mut t = two_sides(2, 2, 12);
        t[3].1 = vec![96];
        let err = resolve(&meta_of(cfg(8, 12, None), &t), &m).unwrap_err().to_string();
        assert!(err.contains("`encoder.1.fc` has shape [96] (1-d), but config.json implies a 2-d [12, 8]"), "{err}");
        t[3].1 = vec![12, 8, 1];
        let err = resolve(&meta_of(cfg(8, 12, None), &t), &m).unwrap_err().to_string();
        assert!(err.contains("has shape [12, 8, 1] (3-d), but config.json implies a 2-d [12, 8]"), "{err}");
        // A shape check that matches nothing is a mistake in the mapping.
        let m2 = checked_mapping(r#"{"kind":"shape","pattern":"embb","shape":[]}"#);
        let err = resolve(&meta_of(cfg(8, 12, None), &two_sides(1, 1, 12)), &m2).unwrap_err().to_string();
        assert!(err.contains("checks[0] (embb) matches no tensor"), "{err}");
        // An expression that cannot be evaluated for this config names the check and the keys.
        let m3 = checked_mapping(r#"{"kind":"shape","pattern":"emb","shape":["d / 3","d"]}"#);
        let err = resolve(&meta_of(cfg(8, 12, None), &two_sides(1, 1, 12)), &m3).unwrap_err().to_string();
        assert!(err.contains("checks[0] of mapping t.json: `d / 3`: 8 / 3 is not exact (`d` = 8)"), "{err}");
    }

    #[test]
    fn layer_counts_per_group_more_and_fewer() {
        let m = checked_mapping(
            r#"{"kind":"layer_count","pattern":"{side:encoder|decoder}.{i}.{t:fc|norm}","count":"{side}_layers"}"#,
        );
        let cfg = |enc: u64, dec: u64| json!({"d": 8, "ffn": {"enc": 12}, "enc": enc, "dec": dec});
        assert!(resolve(&meta_of(cfg(2, 3), &two_sides(2, 3, 12)), &m).is_ok());
        let err = resolve(&meta_of(cfg(2, 4), &two_sides(2, 3, 12)), &m).unwrap_err().to_string();
        assert!(err.contains("config.json gives 4 layer(s): `dec` = 4 (dim `decoder_layers`)"), "{err}");
        assert!(err.contains("tensors matching `decoder.{i}.fc` exist for layer(s) [0, 1, 2]"), "{err}");
        assert!(err.contains("layer(s) [3] are expected but have no such tensors (no `decoder.3.fc`)"), "{err}");
        let err = resolve(&meta_of(cfg(1, 3), &two_sides(2, 3, 12)), &m).unwrap_err().to_string();
        assert!(err.contains("layer(s) [1] have such tensors but are not expected (`encoder.1.fc`)"), "{err}");
        // One tensor kind missing in one layer.
        let mut t = two_sides(2, 3, 12);
        t.retain(|(n, _)| n != "decoder.1.norm");
        let err = resolve(&meta_of(cfg(2, 3), &t), &m).unwrap_err().to_string();
        assert!(err.contains("matching `decoder.{i}.norm` exist for layer(s) [0, 2]"), "{err}");
        // Numbers not written canonically are not layers; a huge count does not hang.
        let mut t = two_sides(2, 3, 12);
        t.push(("encoder.01.fc".into(), vec![12, 8]));
        t.push(("encoder.01.norm".into(), vec![8]));
        let err = resolve(&meta_of(cfg(2, 3), &t), &m).unwrap_err().to_string();
        assert!(err.contains("layer(s) [01] have such tensors but are not expected (`encoder.01.fc`)"), "{err}");
        let err = resolve(&meta_of(cfg(u64::MAX, 3), &two_sides(2, 3, 12)), &m).unwrap_err().to_string();
        assert!(
            err.contains("layer(s) [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, ... (18446744073709551613 in all)]"),
            "{err}"
        );
    }

    #[test]
    fn layer_set_with_complement() {
        let m = checked_mapping(
            r#"{"kind":"layer_set","config":"cross","pattern":"decoder.{i}.fc"},
               {"kind":"layer_set","config":"cross","complement":"decoder_layers","pattern":"encoder.{i}.fc"}"#,
        );
        let cfg = |cross: serde_json::Value| json!({"d": 8, "ffn": {"enc": 12}, "enc": 2, "dec": 4, "cross": cross});
        // decoder.{0,1} and encoder.{0,1}: with 4 layers, cross [0, 1] leaves [2, 3] for the complement.
        let err = resolve(&meta_of(cfg(json!([0, 1])), &two_sides(2, 2, 12)), &m).unwrap_err().to_string();
        assert!(err.contains("config.json gives the layers of 0..4 (`dec` = 4 (dim `decoder_layers`))"), "{err}");
        assert!(err.contains("layer(s) [2, 3] are expected but have no such tensors"), "{err}");
        assert!(err.contains("layer(s) [0, 1] have such tensors but are not expected"), "{err}");
        let mut t = two_sides(0, 2, 12);
        t.extend([("encoder.2.fc".to_string(), vec![12, 8]), ("encoder.3.fc".to_string(), vec![12, 8])]);
        t.extend([("encoder.2.norm".to_string(), vec![8]), ("encoder.3.norm".to_string(), vec![8])]);
        assert!(resolve(&meta_of(cfg(json!([1, 0])), &t), &m).is_ok());
        let err = resolve(&meta_of(cfg(json!("0,1")), &t), &m).unwrap_err().to_string();
        assert!(err.contains("`cross`: expected a list of integers, found \"0,1\""), "{err}");
    }

    proptest! {
        /// Shards put back together give the source: every source row of a split tensor lands on
        /// exactly one rank (replicas aside), sizes add up, and the plan is deterministic.
        #[test]
        fn shards_tile_the_source(kv in 1usize..5, group in 1usize..4, hd in 1usize..5, tp_pow in 0u32..4, vocab in 1usize..300) {
            let heads = kv * group;
            let tp = 1usize << tp_pow;
            let mut m = gqa_meta(heads, kv, hd);
            let d = heads * hd;
            m.tensors.get_mut("emb").unwrap().shape = vec![vocab, d];
            let r = resolve(&m, &gqa_mapping()).unwrap();
            let Ok(plan) = r.plan(&PlanOptions::new(tp)) else {
                prop_assert!(r.check_tp(tp).is_err());
                return Ok(());
            };
            prop_assert_eq!(&plan, &r.plan(&PlanOptions::new(tp)).unwrap());
            // Count how often each source row (dim 0) or column (dim 1) is copied.
            let mut hits: BTreeMap<(String, usize), usize> = BTreeMap::new();
            let mut zero_rows = 0;
            for t in plan.files.iter().flat_map(|f| &f.tensors) {
                let mut row = 0;
                for p in &t.pieces {
                    match p {
                        Piece::Copy { source, start, end, rows, .. } => {
                            prop_assert_eq!(rows[0], row);
                            row = rows[1];
                            for i in *start..*end { *hits.entry((source.clone(), i)).or_default() += 1; }
                        }
                        Piece::Zeros { rows, .. } => { prop_assert_eq!(rows[0], row); row = rows[1]; zero_rows += rows[1] - rows[0]; }
                        Piece::Constant { .. } | Piece::Concat { .. } => prop_assert!(false, "not planned from a checkpoint"),
                    }
                }
                prop_assert_eq!(row, t.shape[0]);
            }
            let kv_copies = if tp >= kv { tp / kv } else { 1 };
            for (name, info) in &m.tensors {
                let n = if name.contains(".o.") { info.shape[1] } else { info.shape[0] };
                let want = if name.contains(".k.") || name.contains(".v.") { kv_copies } else { 1 };
                for i in 0..n {
                    prop_assert_eq!(hits.get(&(name.clone(), i)).copied().unwrap_or(0), want, "{} index {}", name, i);
                }
            }
            prop_assert_eq!(zero_rows, split::padded_rows(vocab, 64) - vocab);
        }
    }
}
