//! Helpers shared by the CPU ops: argument checks, parallel encode, column sums and absmax.
//!
//! Determinism rules used throughout the CPU backend:
//! - Work is split into pieces whose boundaries do not depend on the thread count (rows, fixed
//!   column blocks, fixed element chunks), and every output element is produced by the same
//!   sequential code whatever the split.
//! - Reductions across rows (bias / norm-weight gradients) run over rows in increasing order with
//!   an f64 accumulator, one task per fixed block of columns.
//! - Maxima (absmax) are taken over the bit patterns of |x|, which is order-independent and makes
//!   NaN win over every number (so a NaN anywhere shows up in the absmax instead of vanishing).

use super::{bytes_mut, load};
use crate::dtype::{encode_into, round_through, DType};
pub(crate) use crate::check::{check_absmax, check_f32_n, check_float, check_float_n, check_rows, op_err};
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Elements per parallel encode task.
const ENCODE_CHUNK: usize = 1 << 14;
/// Columns per task in `col_sums`.
const COL_BLOCK: usize = 32;

/// Reads a scalar f32[1] argument.
pub(crate) fn load_scalar(op: &str, arg: &str, t: &Tensor) -> Result<f32> {
    check_f32_n(op, arg, t, 1)?;
    Ok(load(t)[0])
}

/// Stores `vals` into `t` (RNE to its dtype), encoding in parallel chunks.
pub(crate) fn store_par(t: &Tensor, vals: &[f32]) {
    assert_eq!(vals.len(), t.numel(), "store_par: length mismatch for {t:?}");
    let sz = t.dtype.size();
    // SAFETY: the op holds no other reference to `t`'s bytes (inputs were copied by `load`).
    let out = unsafe { bytes_mut(t) };
    out.par_chunks_mut(ENCODE_CHUNK * sz)
        .zip(vals.par_chunks(ENCODE_CHUNK))
        .for_each(|(o, v)| encode_into(t.dtype, v, o));
}

/// Bit pattern of |x|: for non-negative floats the integer order is the float order, and NaN
/// patterns sort above infinity.
#[inline]
pub(crate) fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// max |round(v)| over `vals` after rounding to `dtype` (NaN if any value is NaN).
pub(crate) fn absmax_rounded(dtype: DType, vals: &[f32]) -> f32 {
    let bits = vals
        .par_chunks(ENCODE_CHUNK)
        .map(|c| c.iter().map(|&v| abs_bits(round_through(dtype, v))).max().unwrap_or(0))
        .max()
        .unwrap_or(0);
    f32::from_bits(bits)
}

/// Writes max |round(v)| of an op's output values into `absmax` (f32[1]) when given.
pub(crate) fn write_absmax(absmax: Option<&Tensor>, dtype: DType, vals: &[f32]) {
    if let Some(a) = absmax {
        super::store(a, &[absmax_rounded(dtype, vals)]);
    }
}

/// Calls `f(row_index, row)` for every row of `vals` seen as [rows, cols], in parallel.
/// Safe for `cols == 0` (no calls).
pub(crate) fn for_rows<F>(vals: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if cols == 0 {
        return;
    }
    vals.par_chunks_mut(cols).enumerate().for_each(|(r, row)| f(r, row));
}

/// Column sums of a virtual [rows, cols] matrix whose elements are `f(r, j)`: for each column,
/// the f32 values are added in increasing row order into an f64 accumulator. Parallel over
/// fixed blocks of columns, so the result does not depend on the thread count.
pub(crate) fn col_sums<F>(rows: usize, cols: usize, f: F) -> Vec<f64>
where
    F: Fn(usize, usize) -> f32 + Sync + Send,
{
    let mut sums = vec![0f64; cols];
    sums.par_chunks_mut(COL_BLOCK).enumerate().for_each(|(blk, acc)| {
        let j0 = blk * COL_BLOCK;
        for r in 0..rows {
            for (jj, a) in acc.iter_mut().enumerate() {
                *a += f(r, j0 + jj) as f64;
            }
        }
    });
    sums
}

/// `t (+)= sums`: the sum (plus the old value of `t` when accumulating) is formed in f64 and
/// rounded once to f32 and then to `t`'s dtype (a second rounding only for sub-f32 dtypes).
pub(crate) fn store_sums(t: &Tensor, sums: &[f64], accumulate: bool) {
    let vals: Vec<f32> = if accumulate {
        load(t).iter().zip(sums).map(|(&o, &s)| (o as f64 + s) as f32).collect()
    } else {
        sums.iter().map(|&s| s as f32).collect()
    };
    store_par(t, &vals);
}

