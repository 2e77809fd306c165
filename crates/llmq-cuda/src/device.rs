//! The CUDA context, streams, events and memory of one device, on the driver API (cudarc's `sys`
//! bindings, loaded at run time).
//!
//! Device memory comes from `cuMemAlloc` and pinned host memory from `cuMemHostAlloc` (portable,
//! mapped: with unified addressing its host pointer is also a valid device pointer, so kernels
//! and `cuMemcpyAsync` accept it). Both are zero-initialised and accounted per category. Nothing
//! is freed before the device is dropped: allocation is a setup-time activity.

use cudarc::driver::sys;
use llmq_core::{fmt_bytes, Error, Mem, MemCategory, Result};
use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};

/// Turns a driver status into a `Result`, naming the call.
pub(crate) fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::Backend(format!("{what}: {}", error_string(r))))
}

pub(crate) fn error_string(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    let ok = unsafe { sys::cuGetErrorString(r, &mut p) };
    if ok == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
        // SAFETY: the driver returned a valid NUL-terminated static string.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        format!("{r:?} ({s})")
    } else {
        format!("{r:?}")
    }
}

struct Allocation {
    addr: u64,
    mem: Mem,
}

pub(crate) struct Device {
    pub ordinal: usize,
    pub dev: sys::CUdevice,
    pub ctx: sys::CUcontext,
    pub compute: sys::CUstream,
    pub copy: sys::CUstream,
    /// Device-to-host copies (`Stream::CopyBack`), beside the host-to-device ones on `copy`.
    pub copy_back: sys::CUstream,
    /// A second compute stream (`Stream::Side`): weight-gradient matmuls beside the main chain.
    pub side: sys::CUstream,
    pub events: Vec<sys::CUevent>,
    allocs: Vec<Allocation>,
    accounted: BTreeMap<(MemCategory, u8), usize>,
    /// Cap on device bytes allocated by llmq (`--memory-limit`).
    pub limit: Option<usize>,
    pub name: String,
    pub sm_count: u32,
    pub cc: (i32, i32),
    pub max_smem_optin: i32,
    /// PCI bus id as NVML writes it ("00000000:3B:00.0"): how telemetry finds this device
    /// whatever CUDA_VISIBLE_DEVICES renumbers.
    pub pci_bus_id: String,
}

impl Device {
    /// Shared memory one block may use after opting in (at least the 48 KiB every device gives).
    pub fn smem_optin(&self) -> usize {
        self.max_smem_optin.max(48 << 10) as usize
    }

    pub fn new(ordinal: usize) -> Result<Device> {
        // SAFETY: plain driver calls with out-pointers to locals; the library presence was
        // checked by the caller (cuda_available) before any symbol is resolved.
        unsafe {
            check(sys::cuInit(0), "cuInit")?;
            let mut count = 0;
            check(sys::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
            if ordinal >= count.max(0) as usize {
                return Err(Error::Backend(format!("cuda:{ordinal}: no such device ({count} present)")));
            }
            let mut dev = 0;
            check(sys::cuDeviceGet(&mut dev, ordinal as i32), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            check(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
            check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            let mut compute = std::ptr::null_mut();
            let mut copy = std::ptr::null_mut();
            let mut copy_back = std::ptr::null_mut();
            let mut side = std::ptr::null_mut();
            let nb = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
            // the compute stream carries the critical path: where the side stream's work runs
            // beside it, the compute stream's blocks are scheduled first
            let (mut least, mut greatest) = (0, 0);
            check(sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest), "cuCtxGetStreamPriorityRange")?;
            check(sys::cuStreamCreateWithPriority(&mut compute, nb, greatest), "cuStreamCreateWithPriority")?;
            check(sys::cuStreamCreate(&mut copy, nb), "cuStreamCreate")?;
            check(sys::cuStreamCreate(&mut copy_back, nb), "cuStreamCreate")?;
            check(sys::cuStreamCreateWithPriority(&mut side, nb, least), "cuStreamCreateWithPriority")?;
            let mut buf = [0 as std::ffi::c_char; 256];
            check(sys::cuDeviceGetName(buf.as_mut_ptr(), 255, dev), "cuDeviceGetName")?;
            let name = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
                let mut v = 0;
                check(sys::cuDeviceGetAttribute(&mut v, a, dev), "cuDeviceGetAttribute")?;
                Ok(v)
            };
            let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
            let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let max_smem_optin = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
            let pci_bus_id = format!(
                "{:08X}:{:02X}:{:02X}.0",
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
            );
            Ok(Device {
                ordinal,
                dev,
                ctx,
                compute,
                copy,
                copy_back,
                side,
                events: Vec::new(),
                allocs: Vec::new(),
                accounted: BTreeMap::new(),
                limit: None,
                name,
                sm_count,
                cc: (major, minor),
                max_smem_optin,
                pci_bus_id,
            })
        }
    }

    /// Makes this device's context current on the calling thread (cheap; every entry point calls
    /// it so that the backend may be used from any one thread at a time).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the retained primary context, alive until Drop.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    pub fn stream(&self, s: llmq_core::Stream) -> sys::CUstream {
        match s {
            llmq_core::Stream::Compute => self.compute,
            llmq_core::Stream::Copy => self.copy,
            llmq_core::Stream::Side => self.side,
            llmq_core::Stream::CopyBack => self.copy_back,
        }
    }

    /// Free device memory: the driver's answer, or less under `limit`.
    pub fn free_memory(&self) -> Option<usize> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-pointers to locals.
        let r = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
        let free = (r == sys::CUresult::CUDA_SUCCESS).then_some(free)?;
        Some(match self.limit {
            Some(l) => free.min(l.saturating_sub(self.device_allocated())),
            None => free,
        })
    }

    /// Device bytes allocated by llmq (nothing is freed before drop: also the high-water mark).
    pub fn device_allocated(&self) -> usize {
        self.accounted.iter().filter(|((_, m), _)| *m == Mem::Device as u8).map(|(_, b)| b).sum()
    }

    /// Allocates `bytes` (zeroed) of device or pinned host memory, accounted under `cat`.
    pub fn alloc(&mut self, cat: MemCategory, mem: Mem, bytes: usize) -> Result<u64> {
        self.bind()?;
        let size = bytes.max(1);
        let addr = match mem {
            Mem::Device => {
                if let Some(limit) = self.limit.filter(|&l| self.device_allocated().saturating_add(bytes) > l) {
                    return Err(Error::OutOfMemory(format!(
                        "cuda:{}: cannot allocate {} for {}: over --memory-limit {} ({} allocated by llmq)",
                        self.ordinal,
                        fmt_bytes(bytes),
                        cat.name(),
                        fmt_bytes(limit),
                        fmt_bytes(self.device_allocated())
                    )));
                }
                let mut p: sys::CUdeviceptr = 0;
                // SAFETY: out-pointer to a local; size > 0.
                let r = unsafe { sys::cuMemAlloc_v2(&mut p, size) };
                if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                    return Err(Error::OutOfMemory(format!(
                        "cuda:{}: cannot allocate {} for {} ({} free on the device, {} allocated by llmq)",
                        self.ordinal,
                        fmt_bytes(bytes),
                        cat.name(),
                        self.free_memory().map(fmt_bytes).unwrap_or_else(|| "?".into()),
                        fmt_bytes(self.accounted.values().sum())
                    )));
                }
                check(r, "cuMemAlloc")?;
                // SAFETY: p points to `size` freshly allocated device bytes.
                check(unsafe { sys::cuMemsetD8_v2(p, 0, size) }, "cuMemsetD8")?;
                p
            }
            Mem::Host | Mem::HostWriteCombined => {
                let mut p: *mut c_void = std::ptr::null_mut();
                let mut flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
                if mem == Mem::HostWriteCombined {
                    flags |= sys::CU_MEMHOSTALLOC_WRITECOMBINED;
                }
                // SAFETY: out-pointer to a local; size > 0.
                let r = unsafe { sys::cuMemHostAlloc(&mut p, size, flags) };
                if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                    return Err(Error::OutOfMemory(format!(
                        "cuda:{}: cannot allocate {} of pinned host memory for {}",
                        self.ordinal,
                        fmt_bytes(bytes),
                        cat.name()
                    )));
                }
                check(r, "cuMemHostAlloc")?;
                // SAFETY: p points to `size` freshly allocated, host-accessible bytes.
                unsafe { std::ptr::write_bytes(p as *mut u8, 0, size) };
                p as u64
            }
        };
        self.allocs.push(Allocation { addr, mem });
        *self.accounted.entry((cat, mem as u8)).or_default() += bytes;
        Ok(addr)
    }

    pub fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)> {
        self.accounted
            .iter()
            .map(|(&(c, m), &b)| (c, Mem::from_index(m), b))
            .collect()
    }

    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the context is current.
        check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize (an earlier asynchronous error surfaces here)")
    }

    pub fn create_event(&mut self) -> Result<u32> {
        self.bind()?;
        let mut ev = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }, "cuEventCreate")?;
        self.events.push(ev);
        Ok(self.events.len() as u32 - 1)
    }

    pub fn event(&self, id: u32) -> Result<sys::CUevent> {
        self.events.get(id as usize).copied().ok_or_else(|| Error::Op(format!("unknown event {id}")))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: all handles were created by this Device and are destroyed once; errors are
        // ignored because nothing can be done about them in Drop.
        unsafe {
            sys::cuCtxSetCurrent(self.ctx);
            sys::cuCtxSynchronize();
            for a in self.allocs.drain(..) {
                match a.mem {
                    Mem::Device => {
                        sys::cuMemFree_v2(a.addr);
                    }
                    Mem::Host | Mem::HostWriteCombined => {
                        sys::cuMemFreeHost(a.addr as *mut c_void);
                    }
                }
            }
            for e in self.events.drain(..) {
                sys::cuEventDestroy_v2(e);
            }
            sys::cuStreamDestroy_v2(self.compute);
            sys::cuStreamDestroy_v2(self.copy);
            sys::cuStreamDestroy_v2(self.copy_back);
            sys::cuStreamDestroy_v2(self.side);
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}
