//! The plan run backwards (issue #16): a sharded directory read as the checkpoint it was made
//! from, so that it can be converted to another tp, merged back into a Hugging Face checkpoint,
//! or verified against, with the same planner, writer and verifier as a Hugging Face input.
//!
//! The mapping and the forward plan already say where every source byte goes; [`Backward::read`]
//! turns that around in four steps, none of which knows a model family:
//!
//! 1. **Names and shapes.** Every rank-0 tensor is matched against the rules' target templates
//!    (with the placeholders' alternatives of the sources) and the constants' targets; each match
//!    renders the rule's source names. A source's shape is the mapping's shape check for it when
//!    there is one (config.json decides), else the split run backwards (a column split has tp
//!    times the rows, a fused qkv the head counts of config.json, ...). Synthesized parts and
//!    aliases are not sources; the dtype is the shard's.
//! 2. **The forward plan at the input's tp** is made from those tensors, as for any checkpoint,
//!    and must be exactly what the files hold: every rank's names, dtypes and shapes. So nothing
//!    guessed in step 1 is trusted: a wrong guess is a plan that does not match.
//! 3. **Where each source byte lies.** For every source slice the forward plan writes, the first
//!    rank holding it is where it is read; every other copy (kv-head replicas, replicated tensors,
//!    tied names) must be byte-identical to it, padding and synthesized parts zero, constants
//!    their value ([`Backward::check`]).
//! 4. **Composition.** Any plan made from the recovered tensors (another tp, or
//!    [`super::Resolved::plan_hf`]) is rewritten piece by piece to read the rank files instead
//!    ([`Backward::compose`]): the writer and `verify` then run as for a Hugging Face input.

use super::{FromShards, Piece, PlanError, PlanOptions, Resolved, ShardPlan, Slice};
use crate::checkpoint::sharded::{rank_tensor, ShardedMeta};
use crate::checkpoint::{Checkpoint, CheckpointMeta, TensorInfo};
use crate::dtype::Dtype;
use crate::mapping::dims::{self, Dims};
use crate::mapping::pattern::{Bindings, Pattern};
use crate::mapping::{CheckKind, Mapping, ShapeEntry, SplitSpec};
use crate::text::{q, qp, shape as fmt_shape};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Why a sharded directory cannot be read back.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum BackwardError {
    #[error("{}: {} rank-0 tensor(s) are neither a target nor a constant of mapping {mapping}: {}", qp(dir), names.len(), super::list(names))]
    Unclaimed { dir: PathBuf, mapping: String, names: Vec<String> },
    #[error("{}: tensor {} matches both {a} and {b} of mapping {mapping}", qp(dir), q(tensor))]
    Ambiguous { dir: PathBuf, tensor: String, mapping: String, a: String, b: String },
    #[error("{} read as tp {tp} ({how}): rank 0 tensor {} {}: {msg}", qp(dir), q(tensor), fmt_shape(shape))]
    Shape { dir: PathBuf, tp: usize, how: String, tensor: String, shape: Vec<usize>, msg: String },
    #[error("{}: {msg}", qp(dir))]
    Target { dir: PathBuf, msg: String },
    #[error("{} read as tp {tp} ({how}) does not hold what a conversion at tp {tp} writes:{}", qp(dir), problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Layout { dir: PathBuf, tp: usize, how: String, problems: Vec<String> },
    #[error("{}: rank {rank}: tensor {}: element {} {msg}\n(hint: the shards were changed after they were written, or not written by a tensor-parallel engine; nothing was written)", qp(dir), q(tensor), fmt_shape(element))]
    Check { dir: PathBuf, rank: usize, tensor: String, element: Vec<usize>, msg: String },
    #[error("{} read as tp {tp} ({how}): {source}", qp(dir))]
    Plan { dir: PathBuf, tp: usize, how: String, source: Box<PlanError> },
}

fn boxed(e: BackwardError) -> PlanError {
    PlanError::Backward(Box::new(e))
}

/// Where a source slice lies in the rank files: rows `rows` of tensor `tensor` of `rank` hold
/// the source's indices `start..end` along its split dim.
#[derive(Clone, Debug)]
struct Primary {
    start: usize,
    end: usize,
    rank: usize,
    tensor: String,
    tshape: Vec<usize>,
    rows: [usize; 2],
}

/// A source tensor as the rank files hold it.
#[derive(Clone, Debug)]
struct Located {
    /// The dim it is split along.
    dim: usize,
    /// Its shape as split (after any reshape).
    shape: Vec<usize>,
    /// Bytes per element.
    elem: usize,
    /// The slices, by start, tiling `0..shape[dim]`.
    primaries: Vec<Primary>,
}

/// A byte range `[a, b)` of one rank tensor's data.
#[derive(Clone, Debug)]
struct Region {
    rank: usize,
    tensor: String,
    bytes: [usize; 2],
}

/// One thing [`Backward::check`] checks.
#[derive(Clone, Debug)]
enum Expect {
    /// `region` equals `of`, byte for byte (`what` says why they should).
    Same { region: Region, of: Region, what: String },
    /// Every byte zero.
    Zero { region: Region, what: String },
    /// Every element the constant.
    Constant { region: Region, value: f64 },
}

/// A sharded input read back (see the module docs).
#[derive(Clone, Debug)]
pub struct Backward {
    /// The directory.
    pub dir: PathBuf,
    /// The input's tensor-parallel size.
    pub tp: usize,
    /// The target it is laid out for.
    pub target: Option<String>,
    /// How the tp and the target were determined.
    pub how: String,
    /// The cast its manifest records.
    pub cast: Option<Dtype>,
    /// The recovered checkpoint: source names, dtypes and shapes (no data: each tensor's
    /// `file`, `start`, `end` only say its size).
    pub logical: CheckpointMeta,
    /// [`crate::plan::resolve`] of [`Backward::logical`].
    pub resolved: Resolved,
    /// The forward plan at the input's tp, which the files match.
    pub forward: ShardPlan,
    sources: BTreeMap<String, Located>,
    expects: Vec<Expect>,
}

/// A rule's target template with the alternatives of its sources' placeholders, so that it
/// matches names (`{p}` of `...qkv_proj.{p}` becomes `{p:weight|bias}`).
fn inverse_pattern(template: &Pattern, sources: &Pattern) -> Pattern {
    let b: Bindings = template
        .vars()
        .into_iter()
        .map(|v| {
            let text = match sources.alternatives(v) {
                Some(alts) => format!("{{{v}:{}}}", alts.join("|")),
                None => format!("{{{v}}}"),
            };
            (v.to_string(), text)
        })
        .collect();
    Pattern::parse(&template.render(&b)).expect("a checked template with its source's alternatives parses")
}

/// What a rank-0 tensor is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Claim {
    /// Target `target` of rule `rule`, under `bindings`.
    Rule { rule: usize, target: usize, bindings: Bindings },
    /// A constant of the mapping.
    Constant(usize),
}

impl Backward {
    /// Reads `sm` back through `mapping`; see the module docs.
    pub fn read(sm: &ShardedMeta, mapping: &Mapping) -> Result<Backward, PlanError> {
        let dir = sm.dir.clone();
        let (tp, how) = (sm.tp, sm.how.clone());
        let dims = dims::resolve(&mapping.file.dims, &sm.config).map_err(|source| PlanError::Dim {
            mapping: mapping.origin.clone(),
            config: qp(&sm.config_path),
            source: Box::new(source),
        })?;
        let rule_patterns: Vec<(usize, usize, Pattern)> = mapping
            .rules
            .iter()
            .flat_map(|r| {
                let anchor = &r.parts[r.anchor].pattern;
                r.targets.iter().enumerate().map(move |(ti, t)| (r.index, ti, inverse_pattern(t, anchor)))
            })
            .collect();
        let const_patterns: Vec<(usize, Pattern)> = mapping
            .constants
            .iter()
            .flat_map(|c| c.targets.iter().map(move |t| (c.index, inverse_pattern(t, &c.for_each))))
            .collect();
        let label = |c: &Claim| match c {
            Claim::Rule { rule, .. } => mapping.rules[*rule].label(),
            Claim::Constant(i) => mapping.constants[*i].label(),
        };
        let rank0 = &sm.ranks[0];
        let mut instances: BTreeMap<(usize, Bindings), BTreeMap<usize, String>> = BTreeMap::new();
        let mut constants_found: BTreeSet<String> = BTreeSet::new();
        let mut unclaimed = Vec::new();
        for name in rank0.keys() {
            let mut claims = rule_patterns
                .iter()
                .filter_map(|(rule, target, p)| {
                    p.matches(name).map(|bindings| Claim::Rule { rule: *rule, target: *target, bindings })
                })
                .chain(
                    const_patterns.iter().filter(|(_, p)| p.matches(name).is_some()).map(|(i, _)| Claim::Constant(*i)),
                );
            match (claims.next(), claims.next()) {
                (None, _) => unclaimed.push(name.clone()),
                (Some(a), Some(b)) => {
                    return Err(boxed(BackwardError::Ambiguous {
                        dir,
                        tensor: name.clone(),
                        mapping: mapping.origin.clone(),
                        a: label(&a),
                        b: label(&b),
                    }))
                }
                (Some(Claim::Rule { rule, target, bindings }), None) => {
                    instances.entry((rule, bindings)).or_default().insert(target, name.clone());
                }
                (Some(Claim::Constant(_)), None) => {
                    constants_found.insert(name.clone());
                }
            }
        }
        if !unclaimed.is_empty() {
            unclaimed.sort_by(|a, b| crate::text::natural_cmp(a, b));
            return Err(boxed(BackwardError::Unclaimed { dir, mapping: mapping.origin.clone(), names: unclaimed }));
        }
        // Step 1: the source tensors.
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for ((r, bindings), found) in &instances {
            let rule = &mapping.rules[*r];
            let (_, name) = found.iter().next().expect("an instance has a tensor");
            let info = &rank0[name];
            let shape_err = |msg: String| {
                boxed(BackwardError::Shape {
                    dir: dir.clone(),
                    tp,
                    how: how.clone(),
                    tensor: name.clone(),
                    shape: info.shape.clone(),
                    msg,
                })
            };
            let parts: Vec<(String, bool)> = rule
                .parts
                .iter()
                .map(|p| {
                    let synthesized = p
                        .zeros_like
                        .as_ref()
                        .is_some_and(|(_, when)| when.iter().all(|(k, v)| bindings.get(k) == Some(v)));
                    (p.pattern.render(bindings), synthesized)
                })
                .collect();
            let shapes = part_shapes(&rule.split, &info.shape, tp, rule.parts.len(), &dims).map_err(shape_err)?;
            for ((src, synthesized), split_shape) in parts.iter().zip(shapes) {
                if *synthesized {
                    continue;
                }
                let canonical = mapping.canonical(src);
                let shape = match checked_shape(mapping, &canonical, &dims) {
                    Some(s) => s.map_err(shape_err)?,
                    None if rule.reshape.is_some() => {
                        return Err(shape_err(format!(
                            "source {} is reshaped by {} and no shape check of the mapping gives its shape",
                            q(src),
                            rule.label()
                        )))
                    }
                    None => split_shape,
                };
                // Shapes from config.json can be anything: a size that does not fit is refused.
                let nbytes =
                    shape.iter().try_fold(info.dtype.size() as u64, |n, d| n.checked_mul(*d as u64)).ok_or_else(
                        || shape_err(format!("source {} of shape {} is too large", q(src), fmt_shape(&shape))),
                    )?;
                let t = TensorInfo { dtype: info.dtype, shape, file: 0, start: 0, end: nbytes };
                if tensors.insert(src.clone(), t).is_some() {
                    return Err(shape_err(format!("source {} is rendered twice", q(src))));
                }
            }
        }
        // The target: the manifest's, else the one whose constants are those the files hold.
        let target = match (&sm.manifest, mapping.file.engines.is_empty()) {
            (Some(m), _) => m.target.as_ref().map(|t| t.name.clone()),
            (None, true) => None,
            (None, false) => Some(
                infer_target(mapping, &constants_found)
                    .map_err(|msg| boxed(BackwardError::Target { dir: dir.clone(), msg }))?,
            ),
        };
        let how = match (&sm.manifest, &target) {
            (None, Some(t)) => format!("{how}; target {t} from the constant tensors present"),
            (Some(_), Some(t)) => format!("{how}; target {t} from the manifest"),
            _ => how,
        };
        let logical = CheckpointMeta {
            dir: dir.clone(),
            config: sm.config.clone(),
            config_path: sm.config_path.clone(),
            files: vec![],
            tensors,
            extra_files: sm.extra_files.clone(),
        };
        // Step 2: the forward plan, which must be what the files hold.
        let wrap =
            |e: PlanError| boxed(BackwardError::Plan { dir: dir.clone(), tp, how: how.clone(), source: Box::new(e) });
        let resolved = super::resolve(&logical, mapping).map_err(wrap)?;
        let opts = PlanOptions { max_part_size: u64::MAX, target: target.clone(), ..PlanOptions::new(tp) };
        let forward = resolved.plan(&opts).map_err(wrap)?;
        let problems = compare_layout(&forward, sm);
        if !problems.is_empty() {
            return Err(boxed(BackwardError::Layout { dir, tp, how, problems }));
        }
        // Step 3: where each source slice is read, and what the other copies must be.
        let ties: BTreeMap<&str, &str> = resolved
            .params
            .iter()
            .flat_map(|p| p.targets[1..].iter().map(|t| (t.as_str(), p.targets[0].as_str())))
            .collect();
        let mut sources: BTreeMap<String, Located> = BTreeMap::new();
        let mut first: BTreeMap<(String, usize, usize), Region> = BTreeMap::new();
        let mut expects = Vec::new();
        for f in &forward.files {
            for t in &f.tensors {
                let elem = t.dtype.size();
                let row_bytes = t.shape.get(1..).map_or(1, |s| s.iter().product()) * elem;
                let whole = Region { rank: f.rank, tensor: t.name.clone(), bytes: [0, t.nbytes as usize] };
                let rows_of = |rows: [usize; 2]| Region {
                    rank: f.rank,
                    tensor: t.name.clone(),
                    bytes: [rows[0] * row_bytes, rows[1] * row_bytes],
                };
                if let Some(primary) = ties.get(t.name.as_str()) {
                    let of = Region { tensor: primary.to_string(), ..whole.clone() };
                    expects.push(Expect::Same { region: whole, of, what: format!("its tied copy {}", q(primary)) });
                    continue;
                }
                for piece in &t.pieces {
                    match piece {
                        Piece::Copy { source, source_shape, dim, start, end, rows } => {
                            let region = if *dim == 0 { rows_of(*rows) } else { whole.clone() };
                            match first.get(&(source.clone(), *start, *end)) {
                                Some(of) => {
                                    let what = format!("rank {}'s copy of {}", of.rank, q(source));
                                    expects.push(Expect::Same { region, of: of.clone(), what })
                                }
                                None => {
                                    first.insert((source.clone(), *start, *end), region);
                                    let loc = sources.entry(source.clone()).or_insert_with(|| Located {
                                        dim: *dim,
                                        shape: source_shape.clone(),
                                        elem,
                                        primaries: vec![],
                                    });
                                    loc.primaries.push(Primary {
                                        start: *start,
                                        end: *end,
                                        rank: f.rank,
                                        tensor: t.name.clone(),
                                        tshape: t.shape.clone(),
                                        rows: *rows,
                                    });
                                }
                            }
                        }
                        Piece::Zeros { rows, reason } => {
                            expects.push(Expect::Zero { region: rows_of(*rows), what: reason.clone() })
                        }
                        Piece::Constant { rows, value } => {
                            expects.push(Expect::Constant { region: rows_of(*rows), value: value.0 })
                        }
                        // A plan made from a checkpoint has none.
                        Piece::Concat { .. } => {}
                    }
                }
            }
        }
        for (name, loc) in sources.iter_mut() {
            loc.primaries.sort_by_key(|p| p.start);
            let n = loc.shape.get(loc.dim).copied().unwrap_or(1);
            let mut reach = 0;
            for p in &loc.primaries {
                if p.start != reach {
                    return Err(boxed(BackwardError::Layout {
                        dir: dir.clone(),
                        tp,
                        how: how.clone(),
                        problems: vec![format!("internal: the slices of {} do not tile it at {reach}", q(name))],
                    }));
                }
                reach = p.end;
            }
            if reach != n {
                return Err(boxed(BackwardError::Layout {
                    dir: dir.clone(),
                    tp,
                    how: how.clone(),
                    problems: vec![format!("internal: the slices of {} end at {reach} of {n}", q(name))],
                }));
            }
        }
        let cast = sm.manifest.as_ref().and_then(|m| m.dtype);
        Ok(Backward { dir, tp, target, how, cast, logical, resolved, forward, sources, expects })
    }

    /// What plans made from this input record about it.
    pub fn from_shards(&self) -> FromShards {
        FromShards { tp: self.tp, target: self.target.clone(), how: self.how.clone(), cast: self.cast }
    }

    /// Checks every copy the writer does not read against the one it reads, padding and
    /// synthesized parts for zeros, constants for their value; the first failure (in plan order)
    /// names the rank, the tensor and the element.
    pub fn check(&self, ckpt: &Checkpoint) -> Result<(), Box<BackwardError>> {
        let bytes = |r: &Region| -> &[u8] {
            let all = ckpt.tensor_bytes(&rank_tensor(&r.tensor, r.rank)).unwrap_or(&[]);
            all.get(r.bytes[0]..r.bytes[1]).unwrap_or(&[])
        };
        let info = |r: &Region| ckpt.meta.tensors.get(&rank_tensor(&r.tensor, r.rank));
        let failure = self.expects.par_iter().enumerate().find_map_first(|(_, e)| {
            let (region, pos, msg) = match e {
                Expect::Same { region, of, what } => {
                    let (a, b) = (bytes(region), bytes(of));
                    let pos = a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then_some(0))?;
                    (region, pos, (what.clone(), Some(b.get(pos..).unwrap_or(&[]))))
                }
                Expect::Zero { region, what } => {
                    let pos = bytes(region).iter().position(|b| *b != 0)?;
                    (region, pos, (format!("should be zero ({what})"), None))
                }
                Expect::Constant { region, value } => {
                    let dtype = info(region)?.dtype;
                    let want = crate::dtype::encode_value(dtype, *value).unwrap_or_default();
                    let at = bytes(region).chunks(want.len().max(1)).position(|c| c != want.as_slice())?;
                    (region, at * want.len(), (format!("should be the mapping's constant {value}"), None))
                }
            };
            Some((region.clone(), pos, msg))
        });
        let Some((region, pos, (what, expected))) = failure else { return Ok(()) };
        let info = info(&region).cloned();
        let (dtype, shape) = info.map(|i| (i.dtype, i.shape)).unwrap_or((Dtype::U8, vec![]));
        let elem = dtype.size();
        let e = (region.bytes[0] + pos) / elem;
        let at = |b: &[u8], o: usize| {
            let start = o - o % elem;
            b.get(start..start + elem).map(|x| crate::verify::show(dtype, x)).unwrap_or_else(|| "?".into())
        };
        let found = at(bytes(&region), pos);
        let msg = match expected {
            Some(want) => format!("differs from {what}: {found} where it has {}", at(want, 0)),
            None => format!("{what} but is {found}"),
        };
        Err(Box::new(BackwardError::Check {
            dir: self.dir.clone(),
            rank: region.rank,
            tensor: region.tensor,
            element: crate::verify::unravel(e, &shape),
            msg,
        }))
    }

    /// `plan` (made from [`Backward::resolved`]) reading the rank files: every piece that
    /// copies a source slice becomes the pieces that copy it from the ranks holding it, named
    /// [`rank_tensor`]`(name, rank)` as in [`ShardedMeta::physical`].
    pub fn compose(&self, plan: &ShardPlan) -> ShardPlan {
        let mut out = plan.clone();
        for t in out.files.iter_mut().flat_map(|f| f.tensors.iter_mut()) {
            t.pieces = t.pieces.iter().flat_map(|p| self.compose_piece(p)).collect();
        }
        out.from_shards = Some(self.from_shards());
        out
    }

    fn compose_piece(&self, piece: &Piece) -> Vec<Piece> {
        let Piece::Copy { source, dim, start, end, rows, .. } = piece else { return vec![piece.clone()] };
        let Some(loc) = self.sources.get(source) else { return vec![piece.clone()] };
        let over = loc.primaries.iter().filter(|p| p.start < *end && p.end > *start).map(|p| {
            let (a, b) = ((*start).max(p.start), (*end).min(p.end));
            (p, a, b)
        });
        if *dim == 0 {
            return over
                .map(|(p, a, b)| Piece::Copy {
                    source: rank_tensor(&p.tensor, p.rank),
                    source_shape: p.tshape.clone(),
                    dim: 0,
                    start: p.rows[0] + a - p.start,
                    end: p.rows[0] + b - p.start,
                    rows: [rows[0] + a - start, rows[0] + b - start],
                })
                .collect();
        }
        let mut parts: Vec<Slice> = over
            .map(|(p, a, b)| Slice {
                source: rank_tensor(&p.tensor, p.rank),
                source_shape: p.tshape.clone(),
                start: a - p.start,
                end: b - p.start,
            })
            .collect();
        if parts.len() == 1 {
            let s = parts.pop().expect("one");
            return vec![Piece::Copy {
                source: s.source,
                source_shape: s.source_shape,
                dim: *dim,
                start: s.start,
                end: s.end,
                rows: *rows,
            }];
        }
        vec![Piece::Concat { rows: *rows, dim: *dim, parts }]
    }

    /// Appends bytes `off..off + len` of source tensor `name` (as the original checkpoint holds
    /// it) to `out`, read from the rank files (for the source fingerprint).
    pub fn read_logical(&self, ckpt: &Checkpoint, name: &str, mut off: usize, mut len: usize, out: &mut Vec<u8>) {
        let Some(loc) = self.sources.get(name) else { return };
        let n = loc.shape.get(loc.dim).copied().unwrap_or(1);
        let inner = loc.shape.get(loc.dim + 1..).map_or(1, |s| s.iter().product::<usize>()) * loc.elem;
        while len > 0 {
            let (o, i, within) = (off / (inner * n), off / inner % n, off % inner);
            let Some(p) = loc.primaries.iter().find(|p| p.start <= i && i < p.end) else { return };
            let row_bytes = p.tshape.get(1..).map_or(1, |s| s.iter().product::<usize>()) * loc.elem;
            let base = if loc.dim == 0 { p.rows[0] * row_bytes } else { 0 };
            let at = base + (o * (p.end - p.start) + (i - p.start)) * inner + within;
            let take = len.min(inner - within);
            let data = ckpt.tensor_bytes(&rank_tensor(&p.tensor, p.rank)).unwrap_or(&[]);
            match data.get(at..at + take) {
                Some(b) => out.extend_from_slice(b),
                None => return,
            }
            off += take;
            len -= take;
        }
    }
}

/// The shapes of a rule's parts (in order) given the shape of one rank's fused tensor, by
/// running the split backwards; the error says why the shape does not fit.
fn part_shapes(
    split: &SplitSpec,
    s: &[usize],
    tp: usize,
    n_parts: usize,
    dims: &Dims,
) -> Result<Vec<Vec<usize>>, String> {
    let dim = |name: &str| dims.get(name).map(|v| *v as usize).unwrap_or(0);
    let rows = s.first().copied().unwrap_or(1);
    let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(|| format!("{a} x {b} rows is too large"));
    let with_rows = |r: usize| {
        let mut v = s.to_vec();
        if let Some(x) = v.first_mut() {
            *x = r;
        }
        v
    };
    let per_rank_kv = |kv: usize| {
        if kv == 0 {
            0
        } else if tp >= kv {
            1
        } else {
            kv / tp
        }
    };
    Ok(match split {
        SplitSpec::Replicated {} => vec![s.to_vec()],
        SplitSpec::Column {} if s.is_empty() => return Err("a 0-d tensor cannot be column-split".into()),
        SplitSpec::Column {} => vec![with_rows(mul(rows, tp)?)],
        SplitSpec::Row {} if s.len() < 2 => vec![s.to_vec()],
        SplitSpec::Row {} => {
            let mut v = s.to_vec();
            v[1] = mul(v[1], tp)?;
            vec![v]
        }
        SplitSpec::MergedColumn {} => {
            if rows % n_parts != 0 {
                return Err(format!("{rows} rows do not split into {n_parts} equal parts"));
            }
            vec![with_rows(mul(rows / n_parts, tp)?); n_parts]
        }
        SplitSpec::FusedQkv { heads, kv_heads, head_dim } | SplitSpec::Kv { heads, kv_heads, head_dim } => {
            let (h, kv) = (dim(heads), dim(kv_heads));
            if h == 0 || kv == 0 || h % tp != 0 {
                return Err(format!("{h} heads and {kv} kv heads (config.json) cannot be split over {tp} ranks"));
            }
            let kv_r = per_rank_kv(kv);
            let q_r = if matches!(split, SplitSpec::FusedQkv { .. }) { h / tp } else { 0 };
            let heads_here = q_r + 2 * kv_r;
            if heads_here == 0 {
                return Err(format!("no heads per rank at tp {tp}"));
            }
            let hd = match head_dim {
                Some(d) => dim(d),
                None if rows % heads_here == 0 => rows / heads_here,
                None => {
                    return Err(format!(
                        "{rows} rows are not {heads_here} heads ({q_r} q, {kv_r} k and {kv_r} v per rank at tp {tp})"
                    ))
                }
            };
            let mut out = vec![];
            if q_r > 0 {
                out.push(with_rows(mul(h, hd)?));
            }
            out.push(with_rows(mul(kv, hd)?));
            out.push(with_rows(mul(kv, hd)?));
            out
        }
        SplitSpec::Vocab { rows: Some(r), .. } => vec![with_rows(dim(r))],
        SplitSpec::Vocab { rows: None, .. } => {
            return Err("a vocabulary split without `rows` in the mapping: the unpadded row count is unknown".into())
        }
    })
}

/// The shape the mapping's first shape check matching `name` gives, if one matches.
fn checked_shape(mapping: &Mapping, name: &str, dims: &Dims) -> Option<Result<Vec<usize>, String>> {
    mapping.checks.iter().find_map(|c| {
        let CheckKind::Shape { shape } = &c.kind else { return None };
        let b = c.pattern.matches(name)?;
        Some(
            shape
                .iter()
                .map(|e| match e {
                    ShapeEntry::Size(n) => Ok(*n as usize),
                    ShapeEntry::Expr(t) => dims::eval(&t.render(&b), dims).map(|v| v as usize),
                })
                .collect(),
        )
    })
}

/// The target whose constants are exactly `found` (the default first when several are).
fn infer_target(mapping: &Mapping, found: &BTreeSet<String>) -> Result<String, String> {
    let names_of = |t: &str| -> BTreeSet<String> {
        mapping
            .constants
            .iter()
            .filter(|c| c.engines.as_ref().is_none_or(|e| e.iter().any(|x| x == t)))
            .flat_map(|c| c.targets.iter().map(|p| p.as_str().to_string()))
            .collect()
    };
    // Compare the templates the found names match, not the names.
    let templates: BTreeSet<String> = mapping
        .constants
        .iter()
        .flat_map(|c| c.targets.iter().map(move |t| (t, inverse_pattern(t, &c.for_each))))
        .filter(|(_, p)| found.iter().any(|n| p.matches(n).is_some()))
        .map(|(t, _)| t.as_str().to_string())
        .collect();
    let mut fits: Vec<&str> =
        mapping.file.engines.iter().map(|e| e.name.as_str()).filter(|t| names_of(t) == templates).collect();
    if let Some(d) = &mapping.file.default_engine {
        if let Some(i) = fits.iter().position(|t| t == d) {
            fits.swap(0, i);
        }
    }
    fits.first().map(|t| t.to_string()).ok_or_else(|| {
        format!(
            "the engine buffers present ({}) are those of no target of mapping {}: {}",
            if templates.is_empty() {
                "none".to_string()
            } else {
                templates.iter().cloned().collect::<Vec<_>>().join(", ")
            },
            mapping.origin,
            mapping.file.engines.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// Every difference between what `forward` puts on each rank and what `sm`'s files hold (at most
/// 12, then how many more).
fn compare_layout(forward: &ShardPlan, sm: &ShardedMeta) -> Vec<String> {
    let mut problems = Vec::new();
    for (r, held) in sm.ranks.iter().enumerate() {
        let planned: BTreeMap<&str, (&Dtype, &Vec<usize>)> = forward
            .files
            .iter()
            .filter(|f| f.rank == r)
            .flat_map(|f| &f.tensors)
            .map(|t| (t.name.as_str(), (&t.dtype, &t.shape)))
            .collect();
        for (name, (dtype, shape)) in &planned {
            match held.get(*name) {
                None => {
                    problems.push(format!("rank {r}: tensor {} ({dtype} {}) is missing", q(name), fmt_shape(shape)))
                }
                Some(i) if i.dtype != **dtype || i.shape != **shape => problems.push(format!(
                    "rank {r}: tensor {} is {} {}, expected {dtype} {}",
                    q(name),
                    i.dtype,
                    fmt_shape(&i.shape),
                    fmt_shape(shape)
                )),
                Some(_) => {}
            }
        }
        for name in held.keys().filter(|n| !planned.contains_key(n.as_str())) {
            problems.push(format!("rank {r}: tensor {} is not part of the layout", q(name)));
        }
    }
    if problems.len() > 12 {
        let more = problems.len() - 12;
        problems.truncate(12);
        problems.push(format!("and {more} more"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(v: &[(&str, u64)]) -> Dims {
        v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn splits_run_backwards() {
        let d = dims(&[("h", 8), ("kv", 2)]);
        let qkv = SplitSpec::FusedQkv { heads: "h".into(), kv_heads: "kv".into(), head_dim: None };
        // tp 4: 2 q heads and one replicated kv head per rank, head_dim 8: 32 rows.
        assert_eq!(part_shapes(&qkv, &[32, 64], 4, 3, &d).unwrap(), vec![vec![64, 64], vec![16, 64], vec![16, 64]]);
        // tp 2: 4 q heads and 1 kv head (of 2) per rank.
        assert_eq!(part_shapes(&qkv, &[48, 64], 2, 3, &d).unwrap(), vec![vec![64, 64], vec![16, 64], vec![16, 64]]);
        let kv = SplitSpec::Kv { heads: "h".into(), kv_heads: "kv".into(), head_dim: None };
        assert_eq!(part_shapes(&kv, &[16, 64], 4, 2, &d).unwrap(), vec![vec![16, 64], vec![16, 64]]);
        assert!(part_shapes(&qkv, &[33, 64], 4, 3, &d).unwrap_err().contains("33 rows are not 4 heads"));
        assert!(part_shapes(&qkv, &[32, 64], 3, 3, &d).unwrap_err().contains("cannot be split over 3 ranks"));
        assert_eq!(part_shapes(&SplitSpec::Row {}, &[4, 6], 3, 1, &d).unwrap(), vec![vec![4, 18]]);
        assert_eq!(part_shapes(&SplitSpec::Row {}, &[4], 3, 1, &d).unwrap(), vec![vec![4]]);
        assert_eq!(part_shapes(&SplitSpec::Column {}, &[4, 6], 3, 1, &d).unwrap(), vec![vec![12, 6]]);
        assert_eq!(part_shapes(&SplitSpec::MergedColumn {}, &[8, 6], 2, 2, &d).unwrap(), vec![vec![8, 6]; 2]);
        assert!(part_shapes(&SplitSpec::Column {}, &[usize::MAX / 2, 2], 3, 1, &d).unwrap_err().contains("too large"));
        let vocab = SplitSpec::Vocab { pad_to: 64, rows: None };
        assert!(part_shapes(&vocab, &[64, 8], 2, 1, &d).unwrap_err().contains("without `rows`"));
    }

    #[test]
    fn target_templates_match_with_the_sources_alternatives() {
        let t = Pattern::parse("m.{i}.qkv_proj.{p}").unwrap();
        let s = Pattern::parse("m.{i}.q_proj.{p:weight|bias}").unwrap();
        let inv = inverse_pattern(&t, &s);
        assert_eq!(inv.as_str(), "m.{i}.qkv_proj.{p:weight|bias}");
        assert_eq!(inv.matches("m.3.qkv_proj.bias").unwrap()["p"], "bias");
        assert!(inv.matches("m.3.qkv_proj.scale").is_none() && t.matches("m.3.qkv_proj.bias").is_none());
    }
}
