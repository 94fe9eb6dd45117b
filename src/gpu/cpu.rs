//! The CPU implementation of the device interface (`reshard validate --device cpu`).
//!
//! The GEMM follows the cuBLAS specification literally: column-major operands, `op(A)` of
//! `m x k` read as `A[i + l*lda]` (`N`) or `A[l + i*lda]` (`T`), the same for `B`,
//! `C[i + j*ldc] = alpha * sum + beta * C` with an f32 accumulator, `C` not read when `beta` is 0,
//! and cuBLAS's `CUBLAS_STATUS_INVALID_VALUE` checks on the leading dimensions. A read or write past
//! a buffer's end (undefined behaviour on a GPU) is an error here.
//!
//! The kernels are line-for-line Rust transcriptions of [`super::device::KERNELS`] (each CUDA line
//! is quoted above its Rust): the grid runs as a loop over `blockIdx.x` and `threadIdx.x`, `int`
//! arithmetic wraps as two's complement, and an out-of-bounds access is reported as the kernel's
//! fault instead of corrupting memory. We chose transcription over compiling the CUDA source for
//! the host because it needs no C compiler in `cargo test` and keeps every access bounds-checked.

use super::device::{grid, Device, Elem, Gemm, Op, BLOCK};
use super::GpuError;

/// The CPU device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    /// The name in the report.
    pub fn device_name(&self) -> String {
        "cpu (the device interface on the host: cuBLAS-spec GEMM, transcribed kernels)".into()
    }
}

/// An invalid access by one thread of a kernel.
struct Fault {
    what: &'static str,
    index: i64,
    len: usize,
}

type R<T> = Result<T, Fault>;

fn ld(buf: &[f32], index: i64) -> R<f32> {
    usize::try_from(index).ok().and_then(|i| buf.get(i)).copied().ok_or(Fault { what: "read", index, len: buf.len() })
}

fn st(buf: &mut [f32], index: i64, v: f32) -> R<()> {
    let len = buf.len();
    let slot = usize::try_from(index).ok().and_then(|i| buf.get_mut(i)).ok_or(Fault { what: "write", index, len })?;
    *slot = v;
    Ok(())
}

fn ld_t<T: Copy>(buf: &[T], index: i64) -> R<T> {
    usize::try_from(index).ok().and_then(|i| buf.get(i)).copied().ok_or(Fault { what: "read", index, len: buf.len() })
}

fn st_t<T>(buf: &mut [T], index: i64, v: T) -> R<()> {
    let len = buf.len();
    let slot = usize::try_from(index).ok().and_then(|i| buf.get_mut(i)).ok_or(Fault { what: "write", index, len })?;
    *slot = v;
    Ok(())
}

/// C's `a / b` on `int` or `long`; a zero divisor is a fault (undefined in C).
fn div(a: i64, b: i64) -> R<i64> {
    a.checked_div(b).ok_or(Fault { what: "division by zero", index: a, len: 0 })
}

fn rem(a: i64, b: i64) -> R<i64> {
    a.checked_rem(b).ok_or(Fault { what: "division by zero", index: a, len: 0 })
}

/// `int i = blockIdx.x * blockDim.x + threadIdx.x;` (unsigned arithmetic, then to `int`).
fn tid(block: u32, thread: u32) -> i32 {
    block.wrapping_mul(BLOCK).wrapping_add(thread) as i32
}

/// `long i = (long)blockIdx.x * blockDim.x + threadIdx.x;`
fn tid_long(block: u32, thread: u32) -> i64 {
    block as i64 * BLOCK as i64 + thread as i64
}

/// Runs `thread` for every thread of a launch over `n` threads, as `<<<grid(n), BLOCK>>>`.
fn launch(name: &str, n: usize, mut thread: impl FnMut(u32, u32) -> R<()>) -> Result<(), GpuError> {
    for block in 0..grid(n)? {
        for t in 0..BLOCK {
            thread(block, t).map_err(|f| GpuError::Cuda {
                op: name.to_string(),
                msg: format!(
                    "thread {} of the cpu grid: invalid {} at index {} of a {}-element buffer",
                    tid_long(block, t),
                    f.what,
                    f.index,
                    f.len
                ),
            })?;
        }
    }
    Ok(())
}

fn invalid(why: String) -> GpuError {
    GpuError::Cuda { op: "cublasGemmEx".into(), msg: format!("CUBLAS_STATUS_INVALID_VALUE: {why}") }
}

/// Checks that a column-major `rows x cols` operand with leading dimension `ld`, starting `off`
/// elements in, fits `len`.
fn fits(name: &str, (rows, cols, ld, off): (i64, i64, i64, i64), len: usize) -> Result<(), GpuError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1) + (cols - 1) * ld + off;
    if last >= len as i64 {
        return Err(GpuError::Cuda {
            op: "cublasGemmEx".into(),
            msg: format!(
                "{name} of {rows}x{cols} with ld {ld} at offset {off} reaches element {last} of a {len}-element buffer (undefined on a GPU)"
            ),
        });
    }
    Ok(())
}

/// `C_p = alpha op(A_p) op(B_p) + beta C_p` for each batch entry `p`, as the cuBLAS documentation
/// defines `cublasGemmStridedBatchedEx` (and `cublasGemmEx` at batch 1).
pub fn gemm<T: Elem>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) -> Result<(), GpuError> {
    let (m, n, k) = (g.m as i64, g.n as i64, g.k as i64);
    if m < 0 || n < 0 || k < 0 || g.batch < 0 {
        return Err(invalid(format!("m {m}, n {n}, k {k}, batch {}", g.batch)));
    }
    if g.stride_a < 0 || g.stride_b < 0 || g.stride_c < 0 {
        return Err(invalid("a negative stride (not supported here)".into()));
    }
    // op(A) is m x k: A is m x k (N) or k x m (T), lda >= its rows.
    let (a_rows, a_cols) = if g.transa == Op::N { (m, k) } else { (k, m) };
    let (b_rows, b_cols) = if g.transb == Op::N { (k, n) } else { (n, k) };
    let (lda, ldb, ldc) = (g.lda as i64, g.ldb as i64, g.ldc as i64);
    if lda < a_rows.max(1) {
        return Err(invalid(format!("lda {lda} < {}", a_rows.max(1))));
    }
    if ldb < b_rows.max(1) {
        return Err(invalid(format!("ldb {ldb} < {}", b_rows.max(1))));
    }
    if ldc < m.max(1) {
        return Err(invalid(format!("ldc {ldc} < {}", m.max(1))));
    }
    if m == 0 || n == 0 || g.batch == 0 {
        return Ok(());
    }
    let last = g.batch as i64 - 1;
    if k > 0 {
        fits("A", (a_rows, a_cols, lda, last * g.stride_a), a.len())?;
        fits("B", (b_rows, b_cols, ldb, last * g.stride_b), b.len())?;
    }
    fits("C", (m, n, ldc, last * g.stride_c), c.len())?;
    let at = |i: i64, l: i64| if g.transa == Op::N { i + l * lda } else { l + i * lda };
    let bt = |l: i64, j: i64| if g.transb == Op::N { l + j * ldb } else { j + l * ldb };
    // Every index below is within the extents checked above (the last batch entry reaches
    // furthest, strides being non-negative).
    for p in 0..=last {
        let (oa, ob, oc) = (p * g.stride_a, p * g.stride_b, p * g.stride_c);
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0f32;
                for l in 0..k {
                    acc += a[(oa + at(i, l)) as usize].load() * b[(ob + bt(l, j)) as usize].load();
                }
                let ci = (oc + i + j * ldc) as usize;
                let old = if g.beta == 0.0 { 0.0 } else { g.beta * c[ci].load() };
                c[ci] = T::store(g.alpha * acc + old);
            }
        }
    }
    Ok(())
}

impl<T: Elem> Device<T> for Cpu {
    type Buf = Vec<T>;
    type Buf32 = Vec<f32>;

    fn upload(&self, v: &[f32]) -> Result<Vec<T>, GpuError> {
        Ok(v.iter().map(|&x| T::from_f32(x)).collect())
    }

    fn upload32(&self, v: &[f32]) -> Result<Vec<f32>, GpuError> {
        Ok(v.to_vec())
    }

    fn zeros(&self, n: usize) -> Result<Vec<T>, GpuError> {
        Ok(vec![T::from_f32(0.0); n.max(1)])
    }

    fn zeros32(&self, n: usize) -> Result<Vec<f32>, GpuError> {
        Ok(vec![0.0; n.max(1)])
    }

    fn download32(&self, b: &Vec<f32>) -> Result<Vec<f32>, GpuError> {
        Ok(b.clone())
    }

    fn gemm(&self, g: &Gemm, a: &Vec<T>, b: &Vec<T>, c: &mut Vec<T>) -> Result<(), GpuError> {
        gemm(g, a, b, c)
    }

    fn cast_to_f32(&self, x: &Vec<T>, y: &mut Vec<f32>, n: i32) -> Result<(), GpuError> {
        launch("to_f32", n.max(0) as usize, |b, t| {
            let i = tid(b, t);
            // if (i < n) y[i] = x[i];  /  y[i] = __uint_as_float(((unsigned int)x[i]) << 16);
            if i < n {
                st(y, i as i64, ld_t(x, i as i64)?.kernel_to_f32())?;
            }
            Ok(())
        })
    }

    fn cast_from_f32(&self, x: &Vec<f32>, y: &mut Vec<T>, n: i32) -> Result<(), GpuError> {
        launch("from_f32", n.max(0) as usize, |b, t| {
            let i = tid(b, t);
            // if (i < n) { ... y[i] = (unsigned short)(u >> 16); }
            if i < n {
                st_t(y, i as i64, T::kernel_from_f32(ld(x, i as i64)?))?;
            }
            Ok(())
        })
    }

    fn gather_cols(
        &self,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        rows: i32,
        ldm: i32,
        col0: i32,
        n: i32,
    ) -> Result<(), GpuError> {
        launch("gather_cols", rows.wrapping_mul(n).max(0) as usize, |b, t| {
            // int i = blockIdx.x * blockDim.x + threadIdx.x;
            let i = tid(b, t);
            // if (i < rows * n) { int r = i / n, c = i % n; dst[i] = src[(long)r * ld + col0 + c]; }
            if i < rows.wrapping_mul(n) {
                let (r, c) = (div(i as i64, n as i64)?, rem(i as i64, n as i64)?);
                st(dst, i as i64, ld(src, r * ldm as i64 + col0 as i64 + c)?)?;
            }
            Ok(())
        })
    }

    fn add_bias(&self, y: &mut Vec<f32>, bias: &Vec<f32>, rows: i32, cols: i32) -> Result<(), GpuError> {
        launch("add_bias", rows.wrapping_mul(cols).max(0) as usize, |b, t| {
            let i = tid(b, t);
            // if (i < rows * cols) y[i] += b[i % cols];
            if i < rows.wrapping_mul(cols) {
                let v = ld(y, i as i64)? + ld(bias, rem(i as i64, cols as i64)?)?;
                st(y, i as i64, v)?;
            }
            Ok(())
        })
    }

    fn axpy(&self, y: &mut Vec<f32>, x: &Vec<f32>, n: i32) -> Result<(), GpuError> {
        launch("axpy", n.max(0) as usize, |b, t| {
            let i = tid(b, t);
            // if (i < n) y[i] += x[i];
            if i < n {
                let v = ld(y, i as i64)? + ld(x, i as i64)?;
                st(y, i as i64, v)?;
            }
            Ok(())
        })
    }

    fn rms_norm_heads(&self, x: &mut Vec<f32>, w: &Vec<f32>, vectors: i32, hd: i32, eps: f32) -> Result<(), GpuError> {
        launch("rms_norm_heads", vectors.max(0) as usize, |b, t| {
            let i = tid(b, t);
            // if (i >= vectors) return;
            if i >= vectors {
                return Ok(());
            }
            // float* p = x + (long)i * hd;
            let p = i as i64 * hd as i64;
            // float ss = 0.f;
            let mut ss = 0f32;
            // for (int d = 0; d < hd; d++) ss += p[d] * p[d];
            for d in 0..hd as i64 {
                ss += ld(x, p + d)? * ld(x, p + d)?;
            }
            // float r = rsqrtf(ss / hd + eps);
            let r = 1.0 / (ss / hd as f32 + eps).sqrt();
            // for (int d = 0; d < hd; d++) p[d] = p[d] * r * w[d];
            for d in 0..hd as i64 {
                let v = ld(x, p + d)? * r * ld(w, d)?;
                st(x, p + d, v)?;
            }
            Ok(())
        })
    }

    fn scores(&self, q: &Vec<f32>, k: &Vec<f32>, s: &mut Vec<f32>, dims: [i32; 5], scale: f32) -> Result<(), GpuError> {
        let [tt, ss, hh, kvn, hd] = dims.map(|v| v as i64);
        launch("scores", (hh * tt * ss).max(0) as usize, |b, th| {
            // long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
            let i = tid_long(b, th);
            // if (i >= (long)H * T * S) return;
            if i >= hh * tt * ss {
                return Ok(());
            }
            // int h = i / ((long)T * S), t = (i / S) % T, j = i % S, kh = h / (H / KV);
            let h = div(i, tt * ss)?;
            let t = rem(div(i, ss)?, tt)?;
            let j = rem(i, ss)?;
            let kh = div(h, div(hh, kvn)?)?;
            // const float* qp = q + ((long)t * H + h) * hd;
            let qp = (t * hh + h) * hd;
            // const float* kp = k + ((long)j * KV + kh) * hd;
            let kp = (j * kvn + kh) * hd;
            // float acc = 0.f;
            let mut acc = 0f32;
            // for (int d = 0; d < hd; d++) acc += qp[d] * kp[d];
            for d in 0..hd {
                acc += ld(q, qp + d)? * ld(k, kp + d)?;
            }
            // s[i] = acc * scale;
            st(s, i, acc * scale)
        })
    }

    fn softmax_rows(&self, x: &mut Vec<f32>, rows: i32, cols: i32) -> Result<(), GpuError> {
        launch("softmax_rows", rows.max(0) as usize, |b, t| {
            let r = tid(b, t);
            // if (r >= rows) return;
            if r >= rows {
                return Ok(());
            }
            // float* p = x + (long)r * cols;
            let p = r as i64 * cols as i64;
            // float m = -3.402823466e+38f;
            let mut m = -3.402_823_5e38_f32;
            // for (int j = 0; j < cols; j++) m = fmaxf(m, p[j]);
            for j in 0..cols as i64 {
                m = m.max(ld(x, p + j)?);
            }
            // float z = 0.f;
            let mut z = 0f32;
            // for (int j = 0; j < cols; j++) { p[j] = expf(p[j] - m); z += p[j]; }
            for j in 0..cols as i64 {
                let e = (ld(x, p + j)? - m).exp();
                st(x, p + j, e)?;
                z += ld(x, p + j)?;
            }
            // for (int j = 0; j < cols; j++) p[j] /= z;
            for j in 0..cols as i64 {
                let v = ld(x, p + j)? / z;
                st(x, p + j, v)?;
            }
            Ok(())
        })
    }

    fn context(&self, p: &Vec<f32>, v: &Vec<f32>, ctx: &mut Vec<f32>, dims: [i32; 5]) -> Result<(), GpuError> {
        let [tt, ss, hh, kvn, hd] = dims.map(|v| v as i64);
        launch("context", (tt * hh * hd).max(0) as usize, |b, th| {
            // long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
            let i = tid_long(b, th);
            // if (i >= (long)T * H * hd) return;
            if i >= tt * hh * hd {
                return Ok(());
            }
            // int t = i / ((long)H * hd), h = (i / hd) % H, d = i % hd, kh = h / (H / KV);
            let t = div(i, hh * hd)?;
            let h = rem(div(i, hd)?, hh)?;
            let d = rem(i, hd)?;
            let kh = div(h, div(hh, kvn)?)?;
            // const float* pp = p + ((long)h * T + t) * S;
            let pp = (h * tt + t) * ss;
            // float acc = 0.f;
            let mut acc = 0f32;
            // for (int j = 0; j < S; j++) acc += pp[j] * v[((long)j * KV + kh) * hd + d];
            for j in 0..ss {
                acc += ld(p, pp + j)? * ld(v, (j * kvn + kh) * hd + d)?;
            }
            // ctx[i] = acc;
            st(ctx, i, acc)
        })
    }

    fn timed(&self, iters: usize, body: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
        // No warm-up on the host: the times only say the flow ran, they are not GPU numbers.
        let mut times = Vec::with_capacity(iters.max(1));
        for _ in 0..iters.max(1) {
            let start = std::time::Instant::now();
            body()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times.get(times.len() / 2).copied().unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::device::linear_gemm;

    /// Row-major `x[m,k] w[n,k]^T` in f64.
    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn gemm_follows_the_cublas_spec() {
        let (m, n, k) = (3, 5, 4);
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        let mut y = vec![0f32; m * n];
        gemm(&linear_gemm(m, n, k).unwrap(), &w, &x, &mut y).unwrap();
        let want = naive(&x, &w, m, n, k);
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{y:?} {want:?}");

        // Column-major with op N on both: C[2x2] = A[2x3] B[3x2], A = [[1,2,3],[4,5,6]].
        let a = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let b = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let mut c = [10.0f32; 4];
        let g = Gemm {
            transa: Op::N,
            transb: Op::N,
            m: 2,
            n: 2,
            k: 3,
            alpha: 2.0,
            lda: 2,
            ldb: 3,
            beta: 1.0,
            ldc: 2,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        };
        gemm(&g, &a, &b, &mut c).unwrap();
        assert_eq!(c, [12.0, 18.0, 20.0, 32.0]);

        // Strided batch of 2: the second entry uses A and B shifted by their strides, C by its own;
        // B shared (stride 0).
        let a2: Vec<f32> = a.iter().chain(a.iter().map(|v| v * 10.0).collect::<Vec<_>>().iter()).copied().collect();
        let mut c2 = [0f32; 8];
        let gb = Gemm { alpha: 1.0, beta: 0.0, batch: 2, stride_a: 6, stride_b: 0, stride_c: 4, ..g };
        gemm(&gb, &a2, &b, &mut c2).unwrap();
        assert_eq!(c2, [1.0, 4.0, 5.0, 11.0, 10.0, 40.0, 50.0, 110.0]);
        assert!(gemm(&Gemm { batch: 3, ..gb }, &a2, &b, &mut c2).is_err(), "a batch past A's end");

        // beta 0 does not read C (NaN stays out).
        let mut c = [f32::NAN; 4];
        gemm(&Gemm { beta: 0.0, alpha: 1.0, ..g }, &a, &b, &mut c).unwrap();
        assert_eq!(c, [1.0, 4.0, 5.0, 11.0]);
    }

    #[test]
    fn gemm_wrong_arguments_give_wrong_numbers_or_errors() {
        let (m, n, k) = (3, 5, 4);
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        let want = naive(&x, &w, m, n, k);
        let good = linear_gemm(m, n, k).unwrap();
        let wrong = |y: &[f32]| y.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3);
        // A transposed operand: lda k < m' = n is invalid in cuBLAS.
        let mut y = vec![0f32; m * n];
        assert!(gemm(&Gemm { transa: Op::N, ..good }, &w, &x, &mut y)
            .unwrap_err()
            .to_string()
            .contains("INVALID_VALUE"));
        // Transposed with a valid leading dimension: wrong numbers.
        let mut y = vec![0f32; m * n];
        gemm(&Gemm { transa: Op::N, lda: n as i32, ..good }, &w, &x, &mut y).unwrap();
        assert!(wrong(&y));
        // B transposed (ldb covers it): wrong numbers.
        let mut y = vec![0f32; m * n];
        gemm(&Gemm { transb: Op::T, ldb: m as i32, ..good }, &w, &x, &mut y).unwrap();
        assert!(wrong(&y));
        // A wrong leading dimension over a larger buffer: wrong numbers; over the exact one: past its end.
        let mut wpad = w.clone();
        wpad.extend(data(8, 3));
        let mut y = vec![0f32; m * n];
        gemm(&Gemm { lda: k as i32 + 1, ..good }, &wpad, &x, &mut y).unwrap();
        assert!(wrong(&y));
        assert!(gemm(&Gemm { lda: k as i32 + 1, ..good }, &w, &x, &mut y)
            .unwrap_err()
            .to_string()
            .contains("undefined"));
        assert!(gemm(&Gemm { ldc: 2, ..good }, &w, &x, &mut y).is_err());
        assert!(gemm(&Gemm { m: -1, ..good }, &w, &x, &mut y).is_err());
    }

    #[test]
    fn kernels_fault_instead_of_reading_out_of_bounds() {
        let cpu = Cpu;
        let src = vec![1.0f32; 6];
        let mut dst = vec![0.0f32; 6];
        let e = Device::<f32>::gather_cols(&cpu, &src, &mut dst, 2, 3, 1, 3).unwrap_err();
        assert!(e.to_string().contains("invalid read at index 6 of a 6-element buffer"), "{e}");
        let mut s = vec![0.0f32; 4];
        let e = Device::<f32>::scores(&cpu, &src, &src, &mut s, [1, 2, 2, 0, 1], 1.0).unwrap_err();
        assert!(e.to_string().contains("division by zero"), "{e}");
    }

    #[test]
    fn bf16_kernels_round_to_nearest_even() {
        for v in [1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -3.3, 65504.0, 1e-20] {
            assert_eq!(half::bf16::kernel_from_f32(v), half::bf16::from_f32(v), "{v}");
            assert_eq!(half::bf16::from_f32(v).kernel_to_f32(), half::bf16::from_f32(v).to_f32());
        }
    }
}
