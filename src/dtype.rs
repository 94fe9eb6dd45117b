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

    /// Whether this is a floating-point type that [`to_f32`] decodes for numeric checks: the
    /// types [`castable`] accepts and the 8-bit floats.
    pub fn is_float(self) -> bool {
        castable(self) || matches!(self, Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::F8_E8M0)
    }

    /// What `convert --dtype` does to a tensor of this dtype.
    pub fn cast_rule(self) -> CastRule {
        use Dtype::*;
        match self {
            F64 | F32 | F16 | BF16 => CastRule::Cast,
            BOOL | U8 | I8 | I16 | U16 | I32 | U32 | I64 | U64 => CastRule::Keep,
            F8_E4M3 | F8_E5M2 => CastRule::Refuse(
                "8-bit floats are quantized storage whose scale is held by another tensor, so a cast would not give \
                 the model's weights",
            ),
            F8_E8M0 => CastRule::Refuse("F8_E8M0 holds the power-of-two scales of a quantized format, not weights"),
            C64 => CastRule::Refuse("a complex tensor has no real-valued cast"),
        }
    }
}

/// What `convert --dtype` does to a tensor, by its dtype ([`Dtype::cast_rule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CastRule {
    /// F64, F32, F16, BF16: cast, rounding to nearest even.
    Cast,
    /// Integers and BOOL (indices, masks, packed quantized data): written as they are.
    Keep,
    /// 8-bit floats and C64: `--dtype` is refused, for the reason given.
    Refuse(&'static str),
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
/// Every value of every float type is exact in f32, 8-bit floats included.
///
/// Returns `None` when `dtype` is not a float type ([`Dtype::is_float`]).
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let f8: fn(u8) -> f32 = match dtype {
        Dtype::F8_E4M3 => f8_e4m3_to_f32,
        Dtype::F8_E5M2 => f8_e5m2_to_f32,
        Dtype::F8_E8M0 => f8_e8m0_to_f32,
        d if castable(d) => {
            let n = bytes.len() / d.size();
            let mut w = vec![0f32; n];
            decode(d, bytes, &mut w, &mut vec![0u16; n]);
            return Some(w);
        }
        _ => return None,
    };
    Some(bytes.iter().map(|&b| f8(b)).collect())
}

/// An F8_E4M3 value (torch's `float8_e4m3fn`: bias 7, no infinities, NaN at `S.1111.111`,
/// largest 448) as f32, exactly.
pub fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0x0f, b & 0x07);
    if e == 0x0f && m == 0x07 {
        return f32::NAN.copysign(sign);
    }
    // Subnormals (e = 0) are m/8 * 2^-6; normals (1 + m/8) * 2^(e-7). Both exact in f32.
    let v = if e == 0 {
        f32::from(m) / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + f32::from(m) / 8.0) * 2f32.powi(i32::from(e) - 7)
    };
    sign * v
}

/// An F8_E5M2 value (torch's `float8_e5m2`: bias 15, IEEE infinities and NaNs) as f32, exactly:
/// its bits are the upper byte of an IEEE half.
pub fn f8_e5m2_to_f32(b: u8) -> f32 {
    half::f16::from_bits(u16::from(b) << 8).to_f32()
}

/// An F8_E8M0 value (torch's `float8_e8m0fnu`: unsigned exponent only, 2^(e-127), NaN at 0xff)
/// as f32, exactly (2^-127 is an f32 subnormal).
pub fn f8_e8m0_to_f32(b: u8) -> f32 {
    if b == 0xff {
        f32::NAN
    } else {
        f32::from_bits(if b == 0 { 0x0040_0000 } else { u32::from(b) << 23 })
    }
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

/// Whether tensors of `dtype` can be cast (and be a cast's target): F64, F32, F16 and BF16. See
/// [`Dtype::cast_rule`] for what `--dtype` does to the others.
pub fn castable(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Appends the little-endian elements of `bytes` (of `src`) converted to `dst` to `out`; returns
/// `false`, appending nothing, when `src` or `dst` is not [`castable`] (and differs from the
/// other), so that no caller can write bytes of one dtype under the name of another.
///
/// Conversion goes through f32 with round-to-nearest-even (the `half` crate's slice conversions),
/// so it is deterministic: `verify` recomputes it and compares bytes. F64 is narrowed to f32
/// first; NaN stays NaN (quiet), infinities stay infinite, and a finite value beyond the target's
/// range becomes an infinity, as in IEEE arithmetic. Works block by block on the stack: no
/// allocation beyond `out`, and the half-precision conversions use the CPU's vector instructions
/// where `half` finds them.
#[must_use]
pub fn cast_into(src: Dtype, bytes: &[u8], dst: Dtype, out: &mut Vec<u8>) -> bool {
    if src == dst {
        out.extend_from_slice(bytes);
        return true;
    }
    if !castable(src) || !castable(dst) {
        return false;
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
    true
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
        assert!(cast_into(Dtype::F32, &src, Dtype::BF16, &mut out));
        let back = to_f32(Dtype::BF16, &out).unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0, "1 + 2^-8 is a tie and rounds to even");
        assert!((back[2] + 2.5e-3).abs() < 1e-5);
        let mut h = Vec::new();
        assert!(cast_into(Dtype::F32, &src, Dtype::F16, &mut h));
        assert_eq!(to_f32(Dtype::F16, &h).unwrap()[3], 65504.0);
        let mut w = Vec::new();
        assert!(cast_into(Dtype::BF16, &out, Dtype::F32, &mut w));
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
        assert!(cast_into(Dtype::F32, &src, Dtype::BF16, &mut out));
        for (v, o) in vals.iter().zip(out.chunks_exact(2)) {
            let want = half::bf16::from_f32(*v).to_bits();
            let got = u16::from_le_bytes([o[0], o[1]]);
            assert!(
                want == got || (v.is_nan() && half::bf16::from_bits(got).is_nan()),
                "{v:e}: {want:04x} vs {got:04x}"
            );
        }
    }

    /// Known bit patterns of the OCP FP8 formats (and torch's float8_e8m0fnu), NaN, infinities,
    /// the largest values and subnormals included.
    #[test]
    fn f8_decoders_on_known_bit_patterns() {
        let e4m3 = [
            (0x00, 0.0),
            (0x38, 1.0),
            (0xb8, -1.0),
            (0x40, 2.0),
            (0x3c, 1.5),
            (0x7e, 448.0),
            (0xfe, -448.0),
            (0x08, 2f32.powi(-6)),
            (0x07, 7.0 * 2f32.powi(-9)),
            (0x01, 2f32.powi(-9)),
            (0x81, -(2f32.powi(-9))),
            (0x77, 240.0),
        ];
        for (b, v) in e4m3 {
            assert_eq!(f8_e4m3_to_f32(b), v, "E4M3 {b:#04x}");
        }
        assert!(f8_e4m3_to_f32(0x80).is_sign_negative() && f8_e4m3_to_f32(0x80) == 0.0);
        assert!(f8_e4m3_to_f32(0x7f).is_nan() && f8_e4m3_to_f32(0xff).is_nan());
        // E4M3 has no infinities: every other code is finite.
        assert_eq!((0..=255u8).filter(|&b| !f8_e4m3_to_f32(b).is_finite()).count(), 2);
        let e5m2 = [
            (0x00, 0.0),
            (0x3c, 1.0),
            (0xbc, -1.0),
            (0x3e, 1.5),
            (0x7b, 57344.0),
            (0x04, 2f32.powi(-14)),
            (0x01, 2f32.powi(-16)),
            (0x03, 3.0 * 2f32.powi(-16)),
            (0x7c, f32::INFINITY),
            (0xfc, f32::NEG_INFINITY),
        ];
        for (b, v) in e5m2 {
            assert_eq!(f8_e5m2_to_f32(b), v, "E5M2 {b:#04x}");
        }
        for b in [0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff] {
            assert!(f8_e5m2_to_f32(b).is_nan(), "E5M2 {b:#04x}");
        }
        for (b, v) in [(0x7f, 1.0), (0x80, 2.0), (0x7e, 0.5), (0x00, 2f32.powi(-127)), (0xfe, 2f32.powi(127))] {
            assert_eq!(f8_e8m0_to_f32(b), v, "E8M0 {b:#04x}");
        }
        assert!(f8_e8m0_to_f32(0xff).is_nan());
        // to_f32 decodes them; every value is exact (widening to f32 and back to bf16 or f16 is
        // lossless for the finite E4M3 and E5M2 values).
        let all: Vec<u8> = (0..=255).collect();
        let v = to_f32(Dtype::F8_E4M3, &all).unwrap();
        assert_eq!(v[0x38], 1.0);
        for (b, x) in v.iter().enumerate().filter(|(_, x)| x.is_finite()) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), *x, "E4M3 {b:#04x}");
        }
        for (b, x) in to_f32(Dtype::F8_E5M2, &all).unwrap().iter().enumerate().filter(|(_, x)| x.is_finite()) {
            assert_eq!(half::f16::from_f32(*x).to_f32(), *x, "E5M2 {b:#04x}");
        }
        assert_eq!(to_f32(Dtype::F8_E8M0, &[0x7f]), Some(vec![1.0]));
        assert_eq!(to_f32(Dtype::C64, &[0; 8]), None);
    }

    #[test]
    fn cast_rules_and_refused_casts() {
        use CastRule::*;
        for d in [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16] {
            assert_eq!(d.cast_rule(), Cast);
            assert!(d.is_float());
        }
        for d in
            [Dtype::BOOL, Dtype::U8, Dtype::I8, Dtype::I16, Dtype::U16, Dtype::I32, Dtype::U32, Dtype::I64, Dtype::U64]
        {
            assert_eq!(d.cast_rule(), Keep);
            assert!(!d.is_float());
        }
        for d in [Dtype::F8_E4M3, Dtype::F8_E5M2, Dtype::F8_E8M0, Dtype::C64] {
            assert!(matches!(d.cast_rule(), Refuse(_)), "{d}");
        }
        // cast_into never writes one dtype's bytes as another's.
        let mut out = vec![];
        assert!(!cast_into(Dtype::F8_E4M3, &[0x38], Dtype::BF16, &mut out));
        assert!(!cast_into(Dtype::F32, &[0; 4], Dtype::I32, &mut out));
        assert!(out.is_empty());
        assert!(cast_into(Dtype::I8, &[7], Dtype::I8, &mut out));
        assert_eq!(out, [7]);
        // Out-of-range values become infinities, NaN stays NaN.
        let src: Vec<u8> = [70000f32, f32::NAN, f32::NEG_INFINITY].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut h = vec![];
        assert!(cast_into(Dtype::F32, &src, Dtype::F16, &mut h));
        let back = to_f32(Dtype::F16, &h).unwrap();
        assert_eq!(back[0], f32::INFINITY);
        assert!(back[1].is_nan());
        assert_eq!(back[2], f32::NEG_INFINITY);
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
                assert!(cast_into(src, input, dst, &mut out));
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
