//! Attention with warpgroup MMAs (`attn4_*` in kernels/attention_wg.cu): forward, dQ and dK/dV
//! for Hopper (compute capability 9.0) only, since the kernels are compiled into the sm_90a
//! cubin alone. Same contracts as the v3 kernels (lse from the forward, D written by the dQ
//! kernel, dK/dV in ordered parts), so `AttnImpl::Auto` uses them on 9.0 and the v3 kernels
//! remain the path elsewhere and their cross-check; ops.rs tries these first (`attn4_choice`).
//! The warp-specialised kernels (`attn5_*` in kernels/attention_ws.cu: TMA producer, turn-taking
//! consumer warpgroups) are further configuration indices of the same three kinds, launched here
//! with tensor maps over qkv and dout (`tensor_map_3d`).

use crate::attention::{dkv_part_offset, GradEpi};
use crate::kernels::{self, Arg, Kernels};
use crate::{AttnImpl, CudaBackend};
use cudarc::driver::sys;
use llmq_core::{AttnShape, Result, Tensor};

/// Configurations per kernel kind and head size.
pub const ATTN4_CONFIGS: usize = 4;

/// Configurations of the warp-specialised forward (`attn5_fwd` in kernels/attention_ws.cu) per
/// head size; `AttnImpl::Wg` forward indices ATTN4_CONFIGS .. ATTN4_CONFIGS + ATTN_WS_CONFIGS
/// pick them.
pub const ATTN_WS_CONFIGS: usize = 3;

/// (keys per tile, stages) of each warp-specialised forward configuration, the same for both head
/// sizes; must match the instantiations at the end of kernels/attention_ws.cu.
pub const WS_FWD: [(usize, usize); ATTN_WS_CONFIGS] = [(128, 2), (64, 3), (64, 2)];

/// Query rows per warp-specialised forward block (two consumer warpgroups of 64).
const WS_BQ: usize = 128;

/// Configurations of the warp-specialised dK/dV kernel (`attn5_dkv`) per head size; `AttnImpl::Wg`
/// dK/dV indices ATTN4_CONFIGS .. ATTN4_CONFIGS + ATTN_WS_DKV_CONFIGS pick them.
pub const ATTN_WS_DKV_CONFIGS: usize = 2;
/// Stages of (Q, dO) tiles of each warp-specialised dK/dV configuration (64 queries per tile,
/// 128 keys per block); must match kernels/attention_ws.cu.
pub const WS_DKV: [usize; ATTN_WS_DKV_CONFIGS] = [2, 3];
const WS_DKV_BQ: usize = 64;

/// Configurations of the warp-specialised dQ kernel (`attn5_dq`: 128 queries per block, 64 keys
/// per tile) per head size; `AttnImpl::Wg` dQ indices ATTN4_CONFIGS + i pick them.
pub const ATTN_WS_DQ_CONFIGS: usize = 2;
/// Stages of (K, V) tiles of each warp-specialised dQ configuration; must match attention_ws.cu.
pub const WS_DQ: [usize; ATTN_WS_DQ_CONFIGS] = [2, 3];
const WS_DQ_BQ: usize = 128;
const WS_DQ_BK: usize = 64;
const WS_DKV_BKV: usize = 128;

/// Rows (queries for the forward and dQ, keys for dK/dV) per warpgroup (128 threads).
const ROWS: usize = 64;

/// One kernel configuration: `tile` (keys per tile for the forward and dQ, queries per tile for
/// dK/dV), `wgs` warpgroups per block (each owns 64 rows: queries for the forward and dQ, keys
/// for dK/dV) and `stages` shared-memory stages (3 or more: deferred waits, see the kernel file).
/// Must match the instantiations at the end of kernels/attention_wg.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attn4Cfg {
    pub tile: usize,
    pub wgs: usize,
    pub stages: usize,
}

const fn c(tile: usize, wgs: usize, stages: usize) -> Attn4Cfg {
    Attn4Cfg { tile, wgs, stages }
}

/// [Hd 64, Hd 128][index]
const FWD: [[Attn4Cfg; ATTN4_CONFIGS]; 2] = [[c(64, 1, 2), c(64, 1, 3), c(128, 2, 2), c(64, 2, 3)], [c(64, 1, 2), c(64, 1, 3), c(64, 2, 2), c(128, 2, 2)]];
const DQ: [[Attn4Cfg; ATTN4_CONFIGS]; 2] = [[c(64, 1, 2), c(64, 1, 3), c(64, 2, 2), c(64, 2, 3)], [c(64, 1, 2), c(64, 1, 3), c(64, 2, 2), c(32, 2, 3)]];
const DKV: [[Attn4Cfg; ATTN4_CONFIGS]; 2] = [[c(64, 1, 2), c(64, 1, 3), c(64, 2, 2), c(64, 2, 3)], [c(64, 1, 2), c(64, 1, 3), c(32, 2, 2), c(64, 2, 2)]];
/// (fwd, dq, dkv) indices `AttnImpl::Auto` uses on compute capability 9.0, [Hd 64, Hd 128],
/// from tests/attention_v3.rs on the H200 (2026-11-29, B16 T1024, ms per layer, fwd / bwd):
/// Hd 64 (Hq 14, Hkv 2): fwd 0.139 0.141 0.155 0.131 for configurations 0-3, bwd 0.412 for
/// dq 0 with dkv 0 (0.414-0.442 with the other dkv; v3: 0.168 / 0.606). Hd 128 (Hq 12, Hkv 2):
/// fwd 0.222 0.223 0.214 0.200, bwd 0.640 for dq 0 with dkv 3 (dq 2 with dkv 3: 0.667; v3:
/// 0.273 / 1.015). The backward numbers are those after the kernels stopped writing into their
/// wgmma accumulators (fourth session). Deferring the last wgmma of an iteration (3 stages) did
/// not pay; neither did two warpgroups per block for Hd 64.
/// Warp-specialised forward (index 4 + i, eighth session, 2026-11-30, same test): Hd 64 0.132
/// 0.143 0.143 against 0.127 for wgmma 3, which stays; Hd 128 0.155 0.162 0.161 against 0.199
/// for wgmma 3: index 4 (128 keys per tile, 2 stages) is the Hd 128 default. Warp-specialised
/// dK/dV (index 4 + i) with dq 0: Hd 128 0.567 0.563 against 0.638 for wgmma dkv 3: index 5 (3
/// stages) is the Hd 128 default; whole 1.5B runs (B32, one micro-batch, alternating, same call)
/// +1.0% bf16, +0.9% e4m3 against (3, 0, 3), and (4, 0, 5) 0.2% ahead of (4, 0, 4). Hd 64 (S^T
/// and dP^T issued in one turn) 0.407 0.407 against 0.410 for wgmma dkv 0, but whole 0.5B bf16
/// runs (B64) gained 1.5-1.8% with index 4 (154.3k / 154.1k against 151.7k / 151.3k, 3 stages
/// 152.4k / 152.5k): index 4 is the Hd 64 default. The warp-specialised forward for Hd 64 was no
/// faster in whole runs either (152.2k / 152.9k against 153.6k / 152.5k). Warp-specialised dQ
/// (index 4 + i): Hd 128 with dkv 5 0.521 / 0.522 against 0.566 (index 4 is the Hd 128 default;
/// whole 1.5B bf16 runs 61,268 / 61,190 against 61,289 / 60,775: level); Hd 64 0.429-0.432
/// against 0.411, and level in whole 0.5B runs: wgmma dq 0 stays.
const DEFAULT: [(usize, usize, usize); 2] = [(3, 0, ATTN4_CONFIGS), (ATTN4_CONFIGS, ATTN4_CONFIGS, ATTN4_CONFIGS + 1)];

/// (forward, dQ, dK/dV) configurations of index `i` for head size `hd` (64 or 128).
pub fn attn4_configs(hd: usize, i: usize) -> (Attn4Cfg, Attn4Cfg, Attn4Cfg) {
    let h = usize::from(hd != 64);
    (FWD[h][i], DQ[h][i], DKV[h][i])
}

type Table = [[sys::CUfunction; ATTN4_CONFIGS]; 2];

pub(crate) struct Attn4Kernels {
    fwd: Table,
    dq: Table,
    dkv: Table,
    ws_fwd: [[sys::CUfunction; ATTN_WS_CONFIGS]; 2],
    ws_dkv: [[sys::CUfunction; ATTN_WS_DKV_CONFIGS]; 2],
    ws_dq: [[sys::CUfunction; ATTN_WS_DQ_CONFIGS]; 2],
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
        Ok(Attn4Kernels {
            fwd: get("fwd")?,
            dq: get("dq")?,
            dkv: get("dkv")?,
            ws_fwd: load_ws(k, optin, "fwd")?,
            ws_dkv: load_ws(k, optin, "dkv")?,
            ws_dq: load_ws(k, optin, "dq")?,
            selftest: k.function("llmq_wg_selftest")?,
        })
    }
}

/// `llmq_attn5_<kind>_<hd>_<i>` for both head sizes and i < N, with their shared-memory limit raised.
fn load_ws<const N: usize>(k: &Kernels, optin: u32, kind: &str) -> Result<[[sys::CUfunction; N]; 2]> {
    let mut t = [[std::ptr::null_mut(); N]; 2];
    for (h, hd) in [64, 128].into_iter().enumerate() {
        for (i, slot) in t[h].iter_mut().enumerate() {
            let f = k.function(&format!("llmq_attn5_{kind}_{hd}_{i}"))?;
            kernels::set_max_dynamic_smem(f, optin)?;
            *slot = f;
        }
    }
    Ok(t)
}

/// Dynamic shared memory: the tiles (bf16, kernels/wgmma.cuh: R x Hd each) and row statistics
/// (f32), plus 1024 bytes of room to align the tiles to the 128-byte-swizzle atom.
fn fwd_smem(hd: usize, c: Attn4Cfg) -> usize {
    (ROWS * c.wgs + 2 * c.stages * c.tile) * hd * 2 + 1024
}
/// Q tile, ST x (K, V) tiles, the mbarriers (1 + 2 ST of 8 bytes, in 64) and the alignment room.
fn ws_fwd_smem(hd: usize, (bk, st): (usize, usize)) -> usize {
    (WS_BQ + 2 * st * bk) * hd * 2 + 64 + 1024
}
/// K, V tiles, ST x (Q, dO) tiles, ST x (lse, D) rows, the mbarriers and the alignment room.
fn ws_dkv_smem(hd: usize, st: usize) -> usize {
    (2 * WS_DKV_BKV + 2 * st * WS_DKV_BQ) * hd * 2 + 2 * st * WS_DKV_BQ * 4 + 64 + 1024
}
/// Q, dO tiles, ST x (K, V) tiles, L and D rows, the mbarriers and the alignment room.
fn ws_dq_smem(hd: usize, st: usize) -> usize {
    (2 * WS_DQ_BQ + 2 * st * WS_DQ_BK) * hd * 2 + 2 * WS_DQ_BQ * 4 + 64 + 1024
}
fn dq_smem(hd: usize, c: Attn4Cfg) -> usize {
    let bq = ROWS * c.wgs;
    (2 * bq + 2 * c.stages * c.tile) * hd * 2 + 2 * bq * 4 + 1024
}
fn dkv_smem(hd: usize, c: Attn4Cfg) -> usize {
    let bkv = ROWS * c.wgs;
    (2 * bkv + 2 * c.stages * c.tile) * hd * 2 + 2 * c.stages * c.tile * 4 + 1024
}

impl CudaBackend {
    /// Whether this device runs the wgmma kernels (the sm_90a cubin).
    pub fn has_wgmma(&self) -> bool {
        self.dev.cc == (9, 0)
    }

    /// The (fwd, dq, dkv) configuration indices of the wgmma kernels for head size `hd`, or None
    /// for the v3 kernels: `Wg` (indices >= ATTN4_CONFIGS pick the default) and `Auto` on
    /// compute capability 9.0.
    pub(crate) fn attn4_choice(&self, hd: usize) -> Option<(usize, usize, usize)> {
        if !self.has_wgmma() {
            return None;
        }
        let d = attn4_default(hd);
        match self.attn.get() {
            AttnImpl::Wg { fwd, dq, dkv, .. } => {
                let pick = |i: u8, n: usize, d: usize| if (i as usize) < n { i as usize } else { d };
                Some((pick(fwd, ATTN4_CONFIGS + ATTN_WS_CONFIGS, d.0), pick(dq, ATTN4_CONFIGS + ATTN_WS_DQ_CONFIGS, d.1), pick(dkv, ATTN4_CONFIGS + ATTN_WS_DKV_CONFIGS, d.2)))
            }
            AttnImpl::Auto => Some(d),
            _ => None,
        }
    }

    /// The forward with the wgmma kernel `fi`; arguments as `attn3_fwd` (tensors checked by the
    /// caller; `amax`: the abs-max slot or 0). Ok(false) when the configuration does not fit this
    /// device.
    pub(crate) fn attn4_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, fi: usize, amax: u64) -> Result<bool> {
        if fi >= ATTN4_CONFIGS {
            return self.attn5_fwd(out, lse, qkv, s, fi - ATTN4_CONFIGS, amax);
        }
        let h = usize::from(s.hd != 64);
        let cfg = FWD[h][fi];
        let smem = fwd_smem(s.hd, cfg);
        if smem > self.dev.smem_optin() {
            return Ok(false);
        }
        let bq = ROWS * cfg.wgs;
        let args = [Arg::Ptr(out.addr), Arg::Ptr(lse.addr), Arg::Ptr(qkv.addr), Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32), Arg::Ptr(amax)];
        self.attn3_launch(self.attn4.fwd[h][fi], (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32), 128 * cfg.wgs, smem, &args)?;
        Ok(true)
    }

    /// The warp-specialised forward `llmq_attn5_fwd_<hd>_<wi>`: TMA loads through two tensor maps
    /// over qkv viewed as [B][T][(Hq + 2 Hkv) Hd] (rows past T read as zeros), 384 threads per
    /// block of 128 queries. Ok(false) when it does not fit this device.
    fn attn5_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, wi: usize, amax: u64) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let cfg = WS_FWD[wi];
        let smem = ws_fwd_smem(s.hd, cfg);
        if smem > self.dev.smem_optin() {
            return Ok(false);
        }
        let mq = tensor_map_3d(qkv.addr, s.b, s.t, s.qkv_width(), WS_BQ)?;
        let mkv = if cfg.0 == WS_BQ { mq.clone() } else { tensor_map_3d(qkv.addr, s.b, s.t, s.qkv_width(), cfg.0)? };
        let args = [Arg::Bytes(mq), Arg::Bytes(mkv), Arg::Ptr(out.addr), Arg::Ptr(lse.addr), Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32), Arg::Ptr(amax)];
        self.attn3_launch(self.attn4.ws_fwd[h][wi], (s.t.div_ceil(WS_BQ) as u32, s.hq as u32, s.b as u32), 3 * 128, smem, &args)?;
        Ok(true)
    }

    /// The backward with the wgmma kernels; arguments as `attn3_bwd` (tensors checked by the
    /// caller). Ok(false) when the configuration does not fit this device.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn4_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, dbuf: u64, s: AttnShape, (qi, ki): (usize, usize), epi: GradEpi) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        // the dQ kernel (it also writes D): wgmma (qi < ATTN4_CONFIGS) or warp-specialised
        let (bq, qthreads, sq) = match qi.checked_sub(ATTN4_CONFIGS) {
            Some(wi) => (WS_DQ_BQ, 384, ws_dq_smem(s.hd, WS_DQ[wi])),
            None => (ROWS * DQ[h][qi].wgs, 128 * DQ[h][qi].wgs, dq_smem(s.hd, DQ[h][qi])),
        };
        // the dK/dV kernel: wgmma (ki < ATTN4_CONFIGS) or warp-specialised
        let (bkv, threads, sk) = match ki.checked_sub(ATTN4_CONFIGS) {
            Some(wi) => (WS_DKV_BKV, 384, ws_dkv_smem(s.hd, WS_DKV[wi])),
            None => (ROWS * DKV[h][ki].wgs, 128 * DKV[h][ki].wgs, dkv_smem(s.hd, DKV[h][ki])),
        };
        if sq.max(sk) > self.dev.smem_optin() {
            return Ok(false);
        }
        let dims = || [Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32)];
        // both warp-specialised kernels read qkv and dout through 64-row boxes: encoded once
        let enc = if qi >= ATTN4_CONFIGS || ki >= ATTN4_CONFIGS {
            Some((tensor_map_3d(qkv.addr, s.b, s.t, s.qkv_width(), 64)?, tensor_map_3d(dout.addr, s.b, s.t, s.out_width(), 64)?))
        } else {
            None
        };
        let maps = || -> [Arg; 2] {
            let (mq, md) = enc.as_ref().expect("tensor maps are encoded when a warp-specialised kernel is chosen");
            [Arg::Bytes(mq.clone()), Arg::Bytes(md.clone())]
        };
        let qgrid = (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
        let [t, hq, hkv] = dims();
        if let Some(wi) = qi.checked_sub(ATTN4_CONFIGS) {
            let [mqkv, mdo] = maps();
            let [fr, am] = epi.args();
            let args = [mqkv, mdo, Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(lse.addr), t, hq, hkv, fr, am];
            self.attn3_launch(self.attn4.ws_dq[h][wi], qgrid, qthreads, sq, &args)?;
        } else {
            let [fr, am] = epi.args();
            let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), t, hq, hkv, fr, am];
            self.attn3_launch(self.attn4.dq[h][qi], qgrid, qthreads, sq, &args)?;
        }
        let split = self.dkv_split(&s, bkv);
        let part = dbuf + dkv_part_offset(&s) as u64;
        let grid = ((s.t.div_ceil(bkv) * split) as u32, s.hkv as u32, s.b as u32);
        let [t, hq, hkv] = dims();
        if let Some(wi) = ki.checked_sub(ATTN4_CONFIGS) {
            let [mqkv, mdo] = maps();
            let [fr, am] = epi.args();
            let args = [mqkv, mdo, Arg::Ptr(dqkv.addr), Arg::Ptr(part), Arg::I32(split as i32), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv, fr, am];
            self.attn3_launch(self.attn4.ws_dkv[h][wi], grid, threads, sk, &args)?;
        } else {
            let [fr, am] = epi.args();
            let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(part), Arg::I32(split as i32), Arg::Ptr(dout.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv, fr, am];
            self.attn3_launch(self.attn4.dkv[h][ki], grid, threads, sk, &args)?;
        }
        self.attn3_dkv_reduce(dqkv, part, split, &s, epi)?;
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

/// A TMA tensor map (bf16, 128-byte swizzle, boxes of 64 columns x `box_rows` rows) over the
/// activations at `addr` viewed as [B][T][W] (qkv: W = (Hq + 2 Hkv) Hd; dout: Hq Hd): a box's rows
/// past T (in its own sequence) read as zeros. Returns the map's 128 bytes, passed by value.
fn tensor_map_3d(addr: u64, b: usize, t: usize, w: usize, box_rows: usize) -> Result<Vec<u8>> {
    let w = w as u64;
    let dims = [w, t as u64, b as u64];
    let strides = [w * 2, w * 2 * t as u64]; // bytes, dimensions 1 and 2
    let boxes = [64u32, box_rows.min(256) as u32, 1];
    let elem = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array of the rank (3) the call is given; the
    // caller checked that addr is a 16-byte-aligned device allocation of B*T*W bf16 elements;
    // the row strides are multiples of 16 bytes (W is a multiple of Hd, 64 or 128).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    crate::device::check(r, &format!("cuTensorMapEncodeTiled ([{b} x {t} x {w}] bf16, box 64 x {box_rows})"))?;
    // SAFETY: initialised by the successful call above; CUtensorMap is 128 plain bytes.
    let map = unsafe { map.assume_init() };
    Ok(map.opaque.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The (fwd, dq, dkv) indices `AttnImpl::Auto` uses for head size `hd` on compute capability 9.0.
pub fn attn4_default(hd: usize) -> (usize, usize, usize) {
    DEFAULT[usize::from(hd != 64)]
}
