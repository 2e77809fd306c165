//! llmq-cuda: the CUDA backend of the op interface (`llmq_core::Backend`).
//!
//! - Kernels: CUDA C++ in `kernels/`, compiled by build.rs into one fatbin that is embedded in the
//!   library and loaded with the driver API at `CudaBackend::new`.
//! - Matrix products: cuBLASLt (`blas.rs`), bf16/f32 and fp8 (e4m3/e5m2, TN layout).
//! - The CUDA libraries are loaded at run time (cudarc's dynamic loading), so the crate builds and
//!   its tests run (skipping) on machines without CUDA. `cuda_available()` checks for the driver,
//!   cuBLASLt, the embedded kernels and a device before anything can panic in the loader.
//!
//! Attention uses tensor-core kernels for bf16 with Hd 64/128 — wgmma and warp-specialised
//! kernels on compute capability 9.0 (`attention_wg.rs`), mma.sync kernels elsewhere
//! (`attention.rs`) — and simple warp-per-row kernels otherwise (`BackendOptions::attention`
//! overrides the choice).
//!
//! Every choice that changes results (attention kernels, matmul algorithms, the side stream's SM
//! target) comes from `llmq_core::BackendOptions`, part of the run's validated configuration;
//! nothing is read from the environment.
//! Verification results and timings on an H200: NOTES.md.
//!
//! Streams: ops run on the current stream (`set_stream`): the compute stream, or the side stream
//! (weight gradients beside the main chain, with its own cuBLASLt workspace; ops that need the
//! scratch buffer refuse it). `copy` and `zero` name their stream, which may be the copy stream;
//! events order them all. The compute stream has the highest priority. Memory is allocated only
//! by `alloc` (plus the fixed scratch and the two cuBLASLt workspaces at construction), never
//! inside ops, so that graphs (`graph.rs`) can replay ops on the same memory.

mod attention;
mod attention_wg;
mod blas;
mod copy_comm;
mod device;
mod fast;
mod graph;
mod kernels;
mod nccl;
mod ops;
pub mod telemetry;
mod tuning;

use device::{check, Device};
use kernels::Kernels;
use llmq_core::{AdamW, AttentionKernels, AttnShape, Backend, BackendOptions, DType, Error, Event, Matmul, Mem, MemCategory, Result, Segment, Shape, Stream, Tensor};
use std::cell::{Cell, RefCell};

pub use attention::{attn3_configs, Attn3Cfg};
pub use attention_wg::{hopper_kernels, HopperKernel};
pub use copy_comm::CopyComm;
pub use kernels::KERNELS_BUILT;
pub use nccl::{nccl_available, NcclComm, NcclId};

/// Bytes of the scratch buffer used by ops for deterministic two-pass reductions and the
/// attention backward's row statistics and dK/dV parts.
pub const SCRATCH_BYTES: usize = 128 << 20;
/// Device memory the backend allocates for itself when opened (cuBLASLt workspaces and scratch),
/// counted by `--memory-limit` like the model's buffers.
pub const OWN_DEVICE_BYTES: usize = 2 * blas::WORKSPACE_BYTES + SCRATCH_BYTES;

/// Ok when a CUDA device can be used: the kernels were built, the driver and cuBLASLt libraries
/// load, and at least one device exists. Otherwise the reason.
pub fn cuda_available() -> std::result::Result<(), String> {
    if !KERNELS_BUILT {
        return Err("llmq-cuda was built without CUDA kernels (nvcc not found at build time; run scripts/install-nvcc.sh)".into());
    }
    // SAFETY: these only try to dlopen the libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) cannot be loaded".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err("the cuBLASLt library (libcublasLt.so) cannot be loaded (add its directory to LD_LIBRARY_PATH)".into());
    }
    // SAFETY: plain driver calls with out-pointers to locals, after the library check.
    unsafe {
        use cudarc::driver::sys;
        let r = sys::cuInit(0);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuInit failed: {}", device::error_string(r)));
        }
        let mut n = 0;
        let r = sys::cuDeviceGetCount(&mut n);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDeviceGetCount failed: {}", device::error_string(r)));
        }
        if n == 0 {
            return Err("no CUDA device".into());
        }
    }
    Ok(())
}

/// The variable under which a GPU test that cannot run fails instead of skipping; the GPU runner
/// scripts (scripts/gpu-test.sh, scripts/device-run.sh) set it, so that a build without kernels or
/// a machine without a usable GPU cannot report GPU tests as passed.
pub const REQUIRE_GPU_VAR: &str = "LLMQ_REQUIRE_GPU";

/// For tests: reports that a GPU test cannot run here, with a `SKIPPED:` line the runners count;
/// panics instead when `LLMQ_REQUIRE_GPU=1`.
pub fn skip_gpu_test(reason: &str) {
    if std::env::var(REQUIRE_GPU_VAR).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_GPU_VAR}=1 but this GPU test cannot run: {reason}");
    }
    println!("SKIPPED: {reason}");
}

/// Number of CUDA devices (0 when CUDA is unavailable).
pub fn device_count() -> usize {
    if cuda_available().is_err() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: out-pointer to a local; the driver was initialised by cuda_available.
    unsafe { cudarc::driver::sys::cuDeviceGetCount(&mut n) };
    n.max(0) as usize
}

/// The CUDA backend for one device.
pub struct CudaBackend {
    // Field order matters for Drop: graphs, cuBLASLt and the module go before the context.
    /// `Backend::capture`'s graphs per key (`graph.rs`).
    graphs: RefCell<std::collections::HashMap<llmq_core::GraphKey, graph::GraphState>>,
    blas: RefCell<blas::Blas>,
    k: Kernels,
    dev: Device,
    scratch: u64,
    attn: Cell<AttentionKernels>,
    /// Parts of the attention dK/dV iteration space (0: chosen from the shape), for tests.
    dkv_split: Cell<usize>,
    attn3: attention::Attn3Kernels,
    attn4: attention_wg::Attn4Kernels,
    fk: fast::FastKernels,
    /// The stream ops run on (`Backend::set_stream`).
    cur: Cell<Stream>,
}

// SAFETY: the backend owns its context, streams and memory; every entry point makes the context
// current on the calling thread first, so moving it to another thread is sound. It is not Sync
// (RefCell/Cell): one thread uses it at a time.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// Opens device `ordinal`: context, streams, kernel module, cuBLASLt handle, workspace and
    /// scratch memory, with the kernel and algorithm choices of `opts` (validated here).
    pub fn new(ordinal: usize, opts: &BackendOptions) -> Result<CudaBackend> {
        opts.validate()?;
        if !KERNELS_BUILT {
            return Err(Error::Backend("llmq-cuda was built without CUDA kernels (no nvcc at build time; run scripts/install-nvcc.sh and rebuild)".into()));
        }
        cuda_available().map_err(Error::Backend)?;
        let mut dev = Device::new(ordinal)?;
        let k = Kernels::load()?;
        // Kernels whose dynamic shared memory may exceed the default 48 KiB.
        let optin = dev.smem_optin() as u32;

        kernels::set_max_dynamic_smem(k.qknorm_bwd, optin)?;
        let attn3 = attention::Attn3Kernels::load(&k, optin)?;
        let attn4 = attention_wg::Attn4Kernels::load(&k, optin)?;
        let fk = fast::FastKernels::load(&k)?;
        let attn = Cell::new(opts.attention);
        let ws = [dev.alloc(MemCategory::Temporaries, Mem::Device, blas::WORKSPACE_BYTES)?, dev.alloc(MemCategory::Temporaries, Mem::Device, blas::WORKSPACE_BYTES)?];
        let scratch = dev.alloc(MemCategory::Temporaries, Mem::Device, SCRATCH_BYTES)?;
        let blas = blas::Blas::new(ws, &dev.name, dev.sm_count, opts)?;
        Ok(CudaBackend { graphs: RefCell::default(), blas: RefCell::new(blas), k, dev, scratch, attn, dkv_split: Cell::new(0), attn3, attn4, fk, cur: Cell::new(Stream::Compute) })
    }

    /// The scratch buffer (SCRATCH_BYTES). There is one, for the compute stream: ops that need
    /// it refuse to run on the side stream.
    pub(crate) fn scratch(&self) -> Result<u64> {
        match self.cur.get() {
            Stream::Compute => Ok(self.scratch),
            s => Err(Error::Op(format!("this op uses the backend's scratch buffer and runs on the compute stream only, not {s:?}"))),
        }
    }

    /// The stream ops run on now.
    pub(crate) fn stream(&self) -> cudarc::driver::sys::CUstream {
        self.dev.stream(self.cur.get())
    }

    /// Device name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }
    /// PCI bus id ("00000000:3B:00.0"), as NVML names the device.
    pub fn pci_bus_id(&self) -> &str {
        &self.dev.pci_bus_id
    }
    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.dev.cc
    }
    pub fn sm_count(&self) -> u32 {
        self.dev.sm_count
    }
    /// cuBLASLt version number (e.g. 130100).
    pub fn cublaslt_version(&self) -> usize {
        blas::Blas::version()
    }
    /// Switches the attention kernels (tests compare them; runs take `BackendOptions::attention`).
    pub fn set_attention_kernels(&self, k: AttentionKernels) {
        self.attn.set(k);
    }
    /// Cuts the attention backward's dK/dV iteration space into `parts` (limited by the scratch;
    /// 0: chosen from the shape, as in runs), so that tests reach the ordered reduce of the parts
    /// for any shape.
    pub fn set_attention_dkv_split(&self, parts: usize) {
        self.dkv_split.set(parts);
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
        self.k.unload();
        // blas is dropped with the fields, before `dev` releases the context.
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.dev.ordinal, self.dev.name)
    }

    fn alloc(&mut self, cat: MemCategory, mem: Mem, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        let bytes = shape.numel().checked_mul(dtype.size()).ok_or_else(|| Error::OutOfMemory(format!("{dims:?}: size overflows")))?;
        let addr = self.dev.alloc(cat, mem, bytes)?;
        Ok(Tensor { addr, dtype, shape, mem })
    }

    fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)> {
        self.dev.memory_by_category()
    }

    fn free_memory(&self) -> Option<usize> {
        self.dev.bind().ok()?;
        self.dev.free_memory()
    }
    fn limit_device_memory(&mut self, bytes: usize) {
        self.dev.limit = Some(bytes);
    }

    fn upload(&self, dst: &Tensor, src: &[u8]) -> Result<()> {
        if src.len() != dst.bytes() {
            return Err(Error::Op(format!("upload: {} bytes into {:?}", src.len(), dst)));
        }
        self.dev.synchronize()?;
        if src.is_empty() {
            return Ok(());
        }
        match dst.mem {
            // SAFETY: dst is a pinned host allocation of dst.bytes() bytes (mapped, host-visible);
            // all device work was waited for, so nothing else touches it.
            Mem::Host | Mem::HostWriteCombined => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.addr as *mut u8, src.len()) },
            // SAFETY: dst addresses dst.bytes() == src.len() device bytes; the copy is synchronous.
            Mem::Device => check(
                unsafe { cudarc::driver::sys::cuMemcpyHtoD_v2(dst.addr, src.as_ptr() as *const std::ffi::c_void, src.len()) },
                "cuMemcpyHtoD",
            )?,
        }
        Ok(())
    }

    fn download(&self, src: &Tensor) -> Result<Vec<u8>> {
        self.dev.synchronize()?;
        let mut out = vec![0u8; src.bytes()];
        if out.is_empty() {
            return Ok(out);
        }
        match src.mem {
            // SAFETY: src is a pinned host allocation of src.bytes() bytes; device work is done.
            Mem::Host => unsafe { std::ptr::copy_nonoverlapping(src.addr as *const u8, out.as_mut_ptr(), out.len()) },
            // write-combined memory is uncached for the CPU: the driver's copy reads it through the
            // device address it is mapped at (unified addressing: the same address), not the CPU.
            // SAFETY: src addresses out.len() device-accessible bytes; the copy is synchronous.
            Mem::Device | Mem::HostWriteCombined => check(
                unsafe { cudarc::driver::sys::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut std::ffi::c_void, src.addr, out.len()) },
                "cuMemcpyDtoH",
            )?,
        }
        Ok(out)
    }

    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()> {
        if dst.dtype != src.dtype || dst.numel() != src.numel() {
            return Err(Error::Op(format!("copy: {src:?} -> {dst:?}: dtype and size must match")));
        }
        if src.bytes() == 0 || dst.addr == src.addr {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: both addresses are device or mapped pinned host allocations (unified addressing)
        // of at least src.bytes() bytes; the copy is ordered on `stream`.
        check(unsafe { cudarc::driver::sys::cuMemcpyAsync(dst.addr, src.addr, src.bytes(), self.dev.stream(stream)) }, "cuMemcpyAsync")
    }

    fn zero(&self, t: &Tensor, stream: llmq_core::Stream) -> Result<()> {
        self.dev.bind()?;
        if t.bytes() == 0 {
            return Ok(());
        }
        // SAFETY: t addresses t.bytes() bytes of device or mapped pinned memory.
        check(unsafe { cudarc::driver::sys::cuMemsetD8Async(t.addr, 0, t.bytes(), self.dev.stream(stream)) }, "cuMemsetD8Async")
    }

    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.op_convert(dst, src)
    }

    fn create_event(&mut self) -> Result<Event> {
        Ok(Event(self.dev.create_event()?))
    }
    fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        self.dev.bind()?;
        let e = self.dev.event(ev.0)?;
        // SAFETY: e and the stream are live handles of this context.
        check(unsafe { cudarc::driver::sys::cuEventRecord(e, self.dev.stream(stream)) }, "cuEventRecord")
    }
    fn wait(&self, stream: Stream, ev: Event) -> Result<()> {
        self.dev.bind()?;
        let e = self.dev.event(ev.0)?;
        // SAFETY: e and the stream are live handles of this context.
        check(unsafe { cudarc::driver::sys::cuStreamWaitEvent(self.dev.stream(stream), e, 0) }, "cuStreamWaitEvent")
    }
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn set_stream(&self, stream: Stream) -> Result<()> {
        llmq_core::check::check_op_stream(stream)?;
        self.cur.set(stream);
        Ok(())
    }
    fn capture(&self, key: llmq_core::GraphKey, f: &mut llmq_core::capture::CaptureFn) -> Result<()> {
        self.capture_op(key, f)
    }
    fn matmul(&self, args: &Matmul) -> Result<()> {
        self.dev.bind()?;
        let side = self.cur.get() == Stream::Side;
        let stream = self.stream();
        match args.bias {
            // bias first, then beta = 1 (see llmq_bias_rows in convert.cu for why)
            Some(bias) => {
                let (m, n, _) = args.dims()?;
                self.op_bias_rows(args.out, bias, m, n, args.accumulate)?;
                self.blas.borrow_mut().matmul(&Matmul { bias: None, accumulate: true, ..*args }, stream, side)
            }
            None => self.blas.borrow_mut().matmul(args, stream, side),
        }
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        self.op_embedding_fwd(out, ids, table)
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        self.op_embedding_bwd(dtable, ids, dout)
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        self.op_rmsnorm_fwd(out, rstd, x, w, eps, absmax)
    }
    fn residual_rmsnorm_fwd(&self, res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        self.op_residual_rmsnorm_fwd(res_out, out, rstd, x, delta, w, eps, absmax)
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        self.op_rmsnorm_bwd(dx, dw, dout, x, w, rstd, dres, absmax)
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, shape: AttnShape, eps: f32) -> Result<()> {
        self.op_qk_norm_fwd(out, rstd, qkv, qw, kw, shape, eps)
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        self.op_qk_norm_bwd(dqkv, dqw, dkw, dout, qkv, qw, kw, rstd, shape, absmax)
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, shape: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        self.op_rope_fwd(out, qkv, freqs, shape, bias)
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        self.op_rope_bwd(dqkv, dout, freqs, shape, absmax)
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        self.op_attention_fwd(out, lse, qkv, shape, absmax)
    }
    fn attention_decode(&self, out: &Tensor, qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: usize, shape: AttnShape) -> Result<()> {
        self.op_attention_decode(out, qkv, k_cache, v_cache, pos, shape)
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, shape: AttnShape, rope: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        self.op_attention_bwd(dqkv, dout, qkv, out, lse, shape, rope, absmax)
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        self.op_swiglu_fwd(out, inp, absmax)
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        self.op_swiglu_bwd(dinp, dout, inp, absmax)
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()> {
        self.op_cross_entropy(logits, losses, targets, dloss, z)
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        self.op_colsum(out, inp, accumulate)
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.op_absmax(out, inp)
    }
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        self.op_quantize(out, descale, inp, absmax, transpose)
    }
    fn quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<()> {
        self.op_quantize_pair(out, out_t, descale, inp, absmax)
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.op_transpose(out, inp)
    }
    fn adamw(&self, args: &AdamW, segments: &[Segment]) -> Result<()> {
        self.op_adamw(args, segments)
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        self.op_sum_squares(out, slot, t)
    }
    fn reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, stream: Stream) -> Result<()> {
        self.op_reduce_shards(dst, staged, accumulate, stream)
    }
}
