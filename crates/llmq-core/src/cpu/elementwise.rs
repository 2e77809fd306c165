//! Row-wise and element-wise ops: embedding lookup and its gradient, RoPE, SwiGLU, column sums.
//!
//! - embedding_fwd gathers table rows (decoding only the rows it needs: the table can be large).
//!   embedding_bwd groups the token positions by id with a counting sort (which keeps positions
//!   in increasing order), then each vocabulary row adds its dout rows in that order in f32,
//!   starting from its old value, and is rounded once. Rows of unused ids are not touched.
//!   Parallel over vocabulary rows: no atomics, deterministic.
//! - RoPE uses the rotate-half (HF / NeoX) pairing (i, i + Hd/2) with the table's (cos, sin) for
//!   position n % T; the backward is the same code with sin negated (rotation by -angle), which
//!   gives exactly the transpose. v heads are copied.
//! - SwiGLU: row = [up | gate], out = up * (gate * sigmoid(gate)), sigmoid(g) = 1 / (1 + exp(-g))
//!   (exp(-g) overflowing to inf for very negative g gives sigmoid 0, silu -0: no NaN).
//!   d up = dout * silu(g); d gate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
//! - colsum: f64 column sums over rows in increasing order (`col_sums`).
//! - ids out of range are reported as errors before anything is written.

use super::common::{check_absmax, check_float, check_float_n, check_rows, col_sums, for_rows, op_err, store_par, store_sums, write_absmax};
use super::{bytes, bytes_mut, load, load_i32};
use crate::check::{check_rope, colsum_rows, swiglu_dims};
use crate::backend::AttnShape;
use crate::dtype::{decode_into, encode_into, DType};
use crate::error::Result;
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Checks an i32 id tensor against 0..v and returns the ids.
fn load_ids(op: &str, ids: &Tensor, v: usize) -> Result<Vec<i32>> {
    if ids.dtype != DType::I32 {
        return op_err(format!("{op}: ids must be i32, got {}", ids.dtype));
    }
    let idv = load_i32(ids);
    if let Some((n, &id)) = idv.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= v) {
        return op_err(format!("{op}: ids[{n}] = {id} is outside the vocabulary 0..{v}"));
    }
    Ok(idv)
}

pub fn embedding_fwd(out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
    const OP: &str = "embedding_fwd";
    check_float(OP, "table", table)?;
    let (v, c) = table.rows_cols();
    let n = ids.numel();
    check_rows(OP, "out", out, n, c)?;
    let idv = load_ids(OP, ids, v)?;
    if c == 0 {
        return Ok(());
    }
    let (tdt, odt) = (table.dtype, out.dtype);
    let (tsz, osz) = (tdt.size(), odt.size());
    // SAFETY: table is an input, out the only output; they do not alias (op contract).
    let tb = unsafe { bytes(table) };
    let ob = unsafe { bytes_mut(out) };
    ob.par_chunks_mut(c * osz).zip(idv.par_iter()).for_each(|(orow, &id)| {
        let id = id as usize;
        let src = &tb[id * c * tsz..(id + 1) * c * tsz];
        if tdt == odt {
            orow.copy_from_slice(src);
        } else {
            let mut row = vec![0f32; c];
            decode_into(tdt, src, &mut row);
            encode_into(odt, &row, orow);
        }
    });
    Ok(())
}

pub fn embedding_bwd(dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
    const OP: &str = "embedding_bwd";
    check_float(OP, "dtable", dtable)?;
    let (v, c) = dtable.rows_cols();
    let n = ids.numel();
    check_rows(OP, "dout", dout, n, c)?;
    let idv = load_ids(OP, ids, v)?;
    if c == 0 || n == 0 {
        return Ok(());
    }
    // Counting sort of positions by id; positions of one id stay in increasing order.
    let mut start = vec![0usize; v + 1];
    for &id in &idv {
        start[id as usize + 1] += 1;
    }
    for i in 0..v {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; n];
    for (pos, &id) in idv.iter().enumerate() {
        order[fill[id as usize]] = pos;
        fill[id as usize] += 1;
    }
    let dov = load(dout);
    let dt = dtable.dtype;
    let sz = dt.size();
    // SAFETY: dout was copied; dtable is the only tensor written.
    let tb = unsafe { bytes_mut(dtable) };
    tb.par_chunks_mut(c * sz).enumerate().for_each(|(id, trow)| {
        let positions = &order[start[id]..start[id + 1]];
        if positions.is_empty() {
            return;
        }
        let mut acc = vec![0f32; c];
        decode_into(dt, trow, &mut acc);
        for &p in positions {
            for (a, &d) in acc.iter_mut().zip(&dov[p * c..(p + 1) * c]) {
                *a += d;
            }
        }
        encode_into(dt, &acc, trow);
    });
    Ok(())
}

/// RoPE forward (`backward == false`) or its transpose (`backward == true`).
#[allow(clippy::too_many_arguments)]
pub fn rope(out: &Tensor, inp: &Tensor, freqs: &Tensor, shape: AttnShape, backward: bool, bias: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
    let op = if backward { "rope_bwd" } else { "rope_fwd" };
    let (n, q) = (shape.n(), shape.qkv_width());
    check_rows(op, "input", inp, n, q)?;
    check_rows(op, "output", out, n, q)?;
    check_rope(op, freqs, &shape)?;
    if let Some(b) = bias {
        check_float_n(op, "bias", b, q)?;
    }
    check_absmax(op, absmax)?;
    let mut ov = load(inp);
    if let Some(b) = bias {
        let bv = load(b);
        for_rows(&mut ov, q, |_, row| row.iter_mut().zip(&bv).for_each(|(x, &b)| *x += b));
    }
    rope_in_place(&mut ov, &load(freqs), shape, backward);
    store_par(out, &ov);
    write_absmax(absmax, out.dtype, &ov);
    Ok(())
}

/// RoPE (or its transpose) on the q and k heads of `vals` ([N, Q], f32) in place.
pub(crate) fn rope_in_place(vals: &mut [f32], fv: &[f32], shape: AttnShape, backward: bool) {
    let (q, hd, t) = (shape.qkv_width(), shape.hd, shape.t);
    let half = hd / 2;
    let sign = if backward { -1f32 } else { 1f32 };
    let nrot = shape.hq + shape.hkv; // q and k heads; v heads follow and are left alone
    for_rows(vals, q, |r, row| {
        let f = &fv[(r % t) * hd..][..hd];
        for h in 0..nrot {
            let x = &mut row[h * hd..][..hd];
            for i in 0..half {
                let (cos, sin) = (f[2 * i], sign * f[2 * i + 1]);
                let (x0, x1) = (x[i], x[i + half]);
                x[i] = x0 * cos - x1 * sin;
                x[i + half] = x1 * cos + x0 * sin;
            }
        }
    });
}

#[inline]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

pub fn swiglu_fwd(out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    let (n, d) = swiglu_dims(OP, "out", out, inp)?;
    check_absmax(OP, absmax)?;
    let iv = load(inp);
    let mut ov = vec![0f32; n * d];
    for_rows(&mut ov, d, |r, row| {
        let (up, gate) = iv[r * 2 * d..(r + 1) * 2 * d].split_at(d);
        for ((o, &u), &g) in row.iter_mut().zip(up).zip(gate) {
            *o = u * (g * sigmoid(g));
        }
    });
    store_par(out, &ov);
    write_absmax(absmax, out.dtype, &ov);
    Ok(())
}

pub fn swiglu_bwd(dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    let (n, d) = swiglu_dims(OP, "dout", dout, inp)?;
    check_rows(OP, "dinp", dinp, n, 2 * d)?;
    check_absmax(OP, absmax)?;
    let iv = load(inp);
    let dov = load(dout);
    let mut dv = vec![0f32; n * 2 * d];
    for_rows(&mut dv, 2 * d, |r, row| {
        let (up, gate) = iv[r * 2 * d..(r + 1) * 2 * d].split_at(d);
        let dy = &dov[r * d..(r + 1) * d];
        let (dup, dgate) = row.split_at_mut(d);
        for i in 0..d {
            let (u, g) = (up[i], gate[i]);
            let s = sigmoid(g);
            dup[i] = dy[i] * (g * s);
            dgate[i] = dy[i] * u * (s * (1.0 + g * (1.0 - s)));
        }
    });
    store_par(dinp, &dv);
    write_absmax(absmax, dinp.dtype, &dv);
    Ok(())
}

pub fn colsum(out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
    let Some(rows) = colsum_rows("colsum", out, inp)? else { return Ok(()) };
    let c = out.numel();
    let iv = load(inp);
    let sums = col_sums(rows, c, |r, j| iv[r * c + j]);
    store_sums(out, &sums, accumulate);
    Ok(())
}
