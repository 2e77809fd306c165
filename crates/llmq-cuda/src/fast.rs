//! Launchers of the dtype-specialised memory-bound kernels (the `*_v_*` kernels; chunk access in
//! `kernels/vec.cuh`). Each `v_*` function is called by its op in `ops.rs` after the op has
//! checked shapes and dtypes (and zeroed the abs-max slot), and returns `Ok(false)` when its fast
//! kernel does not apply: other dtypes, sizes or pointer alignment than the kernel handles. The
//! op then launches its generic kernel (one element per thread, runtime dtype switch), which
//! exists only for those inputs; tests/ops.rs reaches each of them with such inputs.
//!
//! Rules shared by the fast kernels: typed instantiations need every tensor they access with
//! vector instructions 16-byte aligned and rows that are whole chunks of 8 elements; grids of
//! reductions depend only on the shapes (never on the device), so results are the same bits on
//! every call and every GPU.

use crate::kernels::{self, Arg, Kernels};
use crate::{CudaBackend, SCRATCH_BYTES};
use cudarc::driver::sys::CUfunction;
use llmq_core::{AttnShape, DType, Result, Tensor};

type F = CUfunction;

/// Function handles of the fast kernels; index 0 = f32, 1 = bf16 (2 = e4m3, 3 = e5m2 where fp8
/// applies; 2 = the runtime-dtype "any" variant of the rmsnorm kernels).
pub(crate) struct FastKernels {
    rms_fwd: [F; 3],
    rms_res: [F; 3],
    rms_bwd: [F; 3],
    colreduce32: F,
    absmax: [F; 2],
    sumsq: [F; 2],
    colsum: [F; 2],
    swiglu_fwd: [F; 2],
    swiglu_bwd: [F; 2],
    ce: [F; 2],
    rope: [F; 2],
    /// [src][dst]
    convert: [[F; 4]; 4],
    /// [input][output e4m3, e5m2]
    quantize: [[F; 2]; 2],
    /// transposed, in 64- and 128-row tiles; [input][output e4m3, e5m2]
    quantize_t64: [[F; 2]; 2],
    quantize_t128: [[F; 2]; 2],
    /// plain + transposed in one pass, likewise
    quantize_tp64: [[F; 2]; 2],
    quantize_tp128: [[F; 2]; 2],
    /// [out f32, bf16]
    bias_rows: [F; 2],
    /// [master][m and v][grads]
    adamw: [[[F; 2]; 2]; 2],
}

const TY: [&str; 4] = ["f32", "bf16", "e4m3", "e5m2"];

impl FastKernels {
    pub fn load(k: &Kernels) -> Result<FastKernels> {
        let f = |name: String| k.function(&format!("llmq_{name}"));
        let two = |base: &str| -> Result<[F; 2]> { Ok([f(format!("{base}_f32"))?, f(format!("{base}_bf16"))?]) };
        let three = |base: &str| -> Result<[F; 3]> { Ok([f(format!("{base}_f32"))?, f(format!("{base}_bf16"))?, f(format!("{base}_any"))?]) };
        let null: F = std::ptr::null_mut();
        let mut convert = [[null; 4]; 4];
        for (s, row) in convert.iter_mut().enumerate() {
            for (d, slot) in row.iter_mut().enumerate() {
                if s != d {
                    *slot = f(format!("convert_v_{}_{}", TY[s], TY[d]))?;
                }
            }
        }
        let quant = |base: &str| -> Result<[[F; 2]; 2]> {
            let mut o = [[null; 2]; 2];
            for (i, row) in o.iter_mut().enumerate() {
                for (j, slot) in row.iter_mut().enumerate() {
                    *slot = f(format!("{base}_{}_{}", TY[i], TY[2 + j]))?;
                }
            }
            Ok(o)
        };
        let mut adamw = [[[null; 2]; 2]; 2];
        for (a, pa) in adamw.iter_mut().enumerate() {
            for (b, pb) in pa.iter_mut().enumerate() {
                for (c, slot) in pb.iter_mut().enumerate() {
                    *slot = f(format!("adamw_v_{}_{}_{}", TY[a], TY[b], TY[c]))?;
                }
            }
        }
        Ok(FastKernels {
            rms_fwd: three("rmsnorm_fwd_v")?,
            rms_res: three("residual_rmsnorm_fwd_v")?,
            rms_bwd: three("rmsnorm_bwd_v")?,
            colreduce32: f("colreduce32".into())?,
            absmax: two("absmax_v")?,
            sumsq: two("sumsq_partial_v")?,
            colsum: two("colsum_partial_v")?,
            swiglu_fwd: two("swiglu_fwd_v")?,
            swiglu_bwd: two("swiglu_bwd_v")?,
            ce: two("cross_entropy_v")?,
            rope: two("rope_v")?,
            convert,
            quantize: quant("quantize_v")?,
            quantize_t64: quant("quantize_t64_v")?,
            quantize_t128: quant("quantize_t128_v")?,
            quantize_tp64: quant("quantize_tp64_v")?,
            quantize_tp128: quant("quantize_tp128_v")?,
            bias_rows: two("bias_rows_v")?,
            adamw,
        })
    }
}

use crate::ops::{adamw_tail, i, p, popt};
fn dt(d: DType) -> Arg {
    Arg::I32(crate::ops::dt(d))
}
/// f32 -> 0, bf16 -> 1.
fn ix(d: DType) -> Option<usize> {
    match d {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        _ => None,
    }
}
/// e4m3 -> 0, e5m2 -> 1.
fn fp8_ix(d: DType) -> Option<usize> {
    match d {
        DType::E4M3 => Some(0),
        DType::E5M2 => Some(1),
        _ => None,
    }
}
/// f32, bf16, e4m3, e5m2 -> 0..4.
fn ix8(d: DType) -> Option<usize> {
    match d {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::E4M3 => Some(2),
        DType::E5M2 => Some(3),
        DType::I32 => None,
    }
}
fn aligned(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.addr % 16 == 0)
}
/// The index of the f32/bf16 dtype that all of `ts` share, if they do.
fn same(ts: &[&Tensor]) -> Option<usize> {
    let d = ts.first()?.dtype;
    if ts.iter().all(|t| t.dtype == d) {
        ix(d)
    } else {
        None
    }
}

/// Threads per block of the fast kernels (the rmsnorm kernels assume 8 warps).
const T: u32 = 256;
/// Threads per row of the fused cross-entropy: 4% faster than 1024 on the H200, and than keeping
/// fewer rows resident for L2 hits (NOTES.md, memory-bound kernels).
const CE_THREADS: u32 = 512;
/// Largest row width of the rmsnorm backward (its teams' f32 dw rows in shared memory: 32 KiB).
const RMS_BWD_MAX_C: usize = 4096;

impl CudaBackend {
    fn vlaunch(&self, f: F, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: every caller checked dtypes, element counts and alignment against what the
        // kernel accesses for this grid, and passes the arguments in the kernel's order.
        unsafe { kernels::launch(f, grid, block, smem, self.stream(), args) }
    }

    /// Blocks for a grid-stride loop over `items` work items (one per thread).
    fn vgrid(&self, items: usize) -> u32 {
        items.div_ceil(T as usize).clamp(1, self.dev.sm_count as usize * 8) as u32
    }

    /// Warps per row team of the rmsnorm kernels: chunks of 8, at most 4 per lane.
    fn team_warps(c: usize) -> Option<usize> {
        let nc = c.div_ceil(8);
        [1usize, 2, 4, 8].into_iter().find(|w| 128 * w >= nc)
    }

    /// out[c] (+)= sum of the `g` partial f64 rows at `partial` (row stride `ld`), fixed order.
    pub(crate) fn colreduce32(&self, out: &Tensor, partial: u64, g: usize, c: usize, ld: usize, accumulate: bool) -> Result<()> {
        self.vlaunch(
            self.fk.colreduce32,
            (c.div_ceil(32) as u32, 1, 1),
            (32, 32, 1),
            0,
            &[p(out), dt(out.dtype), Arg::Ptr(partial), i(g), i(c), i(ld), Arg::I32(accumulate as i32)],
        )
    }

    /// rmsnorm_fwd, or residual_rmsnorm_fwd when `res` = Some((res_out, delta)).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v_rmsnorm_fwd(
        &self,
        res: Option<(&Tensor, &Tensor)>,
        out: &Tensor,
        rstd: &Tensor,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
        absmax: Option<&Tensor>,
        n: usize,
        c: usize,
    ) -> Result<bool> {
        if n == 0 || c == 0 {
            return Ok(false);
        }
        let Some(wt) = Self::team_warps(c) else {
            return Ok(false);
        };
        let mut acts = vec![x, out];
        if let Some((r, d)) = res {
            acts.push(r);
            acts.push(d);
        }
        // typed when possible; else the runtime-dtype variant (the same summation order)
        let var = match same(&acts) {
            Some(t) if c.is_multiple_of(8) && aligned(&acts) => t,
            _ => 2,
        };
        let grid = (n.div_ceil(8 / wt) as u32, 1, 1);
        let tail = [p(w), dt(w.dtype), i(n), i(c), Arg::F32(eps), popt(absmax), i(wt)];
        match res {
            Some((r, d)) => {
                let mut args = vec![p(r), dt(r.dtype), p(out), dt(out.dtype), p(rstd), p(x), dt(x.dtype), p(d), dt(d.dtype)];
                args.extend(tail);
                self.vlaunch(self.fk.rms_res[var], grid, (T, 1, 1), 0, &args)?;
            }
            None => {
                let mut args = vec![p(out), dt(out.dtype), p(rstd), p(x), dt(x.dtype)];
                args.extend(tail);
                self.vlaunch(self.fk.rms_fwd[var], grid, (T, 1, 1), 0, &args)?;
            }
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v_rmsnorm_bwd(
        &self,
        dx: &Tensor,
        dw: &Tensor,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dres: Option<&Tensor>,
        absmax: Option<&Tensor>,
        n: usize,
        c: usize,
    ) -> Result<bool> {
        if n == 0 || c == 0 || c > RMS_BWD_MAX_C {
            return Ok(false);
        }
        let Some(wt) = Self::team_warps(c) else {
            return Ok(false);
        };
        let mut acts = vec![dx, dout, x];
        acts.extend(dres);
        let var = match same(&acts) {
            Some(t) if c.is_multiple_of(8) && aligned(&acts) => t,
            _ => 2,
        };
        // about 4 rows per team: short per-lane f32 sums and enough blocks for four per SM (a
        // function of N and C only, so the sums are the same on every device)
        let teams = 8 / wt;
        let cap = (SCRATCH_BYTES / (8 * c)).min(65535);
        let g = n.div_ceil(teams * 4).clamp(1, cap);
        let smem = teams * c.div_ceil(8) * 8 * 4; // per team: the f32 dw sums, padded to whole chunks
        self.vlaunch(
            self.fk.rms_bwd[var],
            (g as u32, 1, 1),
            (T, 1, 1),
            smem as u32,
            &[
                p(dx),
                dt(dx.dtype),
                p(dout),
                dt(dout.dtype),
                p(x),
                dt(x.dtype),
                p(w),
                dt(w.dtype),
                p(rstd),
                popt(dres),
                dres.map_or(Arg::I32(0), |d| dt(d.dtype)),
                Arg::Ptr(self.scratch()?),
                i(n),
                i(c),
                popt(absmax),
                i(wt),
            ],
        )?;
        self.colreduce32(dw, self.scratch()?, g, c, c, true)?;
        Ok(true)
    }

    /// swiglu_fwd (dout None) or swiglu_bwd; `out` is out or dinp.
    pub(crate) fn v_swiglu(&self, out: &Tensor, dout: Option<&Tensor>, inp: &Tensor, absmax: Option<&Tensor>, n: usize, d: usize) -> Result<bool> {
        if !d.is_multiple_of(8) || n * d == 0 {
            return Ok(false);
        }
        let mut acts = vec![out, inp];
        acts.extend(dout);
        let Some(var) = same(&acts) else {
            return Ok(false);
        };
        if !aligned(&acts) {
            return Ok(false);
        }
        let grid = (self.vgrid(n * d / 8), 1, 1);
        match dout {
            None => self.vlaunch(self.fk.swiglu_fwd[var], grid, (T, 1, 1), 0, &[p(out), p(inp), Arg::I64(n as i64), i(d), popt(absmax)])?,
            Some(dy) => self.vlaunch(self.fk.swiglu_bwd[var], grid, (T, 1, 1), 0, &[p(out), p(dy), p(inp), Arg::I64(n as i64), i(d), popt(absmax)])?,
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v_cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, r: usize, v: usize, dloss: f32, z: f32) -> Result<bool> {
        let Some(var) = ix(logits.dtype) else {
            return Ok(false);
        };
        // a block of CE_THREADS per row
        self.vlaunch(self.fk.ce[var], (r as u32, 1, 1), (CE_THREADS, 1, 1), 0, &[p(logits), p(losses), p(targets), i(r), i(v), Arg::F32(dloss), Arg::F32(z)])?;
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v_rope(&self, out: &Tensor, inp: &Tensor, freqs: &Tensor, s: &AttnShape, backward: bool, [pb, db]: [Arg; 2], absmax: Option<&Tensor>) -> Result<bool> {
        if !s.hd.is_multiple_of(16) {
            return Ok(false);
        }
        let Some(var) = same(&[out, inp]) else {
            return Ok(false);
        };
        if !aligned(&[out, inp, freqs]) {
            return Ok(false);
        }
        let total = s.n() * (s.hq + 2 * s.hkv) * s.hd / 16;
        if total == 0 || total >= (1 << 31) {
            return Ok(false);
        }
        self.vlaunch(
            self.fk.rope[var],
            (self.vgrid(total), 1, 1),
            (T, 1, 1),
            0,
            &[p(out), p(inp), p(freqs), i(s.n()), i(s.t), i(s.hq), i(s.hkv), i(s.hd), Arg::I32(backward as i32), pb, db, popt(absmax)],
        )?;
        Ok(true)
    }

    pub(crate) fn v_convert(&self, dst: &Tensor, src: &Tensor) -> Result<bool> {
        let n = src.numel();
        if n == 0 || !aligned(&[dst, src]) {
            return Ok(false);
        }
        let (Some(si), Some(di)) = (ix8(src.dtype), ix8(dst.dtype)) else {
            return Ok(false);
        };
        if si == di {
            return Ok(false);
        }
        self.vlaunch(self.fk.convert[si][di], (self.vgrid((n / 8).max(1)), 1, 1), (T, 1, 1), 0, &[p(dst), p(src), Arg::I64(n as i64)])?;
        Ok(true)
    }

    pub(crate) fn v_absmax(&self, out: &Tensor, inp: &Tensor) -> Result<bool> {
        let n = inp.numel();
        if n == 0 || !aligned(&[inp]) {
            return Ok(false);
        }
        let Some(var) = ix(inp.dtype) else {
            return Ok(false);
        };
        self.vlaunch(self.fk.absmax[var], (self.vgrid((n / 8).max(1)), 1, 1), (T, 1, 1), 0, &[p(out), p(inp), Arg::I64(n as i64)])?;
        Ok(true)
    }

    /// The tiled transposing quantiser for [r, c] (kernels/quant.cu): the 128-row kernel `k128`
    /// where r % 128 == 0, else the 64-row kernel `k64`; with the tile height (the block has
    /// twice as many threads). None where neither applies.
    fn transpose_tiles(&self, r: usize, c: usize, k128: F, k64: F) -> Option<(F, usize)> {
        if r == 0 || c == 0 || !c.is_multiple_of(64) {
            return None;
        }
        let pick = if r.is_multiple_of(128) { (k128, 128) } else { (k64, 64) };
        (r.is_multiple_of(pick.1) && r / pick.1 <= 65535).then_some(pick)
    }

    pub(crate) fn v_quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<bool> {
        if !aligned(&[out, inp]) {
            return Ok(false);
        }
        let Some(ii) = ix(inp.dtype) else {
            return Ok(false);
        };
        let Some(oi) = fp8_ix(out.dtype) else {
            return Ok(false);
        };
        if transpose {
            let (r, c) = inp.rows_cols();
            let Some((f, tile_rows)) = self.transpose_tiles(r, c, self.fk.quantize_t128[ii][oi], self.fk.quantize_t64[ii][oi]) else {
                return Ok(false);
            };
            let grid = ((c / 64) as u32, (r / tile_rows) as u32, 1);
            self.vlaunch(f, grid, (2 * tile_rows as u32, 1, 1), 0, &[p(out), p(descale), p(inp), p(absmax), i(r), i(c)])?;
        } else {
            let n = inp.numel();
            if n == 0 {
                return Ok(false);
            }
            self.vlaunch(
                self.fk.quantize[ii][oi],
                (self.vgrid((n / 8).max(1)), 1, 1),
                (T, 1, 1),
                0,
                &[p(out), p(descale), p(inp), p(absmax), Arg::I64(n as i64)],
            )?;
        }
        Ok(true)
    }

    /// Plain and transposed quantisation in one pass (128- or 64-row tiles); `Ok(false)` where the
    /// tiled kernel does not apply (the caller then quantises twice).
    pub(crate) fn v_quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<bool> {
        if !aligned(&[out, out_t, inp]) {
            return Ok(false);
        }
        let (Some(ii), Some(oi)) = (ix(inp.dtype), fp8_ix(out.dtype)) else {
            return Ok(false);
        };
        let (r, c) = inp.rows_cols();
        if out_t.dtype != out.dtype {
            return Ok(false);
        }
        let Some((f, tile_rows)) = self.transpose_tiles(r, c, self.fk.quantize_tp128[ii][oi], self.fk.quantize_tp64[ii][oi]) else {
            return Ok(false);
        };
        self.vlaunch(
            f,
            ((c / 64) as u32, (r / tile_rows) as u32, 1),
            (2 * tile_rows as u32, 1, 1),
            0,
            &[p(out_t), p(out), p(descale), p(inp), p(absmax), i(r), i(c)],
        )?;
        Ok(true)
    }

    /// out [rows, cols] = (accumulate ? out : 0) + bias (the matmul bias pass).
    pub(crate) fn v_bias_rows(&self, out: &Tensor, bias: &Tensor, rows: usize, cols: usize, accumulate: bool) -> Result<bool> {
        let Some(oi) = ix(out.dtype) else {
            return Ok(false);
        };
        if !aligned(&[out]) || !cols.is_multiple_of(8) || rows == 0 || rows > i32::MAX as usize || cols > i32::MAX as usize {
            return Ok(false);
        }
        const BT: usize = 128;
        let gx = (cols / 8).div_ceil(BT);
        let gy = (self.dev.sm_count as usize * 16).div_ceil(gx).clamp(1, 65535).min(rows);
        self.vlaunch(self.fk.bias_rows[oi], (gx as u32, gy as u32, 1), (BT as u32, 1, 1), 0, &[p(out), p(bias), dt(bias.dtype), i(rows), i(cols), Arg::I32(accumulate as i32)])?;
        Ok(true)
    }

    pub(crate) fn v_colsum(&self, out: &Tensor, inp: &Tensor, rows: usize, c: usize, accumulate: bool) -> Result<bool> {
        if rows == 0 || c == 0 || !c.is_multiple_of(8) || !aligned(&[inp]) {
            return Ok(false);
        }
        let Some(var) = ix(inp.dtype) else {
            return Ok(false);
        };
        // 8 row slots x ~8 rows per thread; a function of the shape only
        let cap = (SCRATCH_BYTES / (8 * c)).min(65535);
        let g = rows.div_ceil(64).clamp(1, cap);
        self.vlaunch(self.fk.colsum[var], ((c / 8).div_ceil(32) as u32, g as u32, 1), (32, 8, 1), 0, &[Arg::Ptr(self.scratch()?), p(inp), i(rows), i(c)])?;
        self.colreduce32(out, self.scratch()?, g, c, c, accumulate)?;
        Ok(true)
    }

    /// Pass 1 of sum_squares into `g` f64 partials at the scratch buffer (pass 2 is shared).
    pub(crate) fn v_sumsq_partial(&self, t: &Tensor, g: usize) -> Result<bool> {
        let n = t.numel();
        if n == 0 || !aligned(&[t]) {
            return Ok(false);
        }
        let Some(var) = ix(t.dtype) else {
            return Ok(false);
        };
        self.vlaunch(self.fk.sumsq[var], (g as u32, 1, 1), (T, 1, 1), 0, &[Arg::Ptr(self.scratch()?), p(t), Arg::I64(n as i64)])?;
        Ok(true)
    }

    /// One AdamW launch over a segment table (`seg`: the SegTable bytes of optim.cu).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v_adamw(&self, a: &llmq_core::AdamW, seg: &[u8], total: usize, separate: bool) -> Result<bool> {
        let ts = [a.params, a.master, a.grads, a.m, a.v];
        if !aligned(&ts) || a.m.dtype != a.v.dtype || ix(a.params.dtype).is_none() {
            return Ok(false);
        }
        let (Some(mi), Some(si), Some(gi)) = (ix(a.master.dtype), ix(a.m.dtype), ix(a.grads.dtype)) else {
            return Ok(false);
        };
        let tensors = [p(a.params), dt(a.params.dtype), p(a.master), p(a.grads), p(a.m), p(a.v)];
        let args: Vec<Arg> = tensors.into_iter().chain(adamw_tail(a, seg.to_vec(), separate)).collect();
        self.vlaunch(self.fk.adamw[mi][si][gi], (self.vgrid(total.div_ceil(4).max(1)), 1, 1), (T, 1, 1), 0, &args)?;
        Ok(true)
    }
}
