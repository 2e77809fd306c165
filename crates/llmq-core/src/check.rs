//! Argument checks shared by every backend: an op validates dtypes and shapes with these before
//! it touches memory, so both backends refuse the same inputs with the same message (naming the
//! op, the argument, what was expected and what was given).

use crate::backend::AttnShape;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub fn op_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Op(msg.into()))
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
