//! Deliberate mutations of the device calls (issue #15): each wrong call must make `validate`'s
//! check fail on the CPU implementation, as it would on a GPU. A [`Mutant`] is the CPU device
//! with one call made wrong; its buffers carry junk past their end, as a GPU allocation has
//! neighbours, so a wrong leading dimension reads wrong numbers rather than stopping at the end.

use super::cpu::Cpu;
use super::device::{run_paths, Device, Elem, Gemm, Op};
use super::problem::{Preset, Problem};
use super::{compare, GpuDtype, GpuError};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mutation {
    None,
    /// `CUBLAS_OP_N` instead of `CUBLAS_OP_T` on the weights (lda = m, so cuBLAS accepts it: the row-major weights read as column-major).
    TransposedOperand,
    /// `lda` of the weights one more than their row length.
    WrongLeadingDimension,
    /// Softmax down each column of the `[H*T, S]` scores instead of along each row.
    SoftmaxWrongAxis,
}

struct Mutant(Mutation);

fn padded<T: Copy>(mut v: Vec<T>, junk: T) -> Vec<T> {
    let n = v.len();
    v.extend(std::iter::repeat_n(junk, n + 64));
    v
}

#[allow(clippy::too_many_arguments)]
impl<T: Elem> Device<T> for Mutant {
    type Buf = Vec<T>;
    type Buf32 = Vec<f32>;
    fn upload(&self, v: &[f32]) -> Result<Vec<T>, GpuError> {
        Ok(padded(Device::<T>::upload(&Cpu, v)?, T::from_f32(0.75)))
    }
    fn upload32(&self, v: &[f32]) -> Result<Vec<f32>, GpuError> {
        Ok(padded(v.to_vec(), 0.75))
    }
    fn zeros(&self, n: usize) -> Result<Vec<T>, GpuError> {
        Ok(padded(Device::<T>::zeros(&Cpu, n)?, T::from_f32(0.75)))
    }
    fn zeros32(&self, n: usize) -> Result<Vec<f32>, GpuError> {
        Ok(padded(Device::<T>::zeros32(&Cpu, n)?, 0.75))
    }
    fn download32(&self, b: &Vec<f32>) -> Result<Vec<f32>, GpuError> {
        Device::<T>::download32(&Cpu, b)
    }
    fn gemm(&self, g: &Gemm, a: &Vec<T>, b: &Vec<T>, c: &mut Vec<T>) -> Result<(), GpuError> {
        let g = match self.0 {
            Mutation::TransposedOperand => Gemm { transa: Op::N, lda: g.m, ..*g },
            Mutation::WrongLeadingDimension => Gemm { lda: g.lda + 1, ..*g },
            _ => *g,
        };
        Device::<T>::gemm(&Cpu, &g, a, b, c)
    }
    fn cast_to_f32(&self, x: &Vec<T>, y: &mut Vec<f32>, n: i32) -> Result<(), GpuError> {
        Device::<T>::cast_to_f32(&Cpu, x, y, n)
    }
    fn cast_from_f32(&self, x: &Vec<f32>, y: &mut Vec<T>, n: i32) -> Result<(), GpuError> {
        Device::<T>::cast_from_f32(&Cpu, x, y, n)
    }
    fn gather_cols(&self, s: &Vec<f32>, d: &mut Vec<f32>, r: i32, l: i32, c: i32, n: i32) -> Result<(), GpuError> {
        Device::<T>::gather_cols(&Cpu, s, d, r, l, c, n)
    }
    fn add_bias(&self, y: &mut Vec<f32>, b: &Vec<f32>, rows: i32, cols: i32) -> Result<(), GpuError> {
        Device::<T>::add_bias(&Cpu, y, b, rows, cols)
    }
    fn axpy(&self, y: &mut Vec<f32>, x: &Vec<f32>, n: i32) -> Result<(), GpuError> {
        Device::<T>::axpy(&Cpu, y, x, n)
    }
    fn rms_norm_heads(&self, x: &mut Vec<f32>, w: &Vec<f32>, v: i32, hd: i32, eps: f32) -> Result<(), GpuError> {
        Device::<T>::rms_norm_heads(&Cpu, x, w, v, hd, eps)
    }
    fn scores(&self, q: &Vec<f32>, k: &Vec<f32>, s: &mut Vec<f32>, d: [i32; 5], scale: f32) -> Result<(), GpuError> {
        Device::<T>::scores(&Cpu, q, k, s, d, scale)
    }
    fn softmax_rows(&self, x: &mut Vec<f32>, rows: i32, cols: i32) -> Result<(), GpuError> {
        if self.0 != Mutation::SoftmaxWrongAxis {
            return Device::<T>::softmax_rows(&Cpu, x, rows, cols);
        }
        let (rows, cols) = (rows as usize, cols as usize);
        for c in 0..cols {
            let m = (0..rows).map(|r| x[r * cols + c]).fold(f32::MIN, f32::max);
            let z: f32 = (0..rows).map(|r| (x[r * cols + c] - m).exp()).sum();
            for r in 0..rows {
                x[r * cols + c] = (x[r * cols + c] - m).exp() / z;
            }
        }
        Ok(())
    }
    fn context(&self, p: &Vec<f32>, v: &Vec<f32>, c: &mut Vec<f32>, d: [i32; 5]) -> Result<(), GpuError> {
        Device::<T>::context(&Cpu, p, v, c, d)
    }
    fn timed(&self, iters: usize, body: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
        Device::<T>::timed(&Cpu, iters, body)
    }
}

/// Whether the check passes for `p` on `dev`: `Err` (a device error) counts as failing.
fn passes<D: Device<f32> + Device<half::bf16>>(dev: &D, p: &Problem, dtype: GpuDtype) -> Result<bool, String> {
    let run = match dtype {
        GpuDtype::F32 => run_paths::<f32, _>(dev, p, 1),
        GpuDtype::Bf16 => run_paths::<half::bf16, _>(dev, p, 1),
    };
    match run {
        Ok(run) => Ok(compare(p, &run, dtype).passed),
        Err(e) => Err(e.to_string()),
    }
}

fn problems() -> Vec<Problem> {
    // MHA with biases, and GQA with q/k norms over kv heads split and replicated.
    vec![
        Problem::synthetic(Preset::BartLarge, 4, Some(4), 3, 6, 1),
        Problem::synthetic(Preset::Mllama11b, 4, Some(4), 3, 6, 2),
        Problem::synthetic(Preset::Mllama11b, 16, Some(4), 3, 6, 3),
    ]
}

#[test]
fn unmutated_calls_pass_on_padded_buffers() {
    for p in problems() {
        for dtype in [GpuDtype::F32, GpuDtype::Bf16] {
            assert_eq!(passes(&Mutant(Mutation::None), &p, dtype), Ok(true), "{} {dtype:?}", p.label);
        }
    }
}

#[test]
fn each_wrong_device_call_fails_the_check() {
    for m in [Mutation::TransposedOperand, Mutation::WrongLeadingDimension, Mutation::SoftmaxWrongAxis] {
        for p in problems() {
            for dtype in [GpuDtype::F32, GpuDtype::Bf16] {
                // Wrong numbers, not a device error: each mutant is a valid cuBLAS/kernel call.
                assert_eq!(passes(&Mutant(m), &p, dtype), Ok(false), "{m:?} on {} {dtype:?} passed", p.label);
            }
        }
    }
}

#[test]
fn kv_heads_gathered_for_the_wrong_rank_fail_the_check() {
    for (preset, tp) in [(Preset::Mllama11b, 4), (Preset::Mllama11b, 8), (Preset::BartLarge, 2)] {
        let mut p = Problem::synthetic(preset, tp, Some(4), 3, 6, 4);
        assert_eq!(passes(&Cpu, &p, GpuDtype::F32), Ok(true));
        // Rank r gets the kv heads of rank r + 1 (and their biases).
        let kv: Vec<_> = p.ranks.iter().map(|r| (r.wkv.clone(), r.bkv.clone())).collect();
        for (r, shard) in p.ranks.iter_mut().enumerate() {
            (shard.wkv, shard.bkv) = kv[(r + 1) % tp].clone();
        }
        for dtype in [GpuDtype::F32, GpuDtype::Bf16] {
            assert_eq!(passes(&Cpu, &p, dtype), Ok(false), "{} tp {tp} {dtype:?}", p.label);
        }
    }
}

#[test]
fn a_leading_dimension_past_the_buffer_is_an_error_on_cpu() {
    // On exact-size buffers the CPU device refuses what would be an out-of-bounds read on a GPU.
    let g = super::device::linear_gemm(3, 8, 4).unwrap();
    let (a, b) = (vec![0f32; 32], vec![0f32; 12]);
    let mut c = vec![0f32; 24];
    let e = super::cpu::gemm(&Gemm { lda: g.lda + 1, ..g }, &a, &b, &mut c).unwrap_err();
    assert!(e.to_string().contains("undefined on a GPU"), "{e}");
}
