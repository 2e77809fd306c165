//! Typed launchers for the compute ops: every op checks dtypes and shapes (with the same rules as
//! the CPU backend) before any unsafe launch, then enqueues its kernels on the compute stream.
//!
//! Kernel arguments are raw device addresses plus int dtype codes (`dt`), matching the
//! `extern "C"` signatures in `kernels/*.cu` argument for argument.

use crate::attention::GradEpi;
use crate::device::check;
use crate::kernels::{self, Arg};
use crate::{CudaBackend, SCRATCH_BYTES};
use cudarc::driver::sys;
use llmq_core::check::{
    check_absmax, check_eps, check_f32_n, check_float, check_float_n, check_heads, check_i32, check_rope, check_rows, colsum_rows, cross_entropy_dims, op_err, rmsnorm_bwd_dims,
    rmsnorm_fwd_dims, swiglu_dims,
};
use llmq_core::{AdamW, AttentionKernels, AttnShape, DType, Result, Segment, Tensor};

pub(crate) fn dt(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::E4M3 => 2,
        DType::E5M2 => 3,
        DType::I32 => 4,
    }
}
pub(crate) fn p(t: &Tensor) -> Arg {
    Arg::Ptr(t.addr)
}
pub(crate) fn popt(t: Option<&Tensor>) -> Arg {
    Arg::Ptr(t.map_or(0, |t| t.addr))
}
pub(crate) fn i(v: usize) -> Arg {
    Arg::I32(v as i32)
}

/// The shared head checks plus this backend's limits (the kernels pair columns: Hd even; T > 0).
fn check_attn(op: &str, s: &AttnShape) -> Result<()> {
    check_heads(op, s)?;
    if !s.hd.is_multiple_of(2) {
        return op_err(format!("{op}: head size {} must be even", s.hd));
    }
    if s.t == 0 {
        return op_err(format!("{op}: T must be positive"));
    }
    Ok(())
}
/// int-sized dimension check (kernels index with 32-bit ints where noted).
fn fits_i32(op: &str, v: usize) -> Result<()> {
    if v > i32::MAX as usize {
        return op_err(format!("{op}: dimension {v} exceeds the 32-bit range of the kernels"));
    }
    Ok(())
}

const THREADS: u32 = 256;
/// Warps per block of the decode attention kernel (DEC_WARPS in kernels/decode.cu).
const DEC_WARPS: u32 = 4;
/// Keys per shared-memory tile of the embedding backward's sort (kernels/embedding.cu; 16 KiB).
const EMB_SORT_TILE: usize = 2048;

impl CudaBackend {
    fn launch(&self, f: sys::CUfunction, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: every caller checked the tensors' dtypes and element counts against the sizes the
        // kernel derives from its integer arguments, and passes arguments in the kernel's order.
        unsafe { kernels::launch(f, grid, block, smem, self.stream(), args) }
    }

    /// Dynamic shared memory a kernel may ask for (the per-block opt-in limit, less a margin for
    /// the kernels' static shared memory).
    fn smem_limit(&self) -> usize {
        self.dev.smem_optin().saturating_sub(8 << 10)
    }

    /// Blocks for a grid-stride loop over `n` items.
    fn grid_for(&self, n: usize) -> u32 {
        let want = n.div_ceil(THREADS as usize).max(1);
        want.min(self.dev.sm_count as usize * 8) as u32
    }

    /// Grid (column blocks, row blocks) for kernels with a thread per column and a row loop.
    fn rows_grid(&self, rows: usize, cols: usize) -> (u32, u32, u32) {
        let cx = cols.div_ceil(THREADS as usize).max(1);
        let want = (self.dev.sm_count as usize * 16).div_ceil(cx).max(1);
        (cx as u32, rows.clamp(1, want.min(65535)) as u32, 1)
    }

    /// Zeroes `n` f32 abs-max slots (the kernels combine with atomicMax).
    fn zero_f32(&self, t: Option<&Tensor>) -> Result<()> {
        if let Some(t) = t {
            self.dev.bind()?;
            // SAFETY: t is an f32 tensor (checked by the caller) of t.bytes() bytes.
            check(unsafe { sys::cuMemsetD8Async(t.addr, 0, t.bytes(), self.stream()) }, "cuMemsetD8Async")?;
        }
        Ok(())
    }

    /// Number of row blocks G for a two-pass column reduction with `cols` f64 partials per block.
    fn partial_blocks(&self, rows: usize, cols: usize, max_g: usize) -> usize {
        let cap = SCRATCH_BYTES / (8 * cols.max(1));
        rows.clamp(1, max_g).min(cap.max(1))
    }

    fn colreduce(&self, out: &Tensor, partial: u64, g: usize, c: usize, ld: usize, accumulate: bool) -> Result<()> {
        let grid = (c.div_ceil(THREADS as usize) as u32, 1, 1);
        self.launch(self.k.colreduce, grid, (THREADS, 1, 1), 0, &[p(out), Arg::I32(dt(out.dtype)), Arg::Ptr(partial), i(g), i(c), i(ld), Arg::I32(accumulate as i32)])
    }

    pub(crate) fn op_convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        if dst.numel() != src.numel() {
            return op_err(format!("convert: {src:?} -> {dst:?}: sizes differ"));
        }
        if dst.dtype == src.dtype {
            // on the stream the op runs on (a convert queued on the side stream stays there)
            return llmq_core::Backend::copy(self, dst, src, self.cur.get());
        }
        if self.v_convert(dst, src)? {
            return Ok(());
        }
        let n = src.numel();
        self.launch(self.k.convert, (self.grid_for(n), 1, 1), (THREADS, 1, 1), 0, &[p(dst), Arg::I32(dt(dst.dtype)), p(src), Arg::I32(dt(src.dtype)), Arg::I64(n as i64)])
    }

    /// Runs `llmq_encode_selftest` (kernels/convert.cu): the hardware bf16 encoders against the
    /// integer reference on all 2^32 f32 bit patterns, and the branch-free IEEE reciprocal against
    /// `1.0f / x` on every float in [1, 2^126). Returns (mismatches, smallest mismatching bit
    /// pattern or u32::MAX). For tests; takes a few milliseconds on an H200.
    pub fn encode_selftest(&self) -> Result<(u32, u32)> {
        let res = self.scratch()?; // 8 bytes of it; the stream is idle after the synchronize
        self.dev.synchronize()?;
        let init = [0u32, u32::MAX];
        // SAFETY: scratch holds SCRATCH_BYTES >= 8 bytes; init is 8 bytes on the host.
        check(unsafe { sys::cuMemcpyHtoD_v2(res, init.as_ptr() as *const std::ffi::c_void, 8) }, "cuMemcpyHtoD")?;
        let f = self.k.function("llmq_encode_selftest")?;
        self.launch(f, (self.dev.sm_count * 8, 1, 1), (THREADS, 1, 1), 0, &[Arg::Ptr(res)])?;
        self.dev.synchronize()?;
        let mut out = [0u32; 2];
        // SAFETY: as above, device to host.
        check(unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut std::ffi::c_void, res, 8) }, "cuMemcpyDtoH")?;
        Ok((out[0], out[1]))
    }

    /// out [m, n] = (accumulate ? out : 0) + bias broadcast over rows.
    pub(crate) fn op_bias_rows(&self, out: &Tensor, bias: &Tensor, m: usize, n: usize, accumulate: bool) -> Result<()> {
        check_float("matmul", "bias", bias)?;
        bias.expect_numel("matmul", "bias", n)?;
        out.expect_numel("matmul", "out", m * n)?;
        if self.v_bias_rows(out, bias, m, n, accumulate)? {
            return Ok(());
        }
        let total = m * n;
        self.launch(
            self.k.bias_rows,
            (self.grid_for(total), 1, 1),
            (THREADS, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(bias), Arg::I32(dt(bias.dtype)), Arg::I64(m as i64), i(n), Arg::I32(accumulate as i32)],
        )
    }

    pub(crate) fn op_embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        const OP: &str = "embedding_fwd";
        check_float(OP, "table", table)?;
        let (v, c) = table.rows_cols();
        let n = ids.numel();
        check_i32(OP, "ids", ids, n)?;
        check_rows(OP, "out", out, n, c)?;
        fits_i32(OP, n.max(v).max(c))?;
        self.launch(
            self.k.embedding_fwd,
            (n as u32, 1, 1),
            (128, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(ids), p(table), Arg::I32(dt(table.dtype)), i(n), i(c), i(v)],
        )
    }

    pub(crate) fn op_embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        const OP: &str = "embedding_bwd";
        check_float(OP, "dtable", dtable)?;
        let (v, c) = dtable.rows_cols();
        let n = ids.numel();
        check_i32(OP, "ids", ids, n)?;
        check_rows(OP, "dout", dout, n, c)?;
        fits_i32(OP, n.max(v).max(c))?;
        if n == 0 {
            return Ok(());
        }
        // the keys (8 bytes per row, padded to a power of two) sort in the scratch buffer, in tiles
        // of EMB_SORT_TILE keys in shared memory plus global steps for the longer strides
        // (kernels/embedding.cu)
        let pk = n.next_power_of_two();
        if pk * 8 > SCRATCH_BYTES {
            return op_err(format!("{OP}: {n} rows: their sort keys do not fit the {} MiB scratch buffer (at most {} rows)", SCRATCH_BYTES >> 20, SCRATCH_BYTES / 8));
        }
        let tile = pk.min(EMB_SORT_TILE);
        let keys = self.scratch()?;
        let sort_tiles = |fill: bool, size: usize| {
            let args = [Arg::Ptr(keys), p(ids), i(n), i(v), i(tile), Arg::I32(fill as i32), i(size)];
            self.launch(self.k.embedding_sort_tile, ((pk / tile) as u32, 1, 1), (1024, 1, 1), (tile * 8) as u32, &args)
        };
        sort_tiles(true, tile)?;
        let mut size = 2 * tile;
        while size <= pk {
            let mut stride = size / 2;
            while stride >= tile {
                let args = [Arg::Ptr(keys), i(pk), i(size), i(stride)];
                self.launch(self.k.embedding_sort_step, ((pk / 2).div_ceil(256) as u32, 1, 1), (256, 1, 1), 0, &args)?;
                stride /= 2;
            }
            sort_tiles(false, size)?;
            size *= 2;
        }
        self.launch(
            self.k.embedding_bwd_sorted,
            (n as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &[p(dtable), Arg::I32(dt(dtable.dtype)), Arg::Ptr(keys), p(dout), Arg::I32(dt(dout.dtype)), i(n), i(c), i(v)],
        )
    }

    pub(crate) fn op_rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "rmsnorm_fwd";
        let (n, c) = rmsnorm_fwd_dims(OP, out, rstd, x, w, None, eps, absmax)?;
        fits_i32(OP, n.max(c))?;
        self.zero_f32(absmax)?;
        if self.v_rmsnorm_fwd(None, out, rstd, x, w, eps, absmax, n, c)? {
            return Ok(());
        }
        self.launch(
            self.k.rmsnorm_fwd,
            (n.div_ceil(8) as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(rstd), p(x), Arg::I32(dt(x.dtype)), p(w), Arg::I32(dt(w.dtype)), i(n), i(c), Arg::F32(eps), popt(absmax)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_residual_rmsnorm_fwd(&self, res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "residual_rmsnorm_fwd";
        let (n, c) = rmsnorm_fwd_dims(OP, out, rstd, x, w, Some((res_out, delta)), eps, absmax)?;
        fits_i32(OP, n.max(c))?;
        self.zero_f32(absmax)?;
        if self.v_rmsnorm_fwd(Some((res_out, delta)), out, rstd, x, w, eps, absmax, n, c)? {
            return Ok(());
        }
        self.launch(
            self.k.residual_rmsnorm_fwd,
            (n.div_ceil(8) as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &[
                p(res_out),
                Arg::I32(dt(res_out.dtype)),
                p(out),
                Arg::I32(dt(out.dtype)),
                p(rstd),
                p(x),
                Arg::I32(dt(x.dtype)),
                p(delta),
                Arg::I32(dt(delta.dtype)),
                p(w),
                Arg::I32(dt(w.dtype)),
                i(n),
                i(c),
                Arg::F32(eps),
                popt(absmax),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "rmsnorm_bwd";
        let (n, c) = rmsnorm_bwd_dims(OP, dx, dw, dout, x, w, rstd, dres, absmax)?;
        fits_i32(OP, n.max(c))?;
        self.zero_f32(absmax)?;
        if self.v_rmsnorm_bwd(dx, dw, dout, x, w, rstd, dres, absmax, n, c)? {
            return Ok(());
        }
        self.launch(
            self.k.rmsnorm_bwd,
            (n.div_ceil(8) as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &[
                p(dx),
                Arg::I32(dt(dx.dtype)),
                p(dout),
                Arg::I32(dt(dout.dtype)),
                p(x),
                Arg::I32(dt(x.dtype)),
                p(w),
                Arg::I32(dt(w.dtype)),
                p(rstd),
                popt(dres),
                Arg::I32(dres.map_or(0, |d| dt(d.dtype))),
                i(n),
                i(c),
                popt(absmax),
            ],
        )?;
        // dw: fixed row-block count (a function of N and C only), f64 partial sums
        let g = self.partial_blocks(n, c, 256);
        self.launch(
            self.k.rmsnorm_dw_partial,
            (c.div_ceil(THREADS as usize) as u32, g as u32, 1),
            (THREADS, 1, 1),
            0,
            &[Arg::Ptr(self.scratch()?), p(dout), Arg::I32(dt(dout.dtype)), p(x), Arg::I32(dt(x.dtype)), p(rstd), i(n), i(c)],
        )?;
        self.colreduce(dw, self.scratch()?, g, c, c, true)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, s: AttnShape, eps: f32) -> Result<()> {
        const OP: &str = "qk_norm_fwd";
        check_attn(OP, &s)?;
        let (n, q, hd) = (s.n(), s.qkv_width(), s.hd);
        check_rows(OP, "qkv", qkv, n, q)?;
        check_rows(OP, "out", out, n, q)?;
        check_f32_n(OP, "rstd", rstd, n * (s.hq + s.hkv))?;
        check_float_n(OP, "qw", qw, hd)?;
        check_float_n(OP, "kw", kw, hd)?;
        check_eps(OP, eps)?;
        fits_i32(OP, n)?;
        let warps = n * (s.hq + 2 * s.hkv);
        let blocks = warps.div_ceil((THREADS / 32) as usize);
        self.launch(
            self.k.qknorm_fwd,
            (blocks as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(rstd), p(qkv), Arg::I32(dt(qkv.dtype)), p(qw), Arg::I32(dt(qw.dtype)), p(kw), Arg::I32(dt(kw.dtype)), i(n), i(s.hq), i(s.hkv), i(hd), Arg::F32(eps)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, s: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "qk_norm_bwd";
        check_attn(OP, &s)?;
        check_absmax(OP, absmax)?;
        let (n, q, hd) = (s.n(), s.qkv_width(), s.hd);
        check_rows(OP, "qkv", qkv, n, q)?;
        check_rows(OP, "dout", dout, n, q)?;
        check_rows(OP, "dqkv", dqkv, n, q)?;
        check_f32_n(OP, "rstd", rstd, n * (s.hq + s.hkv))?;
        for (name, t) in [("qw", qw), ("kw", kw), ("dqw", dqw), ("dkw", dkw)] {
            check_float_n(OP, name, t, hd)?;
        }
        fits_i32(OP, n)?;
        let nw = (THREADS / 32) as usize;
        let smem = nw * 2 * hd * 8;
        if smem > self.smem_limit() {
            return op_err(format!("{OP}: head size {hd} too large"));
        }
        let g = self.partial_blocks(n, 2 * hd, 2 * self.dev.sm_count as usize);
        self.zero_f32(absmax)?;
        self.launch(
            self.k.qknorm_bwd,
            (g as u32, 1, 1),
            (THREADS, 1, 1),
            smem as u32,
            &[
                p(dqkv),
                Arg::I32(dt(dqkv.dtype)),
                Arg::Ptr(self.scratch()?),
                p(dout),
                Arg::I32(dt(dout.dtype)),
                p(qkv),
                Arg::I32(dt(qkv.dtype)),
                p(qw),
                Arg::I32(dt(qw.dtype)),
                p(kw),
                Arg::I32(dt(kw.dtype)),
                p(rstd),
                i(n),
                i(s.hq),
                i(s.hkv),
                i(hd),
                popt(absmax),
            ],
        )?;
        self.colreduce(dqw, self.scratch()?, g, hd, 2 * hd, true)?;
        self.colreduce(dkw, self.scratch()? + (hd * 8) as u64, g, hd, 2 * hd, true)
    }

    pub(crate) fn op_rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, s: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        if let Some(b) = bias {
            check_float_n("rope_fwd", "bias", b, s.qkv_width())?;
        }
        self.rope(out, qkv, freqs, s, false, bias, None)
    }

    pub(crate) fn op_rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, s: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        self.rope(dqkv, dout, freqs, s, true, None, absmax)
    }

    /// RoPE forward (with the QKV bias added first) or backward (with the abs-max of its output).
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, out: &Tensor, inp: &Tensor, freqs: &Tensor, s: AttnShape, backward: bool, bias: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        let op = if backward { "rope_bwd" } else { "rope_fwd" };
        check_attn(op, &s)?;
        let (n, q, hd, t) = (s.n(), s.qkv_width(), s.hd, s.t);
        check_rows(op, "input", inp, n, q)?;
        check_rows(op, "output", out, n, q)?;
        check_rope(op, freqs, &s)?;
        check_absmax(op, absmax)?;
        fits_i32(op, n)?;
        self.zero_f32(absmax)?;
        let bias_args = || [popt(bias), Arg::I32(bias.map_or(0, |b| dt(b.dtype)))];
        if self.v_rope(out, inp, freqs, &s, backward, bias_args(), absmax)? {
            return Ok(());
        }
        let total = n * (s.hq + 2 * s.hkv) * (hd / 2);
        let [pb, db] = bias_args();
        self.launch(
            self.k.rope,
            (self.grid_for(total), 1, 1),
            (THREADS, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(inp), Arg::I32(dt(inp.dtype)), p(freqs), i(n), i(t), i(s.hq), i(s.hkv), i(hd), Arg::I32(backward as i32), pb, db, popt(absmax)],
        )
    }

    pub(crate) fn op_swiglu_fwd(&self, out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "swiglu_fwd";
        let (n, d) = swiglu_dims(OP, "out", out, inp)?;
        fits_i32(OP, d)?;
        check_absmax(OP, absmax)?;
        self.zero_f32(absmax)?;
        if self.v_swiglu(out, None, inp, absmax, n, d)? {
            return Ok(());
        }
        self.launch(
            self.k.swiglu_fwd,
            self.rows_grid(n, d),
            (THREADS, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(inp), Arg::I32(dt(inp.dtype)), Arg::I64(n as i64), i(d), popt(absmax)],
        )
    }

    pub(crate) fn op_swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "swiglu_bwd";
        let (n, d) = swiglu_dims(OP, "dout", dout, inp)?;
        fits_i32(OP, d)?;
        check_rows(OP, "dinp", dinp, n, 2 * d)?;
        check_absmax(OP, absmax)?;
        self.zero_f32(absmax)?;
        if self.v_swiglu(dinp, Some(dout), inp, absmax, n, d)? {
            return Ok(());
        }
        self.launch(
            self.k.swiglu_bwd,
            self.rows_grid(n, d),
            (THREADS, 1, 1),
            0,
            &[p(dinp), Arg::I32(dt(dinp.dtype)), p(dout), Arg::I32(dt(dout.dtype)), p(inp), Arg::I32(dt(inp.dtype)), Arg::I64(n as i64), i(d), popt(absmax)],
        )
    }

    pub(crate) fn op_cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()> {
        const OP: &str = "cross_entropy";
        let Some((r, v)) = cross_entropy_dims(OP, logits, losses, targets)? else { return Ok(()) };
        fits_i32(OP, r.max(v))?;
        if self.v_cross_entropy(logits, losses, targets, r, v, dloss, z)? {
            return Ok(());
        }
        self.launch(self.k.cross_entropy, (r as u32, 1, 1), (512, 1, 1), 0, &[p(logits), Arg::I32(dt(logits.dtype)), p(losses), p(targets), i(r), i(v), Arg::F32(dloss), Arg::F32(z)])
    }

    pub(crate) fn op_colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        const OP: &str = "colsum";
        let Some(rows) = colsum_rows(OP, out, inp)? else { return Ok(()) };
        let c = out.numel();
        fits_i32(OP, rows.max(c))?;
        if self.v_colsum(out, inp, rows, c, accumulate)? {
            return Ok(());
        }
        let g = self.partial_blocks(rows, c, 256);
        let grid = (c.div_ceil(THREADS as usize) as u32, g as u32, 1);
        if g > 65535 {
            return op_err(format!("{OP}: too many row blocks"));
        }
        self.launch(self.k.colsum_partial, grid, (THREADS, 1, 1), 0, &[Arg::Ptr(self.scratch()?), p(inp), Arg::I32(dt(inp.dtype)), i(rows), i(c)])?;
        self.colreduce(out, self.scratch()?, g, c, c, accumulate)
    }

    pub(crate) fn op_absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        check_f32_n("absmax", "out", out, 1)?;
        check_float("absmax", "inp", inp)?;
        self.zero_f32(Some(out))?;
        if self.v_absmax(out, inp)? {
            return Ok(());
        }
        let n = inp.numel();
        self.launch(self.k.absmax, (self.grid_for(n), 1, 1), (THREADS, 1, 1), 0, &[p(out), p(inp), Arg::I32(dt(inp.dtype)), Arg::I64(n as i64)])
    }

    fn transposed_dims(op: &str, out: &Tensor, inp: &Tensor) -> Result<(usize, usize)> {
        let (r, c) = inp.rows_cols();
        if out.numel() != inp.numel() || (out.shape.ndim() > 1 && out.rows_cols() != (c, r)) {
            return op_err(format!("{op}: out {:?} is not the transpose of inp {:?} (want [{c}, {r}])", out.shape, inp.shape));
        }
        fits_i32(op, r.max(c))?;
        if c.div_ceil(32) > u32::MAX as usize || r.div_ceil(32) > 65535 {
            return op_err(format!("{op}: {r} rows is too many for the transpose grid"));
        }
        Ok((r, c))
    }

    pub(crate) fn op_quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        const OP: &str = "quantize";
        check_float(OP, "inp", inp)?;
        check_f32_n(OP, "descale", descale, 1)?;
        check_f32_n(OP, "absmax", absmax, 1)?;
        if !out.dtype.is_fp8() {
            return op_err(format!("{OP}: out must be e4m3 or e5m2, got {}", out.dtype));
        }
        if transpose {
            let (r, c) = Self::transposed_dims(OP, out, inp)?;
            if self.v_quantize(out, descale, inp, absmax, true)? {
                return Ok(());
            }
            let grid = (c.div_ceil(32) as u32, r.div_ceil(32) as u32, 1);
            self.launch(
                self.k.quantize_t,
                grid,
                (32, 8, 1),
                0,
                &[p(out), Arg::I32(dt(out.dtype)), p(descale), p(inp), Arg::I32(dt(inp.dtype)), p(absmax), i(r), i(c)],
            )?;
            if r == 0 || c == 0 {
                // the kernel did not run: still write descale
                return self.launch(self.k.quantize, (1, 1, 1), (32, 1, 1), 0, &[p(out), Arg::I32(dt(out.dtype)), p(descale), p(inp), Arg::I32(dt(inp.dtype)), p(absmax), Arg::I64(0)]);
            }
            Ok(())
        } else {
            out.expect_numel(OP, "out", inp.numel())?;
            if self.v_quantize(out, descale, inp, absmax, false)? {
                return Ok(());
            }
            let n = inp.numel();
            self.launch(
                self.k.quantize,
                (self.grid_for(n), 1, 1),
                (THREADS, 1, 1),
                0,
                &[p(out), Arg::I32(dt(out.dtype)), p(descale), p(inp), Arg::I32(dt(inp.dtype)), p(absmax), Arg::I64(n as i64)],
            )
        }
    }

    pub(crate) fn op_quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<()> {
        const OP: &str = "quantize_pair";
        check_float(OP, "inp", inp)?;
        check_f32_n(OP, "descale", descale, 1)?;
        check_f32_n(OP, "absmax", absmax, 1)?;
        for (name, t) in [("out", out), ("out_t", out_t)] {
            if !t.dtype.is_fp8() {
                return op_err(format!("{OP}: {name} must be e4m3 or e5m2, got {}", t.dtype));
            }
        }
        Self::transposed_dims(OP, out_t, inp)?;
        out.expect_numel(OP, "out", inp.numel())?;
        if self.v_quantize_pair(out, out_t, descale, inp, absmax)? {
            return Ok(());
        }
        self.op_quantize(out, descale, inp, absmax, false)?;
        self.op_quantize(out_t, descale, inp, absmax, true)
    }

    pub(crate) fn op_transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        const OP: &str = "transpose";
        if out.dtype != inp.dtype {
            return op_err(format!("{OP}: dtypes differ ({} -> {})", inp.dtype, out.dtype));
        }
        let (r, c) = Self::transposed_dims(OP, out, inp)?;
        let f = match inp.dtype.size() {
            1 => self.k.transpose8,
            2 => self.k.transpose16,
            _ => self.k.transpose32,
        };
        self.launch(f, (c.div_ceil(32) as u32, r.div_ceil(32) as u32, 1), (32, 8, 1), 0, &[p(out), p(inp), i(r), i(c)])
    }

    pub(crate) fn op_adamw(&self, a: &AdamW, segments: &[Segment]) -> Result<()> {
        a.validate(segments)?;
        let separate = a.params.addr != a.master.addr;
        self.zero_f32(a.absmax)?;
        const MAX_SEGS: usize = 16;
        for (ci, chunk) in segments.chunks(MAX_SEGS).enumerate() {
            // struct SegTable { long long off[16]; long long start[17]; int decay[16]; int n; int absmax_base; }
            let mut off = [0i64; MAX_SEGS];
            let mut start = [0i64; MAX_SEGS + 1];
            let mut decay = [0i32; MAX_SEGS];
            for (j, s) in chunk.iter().enumerate() {
                off[j] = s.offset as i64;
                start[j + 1] = start[j] + s.len as i64;
                decay[j] = s.decay as i32;
            }
            for j in chunk.len()..MAX_SEGS {
                start[j + 1] = start[j];
            }
            let total = start[chunk.len()] as usize;
            if total == 0 {
                continue;
            }
            let mut bytes = Vec::with_capacity(8 * (2 * MAX_SEGS + 1) + 4 * MAX_SEGS + 8);
            off.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            start.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            decay.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            bytes.extend_from_slice(&(chunk.len() as i32).to_le_bytes());
            bytes.extend_from_slice(&((ci * MAX_SEGS) as i32).to_le_bytes());
            // the struct's alignment is 8: pad to a multiple of 8
            while !bytes.len().is_multiple_of(8) {
                bytes.push(0);
            }
            if self.v_adamw(a, &bytes, total, separate)? {
                continue;
            }
            let tensors = [
                p(a.params),
                Arg::I32(dt(a.params.dtype)),
                p(a.master),
                Arg::I32(dt(a.master.dtype)),
                p(a.grads),
                Arg::I32(dt(a.grads.dtype)),
                p(a.m),
                Arg::I32(dt(a.m.dtype)),
                p(a.v),
                Arg::I32(dt(a.v.dtype)),
            ];
            let args: Vec<Arg> = tensors.into_iter().chain(adamw_tail(a, bytes, separate)).collect();
            self.launch(self.k.adamw, (self.grid_for(total), 1, 1), (THREADS, 1, 1), 0, &args)?;
        }
        Ok(())
    }

    pub(crate) fn op_sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        const OP: &str = "sum_squares";
        out.expect_dtype(OP, "out", &[DType::F32])?;
        if slot >= out.numel() {
            return op_err(format!("{OP}: slot {slot} outside out {:?}", out.shape));
        }
        check_float(OP, "t", t)?;
        const G: usize = 1024; // fixed: the summation order must not depend on the device
        let n = t.numel();
        if !self.v_sumsq_partial(t, G)? {
            self.launch(self.k.sumsq_partial, (G as u32, 1, 1), (THREADS, 1, 1), 0, &[Arg::Ptr(self.scratch()?), p(t), Arg::I32(dt(t.dtype)), Arg::I64(n as i64)])?;
        }
        self.launch(self.k.sumsq_final, (1, 1, 1), (THREADS, 1, 1), 0, &[p(out), i(slot), Arg::Ptr(self.scratch()?), i(G)])
    }

    fn attn_checks(op: &str, s: &AttnShape) -> Result<()> {
        check_attn(op, s)?;
        if s.hd > 256 {
            return op_err(format!("{op}: head size {} > 256 is not supported", s.hd));
        }
        fits_i32(op, s.n())?;
        Ok(())
    }

    /// Whether the tensor-core kernels apply to these tensors.
    fn attn_mma(&self, s: &AttnShape, ts: &[&Tensor]) -> bool {
        self.attn.get() != AttentionKernels::Simple
            && self.dev.cc.0 >= 8
            && (s.hd == 64 || s.hd == 128)
            && ts.iter().all(|t| t.dtype == DType::BF16 && t.addr % 16 == 0)
    }

    /// `absmax`: also the abs-max of out (fp8 runs quantise it next); the tensor-core kernels take
    /// it in their stores, the simple ones in an `absmax` pass afterwards.
    pub(crate) fn op_attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "attention_fwd";
        Self::attn_checks(OP, &s)?;
        let n = s.n();
        check_rows(OP, "qkv", qkv, n, s.qkv_width())?;
        check_rows(OP, "out", out, n, s.out_width())?;
        check_f32_n(OP, "lse", lse, s.b * s.hq * s.t)?;
        check_absmax(OP, absmax)?;
        if self.attn_mma(&s, &[out, qkv]) {
            let am = absmax.map_or(0, |a| a.addr);
            self.zero_f32(absmax)?;
            if self.attn.get() == AttentionKernels::Auto && self.has_wgmma() && self.attn4_fwd(out, lse, qkv, s, am)? {
                return Ok(());
            }
            if self.attn3_fwd(out, lse, qkv, s, am)? {
                return Ok(());
            }
        }
        self.attention_fwd_simple(out, lse, qkv, s)?;
        match absmax {
            Some(a) => self.op_absmax(a, out),
            None => Ok(()),
        }
    }

    /// The simple forward kernels (no fused abs-max).
    fn attention_fwd_simple(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape) -> Result<()> {
        let f = if s.hd <= 128 { self.k.attn_fwd_simple4 } else { self.k.attn_fwd_simple8 };
        let grid = (s.t.div_ceil(4) as u32, s.hq as u32, s.b as u32);
        self.launch(
            f,
            grid,
            (128, 1, 1),
            0,
            &[p(out), Arg::I32(dt(out.dtype)), p(lse), p(qkv), Arg::I32(dt(qkv.dtype)), i(s.b), i(s.t), i(s.hq), i(s.hkv), i(s.hd)],
        )
    }

    /// The new rows' keys and values into the caches, then one block of DEC_WARPS warps
    /// (kernels/decode.cu) per (new row, query head, sequence) over the cache.
    pub(crate) fn op_attention_decode(&self, out: &Tensor, qkv: &Tensor, kc: &Tensor, vc: &Tensor, pos: usize, s: AttnShape) -> Result<()> {
        const OP: &str = "attention_decode";
        Self::attn_checks(OP, &s)?;
        let cap = llmq_core::check::attention_decode_dims(OP, out, qkv, kc, vc, pos, &s)?;
        fits_i32(OP, s.b * cap)?;
        let ints = [i(s.b), i(s.t), i(cap), i(pos), i(s.hq), i(s.hkv), i(s.hd)];
        let mut args = vec![p(kc), p(vc), Arg::I32(dt(kc.dtype)), p(qkv), Arg::I32(dt(qkv.dtype))];
        args.extend(ints);
        let n = s.n() * s.hkv * s.hd;
        self.launch(self.k.kv_append, (n.div_ceil(THREADS as usize) as u32, 1, 1), (THREADS, 1, 1), 0, &args)?;
        let f = if s.hd <= 128 { self.k.attn_decode4 } else { self.k.attn_decode8 };
        let args = [
            p(out),
            Arg::I32(dt(out.dtype)),
            p(qkv),
            Arg::I32(dt(qkv.dtype)),
            p(kc),
            p(vc),
            Arg::I32(dt(kc.dtype)),
            i(s.t),
            i(cap),
            i(pos),
            i(s.hq),
            i(s.hkv),
            i(s.hd),
        ];
        self.launch(f, (s.t as u32, s.hq as u32, s.b as u32), (32 * DEC_WARPS, 1, 1), 0, &args)
    }

    /// `rope`: also the RoPE backward (dqkv receives the gradient of qkv before RoPE); `absmax`:
    /// the abs-max of dqkv. The tensor-core kernels do both in their stores (`GradEpi`); the simple
    /// ones run `rope_bwd` (or `absmax`) over dqkv afterwards.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn op_attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, s: AttnShape, rope: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        const OP: &str = "attention_bwd";
        Self::attn_checks(OP, &s)?;
        let n = s.n();
        check_rows(OP, "qkv", qkv, n, s.qkv_width())?;
        check_rows(OP, "dqkv", dqkv, n, s.qkv_width())?;
        check_rows(OP, "out", out, n, s.out_width())?;
        check_rows(OP, "dout", dout, n, s.out_width())?;
        check_f32_n(OP, "lse", lse, s.b * s.hq * s.t)?;
        if let Some(f) = rope {
            check_f32_n(OP, "freqs", f, s.t * s.hd)?;
        }
        check_absmax(OP, absmax)?;
        let rows = s.b * s.hq * s.t;
        if rows * 4 > SCRATCH_BYTES {
            return op_err(format!("{OP}: B*Hq*T = {rows} row statistics exceed the scratch buffer"));
        }
        let dbuf = self.scratch()?;
        // the fused stores read (cos, sin) pairs as 16-byte vectors
        if self.attn_mma(&s, &[dqkv, dout, qkv, out]) && rope.is_none_or(|f| f.addr % 16 == 0) {
            let epi = GradEpi { freqs: rope.map_or(0, |f| f.addr), amax: absmax.map_or(0, |a| a.addr) };
            self.zero_f32(absmax)?;
            // the tensor-core dQ kernels compute D themselves
            if self.attn.get() == AttentionKernels::Auto && self.has_wgmma() && self.attn4_bwd(dqkv, dout, qkv, out, lse, dbuf, s, epi)? {
                return Ok(());
            }
            if self.attn3_bwd(dqkv, dout, qkv, out, lse, dbuf, s, epi)? {
                return Ok(());
            }
        }
        self.attention_bwd_simple(dqkv, dout, qkv, out, lse, s, dbuf)?;
        match (rope, absmax) {
            (Some(f), _) => self.op_rope_bwd(dqkv, dqkv, f, s, absmax),
            (None, Some(a)) => self.op_absmax(a, dqkv),
            (None, None) => Ok(()),
        }
    }

    /// The simple backward kernels (D in a pass of its own first): dqkv without RoPE backward or
    /// abs-max.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_simple(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, s: AttnShape, dbuf: u64) -> Result<()> {
        let warps = s.b * s.hq * s.t;
        self.launch(
            self.k.attn_bwd_d,
            (warps.div_ceil(8) as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            &[Arg::Ptr(dbuf), p(dout), Arg::I32(dt(dout.dtype)), p(out), Arg::I32(dt(out.dtype)), i(s.b), i(s.t), i(s.hq), i(s.hd)],
        )?;
        let (fq, fkv) = if s.hd <= 128 { (self.k.attn_bwd_dq_simple4, self.k.attn_bwd_dkv_simple4) } else { (self.k.attn_bwd_dq_simple8, self.k.attn_bwd_dkv_simple8) };
        let args = [
            p(dqkv),
            Arg::I32(dt(dqkv.dtype)),
            p(dout),
            Arg::I32(dt(dout.dtype)),
            p(qkv),
            Arg::I32(dt(qkv.dtype)),
            p(lse),
            Arg::Ptr(dbuf),
            i(s.b),
            i(s.t),
            i(s.hq),
            i(s.hkv),
            i(s.hd),
        ];
        let nt = s.t.div_ceil(4) as u32;
        self.launch(fq, (nt, s.hq as u32, s.b as u32), (128, 1, 1), 0, &args)?;
        self.launch(fkv, (nt, s.hkv as u32, s.b as u32), (128, 1, 1), 0, &args)
    }
}

/// The AdamW kernels' arguments after their tensors (generic and typed kernels alike): abs-max
/// slots, the segment table (`seg`, optim.cu's SegTable bytes), hyper-parameters, bias
/// corrections, seed and whether params and master weights are separate buffers.
/// The arguments both AdamW kernels end with; the per-step scalars stay in device memory.
pub(crate) fn adamw_tail(a: &AdamW, seg: Vec<u8>, separate: bool) -> [Arg; 8] {
    [
        popt(a.absmax),
        Arg::Bytes(seg),
        p(a.scalars),
        Arg::F32(a.beta1),
        Arg::F32(a.beta2),
        Arg::F32(a.eps),
        Arg::F32(a.weight_decay),
        Arg::I32(separate as i32),
    ]
}
