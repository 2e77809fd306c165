//! Tensor-core attention, version 3 (`attn3_*` in kernels/attention.cu): the configuration
//! tables, kernel handles and launches. The default path for bf16 tensors with Hd 64 or 128
//! (`AttnImpl::Auto`); `AttnImpl::V3 { fwd, dq, dkv }` picks other configurations (tests, tuning).
//!
//! Backward: the dQ kernel runs first and also writes D = rowsum(dO o O) (f32 [B, Hq, T]) into
//! the scratch buffer; the dK/dV kernel reads it. No atomics: deterministic.

use crate::kernels::{self, Arg, Kernels};
use crate::{AttnImpl, CudaBackend};
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

type Table = [[sys::CUfunction; ATTN3_CONFIGS]; 2];

pub(crate) struct Attn3Kernels {
    fwd: Table,
    dq: Table,
    dkv: Table,
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
        Ok(Attn3Kernels { fwd: get("fwd")?, dq: get("dq")?, dkv: get("dkv")? })
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
            AttnImpl::V3 { fwd, dq, dkv } => {
                let m = ATTN3_CONFIGS - 1;
                ((fwd as usize).min(m), (dq as usize).min(m), (dkv as usize).min(m))
            }
            _ => attn3_default(hd),
        }
    }

    fn attn3_launch(&self, f: sys::CUfunction, grid: (u32, u32, u32), threads: usize, smem: usize, args: &[Arg]) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: the callers (op_attention_fwd/bwd) checked dtypes (bf16), alignment (16 bytes)
        // and element counts of every tensor against the shape the kernel derives from B, T, Hq,
        // Hkv and its compiled Hd; the scratch holds B*Hq*T floats; arguments follow the kernel's
        // parameter order.
        unsafe { kernels::launch(f, grid, (threads as u32, 1, 1), smem as u32, self.dev.compute, args) }
    }

    /// Forward with the v3 kernels. Ok(false) when the configuration does not fit this device
    /// (shared memory); the caller then uses an older path. Tensors are checked by the caller.
    pub(crate) fn attn3_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let (fi, _, _) = self.attn3_indices(s.hd);
        let cfg = FWD[h][fi];
        let smem = fwd_smem(s.hd, cfg);
        if smem > self.dev.max_smem_optin.max(48 << 10) as usize {
            return Ok(false);
        }
        let bq = cfg.warps * 16 * cfg.mt;
        let grid = (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
        let args = [Arg::Ptr(out.addr), Arg::Ptr(lse.addr), Arg::Ptr(qkv.addr), Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32)];
        self.attn3_launch(self.attn3.fwd[h][fi], grid, cfg.warps * 32, smem, &args)?;
        Ok(true)
    }

    /// Backward with the v3 kernels; `dbuf` (scratch, B*Hq*T floats) receives D. Ok(false) as
    /// for the forward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn3_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, dbuf: u64, s: AttnShape) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let (_, qi, ki) = self.attn3_indices(s.hd);
        let (cq, ck) = (DQ[h][qi], DKV[h][ki]);
        let (sq, sk) = (dq_smem(s.hd, cq), dkv_smem(s.hd, ck));
        if sq.max(sk) > self.dev.max_smem_optin.max(48 << 10) as usize {
            return Ok(false);
        }
        let (t, hq, hkv) = (Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32));
        let bq = cq.warps * 16 * cq.mt;
        let args = [
            Arg::Ptr(dqkv.addr),
            Arg::Ptr(dbuf),
            Arg::Ptr(dout.addr),
            Arg::Ptr(out.addr),
            Arg::Ptr(qkv.addr),
            Arg::Ptr(lse.addr),
            Arg::I32(s.t as i32),
            Arg::I32(s.hq as i32),
            Arg::I32(s.hkv as i32),
        ];
        self.attn3_launch(self.attn3.dq[h][qi], (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32), cq.warps * 32, sq, &args)?;
        let bkv = ck.warps * 16 * ck.mt;
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(dout.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv];
        self.attn3_launch(self.attn3.dkv[h][ki], (s.t.div_ceil(bkv) as u32, s.hkv as u32, s.b as u32), ck.warps * 32, sk, &args)?;
        Ok(true)
    }
}
