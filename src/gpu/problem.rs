//! One cross-attention problem for the GPU check, in host memory: the unsplit weights, the
//! per-rank shards, and random inputs. From a checkpoint and its conversion, or synthetic at real
//! model sizes (split here by the contract's rules).

use crate::checkpoint::Checkpoint;
use crate::mapping::dims::Dims;
use crate::mapping::pattern::{Bindings, Pattern};
use crate::mapping::Mapping;
use crate::plan::split::kv_heads_of_rank;
use crate::verify::forward::{self, attend, linear, random_act, Act, HostMat};
use crate::Error;

/// One rank's shard of the layer.
#[derive(Clone, Debug)]
pub struct RankShard {
    /// `[heads/tp * hd, d]`.
    pub wq: HostMat,
    /// Bias of q.
    pub bq: Option<Vec<f32>>,
    /// `[k_r ; v_r]`, `[2 * kv_r * hd, d_enc]`.
    pub wkv: HostMat,
    /// Bias of kv.
    pub bkv: Option<Vec<f32>>,
    /// `[d, heads/tp * hd]`.
    pub wo: HostMat,
}

/// A cross-attention layer with inputs.
#[derive(Clone, Debug)]
pub struct Problem {
    /// What it is (`layer 1 (model.decoder.layers.1.encoder_attn)`, `bart-large (synthetic)`).
    pub label: String,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Decoder hidden size.
    pub hidden: usize,
    /// RMSNorm epsilon for per-head q/k norms (mllama).
    pub norm_eps: Option<f64>,
    /// Decoder states `[T, d]`.
    pub x: HostMat,
    /// Encoder states `[S, d_enc]`.
    pub e: HostMat,
    /// Unsplit weights.
    pub wq: HostMat,
    #[allow(missing_docs)]
    pub wk: HostMat,
    #[allow(missing_docs)]
    pub wv: HostMat,
    #[allow(missing_docs)]
    pub wo: HostMat,
    /// Unsplit biases.
    pub bq: Option<Vec<f32>>,
    #[allow(missing_docs)]
    pub bk: Option<Vec<f32>>,
    #[allow(missing_docs)]
    pub bv: Option<Vec<f32>>,
    /// Output bias (added once).
    pub bo: Option<Vec<f32>>,
    /// Per-head norms.
    pub q_norm: Option<Vec<f32>>,
    #[allow(missing_docs)]
    pub k_norm: Option<Vec<f32>>,
    /// Shards, rank 0 first.
    pub ranks: Vec<RankShard>,
}

/// Real model sizes for synthetic problems.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// facebook/bart-large: d 1024, 16 heads, biases.
    BartLarge,
    /// openai/whisper-large-v3: d 1280, 20 heads, biases (no k bias).
    WhisperLarge,
    /// Llama-3.2-11B-Vision text cross-attention: hidden 4096, 32 q / 8 kv heads, q/k norms.
    Mllama11b,
}

impl Preset {
    /// Name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::BartLarge => "bart-large",
            Preset::WhisperLarge => "whisper-large",
            Preset::Mllama11b => "mllama-11b",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Option<Preset> {
        [Preset::BartLarge, Preset::WhisperLarge, Preset::Mllama11b].into_iter().find(|p| p.name() == s)
    }

    /// `(hidden, heads, kv_heads, biases, k bias, q/k norms)`.
    fn dims(self) -> (usize, usize, usize, bool, bool, bool) {
        match self {
            Preset::BartLarge => (1024, 16, 16, true, true, false),
            Preset::WhisperLarge => (1280, 20, 20, true, false, false),
            Preset::Mllama11b => (4096, 32, 8, false, false, true),
        }
    }

    /// The model's head size.
    pub fn head_dim(self) -> usize {
        let (d, h, ..) = self.dims();
        d / h
    }

    /// The tp values the contract allows for this shape.
    pub fn valid_tp(self, tp: usize) -> bool {
        let (_, h, kv, ..) = self.dims();
        tp > 0 && h % tp == 0 && crate::plan::split::kv_heads_fit(kv, tp)
    }
}

fn f64s(v: &Option<Vec<f32>>) -> Option<Vec<f64>> {
    v.as_ref().map(|v| v.iter().map(|&x| x as f64).collect())
}

fn rand_mat(rows: usize, cols: usize, scale: f64, seed: u64) -> HostMat {
    let a = random_act(rows, cols, seed);
    HostMat { rows, cols, data: a.into_iter().flatten().map(|v| (v * scale) as f32).collect() }
}

fn rand_vec(n: usize, scale: f64, offset: f64, seed: u64) -> Vec<f32> {
    random_act(1, n, seed).remove(0).into_iter().map(|v| (offset + v * scale) as f32).collect()
}

impl Problem {
    /// Builds the shards of rank 0..tp from the unsplit weights by the contract's rules.
    pub fn split(&mut self, tp: usize) {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let per_q = h / tp * hd;
        self.ranks = (0..tp)
            .map(|r| {
                let (k0, kn) = kv_heads_of_rank(kv, tp, r);
                let (a, b) = (k0 * hd, (k0 + kn) * hd);
                let slice = |v: &Option<Vec<f32>>, a: usize, b: usize| v.as_ref().map(|v| v[a..b].to_vec());
                let bkv = match (&self.bk, &self.bv) {
                    (None, None) => None,
                    (k, v) => {
                        let zeros = vec![0.0; b - a];
                        let mut out = slice(k, a, b).unwrap_or_else(|| zeros.clone());
                        out.extend(slice(v, a, b).unwrap_or(zeros));
                        Some(out)
                    }
                };
                RankShard {
                    wq: self.wq.rows_range(r * per_q, (r + 1) * per_q),
                    bq: slice(&self.bq, r * per_q, (r + 1) * per_q),
                    wkv: HostMat::stack(&[&self.wk.rows_range(a, b), &self.wv.rows_range(a, b)]),
                    bkv,
                    wo: self.wo.cols_range(r * per_q, (r + 1) * per_q),
                }
            })
            .collect();
    }

    /// A synthetic layer of real size (or of the real head counts at head size `head_dim`), split
    /// over `tp` ranks.
    pub fn synthetic(
        preset: Preset,
        tp: usize,
        head_dim: Option<usize>,
        tokens: usize,
        source_tokens: usize,
        seed: u64,
    ) -> Problem {
        let (d, h, kv, biases, k_bias, norms) = preset.dims();
        let hd = head_dim.unwrap_or(d / h);
        let label = match head_dim {
            None => format!("{} (synthetic weights)", preset.name()),
            Some(hd) => format!("{} at head size {hd} (synthetic weights)", preset.name()),
        };
        Problem::random(label, (hd, h, kv), (biases, k_bias, norms), tp, (tokens, source_tokens), seed)
    }

    /// A random layer with `(head_dim, heads, kv_heads)`, `(biases, k bias, q/k norms)`.
    pub(crate) fn random(
        label: String,
        (hd, h, kv): (usize, usize, usize),
        (biases, k_bias, norms): (bool, bool, bool),
        tp: usize,
        (tokens, source_tokens): (usize, usize),
        seed: u64,
    ) -> Problem {
        let d = h * hd;
        let s = 1.0 / (d as f64).sqrt();
        let bias = |n: usize, seed: u64| biases.then(|| rand_vec(n, 0.1, 0.0, seed));
        let mut p = Problem {
            label,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
            hidden: d,
            norm_eps: norms.then_some(1e-5),
            x: rand_mat(tokens, d, 1.0, seed ^ 1),
            e: rand_mat(source_tokens, d, 1.0, seed ^ 2),
            wq: rand_mat(h * hd, d, s, seed ^ 3),
            wk: rand_mat(kv * hd, d, s, seed ^ 4),
            wv: rand_mat(kv * hd, d, s, seed ^ 5),
            wo: rand_mat(d, h * hd, s, seed ^ 6),
            bq: bias(h * hd, seed ^ 7),
            bk: if k_bias { bias(kv * hd, seed ^ 8) } else { None },
            bv: bias(kv * hd, seed ^ 9),
            bo: bias(d, seed ^ 10),
            q_norm: norms.then(|| rand_vec(hd, 0.2, 1.0, seed ^ 11)),
            k_norm: norms.then(|| rand_vec(hd, 0.2, 1.0, seed ^ 12)),
            ranks: vec![],
        };
        p.split(tp);
        p
    }

    /// Layer `layer` of a checkpoint, its shards read from `ranks` (the conversion output).
    #[allow(clippy::too_many_arguments)]
    pub fn from_checkpoint(
        src: &Checkpoint,
        mapping: &Mapping,
        dims: &Dims,
        ranks: &[Checkpoint],
        layer: usize,
        tokens: usize,
        source_tokens: usize,
        seed: u64,
    ) -> Result<Problem, Error> {
        let spec = mapping.file.cross_attention.as_ref().ok_or_else(|| crate::verify::VerifyError::Forward {
            msg: format!("mapping {} has no cross_attention section", mapping.origin),
        })?;
        let shape = forward::shape(src, mapping, dims)?;
        let mut b = Bindings::new();
        b.insert("i".into(), layer.to_string());
        let r = |t: &str| Pattern::parse(t).map(|p| p.render(&b)).unwrap_or_default();
        let ro = |t: &Option<String>| t.as_deref().map(r);
        let m = Some(mapping);
        let (s, sh) = (&spec.source, &spec.shards);
        let wq = forward::host_mat(src, m, &r(&s.q))?;
        let wk = forward::host_mat(src, m, &ro(&s.k).unwrap_or_default())?;
        let wv = forward::host_mat(src, m, &ro(&s.v).unwrap_or_default())?;
        let wo = forward::host_mat(src, m, &r(&s.o))?;
        let hd = wq.rows / shape.heads.max(1);
        let vec = |c: &Checkpoint, mm: Option<&Mapping>, n: &Option<String>| forward::host_vec(c, mm, n.as_deref());
        let mut shards = Vec::new();
        for c in ranks {
            shards.push(RankShard {
                wq: forward::host_mat(c, None, &r(&sh.q))?,
                bq: vec(c, None, &ro(&sh.q_bias))?,
                wkv: forward::host_mat(c, None, &ro(&sh.kv).unwrap_or_default())?,
                bkv: vec(c, None, &ro(&sh.kv_bias))?,
                wo: forward::host_mat(c, None, &r(&sh.o))?,
            });
        }
        let module = r(&s.q);
        let module = module.rsplitn(3, '.').nth(2).unwrap_or(&module).to_string();
        Ok(Problem {
            label: format!("layer {layer} ({module})"),
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: hd,
            hidden: wo.rows,
            norm_eps: shape.norm_eps,
            x: HostMat {
                rows: tokens,
                cols: wq.cols,
                data: random_act(tokens, wq.cols, seed).into_iter().flatten().map(|v| v as f32).collect(),
            },
            e: HostMat {
                rows: source_tokens,
                cols: wk.cols,
                data: random_act(source_tokens, wk.cols, seed ^ 1).into_iter().flatten().map(|v| v as f32).collect(),
            },
            bq: vec(src, m, &ro(&s.q_bias))?,
            bk: vec(src, m, &ro(&s.k_bias))?,
            bv: vec(src, m, &ro(&s.v_bias))?,
            bo: vec(src, m, &ro(&s.o_bias))?,
            q_norm: vec(src, m, &ro(&s.q_norm))?,
            k_norm: vec(src, m, &ro(&s.k_norm))?,
            wq,
            wk,
            wv,
            wo,
            ranks: shards,
        })
    }

    fn norms(&self) -> Option<(Vec<f64>, Vec<f64>, f64)> {
        match (f64s(&self.q_norm), f64s(&self.k_norm), self.norm_eps) {
            (Some(a), Some(b), Some(eps)) => Some((a, b, eps)),
            _ => None,
        }
    }

    /// The float64 CPU reference from the unsplit weights.
    pub fn reference(&self) -> Act {
        let (x, e) = (self.x.act(), self.e.act());
        let q = linear(&x, &self.wq, 0..self.wq.rows, f64s(&self.bq).as_deref());
        let k = linear(&e, &self.wk, 0..self.wk.rows, f64s(&self.bk).as_deref());
        let v = linear(&e, &self.wv, 0..self.wv.rows, f64s(&self.bv).as_deref());
        let n = self.norms();
        let ctx = attend(
            &q,
            &k,
            &v,
            self.heads,
            self.kv_heads,
            self.head_dim,
            n.as_ref().map(|(a, b, eps)| (a.as_slice(), b.as_slice(), *eps)),
        );
        linear(&ctx, &self.wo, 0..self.wo.rows, f64s(&self.bo).as_deref())
    }

    /// The split path on the CPU in float64 (what the GPU's split path computes).
    pub fn split_reference(&self) -> Act {
        let (x, e) = (self.x.act(), self.e.act());
        let tp = self.ranks.len();
        let n = self.norms();
        let mut out = vec![vec![0.0; self.hidden]; x.len()];
        for rs in &self.ranks {
            let heads = self.heads / tp;
            let half = rs.wkv.rows / 2;
            let kv = half / self.head_dim;
            let q = linear(&x, &rs.wq, 0..rs.wq.rows, f64s(&rs.bq).as_deref());
            let bkv = f64s(&rs.bkv);
            let k = linear(&e, &rs.wkv, 0..half, bkv.as_deref());
            let v = linear(&e, &rs.wkv, half..rs.wkv.rows, bkv.as_deref());
            let ctx = attend(
                &q,
                &k,
                &v,
                heads,
                kv,
                self.head_dim,
                n.as_ref().map(|(a, b, eps)| (a.as_slice(), b.as_slice(), *eps)),
            );
            for (o, p) in out.iter_mut().zip(linear(&ctx, &rs.wo, 0..rs.wo.rows, None)) {
                for (a, b) in o.iter_mut().zip(p) {
                    *a += b;
                }
            }
        }
        if let Some(bo) = f64s(&self.bo) {
            for o in out.iter_mut() {
                for (a, b) in o.iter_mut().zip(&bo) {
                    *a += b;
                }
            }
        }
        out
    }

    /// FLOPs of the fused path's projection GEMMs: the whole qkv over X and over E.
    pub fn fused_flops(&self) -> f64 {
        let qkv = (self.wq.rows + self.wk.rows + self.wv.rows) as f64;
        2.0 * (self.x.rows + self.e.rows) as f64 * self.hidden as f64 * qkv
    }

    /// FLOPs of the split path's projection GEMMs over all ranks: q over X, kv over E.
    pub fn split_flops(&self) -> f64 {
        self.ranks
            .iter()
            .map(|r| 2.0 * (self.x.rows * r.wq.rows * r.wq.cols + self.e.rows * r.wkv.rows * r.wkv.cols) as f64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_split_matches_the_unsplit_reference() {
        // The presets' structures at a small head size: MHA with biases (and without the k bias),
        // GQA with q/k norms, with kv replication at tp 16.
        for (preset, tp) in [(Preset::BartLarge, 4), (Preset::WhisperLarge, 5), (Preset::Mllama11b, 16)] {
            assert!(preset.valid_tp(tp));
            let (_, h, kv, biases, k_bias, norms) = preset.dims();
            let p = Problem::random("t".into(), (4, h, kv), (biases, k_bias, norms), tp, (3, 5), 7);
            assert_eq!(p.ranks.len(), tp);
            let (abs, mag) = forward::max_err(&p.reference(), &p.split_reference());
            assert!(mag > 0.1 && abs / mag < 1e-12, "{}: tp {tp}: {abs} / {mag}", preset.name());
            let replicated = tp > kv;
            assert!(p.split_flops() < p.fused_flops() || replicated, "{}", preset.name());
        }
    }

    #[test]
    fn split_is_checked_against_a_broken_shard() {
        let mut p = Problem::random("t".into(), (4, 8, 2), (true, true, true), 4, (3, 5), 9);
        p.ranks[1].wkv = p.ranks[2].wkv.clone(); // wrong kv replica on rank 1
        let (abs, mag) = forward::max_err(&p.reference(), &p.split_reference());
        assert!(abs / mag > 1e-3, "a wrong replica must show: {abs} / {mag}");
    }

    #[test]
    fn presets_reject_invalid_tp() {
        assert!(!Preset::WhisperLarge.valid_tp(8));
        assert!(Preset::Mllama11b.valid_tp(16));
        assert!(!Preset::Mllama11b.valid_tp(3));
        assert_eq!(Preset::parse("bart-large"), Some(Preset::BartLarge));
    }
}
