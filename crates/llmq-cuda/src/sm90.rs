//! CUTLASS kernels for compute capability 9.x (sm_90a), from `kernels/sm90/`: the FP8 up+gate
//! GEMM with SwiGLU in its epilogue (`CudaBackend::fp8_swiglu_matmul`).
//!
//! build.rs compiles the device code into a cubin of its own (embedded here, loaded as a second
//! module when the device is 9.x) and CUTLASS's host code, which fills the kernel's parameter
//! block (TMA descriptors, tile scheduler), into a static library called through
//! `llmq_fp8_swiglu_prepare`. That code encodes the TMA descriptors through the driver's
//! `cuTensorMapEncodeTiled`, reached through `encode_tiled` (the driver is loaded at run time).
//!
//! Not wired into the model yet. What wiring needs: the up/gate weight rows interleaved
//! (`interleave_up_gate_rows`; at import/export or at quantisation, with the inverse for export
//! and for the weight gradient, whose rows follow the weight's), and the backward's up/gate
//! values: the fused forward does not store them, so the backward recomputes them with the
//! plain fp8 matmul (or a second kernel variant that also stores the bf16 up/gate pair),
//! which the recompute options must account for.

use crate::device::check;
#[cfg(llmq_has_sm90)]
use crate::kernels::{launch, Arg};
use crate::CudaBackend;
use cudarc::driver::sys;
use llmq_core::{DType, Error, Mem, Result, Tensor};
use std::ffi::c_void;

/// Whether build.rs built the sm90 CUTLASS kernels (it found nvcc and the CUTLASS headers).
pub const SM90_KERNELS_BUILT: bool = cfg!(llmq_has_sm90);

#[cfg(llmq_has_sm90)]
static CUBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llmq_sm90.cubin"));
#[cfg(not(llmq_has_sm90))]
static CUBIN: &[u8] = &[];

#[cfg(llmq_has_sm90)]
/// Bytes reserved for the kernel's parameter block (the host code asserts that CUTLASS's
/// `Params` fits; 4 KiB is the classic kernel-parameter limit).
const PARAMS_CAP: usize = 4096;
/// Row strides and operand addresses of TMA must be multiples of 16 bytes.
pub const FP8_SWIGLU_K_ALIGN: usize = 16;

#[cfg(llmq_has_sm90)]
/// `LlmqSwigluLaunch` in kernels/sm90/fp8_swiglu_host.cu.
#[repr(C)]
struct SwigluLaunch {
    x: u64,
    w: u64,
    h: u64,
    amax: u64,
    descale_x: u64,
    descale_w: u64,
    n: i64,
    d: i64,
    k: i64,
    sm_count: i32,
}

#[cfg(llmq_has_sm90)]
/// `LlmqSwigluGeometry` in kernels/sm90/fp8_swiglu_host.cu.
#[repr(C)]
#[derive(Default)]
struct SwigluGeometry {
    params_bytes: u64,
    smem_bytes: u32,
    block: [u32; 3],
    grid: [u32; 3],
}

#[cfg(llmq_has_sm90)]
type EncodeFn = unsafe extern "C" fn(
    *mut sys::CUtensorMap,
    sys::CUtensorMapDataType,
    u32,
    *mut c_void,
    *const u64,
    *const u64,
    *const u32,
    *const u32,
    sys::CUtensorMapInterleave,
    sys::CUtensorMapSwizzle,
    sys::CUtensorMapL2promotion,
    sys::CUtensorMapFloatOOBfill,
) -> sys::CUresult;

#[cfg(llmq_has_sm90)]
extern "C" {
    fn llmq_fp8_swiglu_prepare(launch: *const SwigluLaunch, encode: EncodeFn, params: *mut u8, cap: u64, geo: *mut SwigluGeometry, driver_status: *mut i32) -> i32;
}

#[cfg(llmq_has_sm90)]
/// The driver's `cuTensorMapEncodeTiled` with the C ABI, for CUTLASS's host code.
///
/// # Safety
/// The arguments are those of `cuTensorMapEncodeTiled` (CUTLASS passes pointers to live arrays
/// of `rank` elements and a map to fill).
unsafe extern "C" fn encode_tiled(
    map: *mut sys::CUtensorMap,
    dt: sys::CUtensorMapDataType,
    rank: u32,
    addr: *mut c_void,
    dims: *const u64,
    strides: *const u64,
    boxes: *const u32,
    elem_strides: *const u32,
    interleave: sys::CUtensorMapInterleave,
    swizzle: sys::CUtensorMapSwizzle,
    l2: sys::CUtensorMapL2promotion,
    oob: sys::CUtensorMapFloatOOBfill,
) -> sys::CUresult {
    // SAFETY: forwarded unchanged under the caller's contract.
    unsafe { sys::cuTensorMapEncodeTiled(map, dt, rank, addr, dims, strides, boxes, elem_strides, interleave, swizzle, l2, oob) }
}

/// The sm90 module and its function, loaded on devices of compute capability 9.x.
#[cfg_attr(not(llmq_has_sm90), allow(dead_code))]
pub(crate) struct Sm90Kernels {
    module: sys::CUmodule,
    fp8_swiglu: sys::CUfunction,
    /// The dynamic shared memory the function was allowed so far (set on first use).
    smem_allowed: std::cell::Cell<u32>,
}

impl Sm90Kernels {
    /// Loads the cubin when it was built and the device is 9.x; None otherwise (the launcher then
    /// says why it cannot run).
    pub fn load(cc: (i32, i32)) -> Result<Option<Sm90Kernels>> {
        if !SM90_KERNELS_BUILT || cc.0 != 9 {
            return Ok(None);
        }
        let mut img = vec![0u64; CUBIN.len().div_ceil(8)];
        // SAFETY: img has at least CUBIN.len() bytes; the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(CUBIN.as_ptr(), img.as_mut_ptr() as *mut u8, CUBIN.len()) };
        let mut module = std::ptr::null_mut();
        // SAFETY: img holds the sm_90a cubin nvcc produced (aligned copy); the context is current.
        check(unsafe { sys::cuModuleLoadData(&mut module, img.as_ptr() as *const c_void) }, "cuModuleLoadData (sm90 CUTLASS cubin)")?;
        let mut f = std::ptr::null_mut();
        // SAFETY: module is loaded; the name is a valid C string; out-pointer to a local.
        check(unsafe { sys::cuModuleGetFunction(&mut f, module, c"llmq_fp8_swiglu_gemm".as_ptr()) }, "cuModuleGetFunction(llmq_fp8_swiglu_gemm)")?;
        Ok(Some(Sm90Kernels { module, fp8_swiglu: f, smem_allowed: std::cell::Cell::new(0) }))
    }

    pub fn unload(&mut self) {
        if !self.module.is_null() {
            // SAFETY: loaded by `load`, unloaded once.
            unsafe { sys::cuModuleUnload(self.module) };
            self.module = std::ptr::null_mut();
        }
    }
}

/// Interleaves the rows of an up+gate weight: `src` holds 2D rows of `row_bytes` bytes, up rows
/// 0..D then gate rows D..2D (the layout `swiglu_fwd` reads from the plain matmul's output);
/// the result holds up row j at row 2j and gate row j at row 2j + 1, the layout
/// `fp8_swiglu_matmul` takes. Works on any element type (whole rows move).
pub fn interleave_up_gate_rows(src: &[u8], d: usize, row_bytes: usize) -> Result<Vec<u8>> {
    permute_rows(src, d, row_bytes, "interleave_up_gate_rows", |j, half| (half * d + j, 2 * j + half))
}

/// The inverse of `interleave_up_gate_rows` (for export, and for the weight gradient, whose rows
/// follow the weight's).
pub fn deinterleave_up_gate_rows(src: &[u8], d: usize, row_bytes: usize) -> Result<Vec<u8>> {
    permute_rows(src, d, row_bytes, "deinterleave_up_gate_rows", |j, half| (2 * j + half, half * d + j))
}

/// Moves row `from` to row `to` for every (from, to) = rows(j, half), j < D, half < 2.
fn permute_rows(src: &[u8], d: usize, row_bytes: usize, what: &str, rows: impl Fn(usize, usize) -> (usize, usize)) -> Result<Vec<u8>> {
    if d.checked_mul(2).and_then(|r| r.checked_mul(row_bytes)) != Some(src.len()) {
        return Err(Error::Op(format!("{what}: {} bytes given, expected 2 * D * row_bytes = 2 * {d} * {row_bytes}", src.len())));
    }
    let mut out = vec![0u8; src.len()];
    for j in 0..d {
        for half in 0..2 {
            let (from, to) = rows(j, half);
            out[to * row_bytes..(to + 1) * row_bytes].copy_from_slice(&src[from * row_bytes..(from + 1) * row_bytes]);
        }
    }
    Ok(out)
}

/// CUTLASS's kernel parameters and launch geometry for `args`, the TMA descriptors encoded by
/// `encode` (the caller binds the context when that is the driver's).
#[cfg(llmq_has_sm90)]
fn prepare(args: &SwigluLaunch, encode: EncodeFn) -> Result<(Vec<u8>, SwigluGeometry)> {
    let (n, d, k) = (args.n, args.d, args.k);
    let mut params = vec![0u8; PARAMS_CAP];
    let mut geo = SwigluGeometry::default();
    let mut driver_status = 0i32;
    // SAFETY: args and geo are live values of the C layouts the function expects; params has
    // PARAMS_CAP bytes (passed as the capacity); encode has the driver function's signature.
    let rc = unsafe { llmq_fp8_swiglu_prepare(args, encode, params.as_mut_ptr(), PARAMS_CAP as u64, &mut geo, &mut driver_status) };
    match rc {
        0 => {}
        1 => return Err(Error::Op(format!("fp8_swiglu_matmul: CUTLASS cannot run N = {n}, D = {d}, K = {k} (can_implement)"))),
        2 => return Err(Error::Backend("fp8_swiglu_matmul: the kernel asks for a workspace, which this launcher does not provide".into())),
        3 => return Err(Error::Backend(format!("fp8_swiglu_matmul: the kernel parameters exceed {PARAMS_CAP} bytes"))),
        4 => return Err(Error::Backend(format!("fp8_swiglu_matmul: cuTensorMapEncodeTiled failed ({driver_status})"))),
        _ => return Err(Error::Backend(format!("fp8_swiglu_matmul: unknown status {rc} from llmq_fp8_swiglu_prepare"))),
    }
    params.truncate(geo.params_bytes as usize);
    Ok((params, geo))
}

/// The launch geometry of `fp8_swiglu_matmul` for a shape: (grid, block, dynamic shared memory
/// bytes, parameter bytes). Runs CUTLASS's host code (its `can_implement` included) without a
/// device: the TMA descriptors are left zero, which is fine since nothing launches. For tests.
pub fn fp8_swiglu_geometry(n: usize, d: usize, k: usize, sm_count: u32) -> Result<([u32; 3], [u32; 3], u32, usize)> {
    #[cfg(llmq_has_sm90)]
    {
        /// Leaves the map as it is (zero) and reports success.
        unsafe extern "C" fn encode_nothing(
            _: *mut sys::CUtensorMap,
            _: sys::CUtensorMapDataType,
            _: u32,
            _: *mut c_void,
            _: *const u64,
            _: *const u64,
            _: *const u32,
            _: *const u32,
            _: sys::CUtensorMapInterleave,
            _: sys::CUtensorMapSwizzle,
            _: sys::CUtensorMapL2promotion,
            _: sys::CUtensorMapFloatOOBfill,
        ) -> sys::CUresult {
            sys::CUresult::CUDA_SUCCESS
        }
        // aligned stand-in addresses, never dereferenced
        let args = SwigluLaunch { x: 1 << 20, w: 2 << 20, h: 3 << 20, amax: 0, descale_x: 4 << 20, descale_w: 4 << 20, n: n as i64, d: d as i64, k: k as i64, sm_count: sm_count as i32 };
        let (params, geo) = prepare(&args, encode_nothing)?;
        Ok((geo.grid, geo.block, geo.smem_bytes, params.len()))
    }
    #[cfg(not(llmq_has_sm90))]
    {
        let _ = (n, d, k, sm_count);
        Err(Error::Backend("fp8_swiglu_geometry: llmq-cuda was built without the sm90 CUTLASS kernels".into()))
    }
}

fn overlaps(a: &Tensor, b: &Tensor) -> bool {
    a.bytes() > 0 && b.bytes() > 0 && a.addr < b.addr + b.bytes() as u64 && b.addr < a.addr + a.bytes() as u64
}

/// The checks of `fp8_swiglu_matmul` that need no device: dtypes, shapes, memory spaces,
/// alignment, aliasing and the kernel's 32-bit limits. Returns (N, D, K).
pub fn fp8_swiglu_check(h: &Tensor, amax: Option<&Tensor>, x: &Tensor, w: &Tensor, descale_x: &Tensor, descale_w: &Tensor) -> Result<(usize, usize, usize)> {
    const OP: &str = "fp8_swiglu_matmul";
    let err = |m: String| Err(Error::Op(format!("{OP}: {m}")));
    for (name, t, dt) in [("x", x, DType::E4M3), ("w", w, DType::E4M3), ("h", h, DType::BF16)] {
        if t.dtype != dt {
            return err(format!("{name} must be {dt}, got {}", t.dtype));
        }
        if t.shape.ndim() != 2 {
            return err(format!("{name} must be a matrix, got {:?}", t.shape));
        }
        if t.mem != Mem::Device {
            return err(format!("{name} must be in device memory, got {} memory", t.mem.name()));
        }
    }
    descale_x.expect(OP, "descale_x", Some(DType::F32), &[1])?;
    descale_w.expect(OP, "descale_w", Some(DType::F32), &[1])?;
    if let Some(a) = amax {
        a.expect(OP, "amax", Some(DType::F32), &[1])?;
    }
    let ((n, k), (w_rows, wk), (hn, d)) = (x.rows_cols(), w.rows_cols(), h.rows_cols());
    if wk != k || w_rows != 2 * d || hn != n {
        return err(format!("shapes x [N, K] = {:?}, w [2D, K] = {:?}, h [N, D] = {:?} do not agree", x.shape, w.shape, h.shape));
    }
    if k == 0 || k % FP8_SWIGLU_K_ALIGN != 0 {
        return err(format!("K = {k} must be a positive multiple of {FP8_SWIGLU_K_ALIGN} (TMA needs 16-byte row strides)"));
    }
    for (name, t) in [("x", x), ("w", w)] {
        if t.addr % 16 != 0 {
            return err(format!("{name} at {:#x} is not 16-byte aligned (TMA)", t.addr));
        }
    }
    if n > i32::MAX as usize || 2 * d > i32::MAX as usize || k > i32::MAX as usize {
        return err(format!("N = {n}, 2D = {}, K = {k} exceed the kernel's 32-bit problem shape", 2 * d));
    }
    for (name, t) in [("x", x), ("w", w)] {
        if overlaps(h, t) {
            return err(format!("h overlaps {name}"));
        }
    }
    Ok((n, d, k))
}

impl CudaBackend {
    /// `h = up * silu(gate)` (bf16 [N, D]) of the fp8 product `x · wᵀ * descale_x * descale_w`
    /// (x: e4m3 [N, K] activations, w: e4m3 [2D, K] up+gate weight with interleaved rows,
    /// `interleave_up_gate_rows`), in one CUTLASS GEMM whose epilogue rounds up and gate to bf16
    /// as the plain matmul's output would, applies SwiGLU and stores h; `amax` (f32 [1]) gets
    /// the abs-max of h as stored. Compute capability 9.x only; K a multiple of 16.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_swiglu_matmul(&self, h: &Tensor, amax: Option<&Tensor>, x: &Tensor, w: &Tensor, descale_x: &Tensor, descale_w: &Tensor) -> Result<()> {
        let (n, d, k) = fp8_swiglu_check(h, amax, x, w, descale_x, descale_w)?;
        let Some(sm90) = &self.sm90 else {
            let (ma, mi) = self.dev.cc;
            return Err(Error::Backend(if !SM90_KERNELS_BUILT {
                "fp8_swiglu_matmul: llmq-cuda was built without the sm90 CUTLASS kernels (no CUTLASS headers at build time; run scripts/install-nvcc.sh and rebuild)".into()
            } else {
                format!("fp8_swiglu_matmul: needs a GPU of compute capability 9.x (its kernel is built for sm_90a); {} is {ma}.{mi}", self.dev.name)
            }));
        };
        self.dev.bind()?;
        if let Some(a) = amax {
            // SAFETY: a is an f32 [1] tensor (checked) of a.bytes() bytes.
            check(unsafe { sys::cuMemsetD8Async(a.addr, 0, a.bytes(), self.stream()) }, "cuMemsetD8Async")?;
        }
        if n == 0 || d == 0 {
            return Ok(());
        }
        self.launch_fp8_swiglu(sm90, h, amax, x, w, descale_x, descale_w, (n, d, k))
    }

    #[allow(clippy::too_many_arguments)]
    #[cfg(llmq_has_sm90)]
    fn launch_fp8_swiglu(&self, sm90: &Sm90Kernels, h: &Tensor, amax: Option<&Tensor>, x: &Tensor, w: &Tensor, dx: &Tensor, dw: &Tensor, (n, d, k): (usize, usize, usize)) -> Result<()> {
        let args = SwigluLaunch {
            x: x.addr,
            w: w.addr,
            h: h.addr,
            amax: amax.map_or(0, |a| a.addr),
            descale_x: dx.addr,
            descale_w: dw.addr,
            n: n as i64,
            d: d as i64,
            k: k as i64,
            sm_count: self.dev.sm_count as i32,
        };
        let (params, geo) = prepare(&args, encode_tiled)?;
        if sm90.smem_allowed.get() < geo.smem_bytes {
            // SAFETY: a live function handle of the loaded sm90 module.
            check(
                unsafe { sys::cuFuncSetAttribute(sm90.fp8_swiglu, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, geo.smem_bytes as i32) },
                "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, fp8_swiglu)",
            )?;
            sm90.smem_allowed.set(geo.smem_bytes);
        }
        let grid = (geo.grid[0], geo.grid[1], geo.grid[2]);
        let block = (geo.block[0], geo.block[1], geo.block[2]);
        // SAFETY: the one argument is CUTLASS's `Params` for this kernel, filled by its own host
        // code from the checked shapes (x [N, K], w [2D, K], h [N, D], K % 16 == 0, 16-byte
        // aligned device operands, h disjoint from them); grid, block and shared memory come from
        // the same kernel type; the context is current.
        unsafe { launch(sm90.fp8_swiglu, grid, block, geo.smem_bytes, self.stream(), &[Arg::Bytes(params)]) }
    }

    /// (`Sm90Kernels::load` gives None in such builds, so this is not reached.)
    #[allow(clippy::too_many_arguments)]
    #[cfg(not(llmq_has_sm90))]
    fn launch_fp8_swiglu(&self, _: &Sm90Kernels, _: &Tensor, _: Option<&Tensor>, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: (usize, usize, usize)) -> Result<()> {
        Err(Error::Backend("fp8_swiglu_matmul: llmq-cuda was built without the sm90 CUTLASS kernels".into()))
    }
}
