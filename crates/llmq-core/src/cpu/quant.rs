//! fp8 support: absmax, quantisation with current scaling, and byte-exact transposes.
//!
//! quantize, all in f32: scale = FP8_MAX / max(absmax, 1e-10) (FP8_MAX = 448 for e4m3, 57344 for
//! e5m2), out = sat_rne(x * scale) with `crate::dtype`'s saturating encoders, descale = 1 / scale.
//! With `transpose`, the 2-D input [rows, cols] is written as its [cols, rows] transpose.
//!
//! Pitfalls:
//! - `max(absmax, 1e-10)` follows fmaxf: a NaN absmax gives the 1e-10 floor (NaN inputs still
//!   encode to NaN); an absmax smaller than the data saturates to ±FP8_MAX instead of overflowing.
//! - absmax takes the max over |x| bit patterns, so it is order-independent and NaN-propagating.
//! - transpose moves bytes (any dtype) and never decodes, so it is bit-exact, NaN payloads
//!   included. Work is split into blocks of output rows; each input column is gathered into one
//!   output row.

use super::common::{abs_bits, check_f32_n, check_float, load_scalar, op_err};
use super::{bytes, bytes_mut, load, store};
use crate::dtype::{f32_to_e4m3, f32_to_e5m2, DType, E4M3_MAX, E5M2_MAX};
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Output rows per transpose task.
const T_BLOCK: usize = 16;
const CHUNK: usize = 1 << 14;

pub fn absmax(out: &Tensor, inp: &Tensor) -> Result<()> {
    check_f32_n("absmax", "out", out, 1)?;
    check_float("absmax", "inp", inp)?;
    let v = load(inp);
    let bits = v.par_chunks(CHUNK).map(|c| c.iter().map(|&x| abs_bits(x)).max().unwrap_or(0)).max().unwrap_or(0);
    store(out, &[f32::from_bits(bits)]);
    Ok(())
}

/// (rows, cols) of the input and checks that `out` is its [cols, rows] transpose.
fn transposed_dims(op: &str, out: &Tensor, inp: &Tensor) -> Result<(usize, usize)> {
    let (r, c) = inp.rows_cols();
    if out.numel() != inp.numel() || (out.shape.ndim() > 1 && out.rows_cols() != (c, r)) {
        return op_err(format!("{op}: out {:?} is not the transpose of inp {:?} (want [{c}, {r}])", out.shape, inp.shape));
    }
    Ok((r, c))
}

/// Writes `out[j, i] = f(i, j)` (element bytes) for an output of `cols` rows of `rows` elements
/// each of `sz` bytes, in parallel over blocks of output rows.
fn transpose_with<F>(ob: &mut [u8], rows: usize, cols: usize, sz: usize, f: F)
where
    F: Fn(usize, usize, &mut [u8]) + Sync + Send,
{
    if rows == 0 || cols == 0 {
        return;
    }
    ob.par_chunks_mut(T_BLOCK * rows * sz).enumerate().for_each(|(blk, chunk)| {
        let j0 = blk * T_BLOCK;
        let nj = chunk.len() / (rows * sz);
        for i in 0..rows {
            for jj in 0..nj {
                let o = (jj * rows + i) * sz;
                f(i, j0 + jj, &mut chunk[o..o + sz]);
            }
        }
    });
}

pub fn quantize(out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
    const OP: &str = "quantize";
    check_float(OP, "inp", inp)?;
    check_f32_n(OP, "descale", descale, 1)?;
    let fp8_max = match out.dtype {
        DType::E4M3 => E4M3_MAX,
        DType::E5M2 => E5M2_MAX,
        dt => return op_err(format!("{OP}: out must be e4m3 or e5m2, got {dt}")),
    };
    let enc: fn(f32) -> u8 = if out.dtype == DType::E4M3 { f32_to_e4m3 } else { f32_to_e5m2 };
    let amax = load_scalar(OP, "absmax", absmax)?;
    let dims = if transpose {
        Some(transposed_dims(OP, out, inp)?)
    } else {
        out.expect_numel(OP, "out", inp.numel())?;
        None
    };
    let scale = fp8_max / amax.max(1e-10);
    let x = load(inp);
    // SAFETY: inp was copied; out is the only tensor written here.
    let ob = unsafe { bytes_mut(out) };
    match dims {
        None => ob.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, xs)| {
            for (b, &v) in o.iter_mut().zip(xs) {
                *b = enc(v * scale);
            }
        }),
        Some((rows, cols)) => transpose_with(ob, rows, cols, 1, |i, j, o| o[0] = enc(x[i * cols + j] * scale)),
    }
    store(descale, &[1.0 / scale]);
    Ok(())
}

pub fn transpose(out: &Tensor, inp: &Tensor) -> Result<()> {
    const OP: &str = "transpose";
    if out.dtype != inp.dtype {
        return op_err(format!("{OP}: dtypes differ ({} -> {})", inp.dtype, out.dtype));
    }
    let (rows, cols) = transposed_dims(OP, out, inp)?;
    let sz = inp.dtype.size();
    // SAFETY: out and inp are distinct allocations (op contract); inp is only read.
    let ib = unsafe { bytes(inp) };
    let ob = unsafe { bytes_mut(out) };
    transpose_with(ob, rows, cols, sz, |i, j, o| {
        let s = (i * cols + j) * sz;
        o.copy_from_slice(&ib[s..s + sz]);
    });
    Ok(())
}
