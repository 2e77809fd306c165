//! Matrix multiplication: out = op(A)·op(B) · descale_a·descale_b (+ bias) (+ old out).
//!
//! Algorithm: the operands are decoded to f32 (fp8 and bf16 alike), then `matrixmultiply::sgemm`
//! (single-threaded per call) computes the f32 product of one fixed block of `ROW_BLOCK` rows;
//! the blocks are spread over rayon. Transposes are expressed as strides, so no data is moved.
//! The epilogue, per element in f32: v = prod; v *= descale_a*descale_b (only when a descale is
//! given); v += bias[j]; v = old + v when accumulating; then one RNE rounding to out's dtype.
//!
//! Pitfalls:
//! - Determinism: sgemm packs A in micro-panels and accumulates every C element over k with the
//!   same kernel (partial panels are padded and computed by the same kernel), so a row's result
//!   depends only on that row of op(A), on B and on K: not on M, the row block it falls in, the
//!   strides, or the thread count. `tests/ops_forward.rs` checks this bitwise.
//! - sgemm is called with beta = 0, so the (uninitialised) C buffer is never read; accumulation
//!   into `out` is done in the epilogue from a decoded copy so that it is rounded only once.
//! - K = 0 gives a zero product (plus bias / old value).
//! - A missing descale factor counts as 1 (also for fp8 operands, whose stored values are then
//!   used as they are).

use super::common::{check_float, load_scalar};
use super::{bytes_mut, load};
use crate::backend::Matmul;
use crate::dtype::encode_into;
use crate::error::Result;
use rayon::prelude::*;

/// Rows of op(A) per sgemm call / rayon task.
const ROW_BLOCK: usize = 64;

pub fn matmul(args: &Matmul) -> Result<()> {
    const OP: &str = "matmul";
    let (m, n, k) = args.dims()?;
    check_float(OP, "a", args.a)?;
    check_float(OP, "b", args.b)?;
    check_float(OP, "out", args.out)?;
    if let Some(bias) = args.bias {
        check_float(OP, "bias", bias)?;
    }
    let da = args.descale_a.map(|t| load_scalar(OP, "descale_a", t)).transpose()?;
    let db = args.descale_b.map(|t| load_scalar(OP, "descale_b", t)).transpose()?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let scale = match (da, db) {
        (None, None) => None,
        _ => Some(da.unwrap_or(1.0) * db.unwrap_or(1.0)),
    };

    let a = load(args.a);
    let b = load(args.b);
    let bias = args.bias.map(load);
    let old = args.accumulate.then(|| load(args.out));

    // Strides of op(A) [M, K] and op(B) [K, N] in their stored layouts.
    let (rsa, csa) = if args.trans_a { (1, m) } else { (k, 1) };
    let (rsb, csb) = if args.trans_b { (1, k) } else { (n, 1) };

    let odt = args.out.dtype;
    let osz = odt.size();
    // SAFETY: inputs (including the old value of out) were copied by `load`.
    let out = unsafe { bytes_mut(args.out) };
    out.par_chunks_mut(ROW_BLOCK * n * osz).enumerate().for_each(|(blk, ob)| {
        let r0 = blk * ROW_BLOCK;
        let rows = ob.len() / (n * osz);
        let mut c = vec![0f32; rows * n];
        if k > 0 {
            // SAFETY: op(A) rows r0..r0+rows and all of op(B) lie inside `a` and `b` for these
            // strides (checked shapes), and `c` is a separate rows x n row-major buffer.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    k,
                    n,
                    1.0,
                    a.as_ptr().add(r0 * rsa),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr(),
                    rsb as isize,
                    csb as isize,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
        for (i, crow) in c.chunks_exact_mut(n).enumerate() {
            for (j, v) in crow.iter_mut().enumerate() {
                let mut x = *v;
                if let Some(s) = scale {
                    x *= s;
                }
                if let Some(bias) = &bias {
                    x += bias[j];
                }
                if let Some(old) = &old {
                    x += old[(r0 + i) * n + j];
                }
                *v = x;
            }
        }
        encode_into(odt, &c, ob);
    });
    Ok(())
}
