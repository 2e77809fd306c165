//! Matrix products through cuBLASLt.
//!
//! Row-major convention of the op interface: `out[M,N] = op(A)[M,K] · op(B)[K,N]`. cuBLASLt is
//! column-major, and a row-major [r, c] matrix is the same memory as a column-major [c, r] one,
//! so we compute `outᵀ = op(B)ᵀ · op(A)ᵀ`: cuBLASLt's "A" is our `b` and its "B" is our `a`,
//! with m = N, n = M. Our `b` stored [K, N] is column-major [N, K] = op(B)ᵀ directly (no
//! transpose); stored [N, K] (`trans_b`) it needs cuBLASLt's transpose. Likewise for `a`.
//! The bias ([N], one value per output column) is a per-row vector of the column-major result,
//! which is what CUBLASLT_EPILOGUE_BIAS adds. `accumulate` is beta = 1 with C = D = out.
//!
//! FP8 (e4m3/e5m2 operands, f32 accumulation, bf16 or f32 output, per-tensor descale factors
//! passed as device pointers) needs cuBLASLt's "TN" layout on Hopper and Ada: its A transposed
//! and its B not, i.e. our `trans_b && !trans_a` (the linear forward `x · Wᵀ`). Other fp8 layouts
//! are refused with `Error::Op`: the caller transposes an operand first (`quantize` with
//! `transpose`).
//!
//! Descriptors, layouts and the algorithm are cached per shape, transposes, dtypes,
//! bias/accumulate/scale flags and operand pointer alignment; the heuristic is asked with the very
//! descriptors that the call then runs with. Which of its answers runs comes from the measured
//! table in `tuning.rs` (the first answer for shapes it does not list). The workspaces are
//! allocated once: one per stream that runs matmuls (compute and side), since concurrent
//! matmuls must not share one.
//!
//! Matmuls on the side stream (weight gradients beside the input-gradient chain) get an SM-count
//! target, 3/4 of the SMs (`BackendOptions::side_sms` overrides; 0 = none): cuBLASLt's kernels are
//! persistent and would otherwise hold every SM until they finish, leaving the compute stream's
//! memory-bound ops nothing to run on. The heuristic answers differently when asked with a
//! target, and a different algorithm rounds differently; so a matmul marked `side_algo` gets
//! the algorithm chosen for the target on either stream (the target itself only narrows the
//! persistent grid: same bits, `side_stream_matmuls_match_the_compute_stream_bitwise`).
//! `BackendOptions::side_algo = false` ignores `side_algo` (every matmul runs the algorithm
//! chosen without a target; the side stream still narrows the grid).

use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys;
use llmq_core::{BackendOptions, DType, Error, Matmul, Result};
use crate::tuning::{self, CANDIDATES};
use std::collections::HashMap;
use std::ffi::c_void;

pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

fn ck(s: lt::cublasStatus_t, what: &str) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Backend(format!("cuBLASLt {what}: {s:?}")))
    }
}

fn cuda_type(d: DType) -> Result<lt::cudaDataType> {
    Ok(match d {
        DType::F32 => lt::cudaDataType::CUDA_R_32F,
        DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
        DType::E4M3 => lt::cudaDataType::CUDA_R_8F_E4M3,
        DType::E5M2 => lt::cudaDataType::CUDA_R_8F_E5M2,
        DType::I32 => return Err(Error::Op("matmul: i32 operands are not supported".into())),
    })
}

/// Largest power of two (up to 256) dividing the address.
fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        return 256;
    }
    (1u64 << addr.trailing_zeros().min(8)) as u32
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    da: DType,
    db: DType,
    dout: DType,
    bias: Option<DType>,
    accumulate: bool,
    scaled: bool,
    align: [u32; 4],
    /// CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET (0: all SMs).
    sms: u32,
    /// The SM count the algorithm is chosen for (0: all).
    algo_sms: u32,
    /// fp8 without promotion of the partial sums (CUBLASLT_MATMUL_DESC_FAST_ACCUM).
    fast_accum: bool,
}

struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    la: lt::cublasLtMatrixLayout_t,
    lb: lt::cublasLtMatrixLayout_t,
    lc: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    /// Other algorithms the heuristic offered, timed once at the first call (`tune`).
    candidates: Vec<lt::cublasLtMatmulAlgo_t>,
}

/// The table key of a shape (tuning.txt): dimensions, transposes, dtypes, bias dtype,
/// accumulate, pointer alignments.
fn key_string(k: &Key) -> String {
    let bias = k.bias.map_or("-".to_string(), |d| d.to_string());
    let [a0, a1, a2, a3] = k.align;
    let base = format!("{} {} {} {} {} {} {} {} {} {} {a0} {a1} {a2} {a3}", k.m, k.n, k.k, k.trans_a as u8, k.trans_b as u8, k.da, k.db, k.dout, bias, k.accumulate as u8);
    // (the SM target a matmul runs with does not matter: only the one its algorithm is chosen for)
    let base = match k.algo_sms {
        0 => base,
        n => format!("{base} sms{n}"),
    };
    if k.fast_accum {
        format!("{base} fast")
    } else {
        base
    }
}

pub(crate) struct Blas {
    handle: lt::cublasLtHandle_t,
    /// For the compute stream and for the side stream.
    workspaces: [u64; 2],
    /// SM-count target of side-stream matmuls (0: none).
    side_sms: u32,
    /// Whether `Matmul::side_algo` is honoured (`BackendOptions::side_algo`).
    side_algo: bool,
    plans: HashMap<Key, Plan>,
    /// Device name and cuBLASLt version: the section of tuning.txt that applies.
    device: String,
    table: HashMap<String, usize>,
    /// `BackendOptions::matmul_autotune`: time the candidates of shapes the table does not list
    /// and append the choices to this file.
    autotune: Option<String>,
}

unsafe fn set_desc<T>(desc: lt::cublasLtMatmulDesc_t, attr: lt::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    ck(lt::cublasLtMatmulDescSetAttribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()), "MatmulDescSetAttribute")
}

impl Blas {
    /// `workspaces`: two device buffers of WORKSPACE_BYTES allocated by the caller (compute and
    /// side stream); `device`: the device's name (selects the tuning table's section, with the
    /// library version); `sm_count`: its multiprocessors; `opts`: the side stream's SM target and
    /// algorithms, the tuning table and autotuning.
    pub fn new(workspaces: [u64; 2], device: &str, sm_count: u32, opts: &BackendOptions) -> Result<Blas> {
        let side_sms = match opts.side_sms {
            None => sm_count * 3 / 4,
            Some(n) if n > sm_count => return Err(Error::Config(format!("--side-sms: expected at most the {sm_count} SMs of {device} (0 = all), got {n}"))),
            Some(n) => n,
        };
        let table = tuning::entries(device, Self::version(), &opts.matmul_tuning)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the library's presence was checked before.
        ck(unsafe { lt::cublasLtCreate(&mut handle) }, "cublasLtCreate")?;
        Ok(Blas { handle, workspaces, side_sms, side_algo: opts.side_algo, plans: HashMap::new(), device: device.to_string(), table, autotune: opts.matmul_autotune.clone() })
    }

    pub fn version() -> usize {
        // SAFETY: no arguments.
        unsafe { lt::cublasLtGetVersion() }
    }

    /// `side`: `stream` is the side stream (its workspace and SM target apply).
    pub fn matmul(&mut self, args: &Matmul, stream: sys::CUstream, side: bool) -> Result<()> {
        let (workspace, sms) = if side { (self.workspaces[1], self.side_sms) } else { (self.workspaces[0], 0) };
        let (m, n, k) = args.dims()?;
        let (a, b, out) = (args.a, args.b, args.out);
        let fp8 = a.dtype.is_fp8() || b.dtype.is_fp8();
        if fp8 {
            if !(a.dtype.is_fp8() && b.dtype.is_fp8()) {
                return Err(Error::Op(format!("matmul: fp8 needs both operands in fp8, got {} and {}", a.dtype, b.dtype)));
            }
            if a.dtype == DType::E5M2 && b.dtype == DType::E5M2 {
                return Err(Error::Op("matmul: e5m2 x e5m2 is not supported by cuBLASLt; one operand must be e4m3".into()));
            }
            if !args.trans_b || args.trans_a {
                return Err(Error::Op(format!(
                    "matmul: fp8 operands need the TN layout (trans_b = true, trans_a = false), got trans_a = {}, trans_b = {}: transpose an operand first (quantize with transpose)",
                    args.trans_a, args.trans_b
                )));
            }
            if args.descale_a.is_none() || args.descale_b.is_none() {
                return Err(Error::Op("matmul: fp8 operands need descale_a and descale_b".into()));
            }
            if !matches!(out.dtype, DType::BF16 | DType::F32) {
                return Err(Error::Op(format!("matmul: fp8 output must be bf16 or fp32, got {}", out.dtype)));
            }
        } else {
            if a.dtype != b.dtype {
                return Err(Error::Op(format!("matmul: operand dtypes differ ({} and {})", a.dtype, b.dtype)));
            }
            match (a.dtype, out.dtype) {
                (DType::BF16, DType::BF16 | DType::F32) | (DType::F32, DType::F32) => {}
                (x, y) => return Err(Error::Op(format!("matmul: {x} operands with {y} output are not supported"))),
            }
        }
        for (name, d) in [("descale_a", args.descale_a), ("descale_b", args.descale_b)] {
            if let Some(d) = d {
                d.expect("matmul", name, Some(DType::F32), &[1])?;
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return Err(Error::Op("matmul: K = 0".into()));
        }
        let key = Key {
            m,
            n,
            k,
            trans_a: args.trans_a,
            trans_b: args.trans_b,
            da: a.dtype,
            db: b.dtype,
            dout: out.dtype,
            bias: args.bias.map(|t| t.dtype),
            accumulate: args.accumulate,
            scaled: fp8,
            align: [alignment(a.addr), alignment(b.addr), alignment(out.addr), args.bias.map(|t| alignment(t.addr)).unwrap_or(256)],
            sms,
            algo_sms: if args.side_algo && self.side_algo { self.side_sms } else { 0 },
            fast_accum: fp8 && args.fast_accumulation,
        };
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(&key)?;
            self.plans.insert(key, plan);
        }
        // SAFETY: the plan's descriptors are alive (owned by self); pointers are device addresses
        // of tensors whose shapes were checked by `dims()` against (m, n, k); the workspace has
        // WORKSPACE_BYTES; alpha/beta are host scalars (default pointer mode).
        unsafe {
            use lt::cublasLtMatmulDescAttributes_t as A;
            let plan = &self.plans[&key];
            if let Some(bias) = args.bias {
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias.addr)?;
            }
            if fp8 {
                // cuBLASLt's A is our b.
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &args.descale_b.unwrap().addr)?;
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &args.descale_a.unwrap().addr)?;
            }
            if !plan.candidates.is_empty() {
                let medians = self.tune(plan, args, stream, workspace)?;
                let best = tuning::best_of(&medians);
                if let Some(path) = &self.autotune {
                    tuning::record(path, &self.device, Self::version(), &key_string(&key), best, &medians);
                }
                let plan = self.plans.get_mut(&key).unwrap();
                plan.algo = plan.candidates[best];
                plan.candidates.clear();
            }
            let plan = &self.plans[&key];
            let alpha = 1.0f32;
            let beta = if args.accumulate { 1.0f32 } else { 0.0f32 };
            ck(
                lt::cublasLtMatmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    b.addr as *const c_void,
                    plan.la,
                    a.addr as *const c_void,
                    plan.lb,
                    &beta as *const f32 as *const c_void,
                    out.addr as *const c_void,
                    plan.lc,
                    out.addr as *mut c_void,
                    plan.lc,
                    &plan.algo,
                    workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    stream as lt::cudaStream_t,
                ),
                &format!("matmul {key:?}"),
            )
        }
    }

    fn make_plan(&self, key: &Key) -> Result<Plan> {
        use lt::cublasLtMatmulDescAttributes_t as A;
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        // SAFETY: descriptor/layout creation with out-pointers to locals; attributes are set with
        // values of the documented types (i32 for enums, u64 for pointers/sizes).
        unsafe {
            let mut desc = std::ptr::null_mut();
            ck(lt::cublasLtMatmulDescCreate(&mut desc, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::cudaDataType::CUDA_R_32F), "MatmulDescCreate")?;
            // cuBLASLt A = our b; B = our a.
            let op_a: i32 = if key.trans_b { 1 } else { 0 };
            let op_b: i32 = if key.trans_a { 1 } else { 0 };
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op_a)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &op_b)?;
            if let Some(bd) = key.bias {
                let epi: i32 = lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
                let bt: i32 = cuda_type(bd)? as i32;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt)?;
                // a placeholder pointer so that the heuristic sees a complete descriptor
                let p: u64 = self.workspaces[0];
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)?;
            }
            if key.scaled {
                let p: u64 = self.workspaces[0];
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p)?;
            }
            if key.algo_sms > 0 {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &(key.algo_sms as i32))?;
            }
            if key.fast_accum {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
            // layouts (column-major): A_lt = b, B_lt = a, C = D = out
            // b stored [K, N] row-major is column-major [N, K] (ld N); stored [N, K] (trans_b) it is
            // column-major [K, N] (ld K) and gets cuBLASLt's transpose. Same for a with M.
            let (ar, ac) = if key.trans_b { (k, n) } else { (n, k) };
            let (br, bc) = if key.trans_a { (m, k) } else { (k, m) };
            let mut la = std::ptr::null_mut();
            let mut lb = std::ptr::null_mut();
            let mut lc = std::ptr::null_mut();
            ck(lt::cublasLtMatrixLayoutCreate(&mut la, cuda_type(key.db)?, ar, ac, ar as i64), "MatrixLayoutCreate(A)")?;
            ck(lt::cublasLtMatrixLayoutCreate(&mut lb, cuda_type(key.da)?, br, bc, br as i64), "MatrixLayoutCreate(B)")?;
            ck(lt::cublasLtMatrixLayoutCreate(&mut lc, cuda_type(key.dout)?, n, m, n as i64), "MatrixLayoutCreate(C)")?;

            let mut pref = std::ptr::null_mut();
            ck(lt::cublasLtMatmulPreferenceCreate(&mut pref), "MatmulPreferenceCreate")?;
            use lt::cublasLtMatmulPreferenceAttributes_t as P;
            let ws: u64 = WORKSPACE_BYTES as u64;
            let setp = |attr: P, v: &u64| ck(lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, v as *const u64 as *const c_void, 8), "MatmulPreferenceSetAttribute");
            setp(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
            let al = |x: u32| -> u32 { x };
            let setp32 = |attr: P, v: u32| ck(lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, &v as *const u32 as *const c_void, 4), "MatmulPreferenceSetAttribute");
            // our a is cuBLASLt's B, our b its A
            setp32(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al(key.align[1]))?;
            setp32(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al(key.align[0]))?;
            setp32(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al(key.align[2]))?;
            setp32(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al(key.align[2]))?;

            let mut results: Vec<lt::cublasLtMatmulHeuristicResult_t> = vec![std::mem::zeroed(); CANDIDATES];
            let mut count = 0i32;
            let st = lt::cublasLtMatmulAlgoGetHeuristic(self.handle, desc, la, lb, lc, lc, pref, CANDIDATES as i32, results.as_mut_ptr(), &mut count);
            lt::cublasLtMatmulPreferenceDestroy(pref);
            if st != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS || count == 0 {
                lt::cublasLtMatmulDescDestroy(desc);
                lt::cublasLtMatrixLayoutDestroy(la);
                lt::cublasLtMatrixLayoutDestroy(lb);
                lt::cublasLtMatrixLayoutDestroy(lc);
                return Err(Error::Op(format!(
                    "matmul: cuBLASLt has no algorithm for M={} N={} K={} a {}{} b {}{} out {} bias {:?} accumulate {} (pointer alignments a/b/out/bias {:?}): {st:?}",
                    key.m,
                    key.n,
                    key.k,
                    key.da,
                    if key.trans_a { "ᵀ" } else { "" },
                    key.db,
                    if key.trans_b { "ᵀ" } else { "" },
                    key.dout,
                    key.bias,
                    key.accumulate,
                    key.align
                )));
            }
            let ok: Vec<_> = results[..count as usize]
                .iter()
                .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            // the measured choice for this shape, else the heuristic's first answer (or, with
            // autotune, all of them, timed at the first call)
            let ks = key_string(key);
            let listed = self.table.get(&ks).copied().filter(|&i| i < ok.len());
            let candidates = if listed.is_none() && self.autotune.is_some() && ok.len() > 1 { ok.clone() } else { vec![] };
            let algo = ok.get(listed.unwrap_or(0)).copied().unwrap_or(results[0].algo);
            // the target this matmul runs with (the choice was made for algo_sms); where the
            // library refuses it for this algorithm, there is none
            if key.sms != key.algo_sms {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &(key.sms as i32))?;
                let mut check: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
                if lt::cublasLtMatmulAlgoCheck(self.handle, desc, la, lb, lc, lc, &algo, &mut check) != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &0i32)?;
                }
            }
            Ok(Plan { desc, la, lb, lc, algo, candidates })
        }
    }

    /// Times every candidate algorithm of `plan` on the call's operands, writing into a scratch
    /// output (allocated and freed here, once per shape), and returns each one's median time over
    /// TIME_ROUNDS interleaved rounds (`tuning::medians`; empty where there was no room to tune,
    /// which keeps the first). Every candidate computes the same product; only speed (and the last
    /// bits) differ.
    ///
    /// SAFETY: as for `matmul`; `plan`'s descriptor already holds this call's pointers.
    unsafe fn tune(&self, plan: &Plan, args: &Matmul, stream: sys::CUstream, workspace: u64) -> Result<Vec<f32>> {
        let out_bytes = args.out.bytes().max(1);
        let mut scratch: sys::CUdeviceptr = 0;
        if sys::cuMemAlloc_v2(&mut scratch, out_bytes) != sys::CUresult::CUDA_SUCCESS {
            return Ok(vec![]); // no room to tune: keep the heuristic's first choice
        }
        let (mut e0, mut e1) = (std::ptr::null_mut(), std::ptr::null_mut());
        sys::cuEventCreate(&mut e0, 0);
        sys::cuEventCreate(&mut e1, 0);
        let alpha = 1.0f32;
        let beta = if args.accumulate { 1.0f32 } else { 0.0f32 };
        let run = |algo: &lt::cublasLtMatmulAlgo_t| {
            lt::cublasLtMatmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                args.b.addr as *const c_void,
                plan.la,
                args.a.addr as *const c_void,
                plan.lb,
                &beta as *const f32 as *const c_void,
                scratch as *const c_void,
                plan.lc,
                scratch as *mut c_void,
                plan.lc,
                algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream as lt::cudaStream_t,
            )
        };
        // a warm-up call each (and the ones that fail drop out)
        let usable: Vec<bool> = plan.candidates.iter().map(|a| run(a) == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS).collect();
        let mut times = vec![vec![f32::NAN; plan.candidates.len()]; tuning::TIME_ROUNDS];
        for round in times.iter_mut() {
            for (c, algo) in plan.candidates.iter().enumerate() {
                if !usable[c] {
                    continue;
                }
                sys::cuEventRecord(e0, stream);
                run(algo);
                run(algo);
                sys::cuEventRecord(e1, stream);
                sys::cuEventSynchronize(e1);
                let mut ms = 0f32;
                sys::cuEventElapsedTime_v2(&mut ms, e0, e1);
                round[c] = ms;
            }
        }
        sys::cuStreamSynchronize(stream);
        sys::cuEventDestroy_v2(e0);
        sys::cuEventDestroy_v2(e1);
        sys::cuMemFree_v2(scratch);
        Ok(tuning::medians(&times))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: every handle was created by this object and is destroyed once.
        unsafe {
            for (_, p) in self.plans.drain() {
                lt::cublasLtMatmulDescDestroy(p.desc);
                lt::cublasLtMatrixLayoutDestroy(p.la);
                lt::cublasLtMatrixLayoutDestroy(p.lb);
                lt::cublasLtMatrixLayoutDestroy(p.lc);
            }
            lt::cublasLtDestroy(self.handle);
        }
    }
}
