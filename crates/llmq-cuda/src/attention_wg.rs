//! Attention on compute capability 9.0 (Hopper; the kernels are compiled into the sm_90a cubin
//! alone): per head size one forward, one dQ and one dK/dV kernel, each either a wgmma kernel
//! (`attn4_*` in kernels/attention_wg.cu) or a warp-specialised one (`attn5_*` in
//! kernels/attention_ws.cu: TMA producer, turn-taking consumer warpgroups, launched with tensor
//! maps over qkv and dout, `tensor_map_3d`). Same contracts as the mma.sync kernels of
//! attention.rs (lse from the forward, D written by the dQ kernel, dK/dV in ordered parts), which
//! run elsewhere and are the cross-check here (`AttentionKernels::Mma`).

use crate::attention::{dkv_part_offset, GradEpi};
use crate::kernels::{self, Arg, Kernels};
use crate::CudaBackend;
use cudarc::driver::sys;
use llmq_core::{AttnShape, Result, Tensor};

/// Query rows per warpgroup of the wgmma kernels (128 threads).
const ROWS: usize = 64;
/// Rows per block of the warp-specialised kernels: queries of the forward and dQ, keys of dK/dV
/// (two consumer warpgroups of 64).
const WS_ROWS: usize = 128;
/// Tile widths the warp-specialised backward kernels loop over: keys (dQ), queries (dK/dV).
const WS_DQ_BK: usize = 64;
const WS_DKV_BQ: usize = 64;
/// Blocks the warp-specialised dK/dV kernel (one per SM) should have at least before its work is
/// split into parts (`dkv_split_for`). H100, backward ms per layer by parts 1 / 2 / 4 / 8
/// (`kernels-bench attention`, 2026-12-06): Hd 64 B16 0.420 / 0.394 / 0.396 / 0.423, Hd 128 B16
/// 0.549 / 0.531 / 0.537 / 0.539, Hd 128 B64 1.812 / 1.847 / 1.840 / 1.833, Hq 28 Hkv 4 B16
/// 1.111 / 1.114 / 1.121 / 1.124 (2048, the mma.sync kernel's minimum, took 8, 8, 2 and 4 parts).
const WS_DKV_MIN_BLOCKS: usize = 512;

/// Which kernel runs one part of the attention, with its tile configuration. Must match the
/// instantiations at the end of kernels/attention_wg.cu and kernels/attention_ws.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopperKernel {
    /// wgmma kernel: `tile` keys per tile, `wgs` warpgroups of 64 query rows per block, `stages`
    /// shared-memory stages (3 or more: deferred waits, see the kernel file).
    Wg { tile: usize, wgs: usize, stages: usize },
    /// Warp-specialised kernel (384 threads): `tile` keys per tile (the forward's; the backward
    /// kernels' tiles are fixed), `stages` TMA stages.
    Ws { tile: usize, stages: usize },
}
use HopperKernel::{Wg, Ws};

/// (forward, dQ, dK/dV) of [Hd 64, Hd 128], chosen on the H200 (B16 T1024, ms per layer, and
/// whole runs where the kernels alone were level) among four wgmma and two or three
/// warp-specialised configurations per kernel:
/// - Hd 64: the wgmma forward (0.127; warp-specialised 0.132-0.143, no faster in whole 0.5B
///   runs) and dQ (0.411; warp-specialised 0.429-0.432); the warp-specialised dK/dV (0.407
///   against 0.410, but +1.5-1.8% in whole 0.5B bf16 runs at B64).
/// - Hd 128: all warp-specialised: forward 0.155 (wgmma 0.199), dK/dV with 3 stages 0.563
///   (wgmma 0.638; +1.0% bf16, +0.9% e4m3 in whole 1.5B runs), dQ 0.521 (wgmma 0.566).
const KERNELS: [[HopperKernel; 3]; 2] = [
    [Wg { tile: 64, wgs: 2, stages: 3 }, Wg { tile: 64, wgs: 1, stages: 2 }, Ws { tile: WS_DKV_BQ, stages: 2 }],
    [Ws { tile: 128, stages: 2 }, Ws { tile: WS_DQ_BK, stages: 2 }, Ws { tile: WS_DKV_BQ, stages: 3 }],
];

/// The (forward, dQ, dK/dV) kernels of head size `hd` (64 or 128), for printing.
pub fn hopper_kernels(hd: usize) -> [HopperKernel; 3] {
    KERNELS[usize::from(hd != 64)]
}

pub(crate) struct Attn4Kernels {
    /// [Hd 64, Hd 128][forward, dQ, dK/dV]
    f: [[sys::CUfunction; 3]; 2],
    selftest: sys::CUfunction,
}

impl Attn4Kernels {
    pub fn load(k: &Kernels, optin: u32) -> Result<Attn4Kernels> {
        let mut f = [[std::ptr::null_mut(); 3]; 2];
        for (h, hd) in [64, 128].into_iter().enumerate() {
            for (i, kind) in ["fwd", "dq", "dkv"].into_iter().enumerate() {
                let family = match KERNELS[h][i] {
                    Wg { .. } => "attn4",
                    Ws { .. } => "attn5",
                };
                f[h][i] = k.function(&format!("llmq_{family}_{kind}_{hd}"))?;
                kernels::set_max_dynamic_smem(f[h][i], optin)?;
            }
        }
        Ok(Attn4Kernels { f, selftest: k.function("llmq_wg_selftest")? })
    }
}

/// (rows per block, threads, dynamic shared memory) of kernel `i` (0 forward, 1 dQ, 2 dK/dV) of
/// head size `hd`. The tiles are bf16 (kernels/wgmma.cuh: R x Hd each), row statistics f32; the
/// warp-specialised kernels add their mbarriers (in 64 bytes); all add 1024 bytes of room to
/// align the tiles to the 128-byte-swizzle atom.
fn launch_dims(hd: usize, i: usize, k: HopperKernel) -> (usize, usize, usize) {
    match (i, k) {
        // Q tile, ST x (K, V) tiles
        (0, Wg { tile, wgs, stages }) => (ROWS * wgs, 128 * wgs, (ROWS * wgs + 2 * stages * tile) * hd * 2 + 1024),
        (0, Ws { tile, stages }) => (WS_ROWS, 384, (WS_ROWS + 2 * stages * tile) * hd * 2 + 64 + 1024),
        // Q, dO tiles, ST x (K, V) tiles, L and D rows
        (1, Wg { tile, wgs, stages }) => {
            let bq = ROWS * wgs;
            (bq, 128 * wgs, (2 * bq + 2 * stages * tile) * hd * 2 + 2 * bq * 4 + 1024)
        }
        (1, Ws { tile, stages }) => (WS_ROWS, 384, (2 * WS_ROWS + 2 * stages * tile) * hd * 2 + 2 * WS_ROWS * 4 + 64 + 1024),
        // K, V tiles, ST x (Q, dO) tiles, ST x (lse, D) rows
        (_, Ws { tile, stages }) => (WS_ROWS, 384, (2 * WS_ROWS + 2 * stages * tile) * hd * 2 + 2 * stages * tile * 4 + 64 + 1024),
        (_, Wg { .. }) => unreachable!("no wgmma dK/dV kernel is instantiated (KERNELS)"),
    }
}

impl CudaBackend {
    /// Whether this device runs the Hopper kernels (the sm_90a cubin).
    pub fn has_wgmma(&self) -> bool {
        self.dev.cc == (9, 0)
    }

    /// The forward (tensors checked by the caller; `amax`: the abs-max slot or 0). Ok(false)
    /// when the kernel does not fit this device.
    pub(crate) fn attn4_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, amax: u64) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let k = KERNELS[h][0];
        let (bq, threads, smem) = launch_dims(s.hd, 0, k);
        if smem > self.dev.smem_optin() {
            return Ok(false);
        }
        let grid = (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
        let tail = [Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32), Arg::Ptr(amax)];
        match k {
            Wg { .. } => {
                let [t, hq, hkv, am] = tail;
                let args = [Arg::Ptr(out.addr), Arg::Ptr(lse.addr), Arg::Ptr(qkv.addr), t, hq, hkv, am];
                self.attn3_launch(self.attn4.f[h][0], grid, threads, smem, &args)?;
            }
            // TMA loads through two tensor maps over qkv viewed as [B][T][(Hq + 2 Hkv) Hd] (rows
            // past T read as zeros): Q boxes of 128 rows, K/V boxes of `tile` rows
            Ws { tile, .. } => {
                let mq = tensor_map_3d(qkv.addr, s.b, s.t, s.qkv_width(), WS_ROWS)?;
                let mkv = if tile == WS_ROWS { mq.clone() } else { tensor_map_3d(qkv.addr, s.b, s.t, s.qkv_width(), tile)? };
                let [t, hq, hkv, am] = tail;
                let args = [Arg::Bytes(mq), Arg::Bytes(mkv), Arg::Ptr(out.addr), Arg::Ptr(lse.addr), t, hq, hkv, am];
                self.attn3_launch(self.attn4.f[h][0], grid, threads, smem, &args)?;
            }
        }
        Ok(true)
    }

    /// The backward; arguments as `attn3_bwd` (tensors checked by the caller). Ok(false) when a
    /// kernel does not fit this device.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn4_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, dbuf: u64, s: AttnShape, epi: GradEpi) -> Result<bool> {
        let h = usize::from(s.hd != 64);
        let [_, kq, kkv] = KERNELS[h];
        let (bq, qthreads, sq) = launch_dims(s.hd, 1, kq);
        let (bkv, threads, sk) = launch_dims(s.hd, 2, kkv);
        if sq.max(sk) > self.dev.smem_optin() {
            return Ok(false);
        }
        let dims = || [Arg::I32(s.t as i32), Arg::I32(s.hq as i32), Arg::I32(s.hkv as i32)];
        // the warp-specialised kernels read qkv and dout through 64-row boxes (the dK/dV kernel
        // is always one of them): encoded once
        let (mq, md) = (tensor_map_3d(qkv.addr, s.b, s.t, s.qkv_width(), 64)?, tensor_map_3d(dout.addr, s.b, s.t, s.out_width(), 64)?);
        let qgrid = (s.t.div_ceil(bq) as u32, s.hq as u32, s.b as u32);
        let [t, hq, hkv] = dims();
        let [fr, am] = epi.args();
        // the dQ kernel (it also writes D)
        match kq {
            Ws { .. } => {
                let args = [Arg::Bytes(mq.clone()), Arg::Bytes(md.clone()), Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(lse.addr), t, hq, hkv, fr, am];
                self.attn3_launch(self.attn4.f[h][1], qgrid, qthreads, sq, &args)?;
            }
            Wg { .. } => {
                let args = [Arg::Ptr(dqkv.addr), Arg::Ptr(dbuf), Arg::Ptr(dout.addr), Arg::Ptr(out.addr), Arg::Ptr(qkv.addr), Arg::Ptr(lse.addr), t, hq, hkv, fr, am];
                self.attn3_launch(self.attn4.f[h][1], qgrid, qthreads, sq, &args)?;
            }
        }
        let split = self.dkv_split(&s, bkv, WS_DKV_MIN_BLOCKS);
        let part = dbuf + dkv_part_offset(&s) as u64;
        let grid = ((s.t.div_ceil(bkv) * split) as u32, s.hkv as u32, s.b as u32);
        let [t, hq, hkv] = dims();
        let [fr, am] = epi.args();
        let args = [Arg::Bytes(mq), Arg::Bytes(md), Arg::Ptr(dqkv.addr), Arg::Ptr(part), Arg::I32(split as i32), Arg::Ptr(lse.addr), Arg::Ptr(dbuf), t, hq, hkv, fr, am];
        self.attn3_launch(self.attn4.f[h][2], grid, threads, sk, &args)?;
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
