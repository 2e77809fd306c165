//! The bit-level conversions of `llmq_core::dtype` against independently computed values.
//!
//! Decoders are checked against closed formulas for all 256 fp8 codes; encoders against
//! "nearest representable value, ties to the even code" computed by brute force in f64 over
//! the decoded code table, plus hand-written edge cases.

use llmq_core::dtype::*;

/// Independent e4m3 (OCP "fn") decoder: bias 7, no infinities, S.1111.111 = NaN.
fn e4m3_formula(c: u8) -> f64 {
    let s = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> 3) & 0xF) as i32;
    let m = (c & 7) as f64;
    if e == 15 && m == 7.0 {
        f64::NAN
    } else if e == 0 {
        s * m / 8.0 * 2f64.powi(-6)
    } else {
        s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

/// Independent e5m2 decoder: bias 15, IEEE-like (inf and NaN with exponent 31).
fn e5m2_formula(c: u8) -> f64 {
    let s = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> 2) & 0x1F) as i32;
    let m = (c & 3) as f64;
    if e == 31 {
        if m == 0.0 {
            s * f64::INFINITY
        } else {
            f64::NAN
        }
    } else if e == 0 {
        s * m / 4.0 * 2f64.powi(-14)
    } else {
        s * (1.0 + m / 4.0) * 2f64.powi(e - 15)
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a == b && a.is_sign_negative() == b.is_sign_negative())
}

/// Checks one fp8 format: decode table, round trip, midpoints, ties, saturation, NaN.
fn check_fp8(name: &str, enc: fn(f32) -> u8, dec: fn(u8) -> f32, formula: fn(u8) -> f64, max: f32, max_code: u8, min_sub: f32) {
    // decode: all 256 codes
    for c in 0..=255u8 {
        assert!(same(dec(c) as f64, formula(c)), "{name}: decode({c:#04x}) = {} but formula gives {}", dec(c), formula(c));
    }
    // round trip for all finite codes (including -0 -> 0x80)
    for c in 0..=255u8 {
        let v = dec(c);
        if v.is_finite() {
            assert_eq!(enc(v), c, "{name}: encode(decode({c:#04x}) = {v})");
        }
    }
    // positive finite codes in increasing value order: 0x00..=max_code
    for c in 0..max_code {
        let (lo, hi) = (formula(c), formula(c + 1));
        assert!(lo < hi);
        let mid = ((lo + hi) / 2.0) as f32;
        assert_eq!(mid as f64, (lo + hi) / 2.0, "midpoint exact in f32");
        let even = if c.is_multiple_of(2) { c } else { c + 1 };
        assert_eq!(enc(mid), even, "{name}: midpoint {mid} between {c:#04x} and {:#04x} must round to the even code", c + 1);
        assert_eq!(enc(-mid), even | 0x80, "{name}: negative midpoint {}", -mid);
        // just off the midpoint goes to the nearer code
        let below = f32::from_bits(mid.to_bits() - 1);
        let above = f32::from_bits(mid.to_bits() + 1);
        assert_eq!(enc(below), c, "{name}: just below midpoint {mid}");
        assert_eq!(enc(above), c + 1, "{name}: just above midpoint {mid}");
    }
    // brute-force nearest over random values in range: compare with the table
    let finite: Vec<(u8, f64)> = (0..=max_code).map(|c| (c, formula(c))).collect();
    let mut s = 12345u64;
    for _ in 0..20000 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (s >> 11) as f64 / (1u64 << 53) as f64;
        let x = (u * 1.05 * max as f64) as f32; // includes a few values above max
        let want = if x >= max {
            max_code
        } else {
            let mut best = (0u8, f64::INFINITY);
            for &(c, v) in &finite {
                let d = (v - x as f64).abs();
                if d < best.1 || (d == best.1 && c % 2 == 0) {
                    best = (c, d);
                }
            }
            best.0
        };
        assert_eq!(enc(x), want, "{name}: encode({x})");
    }
    // saturation (SATFINITE): large values and infinities go to ±max, never NaN
    for (x, c) in [(1e6f32, max_code), (-1e6, max_code | 0x80), (f32::INFINITY, max_code), (f32::NEG_INFINITY, max_code | 0x80), (f32::MAX, max_code)] {
        assert_eq!(enc(x), c, "{name}: saturate {x}");
    }
    assert_eq!(dec(max_code), max);
    // subnormals
    assert_eq!(dec(1), min_sub);
    assert_eq!(enc(min_sub), 1);
    assert_eq!(enc(min_sub / 2.0), 0, "{name}: half the smallest subnormal is a tie with 0: even");
    assert_eq!(enc(min_sub * 0.5001), 1);
    assert_eq!(enc(min_sub * 1.5), 2, "{name}: tie between codes 1 and 2");
    assert_eq!(enc(min_sub * 2.5), 2, "{name}: tie between codes 2 and 3");
    assert_eq!(enc(1e-30), 0);
    assert_eq!(enc(-1e-30), 0x80);
    assert_eq!(enc(f32::from_bits(1)), 0, "f32 subnormal input");
    // NaN stays NaN (both signs)
    assert!(dec(enc(f32::NAN)).is_nan());
    assert!(dec(enc(-f32::NAN)).is_nan());
}

#[test]
fn e4m3_all_codes() {
    check_fp8("e4m3", f32_to_e4m3, e4m3_to_f32, e4m3_formula, E4M3_MAX, 0x7E, 2f32.powi(-9));
    assert_eq!(f32_to_e4m3(464.0), 0x7E, "midpoint above max saturates");
    assert_eq!(f32_to_e4m3(f32::NAN) & 0x7F, 0x7F);
}

#[test]
fn e5m2_all_codes() {
    check_fp8("e5m2", f32_to_e5m2, e5m2_to_f32, e5m2_formula, E5M2_MAX, 0x7B, 2f32.powi(-16));
    assert_eq!(e5m2_to_f32(0x7C), f32::INFINITY);
    assert_eq!(e5m2_to_f32(0xFC), f32::NEG_INFINITY);
    assert_eq!(f32_to_e5m2(61440.0), 0x7B, "midpoint above max saturates");
    let nan = f32_to_e5m2(f32::NAN);
    assert!(nan & 0x7C == 0x7C && nan & 3 != 0);
}

/// Independent bf16 RNE: the nearer of truncate / truncate + 1 ulp, compared in f64, ties to the
/// even pattern; the value after bf16 max is 2^128 (overflow to inf).
fn bf16_ref(x: f32) -> u16 {
    let lo = (x.to_bits() >> 16) as u16;
    let hi = lo.wrapping_add(1);
    let dl = bf16_to_f32(lo) as f64;
    let dh = if bf16_to_f32(hi).is_infinite() { x.signum() as f64 * 2f64.powi(128) } else { bf16_to_f32(hi) as f64 };
    let (el, eh) = ((x as f64 - dl).abs(), (dh - x as f64).abs());
    if el < eh || (el == eh && lo.is_multiple_of(2)) {
        lo
    } else {
        hi
    }
}

#[test]
fn bf16_rounding() {
    // hand-written cases
    let cases: [(u32, u16); 12] = [
        (0x3F80_0000, 0x3F80),            // 1.0
        (0x3F80_8000, 0x3F80),            // tie, even below
        (0x3F81_8000, 0x3F82),            // tie, even above
        (0x3F80_8001, 0x3F81),            // above tie
        (0x3F80_7FFF, 0x3F80),            // below tie
        (0xBF81_8000, 0xBF82),            // negative tie
        (0x7F7F_7FFF, 0x7F7F),            // stays at bf16 max
        (0x7F7F_8000, 0x7F80),            // tie at max rounds to even = inf
        (0x7F7F_FFFF, 0x7F80),            // f32::MAX overflows to inf
        (0xFF7F_FFFF, 0xFF80),            // -f32::MAX to -inf
        (0x0000_8000, 0x0000),            // subnormal tie to even (zero)
        (0x0001_8000, 0x0002),            // subnormal tie to even
    ];
    for (bits, want) in cases {
        assert_eq!(f32_to_bf16(f32::from_bits(bits)), want, "f32 bits {bits:#010x}");
    }
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
    assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xFF80);
    // NaN stays NaN, also when the payload is only in the low 16 bits (naive truncation: inf)
    for bits in [0x7FC0_0000u32, 0x7F80_0001, 0xFF80_0001, 0x7FFF_FFFF] {
        let b = f32_to_bf16(f32::from_bits(bits));
        assert!(bf16_to_f32(b).is_nan(), "NaN {bits:#010x} -> {b:#06x}");
        assert_eq!(b & 0x8000, ((bits >> 16) & 0x8000) as u16, "NaN sign kept");
    }
    // random bit patterns against the independent reference
    let mut s = 99u64;
    for _ in 0..200_000 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let x = f32::from_bits((s >> 32) as u32);
        if !x.is_finite() {
            continue; // NaN and inf are checked above
        }
        assert_eq!(f32_to_bf16(x), bf16_ref(x), "x = {x:e} ({:#010x})", x.to_bits());
    }
    // decode is exact widening
    for h in [0x0000u16, 0x8000, 0x3F80, 0x0001, 0x7F7F] {
        assert_eq!(bf16_to_f32(h).to_bits(), (h as u32) << 16);
    }
}

#[test]
fn bf16_stochastic_rounding_is_unbiased_exactly() {
    // Over all 65536 random inputs, rounding up happens for exactly (low 16 bits) of them, so the
    // average of the results is x exactly (for x away from the overflow threshold).
    for x in [1.0f32 + 3e-4, -2.7182817, 1e-3, 3.3e-39, 65504.3, -1.0e30] {
        let lo = (x.to_bits() >> 16) as u16;
        let mut sum = 0f64;
        for r in 0..65536u32 {
            let b = f32_to_bf16_stochastic(x, r);
            assert!(b == lo || b == lo + 1, "{x}: result {b:#06x} is not a neighbour");
            sum += bf16_to_f32(b) as f64;
        }
        assert_eq!(sum / 65536.0, x as f64, "E[sr({x})]");
        assert_eq!(f32_to_bf16_stochastic(x, 0), lo, "r = 0 truncates");
    }
    // just below the RNE overflow threshold: no random value may produce inf
    let big = f32::from_bits(0x7F7F_7FFF);
    for r in [0u32, 0x8000, 0x8001, 0xFFFF] {
        assert_eq!(f32_to_bf16_stochastic(big, r), 0x7F7F, "r = {r:#x}");
    }
    assert_eq!(f32_to_bf16_stochastic(-big, 0xFFFF), 0xFF7F);
    assert!(bf16_to_f32(f32_to_bf16_stochastic(f32::NAN, 7)).is_nan());
    assert_eq!(f32_to_bf16_stochastic(f32::INFINITY, 7), 0x7F80);
}

#[test]
fn encode_decode_buffers() {
    let vals = [1.0f32, -2.5, 0.1, 448.0, 1e6, -0.0];
    for dt in [DType::F32, DType::BF16, DType::E4M3, DType::E5M2] {
        let mut bytes = vec![0u8; vals.len() * dt.size()];
        encode_into(dt, &vals, &mut bytes);
        let mut back = vec![0f32; vals.len()];
        decode_into(dt, &bytes, &mut back);
        for (v, b) in vals.iter().zip(&back) {
            assert_eq!(b.to_bits(), round_through(dt, *v).to_bits(), "{dt}: {v}");
        }
    }
    assert_eq!(round_through(DType::E4M3, 1e6), 448.0);
    assert_eq!(round_through(DType::E5M2, -1e6), -57344.0);
    assert_eq!(round_through(DType::BF16, 1.0 + 1.0 / 256.0), 1.0);
}
