//! The GPU side of `validate`, with cudarc: cuBLAS for the GEMMs, NVRTC-compiled kernels for the
//! head gathers, biases, per-head RMSNorm, scores, softmax and context. Libraries are loaded at run
//! time, so this builds without CUDA and fails cleanly without it.

use super::problem::Problem;
use super::{GpuDtype, GpuError, GpuRun};
use crate::verify::forward::HostMat;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;

const KERNELS: &str = r#"
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

const NAMES: [&str; 10] = [
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

fn cuda(op: &str) -> impl Fn(cudarc::driver::DriverError) -> GpuError + '_ {
    move |e| GpuError::Cuda { op: op.to_string(), msg: e.to_string() }
}

fn blas(op: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> GpuError + '_ {
    move |e| GpuError::Cuda { op: op.to_string(), msg: e.to_string() }
}

/// An element type the GEMMs run in.
trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Unpin + 'static {
    const TO_F32: &'static str;
    const FROM_F32: &'static str;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const TO_F32: &'static str = "copy_f32";
    const FROM_F32: &'static str = "copy_f32";
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for half::bf16 {
    const TO_F32: &'static str = "bf16_to_f32";
    const FROM_F32: &'static str = "f32_to_bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

/// An open GPU: context, stream, cuBLAS handle and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: Vec<CudaFunction>,
    name: String,
}

/// Launches kernel `$name` over `$n` threads with the given arguments.
macro_rules! launch {
    ($gpu:expr, $name:expr, $n:expr; $($arg:expr),* $(,)?) => {{
        let f = $gpu.f($name);
        let mut b = $gpu.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: every kernel bounds-checks its index against the sizes passed with it, and the
        // buffers were allocated with those sizes.
        unsafe { b.launch(cfg($n)) }.map(|_| ()).map_err(cuda($name))
    }};
}

fn cfg(n: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Opens device 0: checks for the driver, cuBLAS and NVRTC libraries first (cudarc panics when
    /// a library is missing, so this must come before any call into them), then compiles kernels.
    pub fn new() -> Result<Gpu, GpuError> {
        // SAFETY: these only try to dlopen the libraries; no CUDA call is made.
        let present = unsafe {
            [
                ("CUDA driver (libcuda.so)", sys::is_culib_present()),
                ("cuBLAS (libcublas.so)", cudarc::cublas::sys::is_culib_present()),
                ("NVRTC (libnvrtc.so)", cudarc::nvrtc::sys::is_culib_present()),
            ]
        };
        for (what, ok) in present {
            if !ok {
                return Err(GpuError::Unavailable { what: what.into(), detail: "library not found".into() });
            }
        }
        let n = CudaContext::device_count()
            .map_err(|e| GpuError::Unavailable { what: "CUDA device".into(), detail: e.to_string() })?;
        if n < 1 {
            return Err(GpuError::Unavailable {
                what: "CUDA device".into(),
                detail: "the driver reports no device".into(),
            });
        }
        let ctx = CudaContext::new(0)
            .map_err(|e| GpuError::Unavailable { what: "CUDA device".into(), detail: e.to_string() })?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device 0".into());
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(blas("cublasCreate"))?;
        let ptx = compile_ptx_with_opts(
            KERNELS,
            CompileOptions { name: Some("reshard_validate.cu".into()), ..Default::default() },
        )
        .map_err(|e| GpuError::Cuda { op: "NVRTC compile".into(), msg: format!("{e:?}") })?;
        let module = ctx.load_module(ptx).map_err(cuda("cuModuleLoadData"))?;
        let funcs = NAMES
            .iter()
            .map(|n| module.load_function(n).map_err(cuda("cuModuleGetFunction")))
            .collect::<Result<_, _>>()?;
        Ok(Gpu { ctx, stream, blas, funcs, name })
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        self.name.clone()
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[NAMES.iter().position(|n| *n == name).expect("known kernel")]
    }

    fn up<T: Elem>(&self, v: &[f32]) -> Result<CudaSlice<T>, GpuError> {
        let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
        self.stream.clone_htod(&host).map_err(cuda("cuMemcpyHtoD"))
    }

    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>, GpuError> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(cuda("cuMemAlloc"))
    }

    /// Row-major `y[m, n] = x[m, k] w[n, k]^T (+ beta y)` in cuBLAS's column-major terms.
    fn gemm<T: Elem>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<(), GpuError>
    where
        CudaBlas: Gemm<T>,
    {
        let c = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: T::from_f32(1.0),
            lda: k as i32,
            ldb: k as i32,
            beta: T::from_f32(0.0),
            ldc: n as i32,
        };
        // SAFETY: the buffers were allocated with exactly m*k, n*k and m*n elements.
        unsafe { self.blas.gemm(c, w, x, y) }.map_err(blas("cublasGemm"))
    }

    fn cast_to_f32<T: Elem>(&self, x: &CudaSlice<T>, n: usize) -> Result<CudaSlice<f32>, GpuError> {
        let mut y = self.zeros::<f32>(n)?;
        let ni = n as i32;
        launch!(self, T::TO_F32, n; x, &mut y, &ni)?;
        Ok(y)
    }

    fn cast_from_f32<T: Elem>(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<T>, GpuError> {
        let mut y = self.zeros::<T>(n)?;
        let ni = n as i32;
        launch!(self, T::FROM_F32, n; x, &mut y, &ni)?;
        Ok(y)
    }

    fn gather(
        &self,
        src: &CudaSlice<f32>,
        rows: usize,
        ld: usize,
        col0: usize,
        n: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let mut dst = self.zeros::<f32>(rows * n)?;
        let (r, l, c, k) = (rows as i32, ld as i32, col0 as i32, n as i32);
        launch!(self, "gather_cols", rows * n; src, &mut dst, &r, &l, &c, &k)?;
        Ok(dst)
    }

    fn bias(&self, y: &mut CudaSlice<f32>, b: Option<&[f32]>, rows: usize, cols: usize) -> Result<(), GpuError> {
        let Some(b) = b else { return Ok(()) };
        let bd = self.up::<f32>(b)?;
        let (r, c) = (rows as i32, cols as i32);
        launch!(self, "add_bias", rows * cols; &mut *y, &bd, &r, &c)
    }

    fn norm(
        &self,
        x: &mut CudaSlice<f32>,
        w: Option<&Vec<f32>>,
        vectors: usize,
        hd: usize,
        eps: Option<f64>,
    ) -> Result<(), GpuError> {
        let (Some(w), Some(eps)) = (w, eps) else { return Ok(()) };
        let wd = self.up::<f32>(w)?;
        let (v, h, e) = (vectors as i32, hd as i32, eps as f32);
        launch!(self, "rms_norm_heads", vectors; &mut *x, &wd, &v, &h, &e)
    }

    /// Attention from f32 q [T, H*hd], k/v [S, KV*hd] to ctx [T, H*hd].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        t: usize,
        s: usize,
        h: usize,
        kv: usize,
        hd: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let mut sc = self.zeros::<f32>(h * t * s)?;
        let (ti, si, hi, kvi, hdi, scale) =
            (t as i32, s as i32, h as i32, kv as i32, hd as i32, 1.0f32 / (hd as f32).sqrt());
        launch!(self, "scores", h * t * s; q, k, &mut sc, &ti, &si, &hi, &kvi, &hdi, &scale)?;
        let rows = (h * t) as i32;
        launch!(self, "softmax_rows", h * t; &mut sc, &rows, &si)?;
        let mut ctx = self.zeros::<f32>(t * h * hd)?;
        launch!(self, "context", t * h * hd; &sc, v, &mut ctx, &ti, &si, &hi, &kvi, &hdi)?;
        Ok(ctx)
    }

    fn timed(&self, iters: usize, mut body: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
        for _ in 0..5 {
            body()?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
            let start = self.stream.record_event(flags).map_err(cuda("cuEventRecord"))?;
            body()?;
            let end = self.stream.record_event(flags).map_err(cuda("cuEventRecord"))?;
            times.push(start.elapsed_ms(&end).map_err(cuda("cuEventElapsedTime"))? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
    }

    /// Runs the fused and the split path of `p` and times their projection GEMMs.
    pub fn run(&self, p: &Problem, dtype: GpuDtype, iters: usize) -> Result<GpuRun, GpuError> {
        let _ = &self.ctx;
        match dtype {
            GpuDtype::F32 => self.run_typed::<f32>(p, iters),
            GpuDtype::Bf16 => self.run_typed::<half::bf16>(p, iters),
        }
    }

    fn run_typed<T: Elem>(&self, p: &Problem, iters: usize) -> Result<GpuRun, GpuError>
    where
        CudaBlas: Gemm<T>,
    {
        let (t, s, d, hd) = (p.x.rows, p.e.rows, p.hidden, p.head_dim);
        if p.e.cols != p.x.cols {
            return Err(GpuError::Setup(format!(
                "the fused path needs encoder states of the decoder width ({} != {})",
                p.e.cols, p.x.cols
            )));
        }
        let (qn, kn) = (p.q_norm.as_ref(), p.k_norm.as_ref());
        let x = self.up::<T>(&p.x.data)?;
        let e = self.up::<T>(&p.e.data)?;

        // (a) Fused, as before the split: [q; k; v] over X and over E, slices kept.
        let wqkv = HostMat::stack(&[&p.wq, &p.wk, &p.wv]);
        let (nq, nkv, nqkv) = (p.wq.rows, p.wk.rows, wqkv.rows);
        let wqkv_d = self.up::<T>(&wqkv.data)?;
        let mut yx = self.zeros::<T>(t * nqkv)?;
        let mut ye = self.zeros::<T>(s * nqkv)?;
        let fused_ms = self.timed(iters, || {
            self.gemm(&x, &wqkv_d, &mut yx, (t, nqkv, d))?;
            self.gemm(&e, &wqkv_d, &mut ye, (s, nqkv, d))
        })?;
        let (fx, fe) = (self.cast_to_f32(&yx, t * nqkv)?, self.cast_to_f32(&ye, s * nqkv)?);
        let mut q = self.gather(&fx, t, nqkv, 0, nq)?;
        let mut k = self.gather(&fe, s, nqkv, nq, nkv)?;
        let mut v = self.gather(&fe, s, nqkv, nq + nkv, nkv)?;
        self.bias(&mut q, p.bq.as_deref(), t, nq)?;
        self.bias(&mut k, p.bk.as_deref(), s, nkv)?;
        self.bias(&mut v, p.bv.as_deref(), s, nkv)?;
        self.norm(&mut q, qn, t * p.heads, hd, p.norm_eps)?;
        self.norm(&mut k, kn, s * p.kv_heads, hd, p.norm_eps)?;
        let ctx = self.attention(&q, &k, &v, t, s, p.heads, p.kv_heads, hd)?;
        let ctx_t = self.cast_from_f32::<T>(&ctx, t * nq)?;
        let wo = self.up::<T>(&p.wo.data)?;
        let mut out = self.zeros::<T>(t * d)?;
        self.gemm(&ctx_t, &wo, &mut out, (t, d, nq))?;
        let mut fused = self.cast_to_f32(&out, t * d)?;
        self.bias(&mut fused, p.bo.as_deref(), t, d)?;

        // (b) Split, rank by rank: q over X, kv over E, partial out_proj, partials summed.
        let tp = p.ranks.len();
        let mut ranks = Vec::with_capacity(tp);
        for r in &p.ranks {
            let (wq, wkv, wo) = (self.up::<T>(&r.wq.data)?, self.up::<T>(&r.wkv.data)?, self.up::<T>(&r.wo.data)?);
            let (yq, ykv) = (self.zeros::<T>(t * r.wq.rows)?, self.zeros::<T>(s * r.wkv.rows)?);
            ranks.push((wq, wkv, wo, yq, ykv));
        }
        let split_ms = self.timed(iters, || {
            for (rs, (wq, wkv, _, yq, ykv)) in p.ranks.iter().zip(ranks.iter_mut()) {
                self.gemm(&x, wq, yq, (t, rs.wq.rows, d))?;
                self.gemm(&e, wkv, ykv, (s, rs.wkv.rows, d))?;
            }
            Ok(())
        })?;
        let mut acc = self.zeros::<f32>(t * d)?;
        for (rs, (_, _, wo, yq, ykv)) in p.ranks.iter().zip(&ranks) {
            let (heads, half) = (p.heads / tp, rs.wkv.rows / 2);
            let kv = half / hd;
            let mut q = self.cast_to_f32(yq, t * rs.wq.rows)?;
            let kvf = self.cast_to_f32(ykv, s * rs.wkv.rows)?;
            let (mut k, mut v) =
                (self.gather(&kvf, s, rs.wkv.rows, 0, half)?, self.gather(&kvf, s, rs.wkv.rows, half, half)?);
            self.bias(&mut q, rs.bq.as_deref(), t, rs.wq.rows)?;
            if let Some(b) = &rs.bkv {
                self.bias(&mut k, Some(&b[..half]), s, half)?;
                self.bias(&mut v, Some(&b[half..]), s, half)?;
            }
            self.norm(&mut q, qn, t * heads, hd, p.norm_eps)?;
            self.norm(&mut k, kn, s * kv, hd, p.norm_eps)?;
            let ctx = self.attention(&q, &k, &v, t, s, heads, kv, hd)?;
            let ctx_t = self.cast_from_f32::<T>(&ctx, t * rs.wq.rows)?;
            let mut part = self.zeros::<T>(t * d)?;
            self.gemm(&ctx_t, wo, &mut part, (t, d, rs.wq.rows))?;
            let part32 = self.cast_to_f32(&part, t * d)?;
            let n = (t * d) as i32;
            launch!(self, "axpy", t * d; &mut acc, &part32, &n)?;
        }
        self.bias(&mut acc, p.bo.as_deref(), t, d)?;
        let fused = self.stream.clone_dtoh(&fused).map_err(cuda("cuMemcpyDtoH"))?;
        let split = self.stream.clone_dtoh(&acc).map_err(cuda("cuMemcpyDtoH"))?;
        self.stream.synchronize().map_err(cuda("cuStreamSynchronize"))?;
        Ok(GpuRun { fused, split, fused_ms, split_ms, iters })
    }
}
