//! RMSNorm (forward, fused residual forward, backward) and Qwen3's per-head qk-norm.
//!
//! Forward, per row x of width C: ss = Σ x² accumulated sequentially in f64 (so the value does
//! not depend on how the row would be split), mean = (ss / C) rounded to f32,
//! rstd = 1 / sqrt(mean + eps) in f32, out[i] = (x[i] * rstd) * w[i] in f32, rounded to out's dtype.
//!
//! Backward, with xhat = x * rstd (f32, as in the forward) and g = w * dout:
//! c = mean(g * xhat) (f64 accumulation, rounded to f32), dx = rstd * (g - xhat * c) (+ dres),
//! dw += Σ_rows dout * xhat (rows in increasing order, f64 accumulator, see `col_sums`).
//!
//! Pitfalls:
//! - residual_rmsnorm_fwd normalises the residual *after* rounding it to res_out's dtype, so that
//!   a later rmsnorm_fwd / recomputation from the stored residual gives the same bits.
//! - rmsnorm_bwd allows dx == dres (in-place residual gradient): all inputs are decoded into
//!   f32 copies before anything is written.
//! - qk_norm_bwd's weight gradients sum over (row, head) pairs in row-major order.
//! - Sizes are checked by element count: N comes from rstd, C from w (Hd for qk-norm).

use crate::check::{check_eps, check_heads, rmsnorm_bwd_dims, rmsnorm_fwd_dims};
use super::common::{check_absmax, check_f32_n, check_float_n, check_rows, col_sums, for_rows, store_par, store_sums, write_absmax};
use super::load;
use crate::backend::AttnShape;
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// 1 / sqrt(mean(x²) + eps) of one row (see the module comment for the precision).
#[inline]
pub(crate) fn row_rstd(x: &[f32], eps: f32) -> f32 {
    let mut ss = 0f64;
    for &v in x {
        ss += (v as f64) * (v as f64);
    }
    let mean = (ss / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// out = x * rstd * w for one row; returns rstd.
#[inline]
fn norm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let r = row_rstd(x, eps);
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * r * wv;
    }
    r
}

/// dx = rstd * (g - xhat * mean(g * xhat)) with g = w * dout, for one row (or head).
#[inline]
fn norm_bwd_row(dx: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], r: f32) {
    let mut acc = 0f64;
    for ((&d, &xv), &wv) in dout.iter().zip(x).zip(w) {
        acc += ((wv * d) * (xv * r)) as f64;
    }
    let c = (acc / x.len() as f64) as f32;
    for (((o, &d), &xv), &wv) in dx.iter_mut().zip(dout).zip(x).zip(w) {
        *o = r * (wv * d - (xv * r) * c);
    }
}

pub fn rmsnorm_fwd(out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "rmsnorm_fwd";
    let (n, c) = rmsnorm_fwd_dims(OP, out, rstd, x, w, None, eps, absmax)?;
    let xv = load(x);
    let wv = load(w);
    normalize_and_store(OP, out, rstd, &xv, &wv, n, c, eps, absmax)
}

#[allow(clippy::too_many_arguments)]
fn normalize_and_store(_op: &str, out: &Tensor, rstd: &Tensor, xv: &[f32], wv: &[f32], n: usize, c: usize, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
    let mut ov = vec![0f32; n * c];
    let mut rv = vec![0f32; n];
    if c > 0 {
        ov.par_chunks_mut(c).zip(rv.par_iter_mut()).enumerate().for_each(|(r, (orow, rs))| {
            *rs = norm_row(orow, &xv[r * c..(r + 1) * c], wv, eps);
        });
    }
    store_par(out, &ov);
    store_par(rstd, &rv);
    write_absmax(absmax, out.dtype, &ov);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn residual_rmsnorm_fwd(res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "residual_rmsnorm_fwd";
    let (n, c) = rmsnorm_fwd_dims(OP, out, rstd, x, w, Some((res_out, delta)), eps, absmax)?;
    let mut res = load(x);
    let dv = load(delta);
    let rdt = res_out.dtype;
    res.par_iter_mut().zip(dv.par_iter()).for_each(|(r, &d)| *r = crate::dtype::round_through(rdt, *r + d));
    let wv = load(w);
    // `res` now holds exactly the values stored in res_out.
    store_par(res_out, &res);
    normalize_and_store(OP, out, rstd, &res, &wv, n, c, eps, absmax)
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "rmsnorm_bwd";
    let (n, c) = rmsnorm_bwd_dims(OP, dx, dw, dout, x, w, rstd, dres, absmax)?;
    let xv = load(x);
    let wv = load(w);
    let rv = load(rstd);
    let dov = load(dout);
    // dx starts as dres (a copy: dx may be the same tensor) or zero.
    let mut dxv = match dres {
        Some(d) => load(d),
        None => vec![0f32; n * c],
    };
    let has_res = dres.is_some();
    for_rows(&mut dxv, c, |r, row| {
        let s = r * c..(r + 1) * c;
        let mut g = vec![0f32; c];
        norm_bwd_row(&mut g, &dov[s.clone()], &xv[s], &wv, rv[r]);
        if has_res {
            for (o, gv) in row.iter_mut().zip(g) {
                *o += gv;
            }
        } else {
            row.copy_from_slice(&g);
        }
    });
    let sums = col_sums(n, c, |r, j| dov[r * c + j] * (xv[r * c + j] * rv[r]));
    store_par(dx, &dxv);
    store_sums(dw, &sums, true);
    write_absmax(absmax, dx.dtype, &dxv);
    Ok(())
}

pub fn qk_norm_fwd(out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, shape: AttnShape, eps: f32) -> Result<()> {
    const OP: &str = "qk_norm_fwd";
    check_heads(OP, &shape)?;
    let (n, q, hd) = (shape.n(), shape.qkv_width(), shape.hd);
    let nh = shape.hq + shape.hkv;
    check_rows(OP, "qkv", qkv, n, q)?;
    check_rows(OP, "out", out, n, q)?;
    check_f32_n(OP, "rstd", rstd, n * nh)?;
    check_float_n(OP, "qw", qw, hd)?;
    check_float_n(OP, "kw", kw, hd)?;
    check_eps(OP, eps)?;
    let xv = load(qkv);
    let (qwv, kwv) = (load(qw), load(kw));
    let mut ov = xv.clone(); // v heads are copied
    let mut rv = vec![0f32; n * nh];
    if q > 0 && hd > 0 {
        ov.par_chunks_mut(q).zip(rv.par_chunks_mut(nh)).enumerate().for_each(|(r, (orow, rrow))| {
            let xrow = &xv[r * q..(r + 1) * q];
            for (h, rs) in rrow.iter_mut().enumerate() {
                let w = if h < shape.hq { &qwv } else { &kwv };
                let s = h * hd..(h + 1) * hd;
                *rs = norm_row(&mut orow[s.clone()], &xrow[s], w, eps);
            }
        });
    }
    store_par(out, &ov);
    store_par(rstd, &rv);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn qk_norm_bwd(dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "qk_norm_bwd";
    check_heads(OP, &shape)?;
    check_absmax(OP, absmax)?;
    let (n, q, hd, hq, hkv) = (shape.n(), shape.qkv_width(), shape.hd, shape.hq, shape.hkv);
    let nh = hq + hkv;
    check_rows(OP, "qkv", qkv, n, q)?;
    check_rows(OP, "dout", dout, n, q)?;
    check_rows(OP, "dqkv", dqkv, n, q)?;
    check_f32_n(OP, "rstd", rstd, n * nh)?;
    check_float_n(OP, "qw", qw, hd)?;
    check_float_n(OP, "kw", kw, hd)?;
    check_float_n(OP, "dqw", dqw, hd)?;
    check_float_n(OP, "dkw", dkw, hd)?;
    let xv = load(qkv);
    let dov = load(dout);
    let rv = load(rstd);
    let (qwv, kwv) = (load(qw), load(kw));
    let mut dv = dov.clone(); // v part copied from dout
    for_rows(&mut dv, q, |r, row| {
        for h in 0..nh {
            let w = if h < hq { &qwv } else { &kwv };
            let s = r * q + h * hd..r * q + (h + 1) * hd;
            norm_bwd_row(&mut row[h * hd..(h + 1) * hd], &dov[s.clone()], &xv[s], w, rv[r * nh + h]);
        }
    });
    // Weight gradients: "rows" are (token, head) pairs in row-major order.
    let term = |r: usize, h: usize, j: usize| {
        let i = r * q + h * hd + j;
        dov[i] * (xv[i] * rv[r * nh + h])
    };
    let dq = col_sums(n * hq, hd, |p, j| term(p / hq, p % hq, j));
    let dk = col_sums(n * hkv, hd, |p, j| term(p / hkv, hq + p % hkv, j));
    store_par(dqkv, &dv);
    write_absmax(absmax, dqkv.dtype, &dv);
    store_sums(dqw, &dq, true);
    store_sums(dkw, &dk, true);
    Ok(())
}
