//! The attention backward with warpgroup MMAs (`attn4_*` in kernels/attention_wg.cu): Hopper
//! (compute capability 9.0) only, since the kernels are compiled into the sm_90a cubin alone.
//! Same contracts as the v3 backward (D written by the dQ kernel, dK/dV in ordered parts), so
//! the v3 kernels remain the path elsewhere and its cross-check; the forward is v3's.

use crate::attention::{dkv_part_offset, dkv_split_for};
use crate::kernels::{self, Arg, Kernels};
use crate::{AttnImpl, CudaBackend};
use cudarc::driver::sys;
use llmq_core::{AttnShape, Result, Tensor};

/// Configurations per kernel kind and head size.
pub const ATTN4_CONFIGS: usize = 2;

/// Rows (queries for dQ, keys for dK/dV) per block: one warpgroup of 128 threads.
const ROWS: usize = 64;

/// Key tile of the dQ kernel and query tile of the dK/dV kernel, [Hd 64, Hd 128][index]; must
/// match the instantiations at the end of kernels/attention_wg.cu.
const DQ_TILE: [[usize; ATTN4_CONFIGS]; 2] = [[64, 128], [64, 32]];
const DKV_TILE: [[usize; ATTN4_CONFIGS]; 2] = [[64, 32], [32, 64]];
/// (dq, dkv) indices `AttnImpl::Auto` uses on compute capability 9.0.
const DEFAULT: [(usize, usize); 2] = [(0, 0), (0, 0)];

/// (dQ key tile, dK/dV query tile) of configuration `i` for head size `hd` (64 or 128).
pub fn attn4_configs(hd: usize, i: usize) -> (usize, usize) {
    let h = usize::from(hd != 64);
    (DQ_TILE[h][i], DKV_TILE[h][i])
}

type Table = [[sys::CUfunction; ATTN4_CONFIGS]; 2];

pub(crate) struct Attn4Kernels {
    dq: Table,
    dkv: Table,
    selftest: sys::CUfunction,
}

impl Attn4Kernels {
    pub fn load(k: &Kernels, optin: u32) -> Result<Attn4Kernels> {
        let get = |kind: &str| -> Result<Table> {
            let mut t: Table = [[std::ptr::null_mut(); ATTN4_CONFIGS]; 2];
            for (h, hd) in [64, 128].into_iter().enumerate() {
                for (i, slot) in t[h].iter_mut().enumerate() {
                    let f = k.function(&format!("llmq_attn4_{kind}_{hd}_{i}"))?;
                    kernels::set_max_dynamic_smem(f, optin)?;
                    *slot = f;
                }
            }
            Ok(t)
        };
        Ok(Attn4Kernels { dq: get("dq")?, dkv: get("dkv")?, selftest: k.function("llmq_wg_selftest")? })
    }
}

fn dq_smem(hd: usize, bk: usize) -> usize {
    (2 * ROWS + 4 * bk) * hd * 2 + 2 * ROWS * 4
}
fn dkv_smem(hd: usize, bq: usize) -> usize {
    (2 * ROWS + 4 * bq) * hd * 2 + 4 * bq * 4
}

impl CudaBackend {
    /// Whether this device runs the wgmma kernels (the sm_90a cubin).
    pub fn has_wgmma(&self) -> bool {
        self.dev.cc == (9, 0)
    }

    /// The (dq, dkv) configuration indices of the wgmma backward, or None for the v3 kernels.
    pub(crate) fn attn4_choice(&self) -> Option<(usize, usize)> {
        if !self.has_wgmma() {
            return None;
        }
        match self.attn.get() {
            AttnImpl::Wg { dq, dkv, .. } => Some(((dq as usize).min(ATTN4_CONFIGS - 1), (dkv as usize).min(ATTN4_CONFIGS - 1))),
            _ => None,
        }
    }

    /// The backward with the wgmma kernels; arguments as `attn3_bwd` (tensors checked there).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn4_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, dbuf: u64, s: AttnShape, qi: usize, ki: usize) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let (sq, sk) = (dq_smem(s.hd, DQ_TILE[h][qi]), dkv_smem(s.hd, DKV_TILE[h][ki]));
        if sq.max(sk) > self.dev.max_smem_optin.max(48 << 10) as usize {
            return Ok(false);
        }
        let dims = || [Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32)];
        let [t, hq, hkv] = dims();
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), t, hq, hkv];
        let blocks = s.t.div_ceil(ROWS);
        self.attn3_launch(self.attn4.dq[h][qi], (blocks as u32, s.hq as u32, s.b as u32), 128, sq, &args)?;
        let split = match self.attn.get() {
            AttnImpl::Wg { split, .. } if split > 0 => (split as usize).min(crate::attention::dkv_parts_room(&s)),
            _ => dkv_split_for(&s, ROWS),
        };
        let part = dbuf + dkv_part_offset(&s) as u64;
        let [t, hq, hkv] = dims();
        let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(part), Arg::I32(split as i32), Arg::Ptr(dout.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv];
        self.attn3_launch(self.attn4.dkv[h][ki], ((blocks * split) as u32, s.hkv as u32, s.b as u32), 128, sk, &args)?;
        self.attn3_dkv_reduce(dqkv, part, split, &s)?;
        Ok(true)
    }

    /// Runs `llmq_wg_selftest`: C = A B (64 x 64 x 64, bf16 in, f32 out) through one wgmma form
    /// (`mode` bit 0: B MN-major, bit 1: A from registers) with the given (LBO, SBO) bytes for the
    /// A and B descriptors. `a`, `b`: row-major bf16 tensors [64, 64] (A is M x K, B is K x N);
    /// `c`: f32 [64, 64]. For tests.
    pub fn wgmma_selftest(&self, c: &Tensor, a: &Tensor, b: &Tensor, mode: i32, a_lbo_sbo: (i32, i32), b_lbo_sbo: (i32, i32)) -> Result<()> {
        use llmq_core::DType;
        for (name, x, dt) in [("c", c, DType::F32), ("a", a, DType::BF16), ("b", b, DType::BF16)] {
            if x.dtype != dt || x.numel() != 64 * 64 {
                return Err(llmq_core::Error::Op(format!("wgmma_selftest: {name} must be {dt:?} [64, 64], got {:?} {:?}", x.dtype, x.dims())));
            }
        }
        if !self.has_wgmma() {
            return Err(llmq_core::Error::Backend(format!("wgmma_selftest: needs compute capability 9.0, device has {:?}", self.dev.cc)));
        }
        let args = [Arg::Ptr(c.addr), Arg::Ptr(a.addr), Arg::Ptr(b.addr), Arg::I32(mode), Arg::I32(a_lbo_sbo.0), Arg::I32(a_lbo_sbo.1), Arg::I32(b_lbo_sbo.0), Arg::I32(b_lbo_sbo.1)];
        self.attn3_launch(self.attn4.selftest, (1, 1, 1), 128, 0, &args)?;
        self.dev.synchronize()
    }
}

/// The (dq, dkv) indices `AttnImpl::Auto` would use for head size `hd` on compute capability 9.0.
pub fn attn4_default(hd: usize) -> (usize, usize) {
    DEFAULT[usize::from(hd != 64)]
}
