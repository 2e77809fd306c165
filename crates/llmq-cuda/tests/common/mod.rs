//! Shared helpers of the CUDA tests: a CPU backend and a CUDA backend side by side, tensors with
//! the same bytes in both, and comparisons with a per-dtype tolerance table.
//!
//! Tests call `Pair::new()` first; without a usable CUDA device it prints
//! "skipping: no CUDA device: <reason>" and returns None, so the suite passes on machines
//! without a GPU.
#![allow(dead_code)]

use llmq_core::cpu::CpuBackend;
use llmq_core::dtype::{decode_into, encode_into};
use llmq_core::{Backend, DType, Mem, MemCategory, Tensor};
use llmq_cuda::{cuda_available, CudaBackend};
use std::time::Instant;

/// splitmix64-based generator (deterministic per test).
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// uniform in [0, 1)
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// approximately normal(0, scale), never exactly all zero
    pub fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
        s * 1.7320508 * scale
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(scale)).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A tensor present in both backends.
#[derive(Clone, Copy, Debug)]
pub struct T2 {
    pub c: Tensor,
    pub g: Tensor,
}

pub struct Pair {
    pub cpu: CpuBackend,
    pub gpu: CudaBackend,
    pub rng: Rng,
    /// Failed checks; the test fails when the Pair is dropped (so one bad case does not hide the
    /// others).
    pub failures: std::cell::RefCell<Vec<String>>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let f = self.failures.borrow();
        if !f.is_empty() && !std::thread::panicking() {
            panic!("{} check(s) failed:\n{}", f.len(), f.join("\n"));
        }
    }
}

pub fn gpu_or_skip() -> Option<CudaBackend> {
    if let Err(e) = cuda_available() {
        println!("skipping: no CUDA device: {e}");
        return None;
    }
    Some(CudaBackend::new(0, &Default::default()).expect("CudaBackend::new"))
}

pub fn encode(dtype: DType, vals: &[f32]) -> Vec<u8> {
    let mut b = vec![0u8; vals.len() * dtype.size()];
    encode_into(dtype, vals, &mut b);
    b
}

pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut v);
    v
}

impl Pair {
    pub fn new(seed: u64) -> Option<Pair> {
        let gpu = gpu_or_skip()?;
        Some(Pair { cpu: CpuBackend::new(), gpu, rng: Rng::new(seed), failures: Default::default() })
    }

    pub fn fail(&self, msg: String) {
        println!("FAIL {msg}");
        self.failures.borrow_mut().push(msg);
    }

    pub fn bytes(&mut self, dtype: DType, dims: &[usize], bytes: &[u8]) -> T2 {
        let c = self.cpu.alloc(MemCategory::Other, Mem::Device, dtype, dims).unwrap();
        let g = self.gpu.alloc(MemCategory::Other, Mem::Device, dtype, dims).unwrap();
        self.cpu.upload(&c, bytes).unwrap();
        self.gpu.upload(&g, bytes).unwrap();
        T2 { c, g }
    }
    pub fn vals(&mut self, dtype: DType, dims: &[usize], vals: &[f32]) -> T2 {
        let b = encode(dtype, vals);
        self.bytes(dtype, dims, &b)
    }
    pub fn rand(&mut self, dtype: DType, dims: &[usize], scale: f32) -> T2 {
        let n: usize = dims.iter().product();
        let v = self.rng.vec(n, scale);
        self.vals(dtype, dims, &v)
    }
    /// Output buffer filled with garbage (not zeros) so that unwritten elements show up.
    pub fn out(&mut self, dtype: DType, dims: &[usize]) -> T2 {
        self.rand(dtype, dims, 3.0)
    }
    pub fn i32s(&mut self, dims: &[usize], vals: &[i32]) -> T2 {
        let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.bytes(DType::I32, dims, &b)
    }
    pub fn get(&self, t: &T2) -> (Vec<f32>, Vec<f32>) {
        let c = self.cpu.download(&t.c).unwrap();
        let g = self.gpu.download(&t.g).unwrap();
        (decode(t.c.dtype, &c), decode(t.g.dtype, &g))
    }
    pub fn raw(&self, t: &T2) -> (Vec<u8>, Vec<u8>) {
        (self.cpu.download(&t.c).unwrap(), self.gpu.download(&t.g).unwrap())
    }

    /// Byte-identical results.
    pub fn exact(&self, name: &str, t: &T2) {
        let (c, g) = self.raw(t);
        let diff = c.iter().zip(&g).filter(|(a, b)| a != b).count();
        if diff != 0 {
            let first = c.iter().zip(&g).position(|(a, b)| a != b).unwrap();
            let sz = t.c.dtype.size();
            let e = first / sz;
            let (cv, gv) = (decode(t.c.dtype, &c[e * sz..(e + 1) * sz])[0], decode(t.g.dtype, &g[e * sz..(e + 1) * sz])[0]);
            let nel = c.chunks(sz).zip(g.chunks(sz)).filter(|(a, b)| a != b).count();
            self.fail(format!("{name}: {nel} of {} elements differ from the CPU (first at element {e}: cpu {cv} gpu {gv})", t.c.numel()));
            return;
        }
        println!("{name}: bit-exact ({} elements)", t.c.numel());
    }

    /// Elementwise tolerance |g - c| <= atol + rtol |c|, with NaN only where the CPU has NaN.
    pub fn close(&self, name: &str, t: &T2, rtol: f32, atol: f32) {
        let (c, g) = self.get(t);
        let mut worst = (0f32, 0usize);
        let mut bad = 0;
        let mut exact = 0;
        for (i, (&a, &b)) in c.iter().zip(&g).enumerate() {
            if a.to_bits() == b.to_bits() {
                exact += 1;
                continue;
            }
            if a.is_nan() || b.is_nan() {
                bad += 1;
                continue;
            }
            let d = (a - b).abs();
            let lim = atol + rtol * a.abs();
            if d > lim {
                bad += 1;
            }
            let r = d / lim.max(f32::MIN_POSITIVE);
            if r > worst.0 {
                worst = (r, i);
            }
        }
        let n = c.len();
        println!(
            "{name}: {exact}/{n} bit-identical, worst |diff|/tol {:.3} at {} (cpu {} gpu {})",
            worst.0,
            worst.1,
            c.get(worst.1).copied().unwrap_or(0.0),
            g.get(worst.1).copied().unwrap_or(0.0)
        );
        if bad != 0 {
            self.fail(format!("{name}: {bad} of {n} elements outside rtol {rtol} atol {atol}"));
        }
    }

    /// Tolerance by dtype for elementwise results that may differ in the last bits of the f32
    /// arithmetic: f32 a few ulp; bf16/fp8 one unit of their last place.
    pub fn close_dt(&self, name: &str, t: &T2) {
        let (rtol, atol) = tol(t.c.dtype);
        self.close(name, t, rtol, atol)
    }

    /// ‖g − c‖ / ‖c‖ <= tol (for accumulations in a different order or precision).
    pub fn rel(&self, name: &str, t: &T2, tol: f64) -> f64 {
        let (c, g) = self.get(t);
        let (mut num, mut den) = (0f64, 0f64);
        let mut nans = 0;
        for (&a, &b) in c.iter().zip(&g) {
            if b.is_nan() && !a.is_nan() {
                nans += 1;
                continue;
            }
            num += ((a - b) as f64).powi(2);
            den += (a as f64).powi(2);
        }
        let r = (num / den.max(1e-300)).sqrt();
        println!("{name}: relative error {r:.3e} (tolerance {tol:.0e})");
        if nans > 0 || r.is_nan() || r > tol {
            self.fail(format!("{name}: relative error {r:.3e} > {tol:.0e} ({nans} NaN on the GPU only)"));
        }
        r
    }
}

/// (rtol, atol) per dtype for "same formula, possibly different last bits".
pub fn tol(d: DType) -> (f32, f32) {
    match d {
        DType::F32 => (2e-6, 1e-7),
        DType::BF16 => (1.0 / 128.0, 1e-6),
        DType::E4M3 => (1.0 / 8.0, 1.0 / 512.0),
        DType::E5M2 => (1.0 / 4.0, 1.0 / 65536.0),
        DType::I32 => (0.0, 0.0),
    }
}

/// Median seconds per call of `f` on `g` (host-timed, synchronised); repetitions per sample are
/// chosen so that a sample takes >= ~3 ms (launch and synchronisation latency amortised).
pub fn median_time<F: FnMut()>(g: &CudaBackend, mut f: F) -> f64 {
    f();
    g.synchronize().unwrap();
    let t0 = Instant::now();
    f();
    g.synchronize().unwrap();
    let once = t0.elapsed().as_secs_f64();
    let reps = ((3e-3 / once.max(1e-6)) as usize).clamp(3, 200);
    let mut ts = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        for _ in 0..reps {
            f();
        }
        g.synchronize().unwrap();
        ts.push(t0.elapsed().as_secs_f64() / reps as f64);
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[ts.len() / 2]
}

/// A device tensor of random normal values (never all zero) times `scale`.
pub fn rand_tensor(g: &mut CudaBackend, rng: &mut Rng, dt: DType, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let t = g.alloc(MemCategory::Other, Mem::Device, dt, dims).unwrap();
    g.upload(&t, &encode(dt, &rng.vec(n, scale))).unwrap();
    t
}
