//! The declarative mapping format: which checkpoint tensors become which vLLM parameters, and how
//! each is split across tensor-parallel ranks. One JSON file per model family (`mappings/*.json`,
//! documented in `mappings/README.md`).
//!
//! Entry points: [`Mapping::load`] (a user's file), [`Mapping::builtin`] and [`Mapping::detect`]
//! (the bundled files, chosen by config.json's `model_type`). Parsing is strict: an unknown key is
//! an error naming its JSON path, and every pattern and template is checked at load time.

pub mod dims;
pub mod engine;
pub mod pattern;

use crate::dtype::Dtype;
use crate::text::q;
use engine::EngineTarget;
use pattern::{Bindings, Pattern};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest constant tensor a mapping may declare: they are engine buffers (scalars, small
/// vectors), and the writer fills one in a single buffer.
pub const MAX_CONSTANT_BYTES: usize = 1 << 20;

/// The mapping format version this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// The mapping files compiled into the binary: (file name, contents), in name order: every
/// `mappings/*.json` (build.rs lists them, so a new family needs no Rust).
pub const BUILTIN: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/builtin_mappings.rs"));

/// Errors loading or checking a mapping file.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum MappingError {
    #[error("cannot read mapping {}: {source}", crate::text::qp(path))]
    Io { path: PathBuf, source: std::io::Error },
    #[error("mapping {0}")]
    File(crate::input::FileError),
    #[error("mapping {origin}: at `{at}`: {msg}")]
    Invalid { origin: String, at: String, msg: String },
    #[error(
        "no bundled mapping for model_type {} (in {config})\n(hint: bundled families: {known}; or pass --mapping FILE)",
        q(model_type)
    )]
    UnknownFamily { model_type: String, config: String, known: String },
    #[error(
        "{config} has no string `model_type`, so the model family cannot be detected\n(hint: pass --mapping FILE)"
    )]
    NoModelType { config: String },
    #[error(
        "mapping {} is for model_type {} but {config} has model_type {}\n(hint: pass --force-mapping to use it anyway, e.g. for a derived model with the same layout)",
        crate::text::qp(path), model_types.iter().map(|t| q(t).to_string()).collect::<Vec<_>>().join(" or "), q(model_type)
    )]
    WrongFamily { path: PathBuf, model_types: Vec<String>, model_type: String, config: String },
}

/// How a dimension is obtained.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimSpec {
    /// A dotted key path into config.json, e.g. `text_config.hidden_size`.
    #[serde(default)]
    pub config: Option<String>,
    /// The number of entries of the list at this dotted config.json key (instead of `config`).
    #[serde(default)]
    pub length: Option<String>,
    /// Value used when the key of `config` or `length` is absent (as the Hugging Face config
    /// class defaults it).
    #[serde(default)]
    pub default: Option<u64>,
    /// An arithmetic expression over other dims and integers: `hidden / heads` (left to right,
    /// `+ - * /`, division must be exact).
    #[serde(default)]
    pub expr: Option<String>,
}

/// One part of a stacked parameter (like an entry of vLLM's `stacked_params_mapping`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartSpec {
    /// The part's shard id: `q`, `k`, `v` for attention; free-form for merged columns.
    pub shard_id: String,
    /// Source pattern.
    pub source: String,
    /// What to do when the source tensor is absent.
    #[serde(default)]
    pub missing: Option<Missing>,
}

/// Handling of an absent part.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Missing {
    /// Synthesize zeros with the shape and dtype of this sibling part (by shard id).
    pub zeros_like: String,
    /// Only when every listed placeholder has the given value (e.g. `{"p": "bias"}`): an absent
    /// tensor under other bindings stays an error.
    #[serde(default)]
    pub when: BTreeMap<String, String>,
}

/// How a parameter is split across ranks.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SplitSpec {
    /// Whole tensor on every rank.
    Replicated {},
    /// Dim 0 in tp equal blocks (weights and biases).
    Column {},
    /// Dim 1 in tp equal blocks; 1-D tensors (row-parallel biases) are replicated whole.
    Row {},
    /// Parts each column-split, then concatenated per rank.
    MergedColumn {},
    /// Self-attention `[q_r ; k_r ; v_r]` with GQA replication.
    FusedQkv {
        /// Dim name of the query head count.
        heads: String,
        /// Dim name of the key/value head count.
        kv_heads: String,
        /// Dim name of the head size; derived from the q rows when absent.
        #[serde(default)]
        head_dim: Option<String>,
    },
    /// Cross-attention `[k_r ; v_r]` with GQA replication.
    Kv {
        /// Dim name of the query head count (checked against tp like q_proj).
        heads: String,
        /// Dim name of the key/value head count.
        kv_heads: String,
        /// Dim name of the head size; derived from the k rows when absent.
        #[serde(default)]
        head_dim: Option<String>,
    },
    /// Embedding / LM head rows padded to a multiple of `pad_to`, then split evenly.
    Vocab {
        /// Row-count multiple (vLLM's default is 64).
        #[serde(default = "default_pad")]
        pad_to: u64,
        /// Optional dim name the unpadded row count must equal.
        #[serde(default)]
        rows: Option<String>,
    },
}

fn default_pad() -> u64 {
    64
}

/// How a source tensor is viewed before splitting.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reshape {
    /// `[d0, d1, ..., dn]` viewed as `[d0, d1*...*dn]` (e.g. a conv patch embedding as a linear).
    Flatten2d,
}

/// One rule of a mapping file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// Target name template; defaults to the source name (only for single-source rules).
    #[serde(default)]
    pub target: Option<String>,
    /// Several target names fed by the same data (tied weights); instead of `target`.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Single source pattern; instead of `parts`.
    #[serde(default)]
    pub source: Option<String>,
    /// Stacked sources.
    #[serde(default)]
    pub parts: Vec<PartSpec>,
    /// Split rule.
    pub split: SplitSpec,
    /// Optional duplicate copies of the source (older files, tied weights); each, when present,
    /// must be byte-identical to the source, and is not written.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// View applied to the source before splitting.
    #[serde(default)]
    pub reshape: Option<Reshape>,
    /// Free text for humans.
    #[serde(default)]
    pub note: Option<String>,
}

/// A tensor that the engine's `state_dict()` holds but no checkpoint tensor feeds, such as vLLM's
/// attention buffers `_k_scale`: written with one value in every element, replicated on every
/// rank, never cast by `--dtype` (the engine keeps it in its own dtype).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantSpec {
    /// Source pattern whose matches bind the placeholders of `targets` (it claims nothing: the
    /// tensors it matches are still mapped by `params`). One constant per distinct target name.
    pub for_each: String,
    /// Target templates, one tensor each.
    pub targets: Vec<String>,
    /// The value of every element.
    pub value: f64,
    /// Element type (`F32`; float and integer types).
    pub dtype: Dtype,
    /// Shape; `[]` (the default) is a scalar.
    #[serde(default)]
    pub shape: Vec<usize>,
    /// Names of the `engines` this constant is written for; every target when absent.
    #[serde(default)]
    pub engines: Option<Vec<String>>,
    /// Free text for humans.
    #[serde(default)]
    pub note: Option<String>,
}

/// A consistency check between config.json and the tensors, run before anything is written.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckSpec {
    /// The integers listed at config key `config` must be exactly the values that variable `var`
    /// takes in the tensor names matching `pattern` (for each combination of the pattern's other
    /// placeholders); with `complement`, exactly the integers in `0..complement` the list does not
    /// hold.
    LayerSet {
        /// Dotted config key holding a list of integers.
        config: String,
        /// Pattern with the variable.
        pattern: String,
        /// The variable name.
        #[serde(default = "default_var")]
        var: String,
        /// A dim expression N: the layers are those of `0..N` not in the list.
        #[serde(default)]
        complement: Option<String>,
    },
    /// The values of `var` in the tensor names matching `pattern` must be exactly `0..count`, for
    /// each combination of the pattern's other placeholders.
    LayerCount {
        /// Pattern with the variable.
        pattern: String,
        /// The variable name.
        #[serde(default = "default_var")]
        var: String,
        /// A dim expression; may use the pattern's other placeholders (`{side}_layers`).
        count: String,
    },
    /// Every tensor matching `pattern` has exactly this shape.
    Shape {
        /// Source pattern (after `source_prefixes`).
        pattern: String,
        /// One entry per dimension: an integer or a dim expression, which may use the pattern's
        /// placeholders with alternatives (`{side}_ffn`). Read as JSON values and checked when
        /// the file is compiled, so that an error can name the entry (`checks[3].shape[1]`).
        shape: Vec<serde_json::Value>,
    },
}

fn default_var() -> String {
    "i".into()
}

/// A prefix rewrite applied to source names before matching (for checkpoints saved under
/// different naming conventions).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRename {
    /// Prefix as found in some checkpoints.
    pub from: String,
    /// Canonical prefix the patterns use.
    pub to: String,
}

/// The raw mapping file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// Must be [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Family name (`bart`).
    pub family: String,
    /// config.json `model_type` values this mapping serves.
    pub model_types: Vec<String>,
    /// Which vLLM source file(s) the layout follows.
    #[serde(default)]
    pub follows: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Named dimensions.
    #[serde(default)]
    pub dims: BTreeMap<String, DimSpec>,
    /// Source-name prefix rewrites, tried in order (first match wins).
    #[serde(default)]
    pub source_prefixes: Vec<PrefixRename>,
    /// Prefix rewrites from the canonical source names to the names current transformers writes
    /// (`save_pretrained`), for a Hugging Face checkpoint written by `reshard merge`; tried in
    /// order, first match wins (none: the canonical names).
    #[serde(default)]
    pub hf_prefixes: Vec<PrefixRename>,
    /// The rules.
    pub params: Vec<ParamSpec>,
    /// Config/tensor consistency checks.
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// How to run the decoder cross-attention forward check (`verify`, `validate`).
    #[serde(default)]
    pub cross_attention: Option<CrossAttentionSpec>,
    /// Tensors written with a constant value (engine buffers).
    #[serde(default)]
    pub constants: Vec<ConstantSpec>,
    /// The engines and release ranges the output can target (`--target`).
    #[serde(default)]
    pub engines: Vec<EngineTarget>,
    /// The target used without `--target`: the newest one tested.
    #[serde(default)]
    pub default_engine: Option<String>,
    /// For a mapping without `engines`: which engine loads its output, if any, and what proves
    /// it (shown by `plan`).
    #[serde(default)]
    pub engine_status: Option<String>,
}

/// Names of one cross-attention layer's weights; templates use `{i}` for the layer index.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttnNames {
    /// Query weight.
    pub q: String,
    /// Query bias (absent tensor = zeros).
    #[serde(default)]
    pub q_bias: Option<String>,
    /// Key weight (source only).
    #[serde(default)]
    pub k: Option<String>,
    /// Key bias (source only; absent tensor = zeros).
    #[serde(default)]
    pub k_bias: Option<String>,
    /// Value weight (source only).
    #[serde(default)]
    pub v: Option<String>,
    /// Value bias (source only).
    #[serde(default)]
    pub v_bias: Option<String>,
    /// Fused `[k_r ; v_r]` weight (shards only).
    #[serde(default)]
    pub kv: Option<String>,
    /// Fused `[k_r ; v_r]` bias (shards only).
    #[serde(default)]
    pub kv_bias: Option<String>,
    /// Output projection weight.
    pub o: String,
    /// Output projection bias (full on every rank, added once).
    #[serde(default)]
    pub o_bias: Option<String>,
    /// Per-head RMSNorm weight of q (mllama).
    #[serde(default)]
    pub q_norm: Option<String>,
    /// Per-head RMSNorm weight of k (mllama).
    #[serde(default)]
    pub k_norm: Option<String>,
}

/// The decoder cross-attention of a family, for the forward checks.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrossAttentionSpec {
    /// Pattern whose `{i}` values enumerate the layers (a source name).
    pub layers: String,
    /// Dim name of the query head count.
    pub heads: String,
    /// Dim name of the kv head count.
    pub kv_heads: String,
    /// Dim name of the decoder hidden size (rows of `x`).
    pub hidden: String,
    /// Config key of the RMSNorm epsilon when q/k are normalized per head.
    #[serde(default)]
    pub norm_eps_config: Option<String>,
    /// Source (unsplit) names.
    pub source: AttnNames,
    /// Shard (target) names.
    pub shards: AttnNames,
}

/// A compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Position in the file (`params[i]`).
    pub index: usize,
    /// Target templates (one, or several for ties).
    pub targets: Vec<Pattern>,
    /// Parts in stacking order; a single-source rule has one part with id "".
    pub parts: Vec<RulePart>,
    /// The part whose matches enumerate the rule's instances (the first part that may not be missing).
    pub anchor: usize,
    /// Split rule.
    pub split: SplitSpec,
    /// Alias patterns.
    pub aliases: Vec<Pattern>,
    /// Reshape.
    pub reshape: Option<Reshape>,
}

impl Rule {
    /// A short label for messages: `params[3] (model.{side}.layers.{i}.fc1.{p})`.
    pub fn label(&self) -> String {
        format!("params[{}] ({})", self.index, self.targets[0].as_str())
    }
}

/// A compiled part of a rule.
#[derive(Clone, Debug)]
pub struct RulePart {
    /// Shard id.
    pub shard_id: String,
    /// Source pattern.
    pub pattern: Pattern,
    /// When absent: synthesize zeros like this part (index), under these bindings.
    pub zeros_like: Option<(usize, BTreeMap<String, String>)>,
}

/// A compiled check.
#[derive(Clone, Debug)]
pub struct Check {
    /// Position in the file's `checks`.
    pub index: usize,
    /// The pattern of tensor names it looks at.
    pub pattern: Pattern,
    /// What it checks.
    pub kind: CheckKind,
}

impl Check {
    /// A short label for messages: `checks[3] (model.{side}.layers.{i}.fc1.weight)`.
    pub fn label(&self) -> String {
        format!("checks[{}] ({})", self.index, self.pattern.as_str())
    }
}

/// What a compiled check checks.
#[derive(Clone, Debug)]
pub enum CheckKind {
    /// The values of `var` per combination of the other placeholders (`groups`).
    Layers {
        /// The layer variable.
        var: String,
        /// Every binding of the other placeholders.
        groups: Vec<Bindings>,
        /// The expected layers.
        expect: LayerExpect,
    },
    /// The shape of every matching tensor.
    Shape {
        /// Per dimension: a size or an expression template.
        shape: Vec<ShapeEntry>,
    },
}

/// The layers a layer check expects.
#[derive(Clone, Debug)]
pub enum LayerExpect {
    /// `0..N` for the expression (a template over the group's placeholders).
    Count(Pattern),
    /// The list at a config key, or with `complement` the rest of `0..N`.
    List {
        /// Dotted config key.
        config: String,
        /// The expression N.
        complement: Option<Pattern>,
    },
}

/// One compiled dimension of a shape check.
#[derive(Clone, Debug)]
pub enum ShapeEntry {
    /// A fixed size.
    Size(u64),
    /// An expression template.
    Expr(Pattern),
}

/// At most this many combinations of alternatives per check (each is evaluated).
const MAX_COMBINATIONS: usize = 4096;

/// A compiled constant.
#[derive(Clone, Debug)]
pub struct Constant {
    /// Position in the file's `constants`.
    pub index: usize,
    /// Pattern binding the placeholders.
    pub for_each: Pattern,
    /// Target templates.
    pub targets: Vec<Pattern>,
    /// The value of every element.
    pub value: f64,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Targets it is written for (`None`: all).
    pub engines: Option<Vec<String>>,
}

impl Constant {
    /// A short label for messages: `constants[0] (model.decoder.layers.{i}.{attn}.attn._k_scale)`.
    pub fn label(&self) -> String {
        format!("constants[{}] ({})", self.index, self.targets[0].as_str())
    }
}

/// A loaded, checked mapping.
#[derive(Clone, Debug)]
pub struct Mapping {
    /// Where it came from: a path, or `built-in bart.json`.
    pub origin: String,
    /// The raw file (kept for the manifest and `plan --json`).
    pub file: MappingFile,
    /// Compiled rules, in file order.
    pub rules: Vec<Rule>,
    /// Compiled checks.
    pub checks: Vec<Check>,
    /// Compiled constants.
    pub constants: Vec<Constant>,
    /// Stable 32-bit digest (CRC-32) of the mapping text, recorded in manifests.
    pub digest: u32,
}

impl Mapping {
    /// Loads a mapping file from disk.
    pub fn load(path: &Path) -> Result<Mapping, MappingError> {
        use crate::input::{read_regular, FileError, Problem};
        let bytes = read_regular(path).map_err(|e| match e {
            FileError { path, problem: Problem::Io(source) } => MappingError::Io { path, source },
            e => MappingError::File(e),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| MappingError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"),
        })?;
        Mapping::parse(&text, &path.display().to_string())
    }

    /// The bundled mapping with this file name (`bart.json`).
    pub fn builtin(name: &str) -> Option<Mapping> {
        let (n, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        Some(Mapping::parse(text, &format!("built-in {n}")).expect("bundled mappings are tested"))
    }

    /// Picks the bundled mapping serving config.json's `model_type`.
    pub fn detect(config: &serde_json::Value, config_label: &str) -> Result<Mapping, MappingError> {
        let Some(mt) = config.get("model_type").and_then(|v| v.as_str()) else {
            return Err(MappingError::NoModelType { config: config_label.to_string() });
        };
        let mut known = Vec::new();
        for (name, _) in BUILTIN {
            let m = Mapping::builtin(name).expect("bundled");
            if m.file.model_types.iter().any(|t| t == mt) {
                return Ok(m);
            }
            known.extend(m.file.model_types.clone());
        }
        Err(MappingError::UnknownFamily {
            model_type: mt.to_string(),
            config: config_label.to_string(),
            known: known.join(", "),
        })
    }

    /// Refuses a mapping file whose `model_types` does not list config.json's `model_type` (a
    /// config without one is left to the mapping's own checks).
    pub fn check_family(
        &self,
        path: &Path,
        config: &serde_json::Value,
        config_label: &str,
    ) -> Result<(), MappingError> {
        match config.get("model_type").and_then(|v| v.as_str()) {
            Some(mt) if !self.file.model_types.iter().any(|t| t == mt) => Err(MappingError::WrongFamily {
                path: path.to_owned(),
                model_types: self.file.model_types.clone(),
                model_type: mt.to_string(),
                config: config_label.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Parses and checks mapping text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Mapping, MappingError> {
        let invalid =
            |at: &str, msg: String| MappingError::Invalid { origin: origin.to_string(), at: at.to_string(), msg };
        let de = &mut serde_json::Deserializer::from_str(text);
        let file: MappingFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            invalid(if at.is_empty() { "." } else { &at }, e.into_inner().to_string())
        })?;
        if file.format_version != FORMAT_VERSION {
            return Err(invalid(
                "format_version",
                format!("version {} is not supported (this build reads version {FORMAT_VERSION})", file.format_version),
            ));
        }
        dims::check_specs(&file.dims).map_err(|(at, msg)| invalid(&at, msg))?;
        let mut rules = Vec::new();
        for (i, p) in file.params.iter().enumerate() {
            rules.push(compile_rule(i, p, &file.dims).map_err(|(at, msg)| invalid(&format!("params[{i}]{at}"), msg))?);
        }
        let checks = file
            .checks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                compile_check(i, c, &file.dims).map_err(|(at, msg)| invalid(&format!("checks[{i}]{at}"), msg))
            })
            .collect::<Result<_, _>>()?;
        if let Some(ca) = &file.cross_attention {
            check_cross_attention(ca, &file.dims).map_err(|(at, msg)| invalid(&format!("cross_attention{at}"), msg))?;
        }
        engine::check_targets(&file.engines, file.default_engine.as_deref()).map_err(|(at, msg)| invalid(&at, msg))?;
        let constants = file
            .constants
            .iter()
            .enumerate()
            .map(|(i, c)| {
                compile_constant(i, c, &file.engines).map_err(|(at, msg)| invalid(&format!("constants[{i}]{at}"), msg))
            })
            .collect::<Result<_, _>>()?;
        Ok(Mapping {
            origin: origin.to_string(),
            file,
            rules,
            checks,
            constants,
            digest: crc32fast::hash(text.as_bytes()),
        })
    }

    /// The target `want` selects (a name, `ENGINE==VERSION`, or the default for `None`); `None`
    /// when the mapping declares no targets and none was asked for.
    pub fn target(&self, want: Option<&str>) -> Result<Option<&EngineTarget>, String> {
        engine::select(&self.file.engines, self.file.default_engine.as_deref(), want)
    }

    /// The name a Hugging Face checkpoint written by `reshard merge` gives source `name`: its
    /// canonical form, then `hf_prefixes`.
    pub fn hf_name(&self, name: &str) -> String {
        let c = self.canonical(name);
        for p in &self.file.hf_prefixes {
            if let Some(rest) = c.strip_prefix(p.from.as_str()) {
                return format!("{}{rest}", p.to);
            }
        }
        c.into_owned()
    }

    /// Whether canonical source name `name` is a rule's alias (a tied copy that is not written).
    pub fn is_alias(&self, name: &str) -> bool {
        self.rules.iter().any(|r| r.aliases.iter().any(|a| a.matches(name).is_some()))
    }

    /// The canonical form of a source name (after `source_prefixes`).
    pub fn canonical<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        for p in &self.file.source_prefixes {
            if let Some(rest) = name.strip_prefix(p.from.as_str()) {
                return format!("{}{rest}", p.to).into();
            }
        }
        name.into()
    }
}

fn check_cross_attention(ca: &CrossAttentionSpec, dims: &BTreeMap<String, DimSpec>) -> Result<(), (String, String)> {
    for (at, d) in [(".heads", &ca.heads), (".kv_heads", &ca.kv_heads), (".hidden", &ca.hidden)] {
        if !dims.contains_key(d) {
            return Err((at.into(), format!("unknown dim `{d}`")));
        }
    }
    let layers = Pattern::parse(&ca.layers).map_err(|m| (".layers".to_string(), m))?;
    if layers.vars().into_iter().collect::<Vec<_>>() != ["i"] {
        return Err((".layers".into(), "must have exactly one placeholder, `{i}`".into()));
    }
    let need = |side: &str, n: &AttnNames, kv: bool| -> Result<(), (String, String)> {
        let ok = if kv { n.kv.is_some() } else { n.k.is_some() && n.v.is_some() };
        if !ok {
            let want = if kv { "`kv`" } else { "`k` and `v`" };
            return Err((format!(".{side}"), format!("needs {want}")));
        }
        Ok(())
    };
    need("source", &ca.source, false)?;
    need("shards", &ca.shards, true)?;
    Ok(())
}

/// Parses a dim expression template and checks it for every binding of `combos`: its
/// placeholders must be among `allowed`, and every rendering a valid expression over `dims`.
fn compile_expr(
    at: &str,
    text: &str,
    pattern: &Pattern,
    allowed: &[&str],
    dims: &BTreeMap<String, DimSpec>,
) -> Result<Pattern, (String, String)> {
    let err = |msg: String| (at.to_string(), msg);
    let t = Pattern::parse(text).map_err(err)?;
    let vars: Vec<&str> = t.vars().into_iter().collect();
    if let Some(v) = vars.iter().find(|v| !allowed.contains(v)) {
        return Err(err(format!(
            "`{{{v}}}` is not a placeholder with alternatives of the pattern `{}`",
            pattern.as_str()
        )));
    }
    for b in pattern.combinations(&vars, MAX_COMBINATIONS).map_err(err)? {
        dims::check_expr(&t.render(&b), dims).map_err(err)?;
    }
    Ok(t)
}

fn compile_check(i: usize, c: &CheckSpec, dims: &BTreeMap<String, DimSpec>) -> Result<Check, (String, String)> {
    let (pattern_text, var) = match c {
        CheckSpec::LayerSet { pattern, var, .. } | CheckSpec::LayerCount { pattern, var, .. } => (pattern, Some(var)),
        CheckSpec::Shape { pattern, .. } => (pattern, None),
    };
    let pattern = Pattern::parse(pattern_text).map_err(|m| (".pattern".to_string(), m))?;
    // Placeholders with alternatives: what expressions may use, and what layer checks group by.
    let alts: Vec<&str> = pattern.vars().into_iter().filter(|v| pattern.alternatives(v).is_some()).collect();
    let kind = match c {
        CheckSpec::Shape { shape, .. } => {
            let shape = shape
                .iter()
                .enumerate()
                .map(|(j, e)| {
                    let at = format!(".shape[{j}]");
                    match e {
                        serde_json::Value::String(x) => {
                            compile_expr(&at, x, &pattern, &alts, dims).map(ShapeEntry::Expr)
                        }
                        _ => match e.as_u64() {
                            Some(n) => Ok(ShapeEntry::Size(n)),
                            None => Err((
                                at,
                                format!("expected a size (an integer >= 0) or a dim expression (a string), found {e}"),
                            )),
                        },
                    }
                })
                .collect::<Result<_, _>>()?;
            CheckKind::Shape { shape }
        }
        CheckSpec::LayerSet { .. } | CheckSpec::LayerCount { .. } => {
            let var = var.expect("layer checks have a var");
            if !pattern.vars().contains(var.as_str()) || pattern.alternatives(var).is_some() {
                return Err((".var".into(), format!("`{{{var}}}` is not a digit placeholder of the pattern")));
            }
            let others: Vec<&str> = pattern.vars().into_iter().filter(|v| v != var).collect();
            let groups = pattern.combinations(&others, MAX_COMBINATIONS).map_err(|m| (".pattern".to_string(), m))?;
            let expect = match c {
                CheckSpec::LayerCount { count, .. } => {
                    LayerExpect::Count(compile_expr(".count", count, &pattern, &alts, dims)?)
                }
                CheckSpec::LayerSet { config, complement, .. } => LayerExpect::List {
                    config: config.clone(),
                    complement: complement
                        .as_ref()
                        .map(|x| compile_expr(".complement", x, &pattern, &alts, dims))
                        .transpose()?,
                },
                CheckSpec::Shape { .. } => unreachable!("handled above"),
            };
            CheckKind::Layers { var: var.clone(), groups, expect }
        }
    };
    Ok(Check { index: i, pattern, kind })
}

fn compile_constant(i: usize, c: &ConstantSpec, engines: &[EngineTarget]) -> Result<Constant, (String, String)> {
    let for_each = Pattern::parse(&c.for_each).map_err(|m| (".for_each".to_string(), m))?;
    if c.targets.is_empty() {
        return Err((".targets".into(), "needs at least one target template".into()));
    }
    let mut targets = Vec::new();
    for (j, t) in c.targets.iter().enumerate() {
        let at = format!(".targets[{j}]");
        let pat = Pattern::parse(t).map_err(|m| (at.clone(), m))?;
        if pat.has_alternatives() {
            return Err((at, "a target template cannot have alternatives; use `{var}`".into()));
        }
        if let Some(v) = pat.vars().iter().find(|v| !for_each.vars().contains(*v)) {
            return Err((at, format!("placeholder `{{{v}}}` is not bound by `for_each`")));
        }
        targets.push(pat);
    }
    crate::dtype::encode_value(c.dtype, c.value).map_err(|m| (".value".to_string(), m))?;
    let bytes = c.shape.iter().try_fold(c.dtype.size(), |n, &d| n.checked_mul(d));
    if bytes.is_none_or(|b| b > MAX_CONSTANT_BYTES) {
        return Err((".shape".into(), format!("a constant may hold at most {MAX_CONSTANT_BYTES} bytes")));
    }
    if let Some(names) = &c.engines {
        if let Some(n) = names.iter().find(|n| !engines.iter().any(|e| &e.name == *n)) {
            return Err((".engines".into(), format!("`{n}` is not the name of one of `engines`")));
        }
    }
    Ok(Constant {
        index: i,
        for_each,
        targets,
        value: c.value,
        dtype: c.dtype,
        shape: c.shape.clone(),
        engines: c.engines.clone(),
    })
}

fn compile_rule(i: usize, p: &ParamSpec, dims: &BTreeMap<String, DimSpec>) -> Result<Rule, (String, String)> {
    let err = |at: &str, msg: String| (at.to_string(), msg);
    let parts: Vec<(String, Pattern, Option<Missing>)> = match (&p.source, p.parts.is_empty()) {
        (Some(s), true) => vec![(String::new(), Pattern::parse(s).map_err(|m| err(".source", m))?, None)],
        (None, false) => p
            .parts
            .iter()
            .enumerate()
            .map(|(j, part)| {
                let pat = Pattern::parse(&part.source).map_err(|m| err(&format!(".parts[{j}].source"), m))?;
                Ok((part.shard_id.clone(), pat, part.missing.clone()))
            })
            .collect::<Result<_, (String, String)>>()?,
        (Some(_), false) => return Err(err("", "give either `source` or `parts`, not both".into())),
        (None, true) => return Err(err("", "needs a `source` or `parts`".into())),
    };
    let ids: Vec<&str> = parts.iter().map(|(s, _, _)| s.as_str()).collect();
    let need = |want: &[&str]| -> Result<(), (String, String)> {
        if ids != want {
            return Err(err(
                ".parts",
                format!("this split needs parts with shard ids {want:?} in that order, found {ids:?}"),
            ));
        }
        Ok(())
    };
    let check_dim = |at: &str, d: &Option<String>| -> Result<(), (String, String)> {
        match d {
            Some(d) if !dims.contains_key(d) => Err(err(at, format!("unknown dim `{d}` (declare it under `dims`)"))),
            _ => Ok(()),
        }
    };
    match &p.split {
        SplitSpec::FusedQkv { heads, kv_heads, head_dim } => {
            need(&["q", "k", "v"])?;
            check_dim(".split.heads", &Some(heads.clone()))?;
            check_dim(".split.kv_heads", &Some(kv_heads.clone()))?;
            check_dim(".split.head_dim", head_dim)?;
        }
        SplitSpec::Kv { heads, kv_heads, head_dim } => {
            need(&["k", "v"])?;
            check_dim(".split.heads", &Some(heads.clone()))?;
            check_dim(".split.kv_heads", &Some(kv_heads.clone()))?;
            check_dim(".split.head_dim", head_dim)?;
        }
        SplitSpec::MergedColumn {} => {
            if parts.len() < 2 || parts.iter().any(|(id, _, _)| id.is_empty()) {
                return Err(err(".parts", "merged_column needs two or more parts with shard ids".into()));
            }
        }
        SplitSpec::Vocab { pad_to, rows } => {
            if *pad_to == 0 {
                return Err(err(".split.pad_to", "must be at least 1".into()));
            }
            check_dim(".split.rows", rows)?;
            if parts.len() != 1 {
                return Err(err("", "vocab takes a single `source`".into()));
            }
        }
        SplitSpec::Replicated {} | SplitSpec::Column {} | SplitSpec::Row {} => {
            if parts.len() != 1 {
                return Err(err(
                    "",
                    "this split takes a single `source`; use merged_column, fused_qkv or kv to stack parts".into(),
                ));
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (id, _, _) in &parts {
        if !seen.insert(id) {
            return Err(err(".parts", format!("shard id `{id}` appears twice")));
        }
    }
    let vars = parts[0].1.vars();
    for (j, (_, pat, _)) in parts.iter().enumerate() {
        if pat.vars() != vars {
            return Err(err(&format!(".parts[{j}].source"), "every part must use the same placeholders".into()));
        }
    }
    let zl: Vec<Option<(usize, BTreeMap<String, String>)>> = parts
        .iter()
        .enumerate()
        .map(|(j, (_, pat, z))| match z {
            None => Ok(None),
            Some(Missing { zeros_like: id, when }) => {
                if let Some(k) = when.keys().find(|k| !pat.vars().contains(k.as_str())) {
                    return Err(err(
                        &format!(".parts[{j}].missing.when"),
                        format!("`{k}` is not a placeholder of the source"),
                    ));
                }
                match ids.iter().position(|x| x == id) {
                    Some(k) if k != j && parts[k].2.is_none() => Ok(Some((k, when.clone()))),
                    _ => Err(err(
                        &format!(".parts[{j}].missing.zeros_like"),
                        format!("`{id}` is not another part that must be present"),
                    )),
                }
            }
        })
        .collect::<Result<_, _>>()?;
    let anchor = zl.iter().position(Option::is_none).expect("checked above: a zeros_like target is required");
    let target_texts: Vec<String> = match (&p.target, p.targets.is_empty()) {
        (Some(t), true) => vec![t.clone()],
        (None, false) => p.targets.clone(),
        (None, true) if parts.len() == 1 => vec![parts[0].1.as_str().to_string()],
        (None, true) => return Err(err("", "stacked parameters need a `target`".into())),
        (Some(_), false) => return Err(err("", "give either `target` or `targets`, not both".into())),
    };
    let mut targets = Vec::new();
    for (j, t) in target_texts.iter().enumerate() {
        let at = if p.targets.is_empty() { ".target".to_string() } else { format!(".targets[{j}]") };
        let pat = Pattern::parse(t).map_err(|m| err(&at, m))?;
        if (p.target.is_some() || !p.targets.is_empty()) && pat.has_alternatives() {
            return Err(err(&at, "a target template cannot have alternatives; use `{var}`".into()));
        }
        if let Some(v) = pat.vars().iter().find(|v| !vars.contains(*v)) {
            return Err(err(&at, format!("placeholder `{{{v}}}` is not bound by the source pattern")));
        }
        targets.push(pat);
    }
    let aliases = p
        .aliases
        .iter()
        .enumerate()
        .map(|(j, a)| {
            let pat = Pattern::parse(a).map_err(|m| err(&format!(".aliases[{j}]"), m))?;
            if pat.vars() != vars {
                return Err(err(
                    &format!(".aliases[{j}]"),
                    "an alias must use the same placeholders as the source".into(),
                ));
            }
            Ok(pat)
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        index: i,
        targets,
        parts: parts
            .into_iter()
            .zip(zl)
            .map(|((shard_id, pattern, _), zeros_like)| RulePart { shard_id, pattern, zeros_like })
            .collect(),
        anchor,
        split: p.split.clone(),
        aliases,
        reshape: p.reshape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Mapping::parse(json, "t.json").unwrap_err().to_string()
    }

    const HEAD: &str = r#""format_version":1,"family":"t","model_types":["t"],"dims":{"h":{"config":"n"}}"#;

    #[test]
    fn bundled_mappings_load() {
        for (name, _) in BUILTIN {
            let m = Mapping::builtin(name).unwrap();
            assert!(!m.rules.is_empty(), "{name}");
            // Every family says which engine loads its output, or that none does.
            assert!(m.file.engine_status.is_some() != m.target(None).unwrap().is_some(), "{name}");
        }
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let e = err(&format!(r#"{{{HEAD},"params":[{{"source":"a","split":{{"kind":"column","x":1}}}}]}}"#));
        assert!(e.contains("params[0].split"), "{e}");
        let e = err(&format!(r#"{{{HEAD},"params":[{{"source":"a","split":{{"kind":"column"}},"bogus":1}}]}}"#));
        assert!(e.contains("params[0]") && e.contains("bogus"), "{e}");
        let e = err(&format!(r#"{{{HEAD},"params":[{{"source":"a","split":{{"kind":"diagonal"}}}}]}}"#));
        assert!(e.contains("diagonal"), "{e}");
        let e = err(r#"{"format_version":2,"family":"t","model_types":[],"params":[]}"#);
        assert!(e.contains("version 2"), "{e}");
    }

    #[test]
    fn engines_and_constants_are_checked_when_the_file_loads() {
        let t = |name: &str, lo: &str, hi: &str| {
            format!(
                r#"{{"name":"{name}","engine":"vllm","min_version":"{lo}","max_version":"{hi}","model_code":"m","evidence":"e"}}"#
            )
        };
        let file = |engines: &str, default: &str, constants: &str| {
            format!(
                r#"{{{HEAD},"params":[{{"source":"a.{{i}}","split":{{"kind":"replicated"}}}}],"engines":[{engines}]{default},"constants":[{constants}]}}"#
            )
        };
        let ok = file(&t("v1", "0.1.0", "0.2.0"), r#","default_engine":"v1""#, "");
        assert_eq!(Mapping::parse(&ok, "t.json").unwrap().target(None).unwrap().unwrap().name, "v1");
        let e = err(&file(&t("v1", "0.1.0", "0.2.0"), "", ""));
        assert!(e.contains("at `default_engine`: required"), "{e}");
        let e = err(&file(&t("v1", "0.x", "0.2.0"), r#","default_engine":"v1""#, ""));
        assert!(e.contains("at `engines[0].min_version`") && e.contains("`0.x` is not a release number"), "{e}");
        let c = |extra: &str| {
            file(
                &t("v1", "0.1.0", "0.2.0"),
                r#","default_engine":"v1""#,
                &format!(r#"{{"for_each":"a.{{i}}","targets":["b.{{i}}.s"],"value":1,"dtype":"F32"{extra}}}"#),
            )
        };
        assert_eq!(Mapping::parse(&c(""), "t.json").unwrap().constants[0].label(), "constants[0] (b.{i}.s)");
        let e = err(&c(r#","engines":["v2"]"#));
        assert!(e.contains("at `constants[0].engines`: `v2` is not the name"), "{e}");
        let e = err(&c(r#","dtype":"F32""#));
        assert!(e.contains("duplicate field `dtype`"), "{e}");
        let e = err(&c(r#","shape":[1024,1024]"#));
        assert!(e.contains("at `constants[0].shape`"), "{e}");
        let e = err(&c(r#","colour":1"#));
        assert!(e.contains("constants[0]") && e.contains("colour"), "{e}");
    }

    #[test]
    fn checks_are_compiled_and_their_errors_name_the_json_path() {
        let file = |checks: &str| {
            format!(
                r#"{{"format_version":1,"family":"t","model_types":["t"],
                "dims":{{"d":{{"config":"d"}},"encoder_ffn":{{"config":"f"}},"decoder_ffn":{{"config":"g"}},"n":{{"config":"n"}}}},
                "params":[{{"source":"m.{{side:encoder|decoder}}.l.{{i}}.w","split":{{"kind":"column"}}}}],"checks":[{checks}]}}"#
            )
        };
        let ok = file(
            r#"{"kind":"shape","pattern":"m.{side:encoder|decoder}.l.{i}.w","shape":["{side}_ffn","d * 2 + 1",3]},
               {"kind":"layer_count","pattern":"m.{side:encoder|decoder}.l.{i}.w","count":"n"},
               {"kind":"layer_set","config":"x","complement":"n - 1","pattern":"m.encoder.l.{j}.w","var":"j"}"#,
        );
        let m = Mapping::parse(&ok, "t.json").unwrap();
        assert!(matches!(&m.checks[0].kind, CheckKind::Shape { shape } if shape.len() == 3));
        match &m.checks[1].kind {
            CheckKind::Layers { var, groups, expect: LayerExpect::Count(_) } => {
                assert_eq!((var.as_str(), groups.len()), ("i", 2));
            }
            k => panic!("{k:?}"),
        }
        assert!(matches!(
            &m.checks[2].kind,
            CheckKind::Layers { expect: LayerExpect::List { complement: Some(_), .. }, .. }
        ));
        let cases = [
            (
                r#"{"kind":"shape","pattern":"a","shape":["d","nope"]}"#,
                "at `checks[0].shape[1]`: expression `nope` uses unknown dim `nope`",
            ),
            (
                r#"{"kind":"shape","pattern":"a.{i}","shape":["{i}_ffn"]}"#,
                "at `checks[0].shape[0]`: `{i}` is not a placeholder with alternatives",
            ),
            (
                r#"{"kind":"shape","pattern":"m.{side:encoder|middle}.w","shape":["{side}_ffn"]}"#,
                "unknown dim `middle_ffn`",
            ),
            (r#"{"kind":"shape","pattern":"a","shape":["d +"]}"#, "at `checks[0].shape[0]`: expression `d +` must be"),
            (
                r#"{"kind":"shape","pattern":"a","shape":[true]}"#,
                "at `checks[0].shape[0]`: expected a size (an integer >= 0) or a dim expression (a string), found true",
            ),
            (r#"{"kind":"shape","pattern":"a","shape":[2,-1]}"#, "at `checks[0].shape[1]`: expected a size"),
            (r#"{"kind":"shape","pattern":"a.{i","shape":[]}"#, "at `checks[0].pattern`: unclosed"),
            (r#"{"kind":"shape","pattern":"a","shape":[],"dims":1}"#, "unknown field `dims`"),
            (r#"{"kind":"layer_count","pattern":"a.{i}"}"#, "missing field `count`"),
            (
                r#"{"kind":"layer_count","pattern":"a.{i}","count":"zz"}"#,
                "at `checks[0].count`: expression `zz` uses unknown dim",
            ),
            (
                r#"{"kind":"layer_count","pattern":"a.{k}","count":"n"}"#,
                "at `checks[0].var`: `{i}` is not a digit placeholder",
            ),
            (
                r#"{"kind":"layer_count","pattern":"a.{i:x|y}","count":"n"}"#,
                "at `checks[0].var`: `{i}` is not a digit placeholder",
            ),
            (
                r#"{"kind":"layer_count","pattern":"a.{i}.b.{j}","count":"n"}"#,
                "at `checks[0].pattern`: `{j}` must be a placeholder with alternatives",
            ),
            (
                r#"{"kind":"layer_count","pattern":"a.{i}","count":"{side}_ffn"}"#,
                "at `checks[0].count`: `{side}` is not a placeholder",
            ),
            (r#"{"kind":"layer_set","config":"x","pattern":"a.{i}","complement":"n /"}"#, "at `checks[0].complement`"),
            (r#"{"kind":"layer_set","pattern":"a.{i}"}"#, "missing field `config`"),
            (r#"{"kind":"layer_range","pattern":"a.{i}"}"#, "layer_range"),
        ];
        for (check, want) in cases {
            let e = err(&file(check));
            assert!(e.contains(want), "{check}: {e}");
        }
        // A check whose alternatives multiply beyond the cap is refused when the file loads.
        let alts = (0..10).map(|k| format!("a{k}")).collect::<Vec<_>>().join("|");
        let big = (0..4).map(|k| format!("{{x{k}:{alts}}}")).collect::<Vec<_>>().join(".");
        let e = err(&file(&format!(r#"{{"kind":"layer_count","pattern":"{big}.{{i}}","count":"n"}}"#)));
        assert!(e.contains("at `checks[0].pattern`") && e.contains("more than 4096 combinations"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_rule() {
        let e = err(&format!(
            r#"{{{HEAD},"params":[{{"source":"a.{{i}}","target":"b.{{j}}","split":{{"kind":"column"}}}}]}}"#
        ));
        assert!(e.contains("params[0].target") && e.contains("{j}"), "{e}");
        let e = err(&format!(
            r#"{{{HEAD},"params":[{{"target":"x","parts":[{{"shard_id":"q","source":"a"}},{{"shard_id":"v","source":"b"}}],"split":{{"kind":"fused_qkv","heads":"h","kv_heads":"h"}}}}]}}"#
        ));
        assert!(e.contains("[\"q\", \"k\", \"v\"]"), "{e}");
        let e = err(&format!(
            r#"{{{HEAD},"params":[{{"target":"x","parts":[{{"shard_id":"k","source":"a"}},{{"shard_id":"v","source":"b"}}],"split":{{"kind":"kv","heads":"h","kv_heads":"nope"}}}}]}}"#
        ));
        assert!(e.contains("unknown dim `nope`"), "{e}");
        let e = err(&format!(r#"{{{HEAD},"params":[{{"source":"a.{{i","split":{{"kind":"row"}}}}]}}"#));
        assert!(e.contains("params[0].source") && e.contains("unclosed"), "{e}");
    }
}
