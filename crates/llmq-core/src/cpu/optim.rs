//! AdamW over segments of a flat buffer, and deterministic sums of squares (gradient norms).
//!
//! AdamW per element i (f32 arithmetic):
//!   g = grad * grad_scale; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g²;
//!   p = master - lr (m / bc1 / (sqrt(v / bc2) + eps) + wd master)
//! with lr, grad_scale, the seed and bc1 = 1 - b1^step, bc2 = 1 - b2^step (computed in f64 on the
//! host, rounded to f32) read from the `scalars` tensor (`AdamStep::words`), and wd the weight
//! decay on segments with `decay` and 0 elsewhere. The update uses the unrounded f32 m and v; they
//! are stored in their dtypes with RNE. The master value is stored with RNE (f32) or stochastic
//! rounding with `hash_u32(seed, i) >> 16` (bf16), i being the index in the flat buffer. When
//! `params` is another buffer, it receives p rounded (RNE) to its dtype.
//!
//! Pitfalls:
//! - Elements outside the segments (alignment padding) are neither read nor written.
//! - Work is split into fixed chunks of each segment; every chunk decodes and encodes only its
//!   own byte ranges, so no element is written twice and there is no whole-buffer copy.
//! - absmax per segment is the max over |value stored in params| (after rounding), combined
//!   across chunks with an order-independent max over bit patterns.
//! - sum_squares accumulates in f64 strictly in index order and rounds to f32 once: it is
//!   sequential on purpose (exactly reproducible), and only out[slot] is written.

use super::common::{abs_bits, check_float, op_err};
use super::{bytes, load_i32, store};
use crate::backend::{AdamScalars, AdamW, Segment};
use crate::dtype::{decode_into, encode_into, f32_to_bf16_stochastic, hash_u32, DType};
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Elements per AdamW task.
const CHUNK: usize = 1 << 13;

/// Bytes of elements [o, o + len) of `t` (bounds checked by the caller's segment checks).
/// SAFETY (callers): no other live reference overlaps the range while this one is used.
unsafe fn range_mut<'a>(t: &Tensor, o: usize, len: usize) -> &'a mut [u8] {
    let sz = t.dtype.size();
    debug_assert!(o + len <= t.numel());
    std::slice::from_raw_parts_mut((t.addr as *mut u8).add(o * sz), len * sz)
}

/// Read-only variant of `range_mut`.
unsafe fn range<'a>(t: &Tensor, o: usize, len: usize) -> &'a [u8] {
    let sz = t.dtype.size();
    debug_assert!(o + len <= t.numel());
    std::slice::from_raw_parts((t.addr as *const u8).add(o * sz), len * sz)
}

pub fn adamw(a: &AdamW, segments: &[Segment]) -> Result<()> {
    a.validate(segments)?;
    let separate = a.params.addr != a.master.addr;
    let words: Vec<u32> = load_i32(a.scalars).into_iter().map(|w| w as u32).collect();
    let sc = AdamScalars::from_words(&words.try_into().expect("validated: ADAM_SCALARS words"));
    let (bc1, bc2, grad_scale, seed) = (sc.bc1, sc.bc2, sc.grad_scale, sc.seed);
    let (b1, b2, lr, eps) = (a.beta1, a.beta2, sc.lr, a.eps);

    // (segment index, first element, length) of every task.
    let tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| (0..s.len).step_by(CHUNK).map(move |o| (si, s.offset + o, CHUNK.min(s.len - o))))
        .collect();

    let maxima: Vec<(usize, u32)> = tasks
        .par_iter()
        .map(|&(si, o, len)| {
            let wd = if segments[si].decay { a.weight_decay } else { 0.0 };
            let mut g = vec![0f32; len];
            let mut m = vec![0f32; len];
            let mut v = vec![0f32; len];
            let mut p = vec![0f32; len];
            // SAFETY: tasks cover disjoint element ranges of distinct tensors (params is only
            // touched separately when it is a different buffer than master).
            unsafe {
                decode_into(a.grads.dtype, range(a.grads, o, len), &mut g);
                decode_into(a.m.dtype, range(a.m, o, len), &mut m);
                decode_into(a.v.dtype, range(a.v, o, len), &mut v);
                decode_into(a.master.dtype, range(a.master, o, len), &mut p);
            }
            for i in 0..len {
                let gi = g[i] * grad_scale;
                let mi = b1 * m[i] + (1.0 - b1) * gi;
                let vi = b2 * v[i] + (1.0 - b2) * (gi * gi);
                let mhat = mi / bc1;
                let vhat = vi / bc2;
                let w = p[i];
                p[i] = w - lr * (mhat / (vhat.sqrt() + eps) + wd * w);
                m[i] = mi;
                v[i] = vi;
            }
            let mut amax = 0u32;
            // SAFETY: as above.
            unsafe {
                encode_into(a.m.dtype, &m, range_mut(a.m, o, len));
                encode_into(a.v.dtype, &v, range_mut(a.v, o, len));
                let mb = range_mut(a.master, o, len);
                match a.master.dtype {
                    DType::BF16 => {
                        for (i, (c, &x)) in mb.chunks_exact_mut(2).zip(&p).enumerate() {
                            let r = hash_u32(seed, (o + i) as u64) >> 16;
                            c.copy_from_slice(&f32_to_bf16_stochastic(x, r).to_le_bytes());
                        }
                    }
                    dt => encode_into(dt, &p, mb),
                }
                if separate {
                    encode_into(a.params.dtype, &p, range_mut(a.params, o, len));
                }
                if a.absmax.is_some() {
                    let pt = if separate { a.params } else { a.master };
                    let mut stored = vec![0f32; len];
                    decode_into(pt.dtype, range(pt, o, len), &mut stored);
                    amax = stored.iter().map(|&x| abs_bits(x)).max().unwrap_or(0);
                }
            }
            (si, amax)
        })
        .collect();

    if let Some(am) = a.absmax {
        let mut per_seg = vec![0u32; segments.len()];
        for (si, bits) in maxima {
            per_seg[si] = per_seg[si].max(bits);
        }
        let vals: Vec<f32> = per_seg.into_iter().map(f32::from_bits).collect();
        store(am, &vals);
    }
    Ok(())
}

pub fn sum_squares(out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
    const OP: &str = "sum_squares";
    out.expect_dtype(OP, "out", &[DType::F32])?;
    if slot >= out.numel() {
        return op_err(format!("{OP}: slot {slot} outside out {:?}", out.shape));
    }
    check_float(OP, "t", t)?;
    let sz = t.dtype.size();
    let mut buf = vec![0f32; 4096];
    let mut acc = 0f64;
    // SAFETY: read-only view of a live allocation.
    for c in unsafe { bytes(t) }.chunks(4096 * sz) {
        let vals = &mut buf[..c.len() / sz];
        decode_into(t.dtype, c, vals);
        for &x in vals.iter() {
            acc += (x as f64) * (x as f64);
        }
    }
    store(&out.slice(slot, &[1]), &[acc as f32]);
    Ok(())
}
