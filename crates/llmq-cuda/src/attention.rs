//! Tensor-core attention, version 3 (`attn3_*` in kernels/attention.cu): the configuration
//! tables, kernel handles and launches. The default path for bf16 tensors with Hd 64 or 128
//! (`AttnImpl::Auto`) except on compute capability 9.0, where the wgmma kernels of
//! attention_wg.rs take over (ops.rs tries them first); `AttnImpl::V3 { fwd, dq, dkv }` picks
//! v3 configurations (tests, tuning).
//!
//! Backward: the dQ kernel runs first and also writes D = rowsum(dO o O) (f32 [B, Hq, T]) into
//! the scratch buffer; the dK/dV kernel reads it. No atomics: deterministic.

use crate::kernels::{self, Arg, Kernels};
use crate::{AttnImpl, CudaBackend, SCRATCH_BYTES};
use cudarc::driver::sys;
use llmq_core::{AttnShape, Result, Tensor};

/// Number of configurations per kernel kind and head size.
pub const ATTN3_CONFIGS: usize = 4;

/// One kernel configuration: `warps` per block, `mt` m-tiles of 16 rows per warp (the block
/// owns warps*16*mt query rows, or key rows for dK/dV) and the width of the tiles it loops over
/// (keys for the forward and dQ, queries for dK/dV). Must match the instantiations at the end
/// of kernels/attention.cu, index for index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attn3Cfg {
    pub warps: usize,
    pub mt: usize,
    pub tile: usize,
}

const fn c(warps: usize, mt: usize, tile: usize) -> Attn3Cfg {
    Attn3Cfg { warps, mt, tile }
}

/// [Hd 64, Hd 128][index]
const FWD: [[Attn3Cfg; ATTN3_CONFIGS]; 2] = [[c(4, 2, 64), c(4, 1, 64), c(8, 1, 64), c(4, 2, 32)], [c(4, 2, 32), c(4, 1, 64), c(8, 1, 64), c(4, 1, 64)]];
const DQ: [[Attn3Cfg; ATTN3_CONFIGS]; 2] = [[c(4, 2, 32), c(4, 1, 64), c(8, 1, 64), c(4, 1, 64)], [c(4, 2, 16), c(4, 1, 64), c(8, 1, 32), c(4, 1, 32)]];
const DKV: [[Attn3Cfg; ATTN3_CONFIGS]; 2] = [[c(2, 2, 32), c(4, 1, 64), c(4, 2, 32), c(4, 1, 32)], [c(4, 1, 32), c(2, 1, 32), c(8, 1, 32), c(4, 1, 16)]];
/// The configurations of `AttnImpl::Auto`: (fwd, dq, dkv) indices for [Hd 64, Hd 128].
/// With the dK/dV work split (2026-11-29, same shapes, bwd ms for 1, 2, 3, 4, 6, 8 parts): Hd 64
/// 0.675 0.624 0.608 0.601 0.606 0.610; Hd 128 1.166 1.060 1.034 1.035 1.037 1.035.
/// Chosen from the H200 timings of tests/attention_v3.rs (B16 T1024; fwd / bwd ms): Hd 64
/// (Hq 14, Hkv 2) 0.166 / 0.685 (v2 0.197 / 0.842); Hd 128 (Hq 12, Hkv 2) 0.273 / 1.167 (v2
/// 0.335 / 1.292). The dK/dV kernel dominates the backward; dQ configurations differ by < 5 %.
const DEFAULT: [(usize, usize, usize); 2] = [(0, 1, 1), (0, 1, 0)];

/// (fwd, dq, dkv) configurations for head size `hd` (64 or 128) and index `i`, for printing.
pub fn attn3_configs(hd: usize, i: usize) -> (Attn3Cfg, Attn3Cfg, Attn3Cfg) {
    let h = usize::from(hd != 64);
    (FWD[h][i], DQ[h][i], DKV[h][i])
}

/// The (fwd, dq, dkv) configuration indices `AttnImpl::Auto` uses for head size `hd`.
pub fn attn3_default(hd: usize) -> (usize, usize, usize) {
    DEFAULT[usize::from(hd != 64)]
}

/// Blocks the dK/dV kernel should have at least (about 16 per SM of an H100/H200): below this the
/// iteration space is split (a function of the shape only, so results never depend on the GPU).
const DKV_MIN_BLOCKS: usize = 2048;

/// Parts S of the dK/dV iteration space for configuration `dkv` (index) of head size s.hd: the
/// smallest S with at least DKV_MIN_BLOCKS blocks, at most 8, and whose f32 parts
/// (S x B*T x 2*Hkv*Hd) fit in the scratch beside D. S > 1 changes only the order in which the
/// query heads' contributions are added (still fixed).
pub fn attn3_dkv_split(s: &AttnShape, dkv: usize) -> usize {
    let c = DKV[usize::from(s.hd != 64)][dkv.min(ATTN3_CONFIGS - 1)];
    dkv_split_for(s, c.warps * 16 * c.mt)
}

/// The dK/dV split for kernels whose blocks own `rows` keys (see `attn3_dkv_split`).
pub(crate) fn dkv_split_for(s: &AttnShape, rows: usize) -> usize {
    let blocks = s.t.div_ceil(rows) * s.hkv * s.b;
    DKV_MIN_BLOCKS.div_ceil(blocks.max(1)).clamp(1, 8).min(dkv_parts_room(s))
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

type Table = [[sys::CUfunction; ATTN3_CONFIGS]; 2];

pub(crate) struct Attn3Kernels {
    fwd: Table,
    dq: Table,
    dkv: Table,
    pub(crate) dkv_reduce: sys::CUfunction,
}

impl Attn3Kernels {
    /// Looks up every configuration and raises its dynamic shared-memory limit to `optin`.
    pub fn load(k: &Kernels, optin: u32) -> Result<Attn3Kernels> {
        let get = |kind: &str| -> Result<Table> {
            let mut t: Table = [[std::ptr::null_mut(); ATTN3_CONFIGS]; 2];
            for (h, hd) in [64, 128].into_iter().enumerate() {
                for (i, slot) in t[h].iter_mut().enumerate() {
                    let f = k.function(&format!("llmq_attn3_{kind}_{hd}_{i}"))?;
                    kernels::set_max_dynamic_smem(f, optin)?;
                    *slot = f;
                }
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
    fn attn3_indices(&self, hd: usize) -> (usize, usize, usize) {
        match self.attn.get() {
            AttnImpl::V3 { fwd, dq, dkv, .. } => {
                let d = attn3_default(hd);
                let pick = |i: u8, d: usize| if (i as usize) < ATTN3_CONFIGS { i as usize } else { d };
                (pick(fwd, d.0), pick(dq, d.1), pick(dkv, d.2))
            }
            _ => attn3_default(hd),
        }
    }

    /// Parts of the dK/dV iteration space for kernels whose blocks own `rows` keys: the `split`
    /// of `AttnImpl::V3`/`Wg` where set (limited by the scratch), else `dkv_split_for`.
    pub(crate) fn dkv_split(&self, s: &AttnShape, rows: usize) -> usize {
        match self.attn.get() {
            AttnImpl::V3 { split, .. } | AttnImpl::Wg { split, .. } if split > 0 => (split as usize).min(dkv_parts_room(s)),
            _ => dkv_split_for(s, rows),
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

    /// Forward with the v3 kernels. Ok(false) when the configuration does not fit this device
    /// (shared memory); the caller then uses an older path. Tensors are checked by the caller.
    pub(crate) fn attn3_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, amax: u64) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let (fi, _, _) = self.attn3_indices(s.hd);
        let cfg = FWD[h][fi];
        let smem = fwd_smem(s.hd, cfg);
        if smem > self.dev.smem_optin() {
            return Ok(false);
        }
        let bq = cfg.warps * 16 * cfg.mt;
        let grid = (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
        let args = [Arg::Ptr(out.addr), Arg::Ptr(lse.addr), Arg::Ptr(qkv.addr), Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32), Arg::Ptr(amax)];
        self.attn3_launch(self.attn3.fwd[h][fi], grid, cfg.warps * 32, smem, &args)?;
        Ok(true)
    }

    /// Backward with the v3 kernels; `dbuf` (the scratch, SCRATCH_BYTES) receives D (B*Hq*T
    /// floats) and, where the dK/dV work is split, the f32 parts after it. Ok(false) as for the
    /// forward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn3_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, dbuf: u64, s: AttnShape, epi: GradEpi) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let (_, qi, ki) = self.attn3_indices(s.hd);
        let (cq, ck) = (DQ[h][qi], DKV[h][ki]);
        let (sq, sk) = (dq_smem(s.hd, cq), dkv_smem(s.hd, ck));
        if sq.max(sk) > self.dev.smem_optin() {
            return Ok(false);
        }
        let (t, hq, hkv) = (Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32));
        let bq = cq.warps * 16 * cq.mt;
        let [fr, am] = epi.args();
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), t, hq, hkv, fr, am];
        self.attn3_launch(self.attn3.dq[h][qi], (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32), cq.warps * 32, sq, &args)?;
        let bkv = ck.warps * 16 * ck.mt;
        let split = self.dkv_split(&s, bkv);
        let part = dbuf + dkv_part_offset(&s) as u64;
        let (t, hq, hkv) = (Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32));
        let [fr, am] = epi.args();
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(part), Arg::I32(split as i32), Arg::Ptr(dout.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv, fr, am];
        self.attn3_launch(self.attn3.dkv[h][ki], ((s.t.div_ceil(bkv) * split) as u32, s.hkv as u32, s.b as u32), ck.warps * 32, sk, &args)?;
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
