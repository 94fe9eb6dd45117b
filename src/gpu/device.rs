//! The narrow device interface `validate` runs on, and the fused and split paths written once
//! against it.
//!
//! Two implementations: cudarc (`enabled.rs`, cuBLAS and the NVRTC kernels of [`KERNELS`]) and
//! the CPU (`cpu.rs`), whose GEMM follows the cuBLAS specification literally (column-major,
//! `op`, `m`/`n`/`k`, leading dimensions, alpha and beta, with cuBLAS's argument checks) and
//! whose kernels are line-for-line Rust transcriptions of [`KERNELS`], the grid run as a loop. A
//! wrong operation or leading dimension in the paths below therefore gives wrong numbers on the
//! CPU as it would on the GPU, and `cargo test` catches it without a GPU.

use super::problem::Problem;
use super::{GpuError, GpuRun};
use crate::verify::forward::HostMat;

/// The CUDA C source of every kernel (compiled by NVRTC in `enabled.rs`; transcribed in `cpu.rs`).
pub const KERNELS: &str = r#"
extern "C" __global__ void gather_cols(const float* src, float* dst, int rows, int ld, int col0, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * n) { int r = i / n, c = i % n; dst[i] = src[(long)r * ld + col0 + c]; }
}
extern "C" __global__ void add_bias(float* y, const float* b, int rows, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * cols) y[i] += b[i % cols];
}
extern "C" __global__ void axpy(float* y, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}
extern "C" __global__ void rms_norm_heads(float* x, const float* w, int vectors, int hd, float eps) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= vectors) return;
    float* p = x + (long)i * hd;
    float ss = 0.f;
    for (int d = 0; d < hd; d++) ss += p[d] * p[d];
    float r = rsqrtf(ss / hd + eps);
    for (int d = 0; d < hd; d++) p[d] = p[d] * r * w[d];
}
extern "C" __global__ void scores(const float* q, const float* k, float* s, int T, int S, int H, int KV, int hd, float scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)H * T * S) return;
    int h = i / ((long)T * S), t = (i / S) % T, j = i % S, kh = h / (H / KV);
    const float* qp = q + ((long)t * H + h) * hd;
    const float* kp = k + ((long)j * KV + kh) * hd;
    float acc = 0.f;
    for (int d = 0; d < hd; d++) acc += qp[d] * kp[d];
    s[i] = acc * scale;
}
extern "C" __global__ void softmax_rows(float* x, int rows, int cols) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float* p = x + (long)r * cols;
    float m = -3.402823466e+38f;
    for (int j = 0; j < cols; j++) m = fmaxf(m, p[j]);
    float z = 0.f;
    for (int j = 0; j < cols; j++) { p[j] = expf(p[j] - m); z += p[j]; }
    for (int j = 0; j < cols; j++) p[j] /= z;
}
extern "C" __global__ void context(const float* p, const float* v, float* ctx, int T, int S, int H, int KV, int hd) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * H * hd) return;
    int t = i / ((long)H * hd), h = (i / hd) % H, d = i % hd, kh = h / (H / KV);
    const float* pp = p + ((long)h * T + t) * S;
    float acc = 0.f;
    for (int j = 0; j < S; j++) acc += pp[j] * v[((long)j * KV + kh) * hd + d];
    ctx[i] = acc;
}
extern "C" __global__ void copy_f32(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}
extern "C" __global__ void bf16_to_f32(const unsigned short* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __uint_as_float(((unsigned int)x[i]) << 16);
}
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { unsigned int u = __float_as_uint(x[i]); u += 0x7fffu + ((u >> 16) & 1u); y[i] = (unsigned short)(u >> 16); }
}
"#;

/// Every kernel of [`KERNELS`].
pub const KERNEL_NAMES: [&str; 10] = [
    "gather_cols",
    "add_bias",
    "axpy",
    "rms_norm_heads",
    "scores",
    "softmax_rows",
    "context",
    "copy_f32",
    "bf16_to_f32",
    "f32_to_bf16",
];

/// Threads per block of every launch.
pub const BLOCK: u32 = 256;

/// Blocks of a launch over `n` threads (at least one, as the CUDA launch asks).
pub fn grid(n: usize) -> Result<u32, GpuError> {
    let blocks = n.div_ceil(BLOCK as usize).max(1);
    u32::try_from(blocks).map_err(|_| GpuError::Setup(format!("a launch over {n} threads is too large")))
}

/// A cuBLAS operation on an operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `CUBLAS_OP_N`.
    N,
    /// `CUBLAS_OP_T`.
    T,
}

/// The arguments of `cublasGemmStridedBatchedEx` (`cublasGemmEx` when `batch` is 1), with
/// cuBLAS's meaning: for each `p < batch`, column-major
/// `C_p[m, n] = alpha * op(A_p)[m, k] * op(B_p)[k, n] + beta * C_p`, `A_p` starting
/// `p * stride_a` elements into `A` with leading dimension `lda`, and so on. Sizes are cuBLAS's
/// `int`s, strides its `long long`s.
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(missing_docs)]
pub struct Gemm {
    pub transa: Op,
    pub transb: Op,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    pub lda: i32,
    pub ldb: i32,
    pub beta: f32,
    pub ldc: i32,
    pub batch: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
}

/// An element type the GEMMs run in, as the host and the conversion kernels see it.
pub trait Elem: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Host-side conversion at upload (round to nearest even).
    fn from_f32(v: f32) -> Self;
    /// What the `*_to_f32` kernel computes.
    fn kernel_to_f32(self) -> f32;
    /// What the `f32_to_*` kernel computes.
    fn kernel_from_f32(v: f32) -> Self;
    /// What cuBLAS stores for an f32 accumulator (round to nearest even).
    fn store(v: f32) -> Self {
        Self::from_f32(v)
    }
    /// The element as f32 (exact).
    fn load(self) -> f32;
}

impl Elem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn kernel_to_f32(self) -> f32 {
        self
    }
    fn kernel_from_f32(v: f32) -> Self {
        v
    }
    fn load(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn kernel_to_f32(self) -> f32 {
        // y[i] = __uint_as_float(((unsigned int)x[i]) << 16);
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn kernel_from_f32(v: f32) -> Self {
        // unsigned int u = __float_as_uint(x[i]); u += 0x7fffu + ((u >> 16) & 1u); y[i] = u >> 16;
        let mut u = v.to_bits();
        u = u.wrapping_add(0x7fff_u32.wrapping_add((u >> 16) & 1));
        half::bf16::from_bits((u >> 16) as u16)
    }
    fn load(self) -> f32 {
        self.to_f32()
    }
}

/// The device operations the paths use: memory, the GEMM, one call per kernel of [`KERNELS`]
/// (arguments as the kernel's parameters, launched over `BLOCK`-thread blocks covering the
/// thread count the kernel indexes), and timing.
#[allow(missing_docs, clippy::too_many_arguments)]
pub trait Device<T: Elem> {
    /// A buffer of GEMM elements.
    type Buf;
    /// A buffer of f32.
    type Buf32;
    /// Uploads `v`, converted to `T` on the host.
    fn upload(&self, v: &[f32]) -> Result<Self::Buf, GpuError>;
    fn upload32(&self, v: &[f32]) -> Result<Self::Buf32, GpuError>;
    /// `n` zeroed elements (at least one is allocated).
    fn zeros(&self, n: usize) -> Result<Self::Buf, GpuError>;
    fn zeros32(&self, n: usize) -> Result<Self::Buf32, GpuError>;
    /// Copies the buffer back after all queued work.
    fn download32(&self, b: &Self::Buf32) -> Result<Vec<f32>, GpuError>;
    /// cuBLAS GEMM with f32 accumulation: `c = alpha op(a) op(b) + beta c`.
    fn gemm(&self, g: &Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<(), GpuError>;
    /// `copy_f32` or `bf16_to_f32`.
    fn cast_to_f32(&self, x: &Self::Buf, y: &mut Self::Buf32, n: i32) -> Result<(), GpuError>;
    /// `copy_f32` or `f32_to_bf16`.
    fn cast_from_f32(&self, x: &Self::Buf32, y: &mut Self::Buf, n: i32) -> Result<(), GpuError>;
    fn gather_cols(
        &self,
        src: &Self::Buf32,
        dst: &mut Self::Buf32,
        rows: i32,
        ld: i32,
        col0: i32,
        n: i32,
    ) -> Result<(), GpuError>;
    fn add_bias(&self, y: &mut Self::Buf32, b: &Self::Buf32, rows: i32, cols: i32) -> Result<(), GpuError>;
    fn axpy(&self, y: &mut Self::Buf32, x: &Self::Buf32, n: i32) -> Result<(), GpuError>;
    fn rms_norm_heads(
        &self,
        x: &mut Self::Buf32,
        w: &Self::Buf32,
        vectors: i32,
        hd: i32,
        eps: f32,
    ) -> Result<(), GpuError>;
    fn scores(
        &self,
        q: &Self::Buf32,
        k: &Self::Buf32,
        s: &mut Self::Buf32,
        dims: [i32; 5],
        scale: f32,
    ) -> Result<(), GpuError>;
    fn softmax_rows(&self, x: &mut Self::Buf32, rows: i32, cols: i32) -> Result<(), GpuError>;
    fn context(&self, p: &Self::Buf32, v: &Self::Buf32, ctx: &mut Self::Buf32, dims: [i32; 5]) -> Result<(), GpuError>;
    /// Runs `body` after warm-up `iters` times and returns the median time in ms.
    fn timed(&self, iters: usize, body: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError>;
}

/// A size as a cuBLAS/kernel `int`.
pub fn int(n: usize) -> Result<i32, GpuError> {
    i32::try_from(n).map_err(|_| GpuError::Setup(format!("size {n} does not fit a 32-bit device int")))
}

/// Row-major `y[m, n] = x[m, k] w[n, k]^T` in cuBLAS's column-major terms: column-major, `y` is
/// `y^T[n, m]`, `x` is `x^T[k, m]` (ld `k`), `w` is `w^T[k, n]` (ld `k`), so
/// `y^T = op_T(w^T) x^T` with `m' = n`, `n' = m`.
pub fn linear_gemm(m: usize, n: usize, k: usize) -> Result<Gemm, GpuError> {
    Ok(Gemm {
        transa: Op::T,
        transb: Op::N,
        m: int(n)?,
        n: int(m)?,
        k: int(k)?,
        alpha: 1.0,
        lda: int(k)?,
        ldb: int(k)?,
        beta: 0.0,
        ldc: int(n)?,
        batch: 1,
        stride_a: 0,
        stride_b: 0,
        stride_c: 0,
    })
}

/// The paths on device `D`, element `T`.
struct Paths<'a, D, T: Elem>
where
    D: Device<T>,
{
    dev: &'a D,
    _t: std::marker::PhantomData<T>,
}

impl<D: Device<T>, T: Elem> Paths<'_, D, T> {
    fn linear(&self, x: &D::Buf, w: &D::Buf, y: &mut D::Buf, (m, n, k): (usize, usize, usize)) -> Result<(), GpuError> {
        self.dev.gemm(&linear_gemm(m, n, k)?, w, x, y)
    }

    fn f32_of(&self, x: &D::Buf, n: usize) -> Result<D::Buf32, GpuError> {
        let mut y = self.dev.zeros32(n)?;
        self.dev.cast_to_f32(x, &mut y, int(n)?)?;
        Ok(y)
    }

    fn t_of(&self, x: &D::Buf32, n: usize) -> Result<D::Buf, GpuError> {
        let mut y = self.dev.zeros(n)?;
        self.dev.cast_from_f32(x, &mut y, int(n)?)?;
        Ok(y)
    }

    fn gather(&self, src: &D::Buf32, rows: usize, ld: usize, col0: usize, n: usize) -> Result<D::Buf32, GpuError> {
        let mut dst = self.dev.zeros32(rows * n)?;
        self.dev.gather_cols(src, &mut dst, int(rows)?, int(ld)?, int(col0)?, int(n)?)?;
        Ok(dst)
    }

    fn bias(&self, y: &mut D::Buf32, b: Option<&[f32]>, rows: usize, cols: usize) -> Result<(), GpuError> {
        let Some(b) = b else { return Ok(()) };
        if b.len() != cols {
            return Err(GpuError::Setup(format!("a bias of {} values for {cols} columns", b.len())));
        }
        let bd = self.dev.upload32(b)?;
        self.dev.add_bias(y, &bd, int(rows)?, int(cols)?)
    }

    fn norm(
        &self,
        x: &mut D::Buf32,
        w: Option<&Vec<f32>>,
        vectors: usize,
        hd: usize,
        eps: Option<f64>,
    ) -> Result<(), GpuError> {
        let (Some(w), Some(eps)) = (w, eps) else { return Ok(()) };
        if w.len() != hd {
            return Err(GpuError::Setup(format!("a per-head norm of {} values for head size {hd}", w.len())));
        }
        let wd = self.dev.upload32(w)?;
        self.dev.rms_norm_heads(x, &wd, int(vectors)?, int(hd)?, eps as f32)
    }

    /// Attention from f32 q `[T, H*hd]`, k/v `[S, KV*hd]` to ctx `[T, H*hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &D::Buf32,
        k: &D::Buf32,
        v: &D::Buf32,
        t: usize,
        s: usize,
        h: usize,
        kv: usize,
        hd: usize,
    ) -> Result<D::Buf32, GpuError> {
        if kv == 0 || h % kv != 0 {
            return Err(GpuError::Setup(format!("{h} query heads do not group over {kv} kv heads")));
        }
        let dims = [int(t)?, int(s)?, int(h)?, int(kv)?, int(hd)?];
        let mut sc = self.dev.zeros32(h * t * s)?;
        self.dev.scores(q, k, &mut sc, dims, 1.0f32 / (hd as f32).sqrt())?;
        self.dev.softmax_rows(&mut sc, int(h * t)?, int(s)?)?;
        let mut ctx = self.dev.zeros32(t * h * hd)?;
        self.dev.context(&sc, v, &mut ctx, dims)?;
        Ok(ctx)
    }
}

/// Runs the fused and the split path of `p` on `dev` and times their projection GEMMs.
pub fn run_paths<T: Elem, D: Device<T>>(dev: &D, p: &Problem, iters: usize) -> Result<GpuRun, GpuError> {
    let me = Paths::<D, T> { dev, _t: std::marker::PhantomData };
    let (t, s, d, hd) = (p.x.rows, p.e.rows, p.hidden, p.head_dim);
    if p.e.cols != p.x.cols {
        return Err(GpuError::Setup(format!(
            "the fused path needs encoder states of the decoder width ({} != {})",
            p.e.cols, p.x.cols
        )));
    }
    let tp = p.ranks.len();
    if tp == 0 || hd == 0 || p.heads % tp != 0 {
        return Err(GpuError::Setup(format!("{} heads of size {hd} over {tp} ranks", p.heads)));
    }
    let (qn, kn) = (p.q_norm.as_ref(), p.k_norm.as_ref());
    let x = dev.upload(&p.x.data)?;
    let e = dev.upload(&p.e.data)?;

    // (a) Fused, as before the split: [q; k; v] over X and over E, slices kept.
    let wqkv = HostMat::stack(&[&p.wq, &p.wk, &p.wv]);
    let (nq, nkv, nqkv) = (p.wq.rows, p.wk.rows, wqkv.rows);
    let wqkv_d = dev.upload(&wqkv.data)?;
    let mut yx = dev.zeros(t * nqkv)?;
    let mut ye = dev.zeros(s * nqkv)?;
    let fused_ms = dev.timed(iters, &mut || {
        me.linear(&x, &wqkv_d, &mut yx, (t, nqkv, d))?;
        me.linear(&e, &wqkv_d, &mut ye, (s, nqkv, d))
    })?;
    let (fx, fe) = (me.f32_of(&yx, t * nqkv)?, me.f32_of(&ye, s * nqkv)?);
    let mut q = me.gather(&fx, t, nqkv, 0, nq)?;
    let mut k = me.gather(&fe, s, nqkv, nq, nkv)?;
    let mut v = me.gather(&fe, s, nqkv, nq + nkv, nkv)?;
    me.bias(&mut q, p.bq.as_deref(), t, nq)?;
    me.bias(&mut k, p.bk.as_deref(), s, nkv)?;
    me.bias(&mut v, p.bv.as_deref(), s, nkv)?;
    me.norm(&mut q, qn, t * p.heads, hd, p.norm_eps)?;
    me.norm(&mut k, kn, s * p.kv_heads, hd, p.norm_eps)?;
    let ctx = me.attention(&q, &k, &v, t, s, p.heads, p.kv_heads, hd)?;
    let ctx_t = me.t_of(&ctx, t * nq)?;
    let wo = dev.upload(&p.wo.data)?;
    let mut out = dev.zeros(t * d)?;
    me.linear(&ctx_t, &wo, &mut out, (t, d, nq))?;
    let mut fused = me.f32_of(&out, t * d)?;
    me.bias(&mut fused, p.bo.as_deref(), t, d)?;

    // (b) Split, rank by rank: q over X, kv over E, partial out_proj, partials summed.
    let mut ranks = Vec::with_capacity(tp);
    for r in &p.ranks {
        let (wq, wkv, wo) = (dev.upload(&r.wq.data)?, dev.upload(&r.wkv.data)?, dev.upload(&r.wo.data)?);
        let (yq, ykv) = (dev.zeros(t * r.wq.rows)?, dev.zeros(s * r.wkv.rows)?);
        ranks.push((wq, wkv, wo, yq, ykv));
    }
    let split_ms = dev.timed(iters, &mut || {
        for (rs, (wq, wkv, _, yq, ykv)) in p.ranks.iter().zip(ranks.iter_mut()) {
            me.linear(&x, wq, yq, (t, rs.wq.rows, d))?;
            me.linear(&e, wkv, ykv, (s, rs.wkv.rows, d))?;
        }
        Ok(())
    })?;
    let mut acc = dev.zeros32(t * d)?;
    for (rs, (_, _, wo, yq, ykv)) in p.ranks.iter().zip(&ranks) {
        let (heads, half) = (p.heads / tp, rs.wkv.rows / 2);
        let kv = half / hd;
        let mut q = me.f32_of(yq, t * rs.wq.rows)?;
        let kvf = me.f32_of(ykv, s * rs.wkv.rows)?;
        let (mut k, mut v) = (me.gather(&kvf, s, rs.wkv.rows, 0, half)?, me.gather(&kvf, s, rs.wkv.rows, half, half)?);
        me.bias(&mut q, rs.bq.as_deref(), t, rs.wq.rows)?;
        if let Some(b) = &rs.bkv {
            if b.len() != 2 * half {
                return Err(GpuError::Setup(format!("a kv bias of {} values for {} rows", b.len(), 2 * half)));
            }
            me.bias(&mut k, Some(&b[..half]), s, half)?;
            me.bias(&mut v, Some(&b[half..]), s, half)?;
        }
        me.norm(&mut q, qn, t * heads, hd, p.norm_eps)?;
        me.norm(&mut k, kn, s * kv, hd, p.norm_eps)?;
        let ctx = me.attention(&q, &k, &v, t, s, heads, kv, hd)?;
        let ctx_t = me.t_of(&ctx, t * rs.wq.rows)?;
        let mut part = dev.zeros(t * d)?;
        me.linear(&ctx_t, wo, &mut part, (t, d, rs.wq.rows))?;
        let part32 = me.f32_of(&part, t * d)?;
        dev.axpy(&mut acc, &part32, int(t * d)?)?;
    }
    me.bias(&mut acc, p.bo.as_deref(), t, d)?;
    let fused = dev.download32(&fused)?;
    let split = dev.download32(&acc)?;
    Ok(GpuRun { fused, split, fused_ms, split_ms, iters })
}
