//! The cross-attention forward check on the CPU, in f64.
//!
//! For decoder states X [T, d] and encoder states E [S, d]: Q = X Wq^T + bq, K = E Wk^T + bk,
//! V = E Wv^T + bv, split into heads (mllama: RMSNorm of every q and k head with q_norm/k_norm),
//! scores scaled by head_dim^-0.5, GQA (q head g uses kv head g / (heads / kv_heads)), softmax over
//! S without a mask, out = context Wo^T + bo. The sharded form runs the same per rank on the rank's
//! q heads and kv heads, sums the partial out_proj products as an all-reduce would, and adds bo
//! once. Weights are read a row at a time from the memory maps, so memory stays O(d).
//!
//! Weights of every float type are read as their exact f32 values (8-bit floats as stored: a
//! quantization scale held by another tensor is not applied, which leaves the comparison of the
//! two paths intact). A layer with a weight of another type (an integer) is skipped, with the
//! reason, its bytes having been compared. A NaN or infinity in either path's output fails the
//! layer (comparisons with NaN are false, so they are counted, not compared), and the weights
//! holding non-finite values are named.

use super::{VerifyError, VerifyOptions};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::{self, Dtype};
use crate::mapping::dims::Dims;
use crate::mapping::pattern::{Bindings, Pattern};
use crate::mapping::{AttnNames, Mapping};
use crate::text::q;
use crate::Error;
use serde::Serialize;

/// Relative tolerance of the f64 forward comparison (max abs error / max |reference|) when the
/// shards hold the source's values exactly.
pub const TOLERANCE: f64 = 1e-5;

/// The tolerance for shards cast to `dtype` (`--dtype` of convert): the rounding of the cast.
pub fn tolerance_for(dtype: Option<Dtype>) -> f64 {
    match dtype {
        Some(Dtype::BF16) => 2e-2,
        Some(Dtype::F16) => 2e-3,
        _ => TOLERANCE,
    }
}

/// Result for one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerCheck {
    /// Layer index.
    pub layer: usize,
    /// Source module name (`model.decoder.layers.1.encoder_attn`).
    pub module: String,
    /// Dtype of the source's q weight, as read.
    pub source_dtype: Dtype,
    /// Dtype of the shards' q weight, as read.
    pub shard_dtype: Dtype,
    /// Max |sharded - unsplit| (NaN, `null` in JSON, when an output is not finite).
    pub max_abs_err: f64,
    /// `max_abs_err / max |unsplit|`.
    pub max_rel_err: f64,
    /// Tolerance on `max_rel_err`.
    pub tolerance: f64,
    /// Output values that are NaN or infinite, computed from the source weights.
    pub non_finite_reference: usize,
    /// Output values that are NaN or infinite, computed from the shards.
    pub non_finite_shards: usize,
    /// When an output is not finite: the layer's weights that hold NaN or infinite values, each
    /// with the count and the first.
    pub non_finite_weights: Vec<String>,
    /// Why the layer was not computed (`null`: it was).
    pub skipped: Option<String>,
    /// Whether the layer passed: finite outputs within the tolerance, or skipped.
    pub passed: bool,
}

impl LayerCheck {
    /// What is wrong, for a finding; `None` when the layer passed.
    pub fn problem(&self) -> Option<String> {
        if self.passed {
            return None;
        }
        let weights = if self.non_finite_weights.is_empty() {
            String::new()
        } else {
            format!("non-finite weights: {}", self.non_finite_weights.join(", "))
        };
        if self.non_finite_reference + self.non_finite_shards > 0 {
            return Some(format!(
                "cross-attention output is not finite: {} value(s) computed from the source and {} from the shards are NaN or infinite{}{weights}",
                self.non_finite_reference,
                self.non_finite_shards,
                if weights.is_empty() { "" } else { "; " }
            ));
        }
        Some(format!(
            "cross-attention output of the shards differs from the source's by {:.3e} (relative {:.3e} > {:.0e})",
            self.max_abs_err, self.max_rel_err, self.tolerance
        ))
    }
}

/// A row-major matrix viewed in place.
pub struct Mat<'a> {
    bytes: &'a [u8],
    dtype: Dtype,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

/// A matrix whose rows can be read as f64 (a memory-mapped tensor, or one in host memory).
pub trait RowSource: Sync {
    /// Row `i`.
    fn row(&self, i: usize) -> Vec<f64>;
}

impl RowSource for Mat<'_> {
    fn row(&self, i: usize) -> Vec<f64> {
        let w = self.cols * self.dtype.size();
        let b = &self.bytes[i * w..(i + 1) * w];
        dtype::to_f32(self.dtype, b).unwrap_or_default().into_iter().map(f64::from).collect()
    }
}

/// A row-major f32 matrix in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl HostMat {
    /// Rows `a..b` as a new matrix.
    pub fn rows_range(&self, a: usize, b: usize) -> HostMat {
        HostMat { rows: b - a, cols: self.cols, data: self.data[a * self.cols..b * self.cols].to_vec() }
    }

    /// Columns `a..b` as a new matrix.
    pub fn cols_range(&self, a: usize, b: usize) -> HostMat {
        let data =
            (0..self.rows).flat_map(|r| self.data[r * self.cols + a..r * self.cols + b].iter().copied()).collect();
        HostMat { rows: self.rows, cols: b - a, data }
    }

    /// Rows of several matrices stacked.
    pub fn stack(parts: &[&HostMat]) -> HostMat {
        let cols = parts[0].cols;
        HostMat {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        }
    }

    /// The f64 activations of this matrix.
    pub fn act(&self) -> Act {
        self.data.chunks(self.cols.max(1)).map(|r| r.iter().map(|&v| v as f64).collect()).collect()
    }
}

impl RowSource for HostMat {
    fn row(&self, i: usize) -> Vec<f64> {
        self.data[i * self.cols..(i + 1) * self.cols].iter().map(|&v| v as f64).collect()
    }
}

/// Dense activations: `[n][d]`.
pub type Act = Vec<Vec<f64>>;

fn forward_err(msg: String) -> Error {
    Error::Verify(VerifyError::Forward { msg })
}

/// Finds a tensor by (canonical) name in a checkpoint.
fn find<'a>(c: &'a Checkpoint, mapping: Option<&Mapping>, name: &str) -> Option<&'a TensorInfo> {
    let (_, t) = c.meta.tensors.iter().find(|(n, _)| match mapping {
        Some(m) => m.canonical(n) == name,
        None => n.as_str() == name,
    })?;
    Some(t)
}

/// A tensor's bytes, dtype and shape, by (canonical) name ([`find`]).
fn get<'a>(c: &'a Checkpoint, mapping: Option<&Mapping>, name: &str) -> Option<(&'a [u8], Dtype, &'a [usize])> {
    let t = find(c, mapping, name)?;
    Some((c.bytes(t), t.dtype, &t.shape))
}

/// Asks the kernel for the pages of the tensors `names` (canonical names with `mapping`) of `c`,
/// all at once and without waiting, instead of a page fault of a cold map waiting for its own
/// read, one fault after another. The forward check of the full 11B-Vision shape, cold, beside
/// the byte comparison, took 1.9 s without and 1.4-1.6 s with (2 runs each).
fn ask_for(c: &Checkpoint, mapping: Option<&Mapping>, names: &[&String]) {
    for t in names.iter().filter_map(|n| find(c, mapping, n)) {
        crate::write::read::will_need(c.file(t.file), t.start, t.end - t.start);
    }
}

fn mat<'a>(c: &'a Checkpoint, mapping: Option<&Mapping>, name: &str) -> Result<Mat<'a>, Error> {
    let (bytes, dtype, shape) =
        get(c, mapping, name).ok_or_else(|| forward_err(format!("tensor {} not found", q(name))))?;
    if shape.len() != 2 || !dtype.is_float() {
        let want = if dtype.is_float() { "a 2-d matrix" } else { "a float type" };
        return Err(forward_err(format!(
            "tensor {} is {dtype} {}, expected {want}",
            q(name),
            crate::text::shape(shape)
        )));
    }
    Ok(Mat { bytes, dtype, rows: shape[0], cols: shape[1] })
}

/// A 2-d float tensor as a host f32 matrix.
pub fn host_mat(c: &Checkpoint, mapping: Option<&Mapping>, name: &str) -> Result<HostMat, Error> {
    let m = mat(c, mapping, name)?;
    let data = dtype::to_f32(m.dtype, m.bytes).unwrap_or_default();
    Ok(HostMat { rows: m.rows, cols: m.cols, data })
}

/// A tensor as a host f32 vector; `None` when no name is given or the tensor is absent.
pub fn host_vec(c: &Checkpoint, mapping: Option<&Mapping>, name: Option<&str>) -> Result<Option<Vec<f32>>, Error> {
    let Some(name) = name else { return Ok(None) };
    let Some((bytes, dtype, _)) = get(c, mapping, name) else { return Ok(None) };
    dtype::to_f32(dtype, bytes)
        .map(Some)
        .ok_or_else(|| forward_err(format!("tensor {} is {dtype}, not a float type", q(name))))
}

/// [`host_vec`] as f64, checked to have `len` elements.
fn vector(
    c: &Checkpoint,
    mapping: Option<&Mapping>,
    name: Option<&String>,
    len: usize,
) -> Result<Option<Vec<f64>>, Error> {
    let Some(v) = host_vec(c, mapping, name.map(String::as_str))? else { return Ok(None) };
    if v.len() != len {
        let name = name.map(String::as_str).unwrap_or_default();
        return Err(forward_err(format!("tensor {} has {} elements, expected {len}", q(name), v.len())));
    }
    Ok(Some(v.into_iter().map(f64::from).collect()))
}

/// The dot product of `a` and `b` (as long as the shorter), summed in 8 independent lanes: one
/// running sum is a chain of dependent additions the compiler may not reorder, and was half of a
/// Whisper-large-v3 verify's time (docs/performance.md, run 9). The reference and the shards are
/// summed the same way; the order changes a float64 sum in its last bits, far below the check's
/// tolerances.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// `x W^T + b` over W rows `rows`; the bias is indexed by absolute row. Parallel over rows.
pub fn linear(x: &Act, w: &dyn RowSource, rows: std::ops::Range<usize>, b: Option<&[f64]>) -> Act {
    use rayon::prelude::*;
    let cols: Vec<Vec<f64>> = rows
        .into_par_iter()
        .map(|o| {
            let wr = w.row(o);
            x.iter().map(|xt| dot(xt, &wr) + b.map_or(0.0, |b| b[o])).collect()
        })
        .collect();
    (0..x.len()).map(|t| cols.iter().map(|c| c[t]).collect()).collect()
}

/// Attention core: q `[T][h*hd]`, k/v `[S][kvh*hd]` -> context `[T][h*hd]`; `norms` = per-head
/// RMSNorm weights of q and k and the epsilon.
pub fn attend(
    q: &Act,
    k: &Act,
    v: &Act,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    norms: Option<(&[f64], &[f64], f64)>,
) -> Act {
    let rms = |x: &[f64], w: &[f64], eps: f64| -> Vec<f64> {
        let ms = x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(w).map(|(a, g)| a * r * g).collect()
    };
    let head = |m: &Act, t: usize, h: usize| -> Vec<f64> { m[t][h * hd..(h + 1) * hd].to_vec() };
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut ctx = vec![vec![0.0; heads * hd]; q.len()];
    for h in 0..heads {
        let kh = h / group;
        let keys: Vec<Vec<f64>> = (0..k.len())
            .map(|s| {
                let kv = head(k, s, kh);
                match norms {
                    Some((_, kn, eps)) => rms(&kv, kn, eps),
                    None => kv,
                }
            })
            .collect();
        for (t, crow) in ctx.iter_mut().enumerate() {
            let mut qv = head(q, t, h);
            if let Some((qn, _, eps)) = norms {
                qv = rms(&qv, qn, eps);
            }
            let scores: Vec<f64> =
                keys.iter().map(|kv| qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (s, p) in e.iter().enumerate() {
                for d in 0..hd {
                    crow[h * hd + d] += p / z * v[s][kh * hd + d];
                }
            }
        }
    }
    ctx
}

/// Shapes and options of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Decoder hidden size.
    pub hidden: usize,
    /// RMSNorm epsilon when q/k are normalized per head.
    pub norm_eps: Option<f64>,
}

fn render(t: &str, layer: usize) -> String {
    let mut b = Bindings::new();
    b.insert("i".into(), layer.to_string());
    Pattern::parse(t).map(|p| p.render(&b)).unwrap_or_else(|_| t.to_string())
}

fn names(n: &AttnNames, layer: usize) -> AttnNames {
    let r = |s: &String| render(s, layer);
    let o = |s: &Option<String>| s.as_ref().map(r);
    AttnNames {
        q: r(&n.q),
        q_bias: o(&n.q_bias),
        k: o(&n.k),
        k_bias: o(&n.k_bias),
        v: o(&n.v),
        v_bias: o(&n.v_bias),
        kv: o(&n.kv),
        kv_bias: o(&n.kv_bias),
        o: r(&n.o),
        o_bias: o(&n.o_bias),
        q_norm: o(&n.q_norm),
        k_norm: o(&n.k_norm),
    }
}

fn cross_spec(mapping: &Mapping) -> Result<&crate::mapping::CrossAttentionSpec, Error> {
    mapping.file.cross_attention.as_ref().ok_or_else(|| forward_err("mapping has no cross_attention section".into()))
}

/// The per-head norm arguments of [`attend`], when the layer has both norms and an epsilon.
fn norm_args<'a>(
    q: &'a Option<Vec<f64>>,
    k: &'a Option<Vec<f64>>,
    eps: Option<f64>,
) -> Option<(&'a [f64], &'a [f64], f64)> {
    match (q, k, eps) {
        (Some(a), Some(b), Some(eps)) => Some((a.as_slice(), b.as_slice(), eps)),
        _ => None,
    }
}

/// The layer computed from the unsplit source weights.
pub fn forward_source(
    src: &Checkpoint,
    mapping: &Mapping,
    layer: usize,
    s: AttnShape,
    x: &Act,
    e: &Act,
) -> Result<Act, Error> {
    let spec = cross_spec(mapping)?;
    let n = names(&spec.source, layer);
    let m = Some(mapping);
    let (wq, wk, wv, wo) = (
        mat(src, m, &n.q)?,
        mat(src, m, n.k.as_ref().expect("checked"))?,
        mat(src, m, n.v.as_ref().expect("checked"))?,
        mat(src, m, &n.o)?,
    );
    let hd = wq.rows / s.heads;
    let bq = vector(src, m, n.q_bias.as_ref(), wq.rows)?;
    let bk = vector(src, m, n.k_bias.as_ref(), wk.rows)?;
    let bv = vector(src, m, n.v_bias.as_ref(), wv.rows)?;
    let bo = vector(src, m, n.o_bias.as_ref(), wo.rows)?;
    let qn = vector(src, m, n.q_norm.as_ref(), hd)?;
    let kn = vector(src, m, n.k_norm.as_ref(), hd)?;
    let norms = norm_args(&qn, &kn, s.norm_eps);
    let qa = linear(x, &wq, 0..wq.rows, bq.as_deref());
    let ka = linear(e, &wk, 0..wk.rows, bk.as_deref());
    let va = linear(e, &wv, 0..wv.rows, bv.as_deref());
    let ctx = attend(&qa, &ka, &va, s.heads, s.kv_heads, hd, norms);
    Ok(linear(&ctx, &wo, 0..wo.rows, bo.as_deref()))
}

/// The layer computed from the per-rank shards as tp ranks would, partials summed.
pub fn forward_shards(
    ranks: &[Checkpoint],
    mapping: &Mapping,
    layer: usize,
    s: AttnShape,
    x: &Act,
    e: &Act,
) -> Result<Act, Error> {
    let spec = cross_spec(mapping)?;
    let n = names(&spec.shards, layer);
    let tp = ranks.len();
    let mut out = vec![vec![0.0; s.hidden]; x.len()];
    let mut bias = None;
    for (r, c) in ranks.iter().enumerate() {
        let (wq, wkv, wo) = (mat(c, None, &n.q)?, mat(c, None, n.kv.as_ref().expect("checked"))?, mat(c, None, &n.o)?);
        let heads = s.heads / tp;
        let hd = wq.rows / heads.max(1);
        let kv_local = wkv.rows / 2 / hd.max(1);
        if heads == 0 || kv_local == 0 || heads % kv_local != 0 {
            return Err(forward_err(format!(
                "rank {r}: {} q heads and {kv_local} kv heads per rank do not form GQA groups",
                heads
            )));
        }
        let bq = vector(c, None, n.q_bias.as_ref(), wq.rows)?;
        let bkv = vector(c, None, n.kv_bias.as_ref(), wkv.rows)?;
        let qn = vector(c, None, n.q_norm.as_ref(), hd)?;
        let kn = vector(c, None, n.k_norm.as_ref(), hd)?;
        let norms = norm_args(&qn, &kn, s.norm_eps);
        let half = wkv.rows / 2;
        let qa = linear(x, &wq, 0..wq.rows, bq.as_deref());
        let ka = linear(e, &wkv, 0..half, bkv.as_deref());
        // `linear` indexes the bias by absolute row, so the v half reads bkv[half..].
        let va = linear(e, &wkv, half..wkv.rows, bkv.as_deref());
        let ctx = attend(&qa, &ka, &va, heads, kv_local, hd, norms);
        let partial = linear(&ctx, &wo, 0..wo.rows, None);
        for (o, p) in out.iter_mut().zip(&partial) {
            for (a, b) in o.iter_mut().zip(p) {
                *a += b;
            }
        }
        if r == 0 {
            bias = vector(c, None, n.o_bias.as_ref(), wo.rows)?;
        }
    }
    if let Some(b) = bias {
        for o in out.iter_mut() {
            for (a, bb) in o.iter_mut().zip(&b) {
                *a += bb;
            }
        }
    }
    Ok(out)
}

/// Deterministic standard-normal inputs (splitmix64 + Box-Muller); never all zeros.
pub fn random_act(n: usize, d: usize, seed: u64) -> Act {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            (0..d)
                .map(|_| {
                    let (u1, u2) = (next().max(1e-300), next());
                    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect()
        })
        .collect()
}

/// Max absolute difference and max |reference|; the difference is NaN when a value of either side
/// is NaN or infinite, so that no tolerance accepts it (`f64::max` would drop a NaN).
pub fn max_err(reference: &Act, other: &Act) -> (f64, f64) {
    let mut abs: f64 = 0.0;
    let mut mag: f64 = 0.0;
    for (a, b) in reference.iter().zip(other) {
        for (x, y) in a.iter().zip(b) {
            if !x.is_finite() || !y.is_finite() {
                abs = f64::NAN;
            } else if !abs.is_nan() {
                abs = abs.max((x - y).abs());
            }
            if x.is_finite() {
                mag = mag.max(x.abs());
            }
        }
    }
    (abs, mag)
}

/// How many values of `a` are NaN or infinite.
pub fn count_non_finite(a: &Act) -> usize {
    a.iter().flatten().filter(|v| !v.is_finite()).count()
}

/// The source tensor names of one layer's attention, as rendered.
fn all_names(n: &AttnNames) -> Vec<&String> {
    [&n.q_bias, &n.k, &n.k_bias, &n.v, &n.v_bias, &n.kv, &n.kv_bias, &n.o_bias, &n.q_norm, &n.k_norm]
        .into_iter()
        .flatten()
        .chain([&n.q, &n.o])
        .collect()
}

/// The first of `names` (present in `c`) that is not of a float type, described.
fn non_float(c: &Checkpoint, mapping: Option<&Mapping>, names: &[&String]) -> Option<String> {
    names.iter().find_map(|n| {
        let (_, dtype, _) = get(c, mapping, n)?;
        (!dtype.is_float()).then(|| format!("{} is {dtype}, not a float type", q(n)))
    })
}

/// `"`name`: 3 of 1024 elements (first [0, 5] = NaN)"` for each of `names` (present in `c`) that
/// holds NaN or infinite values; read in blocks, so memory stays bounded.
fn non_finite_weights(c: &Checkpoint, mapping: Option<&Mapping>, names: &[&String], prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in names {
        let Some((bytes, dtype, shape)) = get(c, mapping, n) else { continue };
        let elem = dtype.size();
        let (mut count, mut first) = (0usize, None);
        for (k, block) in bytes.chunks(4096 * elem).enumerate() {
            for (i, v) in dtype::to_f32(dtype, block).unwrap_or_default().iter().enumerate() {
                if !v.is_finite() {
                    count += 1;
                    first.get_or_insert((k * 4096 + i, *v));
                }
            }
        }
        if let Some((i, v)) = first {
            out.push(format!(
                "{prefix}{}: {count} of {} elements (first {} = {v})",
                q(n),
                bytes.len() / elem.max(1),
                crate::text::shape(&super::unravel(i, shape))
            ));
        }
    }
    out
}

/// What the shards are compared with.
pub enum Reference<'a> {
    /// The layer computed from the unsplit source weights.
    Source(&'a Checkpoint),
    /// A sharded source (`plan::backward`): the layer computed from its ranks as they would
    /// compute it (a layout the byte comparison proved equal to the source's); `logical` is the
    /// checkpoint it was made from (names, shapes and dtypes).
    Shards {
        /// Its ranks, rank 0 first.
        ranks: &'a [Checkpoint],
        /// The checkpoint read back.
        logical: &'a crate::checkpoint::CheckpointMeta,
    },
}

/// The layer indices of the family's cross-attention, from the source tensor names.
pub fn layers(src: &Checkpoint, mapping: &Mapping) -> Vec<usize> {
    layers_in(&src.meta, mapping)
}

/// [`layers`] of the tensor names of `meta`.
pub fn layers_in(meta: &crate::checkpoint::CheckpointMeta, mapping: &Mapping) -> Vec<usize> {
    let Some(spec) = &mapping.file.cross_attention else { return vec![] };
    let Ok(p) = Pattern::parse(&spec.layers) else { return vec![] };
    let mut v: Vec<usize> =
        meta.tensors.keys().filter_map(|n| p.matches(&mapping.canonical(n))?.get("i")?.parse().ok()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The shape parameters of the family's cross-attention, from the dims and config.
pub fn shape(src: &Checkpoint, mapping: &Mapping, dims: &Dims) -> Result<AttnShape, Error> {
    shape_of(&src.meta.config, mapping, dims)
}

/// [`shape`] from config.json.
fn shape_of(config: &serde_json::Value, mapping: &Mapping, dims: &Dims) -> Result<AttnShape, Error> {
    let spec = cross_spec(mapping)?;
    let d = |n: &str| dims.get(n).copied().unwrap_or(0) as usize;
    let norm_eps = match &spec.norm_eps_config {
        Some(k) => Some(
            crate::mapping::dims::lookup(config, k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| forward_err(format!("config.json has no number at `{k}`")))?,
        ),
        None => None,
    };
    Ok(AttnShape { heads: d(&spec.heads), kv_heads: d(&spec.kv_heads), hidden: d(&spec.hidden), norm_eps })
}

/// Runs the check on every cross-attention layer.
pub fn check_all(
    reference: Reference<'_>,
    mapping: &Mapping,
    dims: &Dims,
    ranks: &[Checkpoint],
    opts: &VerifyOptions,
    tolerance: f64,
) -> Result<Vec<LayerCheck>, Error> {
    if opts.tokens == 0 || opts.source_tokens == 0 {
        return Err(VerifyError::NoTokens.into());
    }
    let meta = match &reference {
        Reference::Source(c) => &c.meta,
        Reference::Shards { logical, .. } => *logical,
    };
    let s = shape_of(&meta.config, mapping, dims)?;
    let spec = mapping.file.cross_attention.as_ref().expect("caller checked");
    let all = layers_in(meta, mapping);
    opts.progress.start("forward check", all.len() as u64, crate::progress::Unit::Items);
    // The layers are independent: computed in parallel (on BART-large, 12 layers, the check took
    // as long as the byte comparison of the whole output when computed one layer after another).
    let one = |layer: usize| -> Result<LayerCheck, Error> {
        let module = spec.source.q.rsplit_once('.').map(|(m, _)| m).unwrap_or(&spec.source.q);
        let module = module.rsplit_once('.').map(|(m, _)| m).unwrap_or(module);
        let (src_attn, shard_attn) = (names(&spec.source, layer), names(&spec.shards, layer));
        let (src_names, shard_names) = (all_names(&src_attn), all_names(&shard_attn));
        let dtype_of = |c: &Checkpoint, m: Option<&Mapping>, n: &AttnNames| {
            get(c, m, &n.q).map(|(_, d, _)| d).ok_or_else(|| forward_err(format!("tensor {} not found", q(&n.q))))
        };
        let source_dtype = match &reference {
            Reference::Source(src) => dtype_of(src, Some(mapping), &src_attn)?,
            Reference::Shards { logical, .. } => logical
                .tensors
                .get(&src_attn.q)
                .map(|t| t.dtype)
                .ok_or_else(|| forward_err(format!("tensor {} not found", q(&src_attn.q))))?,
        };
        let mut check = LayerCheck {
            layer,
            module: render(module, layer),
            source_dtype,
            shard_dtype: match ranks.first() {
                Some(c) => dtype_of(c, None, &shard_attn)?,
                None => return Err(forward_err("no ranks".into())),
            },
            max_abs_err: 0.0,
            max_rel_err: 0.0,
            tolerance,
            non_finite_reference: 0,
            non_finite_shards: 0,
            non_finite_weights: vec![],
            skipped: None,
            passed: true,
        };
        let in_ranks = |cs: &[Checkpoint], what: &str| {
            cs.iter()
                .enumerate()
                .find_map(|(r, c)| non_float(c, None, &shard_names).map(|m| format!("{what}rank {r}: {m}")))
        };
        let skip = match &reference {
            Reference::Source(src) => non_float(src, Some(mapping), &src_names),
            Reference::Shards { ranks: input, .. } => in_ranks(input, "source "),
        }
        .or_else(|| in_ranks(ranks, ""));
        if let Some(why) = skip {
            check.skipped =
                Some(format!("{why}; the forward check computes float weights only (its bytes were compared)"));
            opts.progress.inc(1);
            return Ok(check);
        }
        let k = render(spec.source.k.as_deref().unwrap_or_default(), layer);
        let enc_dim = match &reference {
            Reference::Source(src) => mat(src, Some(mapping), &k)?.cols,
            Reference::Shards { logical, .. } => logical
                .tensors
                .get(&k)
                .and_then(|t| t.shape.get(1).copied())
                .ok_or_else(|| forward_err(format!("tensor {} not found", q(&k))))?,
        };
        match &reference {
            Reference::Source(src) => ask_for(src, Some(mapping), &src_names),
            Reference::Shards { ranks: input, .. } => input.iter().for_each(|c| ask_for(c, None, &shard_names)),
        }
        ranks.iter().for_each(|c| ask_for(c, None, &shard_names));
        let x = random_act(opts.tokens, s.hidden, opts.seed ^ (layer as u64) << 32);
        let e = random_act(opts.source_tokens, enc_dim, opts.seed ^ (layer as u64) << 32 ^ 1);
        let expected = match &reference {
            Reference::Source(src) => forward_source(src, mapping, layer, s, &x, &e)?,
            Reference::Shards { ranks: input, .. } => forward_shards(input, mapping, layer, s, &x, &e)?,
        };
        let sharded = forward_shards(ranks, mapping, layer, s, &x, &e)?;
        let (abs, mag) = max_err(&expected, &sharded);
        check.max_abs_err = abs;
        check.max_rel_err = if mag > 0.0 { abs / mag } else { abs };
        check.non_finite_reference = count_non_finite(&expected);
        check.non_finite_shards = count_non_finite(&sharded);
        // A NaN or infinite weight makes outputs non-finite (the random inputs are never zero, and
        // softmax weights are positive), so the weights are scanned only then: on BART-large the
        // scan added a tenth to verify's time.
        if check.non_finite_reference + check.non_finite_shards > 0 {
            check.non_finite_weights = match &reference {
                Reference::Source(src) => non_finite_weights(src, Some(mapping), &src_names, ""),
                Reference::Shards { ranks: input, .. } => input
                    .iter()
                    .enumerate()
                    .flat_map(|(r, c)| non_finite_weights(c, None, &shard_names, &format!("source rank {r} ")))
                    .collect(),
            };
            for (r, c) in ranks.iter().enumerate() {
                check.non_finite_weights.extend(non_finite_weights(c, None, &shard_names, &format!("rank {r} ")));
            }
        }
        // `<=` is false for NaN, so a non-finite output fails here too; counted to say so.
        check.passed =
            check.non_finite_reference == 0 && check.non_finite_shards == 0 && check.max_rel_err <= tolerance;
        opts.progress.inc(1);
        Ok(check)
    };
    use rayon::prelude::*;
    // Collected in layer order first, so that an error is the first layer's, as before.
    let checks: Vec<Result<LayerCheck, Error>> = all.into_par_iter().map(one).collect();
    checks.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_err_does_not_drop_nan_or_inf() {
        let a: Act = vec![vec![1.0, 2.0], vec![3.0, -4.0]];
        assert_eq!(max_err(&a, &a), (0.0, 4.0));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut b = a.clone();
            b[1][0] = bad;
            let (abs, mag) = max_err(&a, &b);
            assert!(abs.is_nan(), "{bad}: {abs}");
            assert_eq!((abs / mag).partial_cmp(&TOLERANCE), None, "no tolerance accepts it");
            assert!(max_err(&b, &a).0.is_nan(), "on the reference side too");
            assert_eq!(count_non_finite(&b), 1);
        }
        // A NaN after a large difference still wins.
        let mut b = a.clone();
        b[0][0] = 100.0;
        b[1][1] = f64::NAN;
        assert!(max_err(&a, &b).0.is_nan());
    }
}
