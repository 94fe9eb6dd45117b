//! The GPU side of `validate`, with cudarc: cuBLAS for the GEMMs, NVRTC-compiled kernels for the
//! head gathers, biases, per-head RMSNorm, scores, softmax and context. Libraries are loaded at run
//! time, so this builds without CUDA and fails cleanly without it.

use super::device::{self, grid, Device, Op, BLOCK, KERNELS, KERNEL_NAMES as NAMES};
use super::problem::Problem;
use super::{GpuDtype, GpuError, GpuRun};
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;

fn cuda(op: &str) -> impl Fn(cudarc::driver::DriverError) -> GpuError + '_ {
    move |e| GpuError::Cuda { op: op.to_string(), msg: e.to_string() }
}

fn blas(op: &str) -> impl Fn(cudarc::cublas::result::CublasError) -> GpuError + '_ {
    move |e| GpuError::Cuda { op: op.to_string(), msg: e.to_string() }
}

/// An element type the GEMMs run in, with its conversion kernels.
pub trait CudaElem: device::Elem + DeviceRepr + ValidAsZeroBits + Unpin {
    /// The kernel from this type to f32.
    const TO_F32: &'static str;
    /// The kernel from f32 to this type.
    const FROM_F32: &'static str;
}

impl CudaElem for f32 {
    const TO_F32: &'static str = "copy_f32";
    const FROM_F32: &'static str = "copy_f32";
}

impl CudaElem for half::bf16 {
    const TO_F32: &'static str = "bf16_to_f32";
    const FROM_F32: &'static str = "f32_to_bf16";
}

/// Compiles [`KERNELS`] with NVRTC for `arch` (`sm_90`, or the default when `None`) and returns
/// the PTX. Runs on the host only: no GPU needed, only libnvrtc.
pub fn compile_kernels(arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    compile_ptx_with_opts(
        KERNELS,
        CompileOptions { name: Some("reshard_validate.cu".into()), arch, ..Default::default() },
    )
    .map_err(|e| GpuError::Cuda { op: "NVRTC compile".into(), msg: format!("{e:?}") })
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
        let f = $gpu.f($name)?;
        let c = cfg($n)?;
        let mut b = $gpu.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: every kernel bounds-checks its index against the sizes passed with it; the
        // paths (device.rs) allocate the buffers with those sizes, and the CPU implementation
        // of the same interface faults on any access outside them, which the tests exercise.
        unsafe { b.launch(c) }.map(|_| ()).map_err(cuda($name))
    }};
}

fn cfg(n: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig { grid_dim: (grid(n)?, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
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
        let ptx = compile_kernels(None)?;
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

    fn f(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| self.funcs.get(i))
            .ok_or_else(|| GpuError::Setup(format!("no kernel `{name}`")))
    }

    /// Runs the fused and the split path of `p` and times their projection GEMMs.
    pub fn run(&self, p: &Problem, dtype: GpuDtype, iters: usize) -> Result<GpuRun, GpuError> {
        let _ = &self.ctx;
        let run = match dtype {
            GpuDtype::F32 => device::run_paths::<f32, _>(self, p, iters)?,
            GpuDtype::Bf16 => device::run_paths::<half::bf16, _>(self, p, iters)?,
        };
        self.stream.synchronize().map_err(cuda("cuStreamSynchronize"))?;
        Ok(run)
    }
}

fn op(o: Op) -> cublasOperation_t {
    match o {
        Op::N => cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublasOperation_t::CUBLAS_OP_T,
    }
}

impl<T: CudaElem> Device<T> for Gpu
where
    CudaBlas: Gemm<T>,
{
    type Buf = CudaSlice<T>;
    type Buf32 = CudaSlice<f32>;

    fn upload(&self, v: &[f32]) -> Result<CudaSlice<T>, GpuError> {
        let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
        if host.is_empty() {
            return <Self as Device<T>>::zeros(self, 1);
        }
        self.stream.clone_htod(&host).map_err(cuda("cuMemcpyHtoD"))
    }

    fn upload32(&self, v: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
        if v.is_empty() {
            return <Self as Device<T>>::zeros32(self, 1);
        }
        self.stream.clone_htod(v).map_err(cuda("cuMemcpyHtoD"))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<T>, GpuError> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(cuda("cuMemAlloc"))
    }

    fn zeros32(&self, n: usize) -> Result<CudaSlice<f32>, GpuError> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(cuda("cuMemAlloc"))
    }

    fn download32(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>, GpuError> {
        let v = self.stream.clone_dtoh(b).map_err(cuda("cuMemcpyDtoH"))?;
        self.stream.synchronize().map_err(cuda("cuStreamSynchronize"))?;
        Ok(v)
    }

    fn gemm(&self, g: &device::Gemm, a: &CudaSlice<T>, b: &CudaSlice<T>, c: &mut CudaSlice<T>) -> Result<(), GpuError> {
        let cfg = GemmConfig {
            transa: op(g.transa),
            transb: op(g.transb),
            m: g.m,
            n: g.n,
            k: g.k,
            alpha: T::from_f32(g.alpha),
            lda: g.lda,
            ldb: g.ldb,
            beta: T::from_f32(g.beta),
            ldc: g.ldc,
        };
        // SAFETY: the same call on the CPU implementation checks cuBLAS's argument rules and that
        // every operand extent fits its buffer; the tests run every call of the paths there.
        if g.batch == 1 {
            return unsafe { self.blas.gemm(cfg, a, b, c) }.map_err(blas("cublasGemm"));
        }
        let cfg = StridedBatchedConfig {
            gemm: cfg,
            batch_size: g.batch,
            stride_a: g.stride_a,
            stride_b: g.stride_b,
            stride_c: g.stride_c,
        };
        // SAFETY: as above.
        unsafe { self.blas.gemm_strided_batched(cfg, a, b, c) }.map_err(blas("cublasGemmStridedBatched"))
    }

    fn cast_to_f32(&self, x: &CudaSlice<T>, y: &mut CudaSlice<f32>, n: i32) -> Result<(), GpuError> {
        launch!(self, T::TO_F32, n.max(0) as usize; x, &mut *y, &n)
    }

    fn cast_from_f32(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<T>, n: i32) -> Result<(), GpuError> {
        launch!(self, T::FROM_F32, n.max(0) as usize; x, &mut *y, &n)
    }

    fn gather_cols(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        rows: i32,
        ld: i32,
        col0: i32,
        n: i32,
    ) -> Result<(), GpuError> {
        let threads = (rows as i64 * n as i64).max(0) as usize;
        launch!(self, "gather_cols", threads; src, &mut *dst, &rows, &ld, &col0, &n)
    }

    fn add_bias(&self, y: &mut CudaSlice<f32>, b: &CudaSlice<f32>, rows: i32, cols: i32) -> Result<(), GpuError> {
        let threads = (rows as i64 * cols as i64).max(0) as usize;
        launch!(self, "add_bias", threads; &mut *y, b, &rows, &cols)
    }

    fn axpy(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: i32) -> Result<(), GpuError> {
        launch!(self, "axpy", n.max(0) as usize; &mut *y, x, &n)
    }

    fn rms_norm_heads(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        vectors: i32,
        hd: i32,
        eps: f32,
    ) -> Result<(), GpuError> {
        launch!(self, "rms_norm_heads", vectors.max(0) as usize; &mut *x, w, &vectors, &hd, &eps)
    }

    fn scores(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        s: &mut CudaSlice<f32>,
        dims: [i32; 5],
        scale: f32,
    ) -> Result<(), GpuError> {
        let [t, sn, h, kv, hd] = dims;
        let threads = (h as i64 * t as i64 * sn as i64).max(0) as usize;
        launch!(self, "scores", threads; q, k, &mut *s, &t, &sn, &h, &kv, &hd, &scale)
    }

    fn softmax_rows(&self, x: &mut CudaSlice<f32>, rows: i32, cols: i32) -> Result<(), GpuError> {
        launch!(self, "softmax_rows", rows.max(0) as usize; &mut *x, &rows, &cols)
    }

    fn context(
        &self,
        p: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        ctx: &mut CudaSlice<f32>,
        dims: [i32; 5],
    ) -> Result<(), GpuError> {
        let [t, s, h, kv, hd] = dims;
        let threads = (t as i64 * h as i64 * hd as i64).max(0) as usize;
        launch!(self, "context", threads; p, v, &mut *ctx, &t, &s, &h, &kv, &hd)
    }

    fn timed(&self, iters: usize, body: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
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
}
