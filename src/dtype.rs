//! Element types of safetensors tensors, as named in the file format.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An element type that reshard can slice: every type whose elements are whole bytes.
///
/// Sub-byte types (F4, F6) are rejected when a checkpoint is read: a row of them need not start
/// on a byte boundary, so they cannot be split by byte ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(missing_docs, non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
}

impl Dtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            BOOL | U8 | I8 | F8_E5M2 | F8_E4M3 | F8_E8M0 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            F64 | I64 | U64 | C64 => 8,
        }
    }

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            BOOL => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8_E5M2 => "F8_E5M2",
            F8_E4M3 => "F8_E4M3",
            F8_E8M0 => "F8_E8M0",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
            C64 => "C64",
        }
    }

    /// Whether this is a floating-point type that reshard can convert to f32 for numeric checks.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        use Dtype::*;
        Ok(match s {
            "BOOL" => BOOL,
            "U8" => U8,
            "I8" => I8,
            "F8_E5M2" => F8_E5M2,
            "F8_E4M3" => F8_E4M3,
            "F8_E8M0" => F8_E8M0,
            "I16" => I16,
            "U16" => U16,
            "F16" => F16,
            "BF16" => BF16,
            "I32" => I32,
            "U32" => U32,
            "F32" => F32,
            "F64" => F64,
            "I64" => I64,
            "U64" => U64,
            "C64" => C64,
            _ => return Err(()),
        })
    }
}

/// Converts little-endian elements of a float dtype to f32 (for numeric checks, never for output).
///
/// Returns `None` when `dtype` is not a float type.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    if !castable(dtype) {
        return None;
    }
    let n = bytes.len() / dtype.size();
    let mut w = vec![0f32; n];
    decode(dtype, bytes, &mut w, &mut vec![0u16; n]);
    Some(w)
}

/// One element of `dtype` holding `value`, little-endian: floats rounded to nearest (even),
/// integers only when `value` is a whole number in range, BOOL from 0 or 1.
pub fn encode_value(dtype: Dtype, value: f64) -> Result<Vec<u8>, String> {
    use Dtype::*;
    let int = |lo: f64, hi: f64| -> Result<f64, String> {
        if value.fract() == 0.0 && (lo..=hi).contains(&value) {
            Ok(value)
        } else {
            Err(format!("{value} is not a whole number from {lo} to {hi}, as {dtype} needs"))
        }
    };
    Ok(match dtype {
        F64 => value.to_le_bytes().to_vec(),
        F32 => (value as f32).to_le_bytes().to_vec(),
        F16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        BF16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        BOOL => vec![int(0.0, 1.0)? as u8],
        U8 => vec![int(0.0, u8::MAX as f64)? as u8],
        I8 => (int(i8::MIN as f64, i8::MAX as f64)? as i8).to_le_bytes().to_vec(),
        I16 => (int(i16::MIN as f64, i16::MAX as f64)? as i16).to_le_bytes().to_vec(),
        U16 => (int(0.0, u16::MAX as f64)? as u16).to_le_bytes().to_vec(),
        I32 => (int(i32::MIN as f64, i32::MAX as f64)? as i32).to_le_bytes().to_vec(),
        U32 => (int(0.0, u32::MAX as f64)? as u32).to_le_bytes().to_vec(),
        // Whole numbers beyond 2^53 are not all representable as f64 anyway.
        I64 => (int(-(2f64.powi(53)), 2f64.powi(53))? as i64).to_le_bytes().to_vec(),
        U64 => (int(0.0, 2f64.powi(53))? as u64).to_le_bytes().to_vec(),
        F8_E5M2 | F8_E4M3 | F8_E8M0 | C64 => return Err(format!("constants of dtype {dtype} are not supported")),
    })
}

/// Whether `cast` applies to tensors of `dtype` (float tensors are cast; others are kept).
pub fn castable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Appends the little-endian elements of `bytes` (of `src`) converted to `dst` to `out`.
///
/// Conversion goes through f32 with round-to-nearest-even (the `half` crate's slice conversions),
/// so it is deterministic: `verify` recomputes it and compares bytes. `src` and `dst` must be
/// float types; F64 is narrowed to f32 first. Works block by block on the stack: no allocation
/// beyond `out`, and the half-precision conversions use the CPU's vector instructions where
/// `half` finds them.
pub fn cast_into(src: Dtype, bytes: &[u8], dst: Dtype, out: &mut Vec<u8>) {
    if src == dst || !castable(src) || !castable(dst) {
        out.extend_from_slice(bytes);
        return;
    }
    const BLOCK: usize = 2048;
    let (ssz, dsz) = (src.size(), dst.size());
    let start = out.len();
    out.resize(start + bytes.len() / ssz * dsz, 0);
    let mut wide = [0f32; BLOCK];
    let mut bits = [0u16; BLOCK];
    for (i, o) in bytes.chunks(BLOCK * ssz).zip(out[start..].chunks_mut(BLOCK * dsz)) {
        let n = i.len() / ssz;
        let w = &mut wide[..n];
        decode(src, i, w, &mut bits[..n]);
        encode(w, dst, o, &mut bits[..n]);
    }
}

/// Little-endian `src` elements to f32; `bits` is scratch space of the same length as `w`.
fn decode(src: Dtype, i: &[u8], w: &mut [f32], bits: &mut [u16]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    match src {
        Dtype::F32 => {
            w.iter_mut().zip(i.chunks_exact(4)).for_each(|(w, c)| *w = f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        }
        Dtype::F64 => w
            .iter_mut()
            .zip(i.chunks_exact(8))
            .for_each(|(w, c)| *w = f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32),
        Dtype::F16 | Dtype::BF16 => {
            bits.iter_mut().zip(i.chunks_exact(2)).for_each(|(b, c)| *b = u16::from_le_bytes([c[0], c[1]]));
            if src == Dtype::F16 {
                bits.reinterpret_cast::<half::f16>().convert_to_f32_slice(w);
            } else {
                bits.reinterpret_cast::<half::bf16>().convert_to_f32_slice(w);
            }
        }
        _ => unreachable!("decode of a dtype castable() refuses"),
    }
}

/// f32 to little-endian `dst` elements; `bits` is scratch space of the same length as `w`.
fn encode(w: &[f32], dst: Dtype, o: &mut [u8], bits: &mut [u16]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    match dst {
        Dtype::F32 => o.chunks_exact_mut(4).zip(w).for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        Dtype::F64 => o.chunks_exact_mut(8).zip(w).for_each(|(o, v)| o.copy_from_slice(&f64::from(*v).to_le_bytes())),
        Dtype::BF16 => {
            // Round to nearest even on the bits, NaN kept quiet: what `half::bf16::from_f32` does
            // (checked by the tests), without its per-element branches.
            for (o, v) in o.chunks_exact_mut(2).zip(w) {
                let u = v.to_bits();
                let r =
                    if u & 0x7fff_ffff > 0x7f80_0000 { (u >> 16) | 0x40 } else { (u + 0x7fff + ((u >> 16) & 1)) >> 16 };
                o.copy_from_slice(&(r as u16).to_le_bytes());
            }
        }
        Dtype::F16 => {
            bits.reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(w);
            o.chunks_exact_mut(2).zip(bits.iter()).for_each(|(o, b)| o.copy_from_slice(&b.to_le_bytes()));
        }
        _ => unreachable!("encode to a dtype castable() refuses"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_value_per_dtype() {
        assert_eq!(encode_value(Dtype::F32, 1.0).unwrap(), 1f32.to_le_bytes());
        assert_eq!(encode_value(Dtype::F64, -2.5).unwrap(), (-2.5f64).to_le_bytes());
        assert_eq!(encode_value(Dtype::BF16, 1.0).unwrap(), [0x80, 0x3f]);
        assert_eq!(encode_value(Dtype::F16, 1.0).unwrap(), [0x00, 0x3c]);
        assert_eq!(encode_value(Dtype::I64, -7.0).unwrap(), (-7i64).to_le_bytes());
        assert_eq!(encode_value(Dtype::U8, 255.0).unwrap(), [255]);
        assert_eq!(encode_value(Dtype::BOOL, 1.0).unwrap(), [1]);
        assert!(encode_value(Dtype::U8, 256.0).unwrap_err().contains("from 0 to 255"));
        assert!(encode_value(Dtype::I32, 0.5).is_err());
        assert!(encode_value(Dtype::BOOL, 2.0).is_err());
        assert!(encode_value(Dtype::F8_E4M3, 1.0).unwrap_err().contains("not supported"));
    }

    #[test]
    fn casts_round_to_nearest_even() {
        let src: Vec<u8> = [1.0f32, 1.0 + 1.0 / 256.0, -2.5e-3, 65504.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        cast_into(Dtype::F32, &src, Dtype::BF16, &mut out);
        let back = to_f32(Dtype::BF16, &out).unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0, "1 + 2^-8 is a tie and rounds to even");
        assert!((back[2] + 2.5e-3).abs() < 1e-5);
        let mut h = Vec::new();
        cast_into(Dtype::F32, &src, Dtype::F16, &mut h);
        assert_eq!(to_f32(Dtype::F16, &h).unwrap()[3], 65504.0);
        let mut w = Vec::new();
        cast_into(Dtype::BF16, &out, Dtype::F32, &mut w);
        assert_eq!(to_f32(Dtype::F32, &w).unwrap(), back);
    }

    #[test]
    fn fast_f32_to_bf16_matches_half_bit_for_bit() {
        let mut vals = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            vals.push(f32::from_bits(x));
        }
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        cast_into(Dtype::F32, &src, Dtype::BF16, &mut out);
        for (v, o) in vals.iter().zip(out.chunks_exact(2)) {
            let want = half::bf16::from_f32(*v).to_bits();
            let got = u16::from_le_bytes([o[0], o[1]]);
            assert!(
                want == got || (v.is_nan() && half::bf16::from_bits(got).is_nan()),
                "{v:e}: {want:04x} vs {got:04x}"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for d in [Dtype::BF16, Dtype::F32, Dtype::F8_E4M3, Dtype::I64, Dtype::BOOL] {
            assert_eq!(d.name().parse::<Dtype>(), Ok(d));
        }
        assert!("F4".parse::<Dtype>().is_err());
        assert!("f32".parse::<Dtype>().is_err());
    }

    #[test]
    fn bf16_to_f32() {
        let one = half::bf16::from_f32(1.5).to_le_bytes();
        assert_eq!(to_f32(Dtype::BF16, &one), Some(vec![1.5]));
        assert_eq!(to_f32(Dtype::I32, &[0; 4]), None);
    }

    /// Every cast between the float types, over random bit patterns (NaN, infinities and
    /// subnormals included) and a length that is not a multiple of the block, equals the
    /// element-by-element conversion through f32 with the `half` crate's rounding.
    #[test]
    fn block_casts_match_element_conversion() {
        let floats = [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..5001 * 8)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let wide = |d: Dtype, c: &[u8]| -> f32 {
            match d {
                Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap()) as f32,
                Dtype::F32 => f32::from_le_bytes(c.try_into().unwrap()),
                Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            }
        };
        let narrow = |d: Dtype, v: f32| -> Vec<u8> {
            match d {
                Dtype::F64 => f64::from(v).to_le_bytes().to_vec(),
                Dtype::F32 => v.to_le_bytes().to_vec(),
                Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                _ => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            }
        };
        for src in floats {
            for dst in floats {
                let n = 5001;
                let input = &bytes[..n * src.size()];
                let mut out = vec![0xAA]; // appends after what is there
                cast_into(src, input, dst, &mut out);
                assert_eq!(out.len(), 1 + n * dst.size(), "{src:?} -> {dst:?}");
                for (i, (c, o)) in input.chunks_exact(src.size()).zip(out[1..].chunks_exact(dst.size())).enumerate() {
                    let v = wide(src, c);
                    let want = if src == dst { c.to_vec() } else { narrow(dst, v) };
                    let same_nan = v.is_nan() && wide(dst, o).is_nan();
                    assert!(o == want || same_nan, "{src:?} -> {dst:?} element {i}: {v:e}: {want:02x?} vs {o:02x?}");
                }
            }
        }
    }
}
