//! Fused softmax cross-entropy, in place over the logits.
//!
//! Per row x (width V) with target y: m = max x; e_i = exp(x_i - m) in f32; S = Σ e_i summed in
//! order in f64; lse = m + ln S (f64); loss = lse - x_y (f64, stored as f32);
//! grad_i = dloss * (e_i / S - [i == y]) in f32, rounded to the logits dtype in place.
//!
//! Pitfalls:
//! - Subtracting the row max keeps exp from overflowing (the largest term is exactly 1).
//! - Target -100 (ignore_index) rows get loss 0 and a zero gradient row.
//! - Targets are validated for all rows before any row is overwritten, so an error leaves the
//!   logits intact; the message names the row and the bad value.
//! - The caller chooses dloss (e.g. 1 / number of counted targets for a mean loss).

use super::common::{op_err, store_par};
use super::{bytes_mut, load_i32};
use crate::dtype::{decode_into, encode_into};
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

pub const IGNORE_INDEX: i32 = -100;

pub fn cross_entropy(logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()> {
    const OP: &str = "cross_entropy";
    let Some((r, v)) = crate::check::cross_entropy_dims(OP, logits, losses, targets)? else { return Ok(()) };
    let tv = load_i32(targets);
    if let Some((row, &y)) = tv.iter().enumerate().find(|(_, &y)| y != IGNORE_INDEX && (y < 0 || y as usize >= v)) {
        return op_err(format!("{OP}: row {row} has target {y}, outside 0..{v} (and not {IGNORE_INDEX})"));
    }
    let dt = logits.dtype;
    let sz = dt.size();
    let mut lossv = vec![0f32; r];
    // SAFETY: logits is updated in place; no other reference to its bytes exists.
    let lb = unsafe { bytes_mut(logits) };
    lb.par_chunks_mut(v * sz).zip(lossv.par_iter_mut()).zip(tv.par_iter()).for_each(|((row, loss), &y)| {
        let mut x = vec![0f32; v];
        if y == IGNORE_INDEX {
            *loss = 0.0;
            encode_into(dt, &x, row);
            return;
        }
        decode_into(dt, row, &mut x);
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let xy = x[y as usize];
        let mut s = 0f64;
        for e in x.iter_mut() {
            *e = (*e - m).exp();
            s += *e as f64;
        }
        let lse = m as f64 + s.ln();
        *loss = ((lse - xy as f64) + z as f64 * lse * lse) as f32;
        let c = (1.0 + 2.0 * z as f64 * lse) as f32;
        for (i, e) in x.iter_mut().enumerate() {
            let p = (*e as f64 / s) as f32;
            let onehot = if i == y as usize { 1.0 } else { 0.0 };
            *e = dloss * (p * c - onehot);
        }
        encode_into(dt, &x, row);
    });
    store_par(losses, &lossv);
    Ok(())
}
