//! `reshard verify`: proves that an output directory is exactly a checkpoint in the target layout.
//!
//! Entry point: [`verify`]. The plan is recomputed from the source and the mapping; then, for
//! every rank, every tensor the plan puts there is compared piece by piece with the source bytes
//! (each output file read once, in order, in windows around the page cache, `compare.rs`; memory
//! does not grow with the model), zero pieces (vocabulary padding, synthesized biases) must be
//! zero, and the rank may hold nothing else. The manifest's sizes and checksums, tied copies in
//! the source, and the plan's coverage of every source element are checked too, and every
//! finding is reported, not only the first.
//! [`forward`] adds the numeric cross-attention check.

mod compare;
pub mod forward;

use crate::checkpoint::{self, fingerprint, Checkpoint, CheckpointMeta, SourceFile, TensorInfo};
use crate::dtype::{self, Dtype};
use crate::mapping::Mapping;
use crate::plan::{self, split, OutTensor, Piece, Resolved, ShardPlan};
use crate::text::q;
use crate::write::manifest::Manifest;
use crate::write::MANIFEST_NAME;
use crate::Error;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the verify report JSON.
pub const REPORT_FORMAT_VERSION: u32 = 1;

/// Errors that stop verification from running at all (as opposed to findings).
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum VerifyError {
    #[error("{}: no `model-rank-*-part-*.safetensors` files; is it a reshard output?", crate::text::qp(dir))]
    NoShards { dir: PathBuf },
    #[error("{}: cannot read: {source}", crate::text::qp(path))]
    Io { path: PathBuf, source: std::io::Error },
    #[error("--tokens and --source-tokens must be at least 1")]
    NoTokens,
    #[error("forward check: {msg}")]
    Forward { msg: String },
}

/// What kind of problem a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum FindingKind {
    /// Bytes differ from the source slice the plan puts there.
    Mismatch,
    /// Padding or a synthesized part is not zero.
    NonZero,
    /// A tensor the plan puts on a rank is absent.
    Missing,
    /// A tensor on a rank that the plan does not put there.
    Extra,
    /// Wrong dtype or shape.
    Shape,
    /// A file that cannot be read as safetensors, or a tensor in two parts of a rank.
    BadFile,
    /// Manifest and files disagree.
    Manifest,
    /// Tied copies in the source differ.
    Alias,
    /// A source element no rank receives.
    Coverage,
    /// The numeric forward check exceeded its tolerance, or met NaN or infinite values.
    Forward,
    /// The output was made from another checkpoint: the manifest's source fingerprint does not
    /// match the source given (reported alone; nothing else is compared).
    Source,
}

/// One problem found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Kind.
    pub kind: FindingKind,
    /// Rank, when the finding is about one.
    pub rank: Option<usize>,
    /// Output (or source) tensor.
    pub tensor: Option<String>,
    /// File, when relevant.
    pub file: Option<String>,
    /// Index of the first differing element (multi-dimensional), when relevant.
    pub element: Option<Vec<usize>>,
    /// Human explanation.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = self.rank {
            write!(f, "rank {r}: ")?;
        }
        if let Some(t) = &self.tensor {
            write!(f, "{}: ", q(t))?;
        }
        f.write_str(&self.message)
    }
}

/// Options of [`verify`].
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Run the cross-attention forward check.
    pub forward: bool,
    /// Decoder tokens for the forward check.
    pub tokens: usize,
    /// Encoder tokens for the forward check.
    pub source_tokens: usize,
    /// Seed of the random inputs.
    pub seed: u64,
    /// The target to verify against when the output has no manifest (`None`: the default).
    pub target: Option<String>,
    /// Where to report the byte comparison and the forward check as they go.
    pub progress: crate::progress::Progress,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            forward: true,
            tokens: 8,
            source_tokens: 12,
            seed: 0x5eed,
            target: None,
            progress: Default::default(),
        }
    }
}

/// The result of [`verify`].
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// [`REPORT_FORMAT_VERSION`].
    pub format_version: u32,
    /// Whether every check held.
    pub ok: bool,
    /// Model family.
    pub family: String,
    /// Mapping used.
    pub mapping: String,
    /// Name of the engine target verified against (`null`: the mapping declares none).
    pub target: Option<String>,
    /// Tensor-parallel size verified.
    pub tp: usize,
    /// Output files read.
    pub files_checked: usize,
    /// Output tensors compared.
    pub tensors_checked: usize,
    /// Bytes compared against the source (or checked zero).
    pub bytes_compared: u64,
    /// Whether a manifest was found and checked.
    pub manifest_checked: bool,
    /// Whether the manifest's source fingerprint was checked against the source (and matched).
    pub source_checked: bool,
    /// Per (source dtype, output dtype): how many of rank 0's tensors the byte comparison checked.
    pub dtypes: Vec<DtypeCount>,
    /// What was not checked, and why.
    pub notes: Vec<String>,
    /// Cross-attention forward results, one per layer.
    pub forward: Vec<forward::LayerCheck>,
    /// Every problem found.
    pub findings: Vec<Finding>,
    /// A partial output's ranks, the only ones checked (absent: every rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Vec<usize>>,
    /// What was verified (absent: shards).
    #[serde(skip_serializing_if = "plan::OutputKind::is_shards")]
    pub output: plan::OutputKind,
}

/// Output tensors of one (source dtype, output dtype) pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DtypeCount {
    /// Dtype of the source tensors (`null`: constants of the mapping, and synthesized zeros).
    pub source: Option<Dtype>,
    /// Dtype written.
    pub output: Dtype,
    /// Tensors of rank 0.
    pub tensors: usize,
}

/// The dtype pairs of rank 0's tensors in `plan`, in order of first appearance.
fn dtype_counts(meta: &CheckpointMeta, plan: &ShardPlan) -> Vec<DtypeCount> {
    let mut out: Vec<DtypeCount> = Vec::new();
    for t in plan.files.iter().filter(|f| f.rank == 0).flat_map(|f| &f.tensors) {
        let source =
            t.pieces.iter().find_map(|p| p.slices().first().and_then(|s| meta.tensors.get(s.0)).map(|i| i.dtype));
        match out.iter_mut().find(|c| c.source == source && c.output == t.dtype) {
            Some(c) => c.tensors += 1,
            None => out.push(DtypeCount { source, output: t.dtype, tensors: 1 }),
        }
    }
    out
}

fn finding(kind: FindingKind, rank: Option<usize>, tensor: Option<&str>, message: String) -> Finding {
    Finding { kind, rank, tensor: tensor.map(str::to_string), file: None, element: None, message }
}

/// Output file names by rank, as `(part, name)` sorted by part.
pub type RankFiles = BTreeMap<usize, Vec<(usize, String)>>;

/// The rank files of an output directory, and other weight files found there.
fn scan_out(out: &Path) -> Result<(RankFiles, Vec<String>), VerifyError> {
    let mut ranks: BTreeMap<usize, Vec<(usize, String)>> = BTreeMap::new();
    let mut strays = Vec::new();
    let rd = std::fs::read_dir(out).map_err(|source| VerifyError::Io { path: out.to_owned(), source })?;
    for e in rd {
        let e = e.map_err(|source| VerifyError::Io { path: out.to_owned(), source })?;
        let name = e.file_name().to_string_lossy().into_owned();
        let parsed = name
            .strip_prefix("model-rank-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .and_then(|s| s.split_once("-part-"))
            .and_then(|(r, p)| Some((r.parse::<usize>().ok()?, p.parse::<usize>().ok()?)));
        match parsed {
            Some((r, p)) => ranks.entry(r).or_default().push((p, name)),
            None if checkpoint::is_weight_file(&name) => strays.push(name),
            None => {}
        }
    }
    for v in ranks.values_mut() {
        v.sort();
    }
    Ok((ranks, strays))
}

/// Whether `out` holds a Hugging Face checkpoint (`reshard merge`) rather than rank files.
fn is_hf_output(out: &Path, ranks: &RankFiles) -> bool {
    ranks.is_empty() && checkpoint::discover::has_weights(out)
}

/// Verifies `out` against the checkpoint and mapping of `src` (a Hugging Face checkpoint or a
/// sharded directory, [`crate::Source::read`]). `out` is rank files (all of them, or those its
/// manifest says it holds), or a Hugging Face checkpoint written by `reshard merge`.
pub fn verify(src: &crate::Source, out: &Path, opts: &VerifyOptions) -> Result<VerifyReport, Error> {
    verify_opened(&src.read()?.open()?, &src.input, out, opts)
}

/// [`verify`] of an input already read and opened (`convert --verify` verifies against the input
/// it converted, without reading and checking it again); `input` names it in messages.
pub fn verify_opened(
    opened: &crate::Opened,
    input: &Path,
    out: &Path,
    opts: &VerifyOptions,
) -> Result<VerifyReport, Error> {
    let (ckpt, mapping) = (&opened.ckpt, &opened.mapping);
    let resolved = match &opened.backward {
        Some(b) => b.resolved.clone(),
        None => plan::resolve(&ckpt.meta, mapping)?,
    };
    let (mut ranks, strays) = scan_out(out)?;
    let hf = is_hf_output(out, &ranks);
    if ranks.is_empty() && !hf {
        return Err(VerifyError::NoShards { dir: out.to_owned() }.into());
    }
    let mut findings = Vec::new();
    let manifest: Option<Manifest> = match crate::input::read_regular(&out.join(MANIFEST_NAME)) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                findings.push(finding(FindingKind::Manifest, None, None, format!("{MANIFEST_NAME} is not valid: {e}")));
                None
            }
        },
        Err(e) if e.is_not_found() => None,
        Err(e) => {
            findings.push(finding(FindingKind::Manifest, None, None, e.to_string()));
            None
        }
    };
    let mut notes = Vec::new();
    if hf {
        // The files of the checkpoint, as rank 0's; reading it checks the index against them.
        let names = match CheckpointMeta::read(out, None) {
            Ok(m) => m.files.iter().map(|f| f.name.clone()).collect(),
            Err(e) => {
                findings.push(finding(FindingKind::BadFile, None, None, e.to_string()));
                strays.clone()
            }
        };
        ranks.insert(0, names.into_iter().enumerate().collect());
    }
    let max_rank = ranks.keys().last().copied().unwrap_or(0);
    let tp = if hf { 1 } else { manifest.as_ref().map(|m| m.tp).unwrap_or(max_rank + 1) };
    let only: Option<Vec<usize>> = manifest.as_ref().and_then(|m| m.ranks.clone());
    if let Some(r) = &only {
        notes.push(format!(
            "a partial output: {MANIFEST_NAME} says it holds rank(s) {} of tp {tp} (--ranks); those were checked",
            crate::text::ranges(r)
        ));
    }
    // The source first: an output made from another checkpoint is one finding, not a mismatch in
    // every tensor. Tied copies are left out on both sides: a sharded input read back has none.
    let mut source_checked = false;
    if let Some(m) = &manifest {
        match &m.source_fingerprint {
            None => notes.push(format!(
                "{MANIFEST_NAME} records no source fingerprint (an older reshard wrote it), so the source was not \
                 checked first; the byte comparison still compares every tensor with the source"
            )),
            Some(recorded) => {
                // Both under canonical names, without the tied copies a checkpoint may carry.
                let alike = |f: &fingerprint::Fingerprint| {
                    let f = f.renamed(|n| mapping.canonical(n).into_owned());
                    let ties: Vec<String> = f.tensors.keys().filter(|n| mapping.is_alias(n)).cloned().collect();
                    f.without(ties.iter().map(String::as_str))
                };
                match fingerprint::compare(&alike(recorded), &alike(&opened.fingerprint())) {
                    fingerprint::Comparison::Same => source_checked = true,
                    fingerprint::Comparison::UnknownScheme(scheme) => notes.push(format!(
                        "{MANIFEST_NAME} records a source fingerprint of scheme {}, which this reshard does not know: not checked",
                        q(&scheme)
                    )),
                    fingerprint::Comparison::Differs(what) => {
                        let f = finding(
                            FindingKind::Source,
                            None,
                            None,
                            format!(
                                "{} was made from a different source than {}: {what}",
                                crate::text::qp(out),
                                crate::text::qp(input)
                            ),
                        );
                        let target = m.target.as_ref().map(|t| t.name.clone());
                        let mut r = report(&resolved, target, tp, vec![f], 0, 0, 0, false, vec![]);
                        r.notes = vec!["nothing else was compared: the output was not made from this source".into()];
                        return Ok(r);
                    }
                }
            }
        }
    }
    if !hf {
        for s in strays {
            findings.push(Finding {
                file: Some(s.clone()),
                ..finding(FindingKind::Extra, None, None, format!("unexpected weight file {}", q(&s)))
            });
        }
    }
    for (&r, parts) in &ranks {
        if r >= tp {
            findings.push(finding(FindingKind::Extra, Some(r), None, format!("files for rank {r}, but tp is {tp}")));
        } else if only.as_ref().is_some_and(|o| !o.contains(&r)) {
            findings.push(finding(
                FindingKind::Extra,
                Some(r),
                None,
                format!("files for rank {r}, which {MANIFEST_NAME} says this partial output does not hold"),
            ));
        }
        for (i, (p, name)) in parts.iter().enumerate() {
            if *p != i {
                findings.push(Finding {
                    file: Some(name.clone()),
                    ..finding(
                        FindingKind::BadFile,
                        Some(r),
                        None,
                        format!("part numbers are not 0..n: found part {p} where {i} was expected"),
                    )
                });
                break;
            }
        }
    }
    // The cast of `convert --dtype`: from the manifest, or, without one, from the files themselves.
    let dtype = match &manifest {
        Some(m) => m.dtype,
        None if hf => None,
        None => infer_cast(&resolved, out, &ranks),
    };
    // The target: the manifest's, or, without one, the one asked for.
    let target = match &manifest {
        Some(m) => m.target.as_ref().map(|t| t.name.clone()),
        None => opts.target.clone(),
    };
    let planned = if hf {
        let shapes = opened.logical().tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone())).collect();
        let part = manifest.as_ref().map_or(plan::DEFAULT_MAX_PART_SIZE, |m| m.max_part_size);
        resolved.plan_hf(part, &shapes, &|n: &str| mapping.hf_name(n))
    } else {
        resolved.plan(&plan::PlanOptions { dtype, target, ranks: only.clone(), ..plan::PlanOptions::new(tp) })
    };
    let logical_plan = match planned {
        Ok(p) => p,
        Err(e) => {
            let (kind, what) = match (&e, dtype) {
                // Only a manifest names a cast that the source refuses (infer_cast never does):
                // an output of a reshard that kept such tensors under --dtype.
                (plan::PlanError::Cast { .. }, Some(d)) => {
                    (FindingKind::Manifest, format!("{MANIFEST_NAME} says the output was cast to {d}, but"))
                }
                (plan::PlanError::Ranks(_), _) => (FindingKind::Manifest, format!("{MANIFEST_NAME}:")),
                _ => (FindingKind::Shape, format!("the output's tp {tp} is not valid for the source:")),
            };
            findings.push(finding(kind, None, None, format!("{what} {e}")));
            let mut r = report(&resolved, None, tp, findings, 0, 0, 0, manifest.is_some(), vec![]);
            r.source_checked = source_checked;
            r.notes = notes;
            return Ok(r);
        }
    };
    let plan = match &opened.backward {
        Some(b) => b.compose(&logical_plan),
        None => logical_plan.clone(),
    };
    findings.extend(check_aliases(ckpt, &plan));
    // Coverage is a property of the whole plan, from the tensors it is made from.
    let whole = if logical_plan.ranks.is_some() {
        resolved
            .plan(&plan::PlanOptions { ranks: None, ..plan::PlanOptions { dtype, ..plan::PlanOptions::new(tp) } })
            .ok()
    } else {
        None
    };
    findings.extend(check_coverage(opened.logical(), whole.as_ref().unwrap_or(&logical_plan)));
    let empty = Vec::new();
    // The source is read as the writer reads it: its long runs around the page cache when the part
    // of it that is not cached is more than half the memory available, through the cache
    // otherwise, the uncached part read into the cache ahead of the comparison.
    let sources = &crate::write::Sources::open(ckpt, true)?;
    opts.progress.start("verifying", plan.output_bytes(), crate::progress::Unit::Bytes);
    let checked: Vec<usize> = (0..tp).filter(|r| plan.writes_rank(*r)).collect();
    // At most FILES_AT_ONCE output files are read at once (ranks, and a rank's files, in
    // parallel), so memory is bounded whatever the number of cores.
    let per_rank = || -> Vec<RankResult> {
        checked
            .par_iter()
            .with_max_len(1)
            .map(|&r| check_rank(ckpt, sources, &plan, out, r, ranks.get(&r).unwrap_or(&empty), &opts.progress))
            .collect()
    };
    let threads = rayon::current_num_threads().min(crate::write::FILES_AT_ONCE);
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The forward check is computed while the bytes are compared (the one is bound by the CPU,
    // the other by the disk), from the output's ranks opened apart, and kept only if the byte
    // comparison finds nothing: it needs every rank, and a rank that is wrong in its bytes is
    // reported as such, not as a failed layer.
    let forward_possible = mapping.file.cross_attention.is_some() && !hf && only.is_none();
    let fwd_ranks = (opts.forward && forward_possible).then(|| open_ranks(out, tp, &ranks).ok()).flatten();
    let fwd_input = match (&fwd_ranks, &opened.backward) {
        (Some(_), Some(b)) => Some((open_output(&b.dir)?, &b.logical)),
        _ => None,
    };
    let silent = VerifyOptions { progress: Default::default(), ..opts.clone() };
    let (per_rank, computed) = std::thread::scope(|sc| {
        if sources.prefetch {
            sc.spawn(|| crate::write::prefetch(ckpt, &stop));
        }
        let forward = fwd_ranks.as_ref().map(|shards| {
            let reference = match &fwd_input {
                Some((ranks, logical)) => forward::Reference::Shards { ranks, logical },
                None => forward::Reference::Source(ckpt),
            };
            let (dims, tolerance, silent) = (&resolved.dims, forward::tolerance_for(plan.dtype), &silent);
            sc.spawn(move || forward::check_all(reference, mapping, dims, shards, silent, tolerance))
        });
        let r = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(pool) => pool.install(per_rank),
            Err(_) => per_rank(),
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let computed = forward.map(|h| {
            h.join().unwrap_or_else(|_| Err(VerifyError::Forward { msg: "the forward check panicked".into() }.into()))
        });
        (r, computed)
    });
    let (mut files, mut tensors, mut bytes) = (0, 0, 0);
    let mut opened_ranks = 0;
    let mut sums = BTreeMap::new();
    for rr in per_rank {
        sums.extend(rr.sums);
        files += rr.files;
        tensors += rr.tensors;
        bytes += rr.bytes;
        findings.extend(rr.findings);
        opened_ranks += usize::from(rr.opened);
    }
    if let Some(m) = &manifest {
        findings.extend(check_manifest(m, out, tp, &ranks, mapping, &sums));
    }
    let mut layers = Vec::new();
    if let (Some(computed), true) = (computed, findings.is_empty() && opened_ranks == tp) {
        // Without findings every rank's files opened, so the ranks hold all tp ranks in order.
        // A sharded source is the reference as its own ranks compute the layer.
        if fwd_input.is_some() {
            notes.push(
                "the cross-attention forward reference was computed from the sharded source's own ranks (the \
                 unsplit weights are not at hand); every byte was compared with the source's"
                    .into(),
            );
        }
        layers = computed?;
        opts.progress.start("forward check", layers.len() as u64, crate::progress::Unit::Items);
        opts.progress.inc(layers.len() as u64);
        for l in &layers {
            if let Some(msg) = l.problem() {
                findings.push(finding(FindingKind::Forward, None, Some(&l.module), msg));
            }
        }
    } else if opts.forward && mapping.file.cross_attention.is_some() && (hf || only.is_some()) {
        notes.push(format!(
            "the cross-attention forward check was not run: it needs every rank of a sharded output{}",
            if hf { "; this is a Hugging Face checkpoint, compared byte for byte" } else { "" }
        ));
    }
    let target = plan.target.as_ref().map(|t| t.name.clone());
    let mut r = report(&resolved, target, tp, findings, files, tensors, bytes, manifest.is_some(), layers);
    r.source_checked = source_checked;
    r.dtypes = dtype_counts(opened.logical(), &logical_plan);
    r.notes = notes;
    r.ranks = only;
    r.output = if hf { plan::OutputKind::HuggingFace } else { plan::OutputKind::Shards };
    Ok(r)
}

/// The dtype float tensors were cast to, judged from rank 0's files: the dtype of the first
/// output tensor whose source is a float of another dtype.
fn infer_cast(resolved: &Resolved, out: &Path, ranks: &RankFiles) -> Option<crate::dtype::Dtype> {
    let names: Vec<String> = ranks.get(&0)?.iter().map(|(_, n)| n.clone()).collect();
    let meta = open_meta(out, &names).ok()?;
    resolved.params.iter().filter(|p| crate::dtype::castable(p.dtype)).find_map(|p| {
        let t = meta.tensors.get(&p.targets[0])?;
        (t.dtype != p.dtype && crate::dtype::castable(t.dtype)).then_some(t.dtype)
    })
}

#[allow(clippy::too_many_arguments)]
fn report(
    r: &Resolved,
    target: Option<String>,
    tp: usize,
    findings: Vec<Finding>,
    files: usize,
    tensors: usize,
    bytes: u64,
    manifest_checked: bool,
    forward: Vec<forward::LayerCheck>,
) -> VerifyReport {
    VerifyReport {
        format_version: REPORT_FORMAT_VERSION,
        ok: findings.is_empty(),
        family: r.family.clone(),
        mapping: r.mapping.clone(),
        target,
        tp,
        files_checked: files,
        tensors_checked: tensors,
        bytes_compared: bytes,
        manifest_checked,
        source_checked: false,
        dtypes: vec![],
        notes: vec![],
        forward,
        findings,
        ranks: None,
        output: plan::OutputKind::Shards,
    }
}

/// Opens an output directory as one checkpoint per rank, rank 0 first.
pub fn open_output(out: &Path) -> Result<Vec<Checkpoint>, Error> {
    let (ranks, _) = scan_out(out)?;
    let tp = ranks.keys().last().map_or(0, |r| r + 1);
    if tp == 0 {
        return Err(VerifyError::NoShards { dir: out.to_owned() }.into());
    }
    open_ranks(out, tp, &ranks)
}

/// Opens every rank's files as one checkpoint per rank (for the forward check).
pub fn open_ranks(
    out: &Path,
    tp: usize,
    ranks: &BTreeMap<usize, Vec<(usize, String)>>,
) -> Result<Vec<Checkpoint>, Error> {
    (0..tp)
        .map(|r| {
            let names: Vec<String> =
                ranks.get(&r).map(|v| v.iter().map(|(_, n)| n.clone()).collect()).unwrap_or_default();
            let meta = open_meta(out, &names)
                .map_err(|(file, msg)| VerifyError::Forward { msg: format!("{}: {msg}", q(&file)) })?;
            Ok(Checkpoint::open(meta)?)
        })
        .collect()
}

/// Reads the headers of `names` in `dir` as one checkpoint; on error, the failing file's name and
/// the problem.
fn open_meta(dir: &Path, names: &[String]) -> Result<CheckpointMeta, (String, String)> {
    let mut files = Vec::new();
    let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let path = dir.join(name);
        let h = checkpoint::read_header(&path).map_err(|e| (name.clone(), e.to_string()))?;
        let size = std::fs::metadata(&path).map_err(|e| (name.clone(), e.to_string()))?.len();
        for (n, t) in h.tensors {
            if let Some(prev) = tensors.get(&n) {
                let e = crate::checkpoint::CheckpointError::DuplicateTensor {
                    tensor: n,
                    a: names[prev.file].clone(),
                    b: name.clone(),
                };
                return Err((name.clone(), e.to_string()));
            }
            tensors.insert(n, TensorInfo { dtype: t.dtype, shape: t.shape, file: i, start: t.start, end: t.end });
        }
        files.push(SourceFile { name: name.clone(), path, size });
    }
    Ok(CheckpointMeta {
        dir: dir.to_owned(),
        config: serde_json::Value::Null,
        config_path: PathBuf::new(),
        files,
        tensors,
        extra_files: vec![],
    })
}

struct RankResult {
    files: usize,
    tensors: usize,
    bytes: u64,
    findings: Vec<Finding>,
    /// Size and CRC-32 of each of the rank's files, by name (for the manifest check).
    sums: Vec<(String, (u64, u32))>,
    /// Whether the rank's files opened.
    opened: bool,
}

fn check_rank(
    ckpt: &Checkpoint,
    sources: &crate::write::Sources,
    plan: &ShardPlan,
    out: &Path,
    rank: usize,
    parts: &[(usize, String)],
    progress: &crate::progress::Progress,
) -> RankResult {
    let mut rr =
        RankResult { files: parts.len(), tensors: 0, bytes: 0, findings: Vec::new(), sums: Vec::new(), opened: false };
    let names: Vec<String> = parts.iter().map(|(_, n)| n.clone()).collect();
    if names.is_empty() {
        rr.findings.push(finding(FindingKind::Missing, Some(rank), None, "no files for this rank".into()));
        return rr;
    }
    let shard = match open_meta(out, &names)
        .and_then(|m| Checkpoint::open(m).map_err(|e| (String::new(), e.to_string())))
    {
        Ok(s) => s,
        Err((file, e)) => {
            rr.findings
                .push(Finding { file: Some(file), ..finding(FindingKind::BadFile, Some(rank), None, e.to_string()) });
            return rr;
        }
    };
    let planned: Vec<&OutTensor> = plan.files.iter().filter(|f| f.rank == rank).flat_map(|f| &f.tensors).collect();
    // Per planned tensor, in plan order: its finding, if any. Per file: the tensors to compare.
    let mut found: Vec<Option<Finding>> = (0..planned.len()).map(|_| None).collect();
    let mut by_file: Vec<Vec<(usize, &TensorInfo)>> = vec![Vec::new(); shard.meta.files.len()];
    for (k, t) in planned.iter().enumerate() {
        let Some(info) = shard.meta.tensors.get(&t.name) else {
            found[k] = Some(finding(
                FindingKind::Missing,
                Some(rank),
                Some(&t.name),
                format!("missing ({} {})", t.dtype, crate::text::shape(&t.shape)),
            ));
            continue;
        };
        if info.dtype != t.dtype || info.shape != t.shape {
            found[k] = Some(finding(
                FindingKind::Shape,
                Some(rank),
                Some(&t.name),
                format!(
                    "is {} {}, expected {} {}",
                    info.dtype,
                    crate::text::shape(&info.shape),
                    t.dtype,
                    crate::text::shape(&t.shape)
                ),
            ));
            continue;
        }
        rr.tensors += 1;
        rr.bytes += t.nbytes;
        by_file[info.file].push((k, info));
    }
    // Each file read once, in order; a tensor that differs is then described from its mapped
    // bytes (the first differing element, with both values).
    let done = |n: u64| progress.inc(n);
    for list in &mut by_file {
        list.sort_by_key(|(_, info)| info.start);
    }
    let compared: Vec<compare::Compared> = (0..by_file.len())
        .into_par_iter()
        .with_max_len(1)
        .map(|i| {
            let tensors: Vec<(&OutTensor, &TensorInfo)> =
                by_file[i].iter().map(|&(k, info)| (planned[k], info)).collect();
            compare::compare_file(ckpt, sources, &shard, i, &tensors, &done)
        })
        .collect();
    for (i, (c, list)) in compared.into_iter().zip(&by_file).enumerate() {
        let file = &shard.meta.files[i].name;
        for j in c.failed {
            let (k, info) = list[j];
            let t = planned[k];
            let f = compare_tensor(ckpt, t, shard.bytes(info)).unwrap_or_else(|| {
                // The bytes read differ from the plan, the mapped ones do not.
                let m = "the bytes read from the file differ from what the plan puts there, but its mapped bytes do \
                         not: did the file change while it was compared?";
                finding(FindingKind::Mismatch, None, Some(&t.name), m.into())
            });
            found[k] = Some(Finding { rank: Some(rank), file: Some(file.clone()), ..f });
        }
        match c.sum {
            Ok(sum) => rr.sums.push((file.clone(), sum)),
            Err(e) => rr.findings.push(Finding {
                file: Some(file.clone()),
                ..finding(FindingKind::BadFile, Some(rank), None, format!("{}: cannot be read: {e}", q(file)))
            }),
        }
    }
    rr.findings.splice(0..0, found.into_iter().flatten());
    let names: std::collections::BTreeSet<&str> = planned.iter().map(|t| t.name.as_str()).collect();
    for name in shard.meta.tensors.keys() {
        if !names.contains(name.as_str()) {
            rr.findings.push(finding(
                FindingKind::Extra,
                Some(rank),
                Some(name),
                "not part of the layout for this rank".into(),
            ));
        }
    }
    rr.opened = true;
    rr
}

/// Compares one output tensor with its pieces; the first difference, if any.
fn compare_tensor(ckpt: &Checkpoint, t: &OutTensor, got: &[u8]) -> Option<Finding> {
    let elem = t.dtype.size();
    let row_bytes = t.shape.get(1..).map(|s| s.iter().product::<usize>()).unwrap_or(1) * elem;
    for piece in &t.pieces {
        match piece {
            Piece::Copy { rows, .. } | Piece::Concat { rows, .. } => {
                let dtype_of = |s: &str| ckpt.meta.tensors.get(s).map(|i| i.dtype);
                let runs = split::piece_runs(piece, &|s| dtype_of(s).map(|d| d.size())).unwrap_or_default();
                let mut at = rows[0] * row_bytes;
                let mut cast = Vec::new();
                for (source, off, src_len) in runs {
                    let src = ckpt.tensor_bytes(source).unwrap_or(&[]);
                    let src_dtype = dtype_of(source).unwrap_or(t.dtype);
                    let len = src_len / src_dtype.size() * elem;
                    let mut want = src.get(off..off + src_len);
                    if src_dtype != t.dtype {
                        // A cast output must equal the deterministic cast of the source run.
                        cast.clear();
                        // No cast between these dtypes exists: nothing can be the expected bytes.
                        want = want
                            .filter(|w| crate::dtype::cast_into(src_dtype, w, t.dtype, &mut cast))
                            .map(|_| &cast[..]);
                    }
                    let have = got.get(at..at + len);
                    if want != have {
                        let i = match (want, have) {
                            (Some(w), Some(h)) => w.iter().zip(h).position(|(a, b)| a != b).unwrap_or(0),
                            _ => 0,
                        };
                        let pos = at + i;
                        let e = pos / elem;
                        let value = |b: Option<&[u8]>, o: usize| {
                            b.and_then(|b| b.get(o - o % elem..o - o % elem + elem)).map(|b| show(t.dtype, b))
                        };
                        let slice = piece
                            .slices()
                            .into_iter()
                            .find(|s| s.0 == source)
                            .filter(|(_, shape, dim, start, end)| !(*start == 0 && shape.get(*dim) == Some(end)))
                            .map(|(_, _, dim, start, end)| format!("[{}{start}..{end}]", ":, ".repeat(dim)))
                            .unwrap_or_default();
                        let message = format!(
                            "element {} differs from {}{slice} (expected {}, found {})",
                            crate::text::shape(&unravel(e, &t.shape)),
                            q(source),
                            value(want, i).unwrap_or_else(|| "?".into()),
                            value(have, i).unwrap_or_else(|| "?".into()),
                        );
                        return Some(Finding {
                            element: Some(unravel(e, &t.shape)),
                            ..finding(FindingKind::Mismatch, None, Some(&t.name), message)
                        });
                    }
                    at += len;
                }
            }
            Piece::Constant { rows, value } => {
                let want = dtype::encode_value(t.dtype, value.0).unwrap_or_default();
                let region = got.get(rows[0] * row_bytes..rows[1] * row_bytes).unwrap_or(&[]);
                if let Some(i) = region.chunks(elem).position(|e| e != want.as_slice()) {
                    let e = rows[0] * row_bytes / elem + i;
                    let message = format!(
                        "element {} should be the constant {} of the mapping but is {}",
                        crate::text::shape(&unravel(e, &t.shape)),
                        value.0,
                        show(t.dtype, &region[i * elem..(i + 1) * elem])
                    );
                    return Some(Finding {
                        element: Some(unravel(e, &t.shape)),
                        ..finding(FindingKind::Mismatch, None, Some(&t.name), message)
                    });
                }
            }
            Piece::Zeros { rows, reason } => {
                let region = got.get(rows[0] * row_bytes..rows[1] * row_bytes).unwrap_or(&[]);
                if let Some(i) = region.iter().position(|&b| b != 0) {
                    let e = (rows[0] * row_bytes + i) / elem;
                    let message = format!(
                        "element {} should be zero ({reason}, rows {}..{}) but is {}",
                        crate::text::shape(&unravel(e, &t.shape)),
                        rows[0],
                        rows[1],
                        show(t.dtype, &got[e * elem..e * elem + elem])
                    );
                    return Some(Finding {
                        element: Some(unravel(e, &t.shape)),
                        ..finding(FindingKind::NonZero, None, Some(&t.name), message)
                    });
                }
            }
        }
    }
    None
}

/// One element's bytes as a number (or hex when the dtype has no decoder).
pub(crate) fn show(dtype: Dtype, b: &[u8]) -> String {
    match dtype::to_f32(dtype, b) {
        Some(v) if v.len() == 1 => format!("{}", v[0]),
        _ => format!("0x{}", b.iter().rev().map(|x| format!("{x:02x}")).collect::<String>()),
    }
}

/// Flat element index -> multi-index.
pub(crate) fn unravel(mut e: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = e % d;
            e /= d;
        }
    }
    idx
}

fn check_aliases(ckpt: &Checkpoint, plan: &ShardPlan) -> Vec<Finding> {
    crate::write::alias_mismatches(ckpt, plan)
        .map(|(alias, primary, offset)| {
            finding(
                FindingKind::Alias,
                None,
                Some(alias),
                format!("source copy differs from {} it is tied to, from byte {offset}", q(primary)),
            )
        })
        .collect()
}

/// Every element of every source tensor must be copied somewhere (a plan property, checked at run
/// time so that a wrong mapping cannot silently drop data).
fn check_coverage(meta: &CheckpointMeta, plan: &ShardPlan) -> Vec<Finding> {
    let mut covered: BTreeMap<&str, Vec<(usize, usize, usize)>> = BTreeMap::new();
    for t in plan.files.iter().flat_map(|f| &f.tensors) {
        for p in &t.pieces {
            if let Piece::Copy { source, dim, start, end, .. } = p {
                covered.entry(source).or_default().push((*dim, *start, *end));
            }
        }
    }
    let aliases: Vec<&str> = plan.aliases.iter().map(|[a, _]| a.as_str()).collect();
    let mut out = Vec::new();
    for (name, info) in &meta.tensors {
        if aliases.contains(&name.as_str()) {
            continue;
        }
        let Some(ranges) = covered.get_mut(name.as_str()) else {
            out.push(finding(
                FindingKind::Coverage,
                None,
                Some(name),
                "no byte of this source tensor is written".into(),
            ));
            continue;
        };
        let dim = ranges[0].0;
        let n = if info.shape.is_empty() {
            1
        } else if dim == 1 && info.shape.len() >= 2 {
            info.shape[1]
        } else {
            info.shape[0]
        };
        ranges.sort_unstable();
        let mut reach = 0;
        for &(_, s, e) in ranges.iter() {
            if s > reach {
                break;
            }
            reach = reach.max(e);
        }
        if reach < n {
            out.push(finding(
                FindingKind::Coverage,
                None,
                Some(name),
                format!("index {reach} of dim {dim} (size {n}) is written to no rank"),
            ));
        }
    }
    out
}

fn check_manifest(
    m: &Manifest,
    out: &Path,
    tp: usize,
    ranks: &BTreeMap<usize, Vec<(usize, String)>>,
    mapping: &Mapping,
    sums: &BTreeMap<String, (u64, u32)>,
) -> Vec<Finding> {
    let mut f = Vec::new();
    let mf = |msg: String| finding(FindingKind::Manifest, None, None, msg);
    if m.tp != tp {
        f.push(mf(format!("manifest says tp {}, files say {tp}", m.tp)));
    }
    if m.mapping_crc32 != mapping.digest {
        f.push(mf(format!(
            "manifest mapping {} (crc32 {:08x}) is not the mapping used now, {} (crc32 {:08x})",
            q(&m.mapping),
            m.mapping_crc32,
            q(&mapping.origin),
            mapping.digest
        )));
    }
    let on_disk: Vec<&String> = ranks.values().flatten().map(|(_, n)| n).collect();
    for e in m.files.iter().map(|x| &x.entry) {
        let path = out.join(&e.name);
        // The rank files' sums were computed as they were compared; any other file is read here.
        let sum = sums.get(&e.name).map(|s| Ok(*s)).unwrap_or_else(|| crc_file(&path));
        match sum {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => f.push(Finding {
                file: Some(e.name.clone()),
                ..mf(format!("{} is listed in the manifest but missing", q(&e.name)))
            }),
            Err(err) => f.push(Finding {
                file: Some(e.name.clone()),
                ..mf(format!("{} is listed in the manifest but cannot be read: {err}", q(&e.name)))
            }),
            Ok((size, crc)) => {
                let crc = format!("{crc:08x}");
                if size != e.size || crc != e.crc32 {
                    f.push(Finding {
                        file: Some(e.name.clone()),
                        ..mf(format!(
                            "{}: size {size} crc32 {crc}, manifest says size {} crc32 {}",
                            q(&e.name),
                            e.size,
                            e.crc32
                        ))
                    });
                }
            }
        }
    }
    for n in on_disk {
        if !m.files.iter().any(|x| &x.entry.name == n) {
            f.push(Finding { file: Some(n.clone()), ..mf(format!("{} is not listed in the manifest", q(n))) });
        }
    }
    f
}

/// Size and CRC-32 of a file, read in 1 MiB chunks.
pub fn crc_file(path: &Path) -> std::io::Result<(u64, u32)> {
    use std::io::Read;
    // Regular files only: a FIFO in the output must not block verify.
    let mut f = crate::input::open_regular(path).map_err(|e| match e.problem {
        crate::input::Problem::Io(e) => e,
        _ => std::io::Error::other(e.to_string()),
    })?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h = crc32fast::Hasher::new();
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((n, h.finalize()));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}
