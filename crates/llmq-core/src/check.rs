//! Argument checks shared by every backend: an op validates dtypes and shapes with these before
//! it touches memory, so both backends refuse the same inputs with the same message (naming the
//! op, the argument, what was expected and what was given).

use crate::backend::{AttnShape, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub fn op_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Op(msg.into()))
}

/// Ops run on the compute or the side stream (`Backend::set_stream`).
pub fn check_op_stream(s: Stream) -> Result<()> {
    if matches!(s, Stream::Copy | Stream::CopyBack) {
        return op_err("set_stream: ops run on the compute or the side stream, not a copy stream");
    }
    Ok(())
}

/// `t` must hold floating point values (f32, bf16, e4m3, e5m2).
pub fn check_float(op: &str, arg: &str, t: &Tensor) -> Result<()> {
    if !t.dtype.is_float() {
        return op_err(format!("{op}: {arg} must be a float tensor, got {}", t.dtype));
    }
    Ok(())
}

/// `t` must be a float tensor with exactly `n` elements.
pub fn check_float_n(op: &str, arg: &str, t: &Tensor, n: usize) -> Result<()> {
    check_float(op, arg, t)?;
    t.expect_numel(op, arg, n)
}

/// `t` must be f32 with `n` elements.
pub fn check_f32_n(op: &str, arg: &str, t: &Tensor, n: usize) -> Result<()> {
    t.expect(op, arg, Some(DType::F32), &[n])
}

/// `t` must be i32 with `n` elements.
pub fn check_i32(op: &str, arg: &str, t: &Tensor, n: usize) -> Result<()> {
    t.expect(op, arg, Some(DType::I32), &[n])
}

/// An optional abs-max output must be f32[1].
pub fn check_absmax(op: &str, absmax: Option<&Tensor>) -> Result<()> {
    match absmax {
        Some(a) => check_f32_n(op, "absmax", a, 1),
        None => Ok(()),
    }
}

/// Element count of a [rows, cols] view: `t` must be a float tensor of `rows * cols` elements.
pub fn check_rows(op: &str, arg: &str, t: &Tensor, rows: usize, cols: usize) -> Result<()> {
    check_float(op, arg, t)?;
    if t.numel() != rows * cols {
        return op_err(format!("{op}: {arg} must have {rows} x {cols} = {} elements, got {:?}", rows * cols, t.shape));
    }
    Ok(())
}

pub fn check_eps(op: &str, eps: f32) -> Result<()> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return op_err(format!("{op}: eps must be finite and >= 0, got {eps}"));
    }
    Ok(())
}

/// Grouped heads: Hkv > 0 divides Hq, and the head size is positive.
pub fn check_heads(op: &str, s: &AttnShape) -> Result<()> {
    if s.hkv == 0 || !s.hq.is_multiple_of(s.hkv) {
        return op_err(format!("{op}: Hq ({}) must be a positive multiple of Hkv ({})", s.hq, s.hkv));
    }
    if s.hd == 0 {
        return op_err(format!("{op}: head size must be positive"));
    }
    Ok(())
}

/// `attention_decode`'s arguments (see `Backend::attention_decode`); returns the cache length S.
pub fn attention_decode_dims(op: &str, out: &Tensor, qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: usize, s: &AttnShape) -> Result<usize> {
    check_heads(op, s)?;
    check_rows(op, "qkv", qkv, s.n(), s.qkv_width())?;
    check_rows(op, "out", out, s.n(), s.out_width())?;
    let kv = s.hkv * s.hd;
    let cap = k_cache.dims().get(1).copied().unwrap_or(0);
    for (name, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        check_float(op, name, c)?;
        if c.dims() != [s.b, cap, kv] {
            return op_err(format!("{op}: {name} must be [B = {}, S, Hkv*Hd = {kv}] (S as k_cache's {cap}), got {:?}", s.b, c.shape));
        }
    }
    if k_cache.dtype != v_cache.dtype {
        return op_err(format!("{op}: k_cache and v_cache dtypes differ ({} and {})", k_cache.dtype, v_cache.dtype));
    }
    if pos.checked_add(s.t).is_none_or(|end| end > cap) {
        return op_err(format!("{op}: positions {pos}..{pos}+{} do not fit the cache of {cap} positions", s.t));
    }
    Ok(cap)
}

/// The RoPE table must be f32 [T, Hd/2, 2] and the head size even.
pub fn check_rope(op: &str, freqs: &Tensor, shape: &AttnShape) -> Result<()> {
    if !shape.hd.is_multiple_of(2) {
        return op_err(format!("{op}: head size {} must be even", shape.hd));
    }
    check_f32_n(op, "freqs", freqs, shape.t * shape.hd)
}

/// `colsum`'s arguments: `inp` whole rows of `out.numel()` columns. The row count, or None when
/// there are no columns (nothing to do).
pub fn colsum_rows(op: &str, out: &Tensor, inp: &Tensor) -> Result<Option<usize>> {
    let c = out.numel();
    check_float(op, "inp", inp)?;
    check_float_n(op, "out", out, c)?;
    if c == 0 {
        return Ok(None);
    }
    if !inp.numel().is_multiple_of(c) {
        return op_err(format!("{op}: inp {:?} is not a whole number of rows of {c} columns", inp.shape));
    }
    Ok(Some(inp.numel() / c))
}

/// RMSNorm forward, with `res` = (res_out, delta) for the fused residual form: (N, C).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd_dims(op: &str, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, res: Option<(&Tensor, &Tensor)>, eps: f32, absmax: Option<&Tensor>) -> Result<(usize, usize)> {
    let (n, c) = (rstd.numel(), w.numel());
    check_float_n(op, "w", w, c)?;
    check_f32_n(op, "rstd", rstd, n)?;
    check_rows(op, "x", x, n, c)?;
    if let Some((res_out, delta)) = res {
        check_rows(op, "delta", delta, n, c)?;
        check_rows(op, "res_out", res_out, n, c)?;
    }
    check_rows(op, "out", out, n, c)?;
    check_absmax(op, absmax)?;
    check_eps(op, eps)?;
    Ok((n, c))
}

/// RMSNorm backward: (N, C).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd_dims(op: &str, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<(usize, usize)> {
    let (n, c) = (rstd.numel(), w.numel());
    check_float_n(op, "w", w, c)?;
    check_float_n(op, "dw", dw, c)?;
    check_f32_n(op, "rstd", rstd, n)?;
    check_rows(op, "x", x, n, c)?;
    check_rows(op, "dout", dout, n, c)?;
    check_rows(op, "dx", dx, n, c)?;
    if let Some(dres) = dres {
        check_rows(op, "dres", dres, n, c)?;
    }
    check_absmax(op, absmax)?;
    Ok((n, c))
}

/// (N, D) from SwiGLU's input [N, 2D] (its last dimension), checking `half` ([N, D] by element
/// count).
pub fn swiglu_dims(op: &str, half_name: &str, half: &Tensor, full: &Tensor) -> Result<(usize, usize)> {
    check_float(op, "inp", full)?;
    let (n, w) = full.rows_cols();
    if !w.is_multiple_of(2) {
        return op_err(format!("{op}: inp {:?} must have an even last dimension [up | gate]", full.shape));
    }
    let d = w / 2;
    check_rows(op, half_name, half, n, d)?;
    Ok((n, d))
}

/// Cross-entropy: (rows, vocabulary), or None when there are no rows.
pub fn cross_entropy_dims(op: &str, logits: &Tensor, losses: &Tensor, targets: &Tensor) -> Result<Option<(usize, usize)>> {
    check_float(op, "logits", logits)?;
    let r = losses.numel();
    check_f32_n(op, "losses", losses, r)?;
    check_i32(op, "targets", targets, r)?;
    if r == 0 {
        return Ok(None);
    }
    if !logits.numel().is_multiple_of(r) {
        return op_err(format!("{op}: logits {:?} do not split into {r} rows", logits.shape));
    }
    let v = logits.numel() / r;
    if v == 0 {
        return op_err(format!("{op}: empty vocabulary"));
    }
    Ok(Some((r, v)))
}
