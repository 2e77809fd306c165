//! Causal grouped-query attention over a fused qkv tensor, forward and backward.
//!
//! Layout: row n = b*T + t of qkv holds [Hq query heads | Hkv key heads | Hkv value heads], each
//! Hd wide; query head h reads kv head g = h / (Hq / Hkv). Softmax scale = 1 / sqrt(Hd).
//!
//! Forward, per (b, h) and query t, all in f32 with sequential sums over j = 0..=t:
//! s_j = (q_t · k_j) * scale, m = max s, p_j = exp(s_j - m), l = Σ p_j,
//! o_t = (Σ p_j v_j) / l, lse_t = m + ln(l). Parallel over (b, h) pairs.
//!
//! Backward (the standard one, recomputing P from lse): p_j = exp(s_j - lse_t),
//! D_t = dO_t · O_t (from the stored forward output), dP_j = dO_t · v_j, dS_j = p_j (dP_j - D_t),
//! dq_t = scale Σ_j dS_j k_j, dk_j += scale dS_j q_t, dv_j += p_j dO_t.
//! Parallel over (b, kv head): the query heads of a group are processed in increasing order and
//! within a head queries in increasing t, so dK / dV sums have a fixed order and no races.
//!
//! With a RoPE table, the backward also applies RoPE's transpose to dQ and dK in f32 before
//! storing (dqkv is then the gradient of the pre-RoPE qkv), like the CUDA kernels' fused stores.
//!
//! Pitfalls: lse is f32 [B, Hq, T] (not [B, T, Hq]); the causal mask is j <= t within one
//! sequence (rows of different b never interact); dqkv is fully overwritten.

use super::common::{check_absmax, check_f32_n, check_rows, store_par, write_absmax};
use super::elementwise::rope_in_place;
use crate::check::{check_heads, check_rope};
use super::load;
use crate::backend::AttnShape;
use crate::dtype::round_through;
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0f32;
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// Offsets into a qkv row of query head h, key head g and value head g.
struct Heads {
    q: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
}

impl Heads {
    fn new(s: &AttnShape) -> Heads {
        Heads { q: s.qkv_width(), hq: s.hq, hkv: s.hkv, hd: s.hd }
    }
    fn q_at(&self, row: usize, h: usize) -> usize {
        row * self.q + h * self.hd
    }
    fn k_at(&self, row: usize, g: usize) -> usize {
        row * self.q + (self.hq + g) * self.hd
    }
    fn v_at(&self, row: usize, g: usize) -> usize {
        row * self.q + (self.hq + self.hkv + g) * self.hd
    }
}

pub fn attention_fwd(out: &Tensor, lse: &Tensor, qkv: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "attention_fwd";
    check_heads(OP, &shape)?;
    let AttnShape { b, t, hq, hkv, hd } = shape;
    let n = shape.n();
    check_rows(OP, "qkv", qkv, n, shape.qkv_width())?;
    check_rows(OP, "out", out, n, shape.out_width())?;
    check_f32_n(OP, "lse", lse, b * hq * t)?;
    check_absmax(OP, absmax)?;
    let x = load(qkv);
    let hs = Heads::new(&shape);
    let rep = hq / hkv;
    let scale = 1.0 / (hd as f32).sqrt();

    // One task per (b, h): returns o [T, Hd] and lse [T].
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..b * hq)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / hq, bh % hq);
            let g = h / rep;
            let mut o = vec![0f32; t * hd];
            let mut l_out = vec![0f32; t];
            let mut p = vec![0f32; t];
            for ti in 0..t {
                let qr = &x[hs.q_at(bi * t + ti, h)..][..hd];
                let mut m = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(ti + 1) {
                    *pj = dot(qr, &x[hs.k_at(bi * t + j, g)..][..hd]) * scale;
                    m = m.max(*pj);
                }
                let mut l = 0f32;
                for pj in &mut p[..=ti] {
                    *pj = (*pj - m).exp();
                    l += *pj;
                }
                let orow = &mut o[ti * hd..(ti + 1) * hd];
                for (j, &pj) in p[..=ti].iter().enumerate() {
                    let vr = &x[hs.v_at(bi * t + j, g)..][..hd];
                    for (ov, &vv) in orow.iter_mut().zip(vr) {
                        *ov += pj * vv;
                    }
                }
                for ov in orow.iter_mut() {
                    *ov /= l;
                }
                l_out[ti] = m + l.ln();
            }
            (o, l_out)
        })
        .collect();

    let ow = shape.out_width();
    let mut ov = vec![0f32; n * ow];
    let mut lv = vec![0f32; b * hq * t];
    for (bh, (o, l)) in parts.into_iter().enumerate() {
        let (bi, h) = (bh / hq, bh % hq);
        for ti in 0..t {
            ov[(bi * t + ti) * ow + h * hd..][..hd].copy_from_slice(&o[ti * hd..(ti + 1) * hd]);
        }
        lv[bh * t..(bh + 1) * t].copy_from_slice(&l);
    }
    store_par(out, &ov);
    store_par(lse, &lv);
    write_absmax(absmax, out.dtype, &ov);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, shape: AttnShape, rope: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "attention_bwd";
    check_heads(OP, &shape)?;
    let AttnShape { b, t, hq, hkv, hd } = shape;
    let n = shape.n();
    let (q, ow) = (shape.qkv_width(), shape.out_width());
    check_rows(OP, "qkv", qkv, n, q)?;
    check_rows(OP, "dqkv", dqkv, n, q)?;
    check_rows(OP, "out", out, n, ow)?;
    check_rows(OP, "dout", dout, n, ow)?;
    check_f32_n(OP, "lse", lse, b * hq * t)?;
    if let Some(f) = rope {
        check_rope(OP, f, &shape)?;
    }
    check_absmax(OP, absmax)?;
    let x = load(qkv);
    let ov = load(out);
    let dov = load(dout);
    let lv = load(lse);
    let hs = Heads::new(&shape);
    let rep = hq / hkv;
    let scale = 1.0 / (hd as f32).sqrt();

    // One task per (b, kv head g): returns dq for the group's `rep` heads [rep, T, Hd], dk and
    // dv [T, Hd].
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
        .into_par_iter()
        .map(|bg| {
            let (bi, g) = (bg / hkv, bg % hkv);
            let mut dq = vec![0f32; rep * t * hd];
            let mut dk = vec![0f32; t * hd];
            let mut dv = vec![0f32; t * hd];
            for r in 0..rep {
                let h = g * rep + r;
                for ti in 0..t {
                    let row = bi * t + ti;
                    let qr = &x[hs.q_at(row, h)..][..hd];
                    let dor = &dov[row * ow + h * hd..][..hd];
                    let orow = &ov[row * ow + h * hd..][..hd];
                    let l = lv[(bi * hq + h) * t + ti];
                    let dsum = dot(dor, orow);
                    let dqr = &mut dq[(r * t + ti) * hd..][..hd];
                    for j in 0..=ti {
                        let kr = &x[hs.k_at(bi * t + j, g)..][..hd];
                        let vr = &x[hs.v_at(bi * t + j, g)..][..hd];
                        let p = (dot(qr, kr) * scale - l).exp();
                        let dp = dot(dor, vr);
                        let ds = p * (dp - dsum) * scale;
                        for (a, &kv) in dqr.iter_mut().zip(kr) {
                            *a += ds * kv;
                        }
                        for (a, &qv) in dk[j * hd..(j + 1) * hd].iter_mut().zip(qr) {
                            *a += ds * qv;
                        }
                        for (a, &d) in dv[j * hd..(j + 1) * hd].iter_mut().zip(dor) {
                            *a += p * d;
                        }
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();

    let mut dx = vec![0f32; n * q];
    for (bg, (dq, dk, dv)) in parts.into_iter().enumerate() {
        let (bi, g) = (bg / hkv, bg % hkv);
        for ti in 0..t {
            let row = bi * t + ti;
            for r in 0..rep {
                dx[hs.q_at(row, g * rep + r)..][..hd].copy_from_slice(&dq[(r * t + ti) * hd..][..hd]);
            }
            dx[hs.k_at(row, g)..][..hd].copy_from_slice(&dk[ti * hd..][..hd]);
            dx[hs.v_at(row, g)..][..hd].copy_from_slice(&dv[ti * hd..][..hd]);
        }
    }
    if let Some(f) = rope {
        rope_in_place(&mut dx, &load(f), shape, true);
    }
    store_par(dqkv, &dx);
    write_absmax(absmax, dqkv.dtype, &dx);
    Ok(())
}

/// Decoding against a key/value cache (see `Backend::attention_decode`): stores the new rows'
/// keys and values into the caches, then runs `attention_fwd`'s per-query loop over cache
/// positions 0..=p, so a row gets the bits `attention_fwd` gives it when the cache has qkv's dtype.
pub fn attention_decode(out: &Tensor, qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: usize, shape: AttnShape) -> Result<()> {
    const OP: &str = "attention_decode";
    let cap = crate::check::attention_decode_dims(OP, out, qkv, k_cache, v_cache, pos, &shape)?;
    let AttnShape { b, t, hq, hkv, hd } = shape;
    let x = load(qkv);
    let hs = Heads::new(&shape);
    let kv = hkv * hd;
    // only the positions this op writes or reads are decoded and stored
    let used = pos + t;
    let mut kc = vec![0f32; b * used * kv];
    let mut vc = vec![0f32; b * used * kv];
    for (cache, dst) in [(k_cache, &mut kc), (v_cache, &mut vc)] {
        for bi in 0..b {
            let seq = cache.slice(bi * cap * kv, &[used * kv]);
            dst[bi * used * kv..(bi + 1) * used * kv].copy_from_slice(&load(&seq));
        }
    }
    for bi in 0..b {
        for ti in 0..t {
            let row = bi * t + ti;
            let at = (bi * used + pos + ti) * kv;
            // rounded to the cache dtype: attention reads them as the cache stores them
            let round = |d: &mut [f32], src: &[f32]| d.iter_mut().zip(src).for_each(|(d, &s)| *d = round_through(k_cache.dtype, s));
            for g in 0..hkv {
                round(&mut kc[at + g * hd..][..hd], &x[hs.k_at(row, g)..][..hd]);
                round(&mut vc[at + g * hd..][..hd], &x[hs.v_at(row, g)..][..hd]);
            }
        }
    }
    for bi in 0..b {
        let new = |c: &Tensor| c.slice((bi * cap + pos) * kv, &[t * kv]);
        let range = (bi * used + pos) * kv..(bi * used + used) * kv;
        store_par(&new(k_cache), &kc[range.clone()]);
        store_par(&new(v_cache), &vc[range]);
    }

    let rep = hq / hkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let ow = shape.out_width();
    // one task per (b, h): o [T, Hd]
    let parts: Vec<Vec<f32>> = (0..b * hq)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / hq, bh % hq);
            let g = h / rep;
            let key = |j: usize| &kc[(bi * used + j) * kv + g * hd..][..hd];
            let val = |j: usize| &vc[(bi * used + j) * kv + g * hd..][..hd];
            let mut o = vec![0f32; t * hd];
            let mut p = vec![0f32; used];
            for ti in 0..t {
                let last = pos + ti;
                let qr = &x[hs.q_at(bi * t + ti, h)..][..hd];
                let mut m = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(last + 1) {
                    *pj = dot(qr, key(j)) * scale;
                    m = m.max(*pj);
                }
                let mut l = 0f32;
                for pj in &mut p[..=last] {
                    *pj = (*pj - m).exp();
                    l += *pj;
                }
                let orow = &mut o[ti * hd..(ti + 1) * hd];
                for (j, &pj) in p[..=last].iter().enumerate() {
                    for (ov, &vv) in orow.iter_mut().zip(val(j)) {
                        *ov += pj * vv;
                    }
                }
                for ov in orow.iter_mut() {
                    *ov /= l;
                }
            }
            o
        })
        .collect();
    let mut ov = vec![0f32; shape.n() * ow];
    for (bh, o) in parts.into_iter().enumerate() {
        let (bi, h) = (bh / hq, bh % hq);
        for ti in 0..t {
            ov[(bi * t + ti) * ow + h * hd..][..hd].copy_from_slice(&o[ti * hd..(ti + 1) * hd]);
        }
    }
    store_par(out, &ov);
    Ok(())
}
