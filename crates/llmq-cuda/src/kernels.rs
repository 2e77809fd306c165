//! The embedded kernel fatbin: module loading, function handles (looked up once) and launching.
//!
//! build.rs compiles `kernels/*.cu` into one fatbin (sm_80, sm_89, sm_90a cubins + compute_90
//! PTX); every kernel is an `extern "C"` function named `llmq_<field>` for a field of `Kernels`.

use crate::device::check;
use cudarc::driver::sys;
use llmq_core::{Error, Result};
use std::ffi::{c_void, CString};

#[cfg(llmq_has_kernels)]
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llmq_kernels.fatbin"));
#[cfg(not(llmq_has_kernels))]
static FATBIN: &[u8] = &[];

/// Whether build.rs found nvcc and embedded kernels.
pub const KERNELS_BUILT: bool = cfg!(llmq_has_kernels);

/// One kernel argument. Scalars are passed by value; the driver copies as many bytes as the
/// kernel's parameter has from the address we hand it (little-endian, so an i32 stored in the
/// low half of a u64 slot is read correctly).
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
    I64(i64),
    /// A `repr(C)` struct passed by value, as its bytes.
    Bytes(Vec<u8>),
}

macro_rules! kernel_table {
    ($($name:ident),* $(,)?) => {
        pub(crate) struct Kernels {
            module: sys::CUmodule,
            $(pub $name: sys::CUfunction,)*
        }
        impl Kernels {
            pub fn load() -> Result<Kernels> {
                if !KERNELS_BUILT {
                    return Err(Error::Backend("llmq-cuda was built without CUDA kernels (no nvcc at build time; run scripts/install-nvcc.sh and rebuild)".into()));
                }
                // The driver wants an aligned image: copy into u64 storage.
                let mut img = vec![0u64; FATBIN.len().div_ceil(8)];
                // SAFETY: img has at least FATBIN.len() bytes; the regions do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(FATBIN.as_ptr(), img.as_mut_ptr() as *mut u8, FATBIN.len()) };
                let mut module = std::ptr::null_mut();
                // SAFETY: img holds a complete fatbin produced by nvcc; the context is current.
                check(unsafe { sys::cuModuleLoadData(&mut module, img.as_ptr() as *const c_void) }, "cuModuleLoadData (kernel fatbin: does it hold code for this GPU?)")?;
                let get = |name: &str| -> Result<sys::CUfunction> {
                    let c = CString::new(format!("llmq_{name}")).unwrap();
                    let mut f = std::ptr::null_mut();
                    // SAFETY: module is loaded; c is a valid C string; out-pointer to a local.
                    check(unsafe { sys::cuModuleGetFunction(&mut f, module, c.as_ptr()) }, &format!("cuModuleGetFunction(llmq_{name})"))?;
                    Ok(f)
                };
                Ok(Kernels { module, $($name: get(stringify!($name))?,)* })
            }
        }
    };
}

kernel_table!(
    convert,
    bias_rows,
    embedding_fwd,
    embedding_sort_tile,
    embedding_sort_step,
    embedding_bwd_sorted,
    rmsnorm_fwd,
    residual_rmsnorm_fwd,
    rmsnorm_bwd,
    rmsnorm_dw_partial,
    qknorm_fwd,
    qknorm_bwd,
    rope,
    swiglu_fwd,
    swiglu_bwd,
    cross_entropy,
    absmax,
    sumsq_partial,
    sumsq_final,
    colsum_partial,
    colreduce,
    reduce_shards,
    quantize,
    quantize_t,
    transpose8,
    transpose16,
    transpose32,
    adamw,
    attn_fwd_simple4,
    attn_fwd_simple8,
    attn_bwd_d,
    attn_bwd_dq_simple4,
    attn_bwd_dkv_simple4,
    attn_bwd_dq_simple8,
    attn_bwd_dkv_simple8,
    kv_append,
    attn_decode4,
    attn_decode8,
);

impl Kernels {
    /// Looks up another `extern "C"` kernel of the loaded module by its full name.
    pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let c = CString::new(name).map_err(|_| Error::Backend(format!("bad kernel name {name:?}")))?;
        let mut f = std::ptr::null_mut();
        // SAFETY: the module is loaded; c is a valid C string; out-pointer to a local.
        check(unsafe { sys::cuModuleGetFunction(&mut f, self.module, c.as_ptr()) }, &format!("cuModuleGetFunction({name})"))?;
        Ok(f)
    }

    pub fn unload(&mut self) {
        if !self.module.is_null() {
            // SAFETY: the module was loaded by `load` and is unloaded once.
            unsafe { sys::cuModuleUnload(self.module) };
            self.module = std::ptr::null_mut();
        }
    }
}

/// Raises a kernel's dynamic shared-memory limit (needed above 48 KiB) to what the device allows
/// per block (`optin`) minus the kernel's static shared memory.
pub(crate) fn set_max_dynamic_smem(f: sys::CUfunction, optin: u32) -> Result<()> {
    let mut stat = 0i32;
    // SAFETY: f is a live function handle of the loaded module; out-pointer to a local.
    check(
        unsafe { sys::cuFuncGetAttribute(&mut stat, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f) },
        "cuFuncGetAttribute(SHARED_SIZE_BYTES)",
    )?;
    let bytes = optin.saturating_sub(stat.max(0) as u32);
    // SAFETY: as above.
    check(
        unsafe { sys::cuFuncSetAttribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32) },
        "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
    )
}

/// Launches `f` on `stream`.
///
/// # Safety
/// The caller guarantees that `args` match the kernel's parameter list in number, order and
/// size, that every pointer argument addresses memory of the sizes the kernel will touch for the
/// given grid (checked against tensor shapes before the call), and that the context is current.
pub(crate) unsafe fn launch(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    stream: sys::CUstream,
    args: &[Arg],
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(()); // nothing to do (empty tensor)
    }
    if grid.1 > 65535 || grid.2 > 65535 {
        return Err(Error::Op(format!("kernel grid {grid:?} exceeds the y/z limit of 65535")));
    }
    let mut slots: Vec<u64> = args
        .iter()
        .map(|a| match a {
            Arg::Ptr(p) => *p,
            Arg::I32(v) => *v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
            Arg::I64(v) => *v as u64,
            Arg::Bytes(_) => 0,
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        match a {
            Arg::Bytes(b) => ptrs.push(b.as_ptr() as *mut c_void),
            _ => ptrs.push(&mut slots[i] as *mut u64 as *mut c_void),
        }
    }
    check(
        sys::cuLaunchKernel(f, grid.0, grid.1, grid.2, block.0, block.1, block.2, smem, stream, ptrs.as_mut_ptr(), std::ptr::null_mut()),
        "cuLaunchKernel",
    )
}
