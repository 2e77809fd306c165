//! Shared helpers for the llmq-core op tests: a seeded RNG, tensor upload/download on the CPU
//! backend, f64 references and the finite-difference gradient checker.
#![allow(dead_code)]

use llmq_core::cpu::CpuBackend;
use llmq_core::dtype::{decode_into, encode_into};
use llmq_core::{Backend, DType, Mem, MemCategory, Tensor};

/// splitmix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// `n` values uniform in [-scale, scale), never all zero.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = ((self.next_u64() >> 11) as f64) / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

pub struct Ctx {
    pub be: CpuBackend,
}

impl Default for Ctx {
    fn default() -> Self {
        Self::new()
    }
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx { be: CpuBackend::new() }
    }
    pub fn zeros(&mut self, dtype: DType, dims: &[usize]) -> Tensor {
        self.be.alloc(MemCategory::Activations, Mem::Device, dtype, dims).unwrap()
    }
    /// A tensor holding `vals` rounded (RNE) to `dtype`.
    pub fn t(&mut self, dtype: DType, dims: &[usize], vals: &[f32]) -> Tensor {
        let t = self.zeros(dtype, dims);
        self.set(&t, vals);
        t
    }
    pub fn f32(&mut self, dims: &[usize], vals: &[f32]) -> Tensor {
        self.t(DType::F32, dims, vals)
    }
    pub fn ids(&mut self, vals: &[i32]) -> Tensor {
        let t = self.zeros(DType::I32, &[vals.len()]);
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.be.upload(&t, &bytes).unwrap();
        t
    }
    pub fn set(&self, t: &Tensor, vals: &[f32]) {
        assert_eq!(vals.len(), t.numel());
        let mut bytes = vec![0u8; t.bytes()];
        encode_into(t.dtype, vals, &mut bytes);
        self.be.upload(t, &bytes).unwrap();
    }
    pub fn get(&self, t: &Tensor) -> Vec<f32> {
        let bytes = self.be.download(t).unwrap();
        let mut v = vec![0f32; t.numel()];
        decode_into(t.dtype, &bytes, &mut v);
        v
    }
    pub fn raw(&self, t: &Tensor) -> Vec<u8> {
        self.be.download(t).unwrap()
    }
}

/// Values rounded through `dtype` (what a tensor of that dtype would hold).
/// A device tensor of `vals` in `dtype` on any backend (the ranks' own backends in the comm tests).
pub fn tensor(be: &mut dyn Backend, dtype: DType, vals: &[f32]) -> Tensor {
    let t = be.alloc(MemCategory::Other, Mem::Device, dtype, &[vals.len()]).unwrap();
    let mut b = vec![0u8; t.bytes()];
    encode_into(dtype, vals, &mut b);
    be.upload(&t, &b).unwrap();
    t
}

pub fn rounded(dtype: DType, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| llmq_core::dtype::round_through(dtype, x)).collect()
}

/// Σ a_i b_i in f64.
pub fn dot64(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, &x| m.max(x.abs()))
}

/// Asserts |got - want| <= atol + rtol |want| elementwise, naming the first failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w} (err {err:e}, allowed {:e})", atol + rtol * w.abs());
    }
}

/// Finite-difference check of an analytic gradient.
///
/// `loss(x)` evaluates the scalar L = Σ out·R (in f64, from the op's f32 outputs) at `x`; `grad`
/// is dL/dx from the backward op at `x0`. For three random directions u (entries uniform in
/// [-1, 1]) and four single elements (the largest |grad| entry and three random ones) it compares
/// the central difference (L(x0 + h u) - L(x0 - h u)) / 2h with grad·u (using the perturbation
/// actually representable in f32, (x+ - x-)/2h, so representation error does not count).
///
/// Tolerance: the central difference has truncation error h²/6 · L''' (~1e-5 relative for
/// h = 1e-2 and O(1) inputs of these smooth ops) and rounding noise of the f32 forward of
/// about 6e-8 · Σ|out·R| / 2h (~1e-5 relative for our sizes). So `tol` ~ 1e-3..5e-3 relative to
/// the scale Σ|g_i u_i| (which bounds |grad·u| and does not vanish when grad·u cancels) leaves a
/// wide margin for correct code, while a wrong gradient (missing term, wrong sign, wrong index)
/// gives errors of order 1. Single elements use max(|g_i|, 1e-2 max|g|) as the scale.
pub fn check_grad(name: &str, x0: &[f32], grad: &[f32], mut loss: impl FnMut(&[f32]) -> f64, rng: &mut Rng, h: f32, tol: f64) {
    assert_eq!(x0.len(), grad.len(), "{name}: gradient length");
    let n = x0.len();
    let gmax = max_abs(grad) as f64;
    assert!(gmax > 0.0, "{name}: the analytic gradient is identically zero");
    let mut dirs: Vec<(String, Vec<f32>)> = (0..3).map(|d| (format!("direction {d}"), rng.vec(n, 1.0))).collect();
    let imax = (0..n).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap();
    let mut idx = vec![imax];
    for _ in 0..3 {
        idx.push(rng.below(n));
    }
    for &i in &idx {
        let mut e = vec![0f32; n];
        e[i] = 1.0;
        dirs.push((format!("element {i}"), e));
    }
    for (what, u) in dirs {
        let xp: Vec<f32> = x0.iter().zip(&u).map(|(&x, &d)| x + h * d).collect();
        let xm: Vec<f32> = x0.iter().zip(&u).map(|(&x, &d)| x - h * d).collect();
        let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
        let mut an = 0f64;
        let mut scale = 0f64;
        for i in 0..n {
            let step = (xp[i] as f64 - xm[i] as f64) / (2.0 * h as f64);
            an += grad[i] as f64 * step;
            scale += (grad[i] as f64 * step).abs();
        }
        if what.starts_with("element") {
            scale = scale.max(1e-2 * gmax);
        }
        let err = (fd - an).abs();
        if std::env::var_os("LLMQ_GRAD_VERBOSE").is_some() {
            eprintln!("{name} {what}: fd {fd:.6e} analytic {an:.6e} rel err {:.2e}", err / scale.max(1e-30));
        }
        assert!(
            err <= tol * scale,
            "{name}, {what}: finite difference {fd:e} vs analytic {an:e} (err {err:e}, scale {scale:e}, tol {tol})"
        );
    }
}
