//! Element types and their exact bit-level conversions.
//!
//! Every backend stores tensors with these byte encodings, so a CPU tensor and a GPU tensor can be
//! compared byte for byte. Conversions from f32 round to nearest, ties to even (what CUDA's
//! `__float2bfloat16_rn` and `__nv_cvt_float_to_fp8(.., __NV_SATFINITE, ..)` do); the fp8 ones
//! saturate finite overflow and infinities to the largest finite value and keep NaN as NaN.
//!
//! Formats: bf16 = 1-8-7 (f32 with the low 16 bits dropped); e4m3 (OCP "fn") = 1-4-3, bias 7,
//! no infinities, NaN = S.1111.111, max 448; e5m2 = 1-5-2, bias 15, IEEE-like, max 57344.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    BF16,
    E4M3,
    E5M2,
    I32,
}

impl DType {
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
            DType::E4M3 | DType::E5M2 => 1,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "fp32",
            DType::BF16 => "bf16",
            DType::E4M3 => "e4m3",
            DType::E5M2 => "e5m2",
            DType::I32 => "i32",
        }
    }
    pub fn is_float(self) -> bool {
        self != DType::I32
    }
    pub fn is_fp8(self) -> bool {
        matches!(self, DType::E4M3 | DType::E5M2)
    }
    /// Parses the names used on the command line and in config files.
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" | "float" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "e4m3" | "fp8" | "float8_e4m3fn" => DType::E4M3,
            "e5m2" | "float8_e5m2" => DType::E5M2,
            "i32" | "int32" => DType::I32,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub const E4M3_MAX: f32 = 448.0;
pub const E5M2_MAX: f32 = 57344.0;

#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        // keep the sign, force a quiet NaN
        return ((b >> 16) as u16) | 0x0040;
    }
    let lsb = (b >> 16) & 1;
    let rounded = b.wrapping_add(0x7FFF + lsb);
    (rounded >> 16) as u16
}

#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Rounds `x` to bf16 stochastically: adds the 16 random bits below the bf16 mantissa before
/// truncating, so E[result] = x. `rand16` must be uniformly distributed in 0..65536.
#[inline]
pub fn f32_to_bf16_stochastic(x: f32, rand16: u32) -> u16 {
    if !x.is_finite() {
        return f32_to_bf16(x);
    }
    let b = x.to_bits();
    let r = b.wrapping_add(rand16 & 0xFFFF);
    // an overflow into the exponent of the max finite value would give inf: keep RNE there
    let out = (r >> 16) as u16;
    if bf16_to_f32(out).is_infinite() {
        return f32_to_bf16(x);
    }
    out
}

/// A small counter-based hash (a "squares"-style mixer) used for stochastic rounding and
/// dropout-free randomness that must be identical on every backend: the GPU kernels compute the
/// same function of (seed, index).
#[inline]
pub fn hash_u32(seed: u64, index: u64) -> u32 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// Generic saturating round-to-nearest-even encoder for small floats with `e` exponent and `m`
/// mantissa bits. `max_bits` is the bit pattern (without sign) of the largest finite value and
/// `nan_bits` that of the NaN to produce.
#[inline]
fn f32_to_small_float(x: f32, e: u32, m: u32, max_bits: u8, nan_bits: u8) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | nan_bits;
    }
    let a = x.abs();
    let bias = (1i32 << (e - 1)) - 1;
    let max_val = small_float_to_f32(max_bits, e, m, nan_bits);
    if a >= max_val {
        // saturate; values between max and the rounding midpoint above it also land here
        return sign | max_bits;
    }
    // Smallest normal exponent is 1 - bias; below that the spacing is fixed at 2^(1-bias-m).
    let min_normal_exp = 1 - bias;
    let ab = a.to_bits();
    let exp = ((ab >> 23) & 0xFF) as i32 - 127;
    let out: u32 = if exp < min_normal_exp {
        // subnormal in the target: quantise to multiples of 2^(min_normal_exp - m)
        let scale = 2f32.powi(-(min_normal_exp - m as i32));
        let q = a * scale; // exact: multiplication by a power of two (no f32 subnormal trouble here)
        let r = round_half_even(q);
        r as u32 // may become 1 << m, which is exactly the smallest normal's encoding
    } else {
        // normal: keep m mantissa bits with RNE on the f32 mantissa
        let shift = 23 - m;
        let mant = ab & 0x7F_FFFF;
        let mut t = ((exp + bias) as u32) << m | (mant >> shift);
        let rem = mant & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && (t & 1) == 1) {
            t += 1; // carries into the exponent correctly
        }
        t
    };
    let out = out.min(max_bits as u32) as u8;
    sign | out
}

#[inline]
fn round_half_even(q: f32) -> f32 {
    let f = q.floor();
    let d = q - f;
    if d > 0.5 || (d == 0.5 && (f as i64) % 2 == 1) {
        f + 1.0
    } else {
        f
    }
}

#[inline]
fn small_float_to_f32(v: u8, e: u32, m: u32, nan_bits: u8) -> f32 {
    let sign = if v & 0x80 != 0 { -1.0 } else { 1.0 };
    let mag = v & 0x7F;
    if mag == nan_bits || (e == 5 && (mag >> 2) == 0x1F && (mag & 3) != 0) {
        return f32::NAN;
    }
    if e == 5 && mag == 0x7C {
        return sign * f32::INFINITY;
    }
    let bias = (1i32 << (e - 1)) - 1;
    let ex = (mag >> m) as i32;
    let mant = (mag & ((1 << m) - 1)) as f32;
    let mscale = (1u32 << m) as f32;
    if ex == 0 {
        sign * mant / mscale * 2f32.powi(1 - bias)
    } else {
        sign * (1.0 + mant / mscale) * 2f32.powi(ex - bias)
    }
}

#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    f32_to_small_float(x, 4, 3, 0x7E, 0x7F)
}
#[inline]
pub fn e4m3_to_f32(v: u8) -> f32 {
    small_float_to_f32(v, 4, 3, 0x7F)
}
#[inline]
pub fn f32_to_e5m2(x: f32) -> u8 {
    f32_to_small_float(x, 5, 2, 0x7B, 0x7F)
}
#[inline]
pub fn e5m2_to_f32(v: u8) -> f32 {
    small_float_to_f32(v, 5, 2, 0x7F)
}

/// Decodes `bytes` of type `dtype` into the f32 slice `out` (i32 converts by value).
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::I32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::E4M3 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = e4m3_to_f32(b);
            }
        }
        DType::E5M2 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = e5m2_to_f32(b);
            }
        }
    }
}

/// Encodes f32 values into `dtype` bytes with round-to-nearest-even (saturating for fp8).
pub fn encode_into(dtype: DType, vals: &[f32], bytes: &mut [u8]) {
    debug_assert_eq!(bytes.len(), vals.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for (v, c) in vals.iter().zip(bytes.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::I32 => {
            for (v, c) in vals.iter().zip(bytes.chunks_exact_mut(4)) {
                c.copy_from_slice(&(*v as i32).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (v, c) in vals.iter().zip(bytes.chunks_exact_mut(2)) {
                c.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        DType::E4M3 => {
            for (v, b) in vals.iter().zip(bytes.iter_mut()) {
                *b = f32_to_e4m3(*v);
            }
        }
        DType::E5M2 => {
            for (v, b) in vals.iter().zip(bytes.iter_mut()) {
                *b = f32_to_e5m2(*v);
            }
        }
    }
}

/// Rounds an f32 value through `dtype` and back (identity for f32).
#[inline]
pub fn round_through(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::I32 => x as i32 as f32,
        DType::BF16 => bf16_to_f32(f32_to_bf16(x)),
        DType::E4M3 => e4m3_to_f32(f32_to_e4m3(x)),
        DType::E5M2 => e5m2_to_f32(f32_to_e5m2(x)),
    }
}
