//! Tensor-core attention with mma.sync (`attn3_*` in kernels/attention.cu): the kernel
//! configuration, handles and launches. The path for bf16 tensors with Hd 64 or 128 on compute
//! capability 8.x (and on 9.0 with `AttentionKernels::Mma`, the cross-check of the Hopper kernels
//! of attention_wg.rs, which ops.rs tries first).
//!
//! Backward: the dQ kernel runs first and also writes D = rowsum(dO o O) (f32 [B, Hq, T]) into
//! the scratch buffer; the dK/dV kernel reads it. No atomics: deterministic.

use crate::kernels::{self, Arg, Kernels};
use crate::{CudaBackend, SCRATCH_BYTES};
use cudarc::driver::sys;
use llmq_core::{AttnShape, Result, Tensor};

/// One kernel configuration: `warps` per block, `mt` m-tiles of 16 rows per warp (the block
/// owns warps*16*mt query rows, or key rows for dK/dV) and the width of the tiles it loops over
/// (keys for the forward and dQ, queries for dK/dV). Must match the instantiations at the end
/// of kernels/attention.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attn3Cfg {
    pub warps: usize,
    pub mt: usize,
    pub tile: usize,
}

const fn c(warps: usize, mt: usize, tile: usize) -> Attn3Cfg {
    Attn3Cfg { warps, mt, tile }
}

/// [Hd 64, Hd 128]. Chosen on an H200 (B16 T1024) among four configurations per kernel, before
/// the Hopper kernels took over there: fwd / bwd ms Hd 64 (Hq 14, Hkv 2) 0.166 / 0.601 with the
/// dK/dV split; Hd 128 (Hq 12, Hkv 2) 0.273 / 1.035. The dK/dV kernel dominates the backward; dQ
/// configurations differed by < 5 %.
const FWD: [Attn3Cfg; 2] = [c(4, 2, 64), c(4, 2, 32)];
const DQ: [Attn3Cfg; 2] = [c(4, 1, 64), c(4, 1, 64)];
const DKV: [Attn3Cfg; 2] = [c(4, 1, 64), c(4, 1, 32)];

/// (fwd, dq, dkv) configurations for head size `hd` (64 or 128), for printing.
pub fn attn3_configs(hd: usize) -> (Attn3Cfg, Attn3Cfg, Attn3Cfg) {
    let h = usize::from(hd != 64);
    (FWD[h], DQ[h], DKV[h])
}

/// Blocks the mma.sync dK/dV kernel should have at least (about 16 per SM of an H100/H200):
/// below this the iteration space is split (a function of the shape only, so results never
/// depend on the GPU).
const DKV_MIN_BLOCKS: usize = 2048;

/// Parts S of the dK/dV iteration space for kernels whose blocks own `rows` keys: the smallest S
/// with at least `min_blocks` blocks, at most 8, and whose f32 parts (S x B*T x 2*Hkv*Hd) fit in
/// the scratch beside D. S > 1 changes only the order in which the query heads' contributions
/// are added (still fixed).
pub(crate) fn dkv_split_for(s: &AttnShape, rows: usize, min_blocks: usize) -> usize {
    let blocks = s.t.div_ceil(rows) * s.hkv * s.b;
    min_blocks.div_ceil(blocks.max(1)).clamp(1, 8).min(dkv_parts_room(s))
}

/// How many f32 dK/dV parts (B*T x 2*Hkv*Hd each) fit in the scratch beside D (at least 1: one
/// part is written straight into dqkv).
pub(crate) fn dkv_parts_room(s: &AttnShape) -> usize {
    let part = s.b * s.t * 2 * s.hkv * s.hd * 4;
    (SCRATCH_BYTES.saturating_sub(dkv_part_offset(s)) / part.max(1)).max(1)
}

/// Byte offset of the dK/dV parts in the scratch (after D, f32 [B*Hq*T]).
pub(crate) fn dkv_part_offset(s: &AttnShape) -> usize {
    (s.b * s.hq * s.t * 4).next_multiple_of(256)
}

/// What the backward kernels fuse into their stores of dQ, dK and dV (`a3_store_grad` in
/// attention.cu; 0: not wanted): the RoPE backward of dQ and dK with the table at `freqs`, and the
/// abs-max of all of dqkv into the f32 slot at `amax` (zeroed by the caller).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GradEpi {
    pub freqs: u64,
    pub amax: u64,
}

impl GradEpi {
    pub(crate) fn args(self) -> [Arg; 2] {
        [Arg::Ptr(self.freqs), Arg::Ptr(self.amax)]
    }
}

type Table = [sys::CUfunction; 2];

pub(crate) struct Attn3Kernels {
    fwd: Table,
    dq: Table,
    dkv: Table,
    pub(crate) dkv_reduce: sys::CUfunction,
}

impl Attn3Kernels {
    /// Looks up the kernels of both head sizes and raises their dynamic shared-memory limit to
    /// `optin`.
    pub fn load(k: &Kernels, optin: u32) -> Result<Attn3Kernels> {
        let get = |kind: &str| -> Result<Table> {
            let mut t: Table = [std::ptr::null_mut(); 2];
            for (slot, hd) in t.iter_mut().zip([64, 128]) {
                let f = k.function(&format!("llmq_attn3_{kind}_{hd}"))?;
                kernels::set_max_dynamic_smem(f, optin)?;
                *slot = f;
            }
            Ok(t)
        };
        Ok(Attn3Kernels { fwd: get("fwd")?, dq: get("dq")?, dkv: get("dkv")?, dkv_reduce: k.function("llmq_attn3_dkv_reduce")? })
    }
}

fn fwd_smem(hd: usize, c: Attn3Cfg) -> usize {
    let bq = c.warps * 16 * c.mt;
    (bq + 4 * c.tile) * (hd + 8) * 2
}
fn dq_smem(hd: usize, c: Attn3Cfg) -> usize {
    let bq = c.warps * 16 * c.mt;
    (2 * bq + 4 * c.tile) * (hd + 8) * 2 + 2 * bq * 4
}
fn dkv_smem(hd: usize, c: Attn3Cfg) -> usize {
    let bkv = c.warps * 16 * c.mt;
    (2 * bkv + 4 * c.tile) * (hd + 8) * 2 + 4 * c.tile * 4
}

impl CudaBackend {
    /// Parts of the dK/dV iteration space for kernels whose blocks own `rows` keys: the split set
    /// by `set_attention_dkv_split` (limited by the scratch), else `dkv_split_for`.
    pub(crate) fn dkv_split(&self, s: &AttnShape, rows: usize, min_blocks: usize) -> usize {
        match self.dkv_split.get() {
            0 => dkv_split_for(s, rows, min_blocks),
            n => n.min(dkv_parts_room(s)),
        }
    }

    pub(crate) fn attn3_launch(&self, f: sys::CUfunction, grid: (u32, u32, u32), threads: usize, smem: usize, args: &[Arg]) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: the callers (op_attention_fwd/bwd) checked dtypes (bf16), alignment (16 bytes)
        // and element counts of every tensor against the shape the kernel derives from B, T, Hq,
        // Hkv and its compiled Hd; the scratch holds B*Hq*T floats; arguments follow the kernel's
        // parameter order.
        unsafe { kernels::launch(f, grid, (threads as u32, 1, 1), smem as u32, self.stream(), args) }
    }

    /// Forward with the mma.sync kernels. Ok(false) when the configuration does not fit this
    /// device (shared memory); the caller then uses the simple kernels. Tensors are checked by the caller.
    pub(crate) fn attn3_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, amax: u64) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let cfg = FWD[h];
        let smem = fwd_smem(s.hd, cfg);
        if smem > self.dev.smem_optin() {
            return Ok(false);
        }
        let bq = cfg.warps * 16 * cfg.mt;
        let grid = (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
        let args = [Arg::Ptr(out.addr), Arg::Ptr(lse.addr), Arg::Ptr(qkv.addr), Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32), Arg::Ptr(amax)];
        self.attn3_launch(self.attn3.fwd[h], grid, cfg.warps * 32, smem, &args)?;
        Ok(true)
    }

    /// Backward with the mma.sync kernels; `dbuf` (the scratch, SCRATCH_BYTES) receives D (B*Hq*T
    /// floats) and, where the dK/dV work is split, the f32 parts after it. Ok(false) as for the
    /// forward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn3_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, dbuf: u64, s: AttnShape, epi: GradEpi) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let (cq, ck) = (DQ[h], DKV[h]);
        let (sq, sk) = (dq_smem(s.hd, cq), dkv_smem(s.hd, ck));
        if sq.max(sk) > self.dev.smem_optin() {
            return Ok(false);
        }
        let (t, hq, hkv) = (Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32));
        let bq = cq.warps * 16 * cq.mt;
        let [fr, am] = epi.args();
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), t, hq, hkv, fr, am];
        self.attn3_launch(self.attn3.dq[h], (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32), cq.warps * 32, sq, &args)?;
        let bkv = ck.warps * 16 * ck.mt;
        let split = self.dkv_split(&s, bkv, DKV_MIN_BLOCKS);
        let part = dbuf + dkv_part_offset(&s) as u64;
        let (t, hq, hkv) = (Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32));
        let [fr, am] = epi.args();
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(part), Arg::I32(split as i32), Arg::Ptr(dout.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv, fr, am];
        self.attn3_launch(self.attn3.dkv[h], ((s.t.div_ceil(bkv) * split) as u32, s.hkv as u32, s.b as u32), ck.warps * 32, sk, &args)?;
        self.attn3_dkv_reduce(dqkv, part, split, &s, epi)?;
        Ok(true)
    }

    /// Adds the `split` f32 dK/dV parts at `part` into dqkv's K|V columns (nothing for 1 part).
    pub(crate) fn attn3_dkv_reduce(&self, dqkv: &Tensor, part: u64, split: usize, s: &AttnShape, epi: GradEpi) -> Result<()> {
        if split > 1 {
            let rows = s.b * s.t;
            let args = [
                Arg::Ptr(dqkv.addr),
                Arg::Ptr(part),
                Arg::I32(split as i32),
                Arg::I32(rows as i32),
                Arg::I32((s.hkv * s.hd) as i32),
                Arg::I32(s.qkv_width() as i32),
                Arg::I32((s.hq * s.hd) as i32),
                Arg::F32(1.0 / (s.hd as f32).sqrt()),
                Arg::I32(s.t as i32),
                Arg::I32(s.hd as i32),
                Arg::Ptr(epi.freqs),
                Arg::Ptr(epi.amax),
            ];
            self.attn3_launch(self.attn3.dkv_reduce, (rows.min(65535 * 16) as u32, 1, 1), 128, 0, &args)?;
        }
        Ok(())
    }
}
