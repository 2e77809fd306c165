//! AdamW against a scalar f64 reference, its rounding modes and segment handling; fp8
//! quantisation, absmax and transposes.

mod common;

use common::{Ctx, Rng};
use llmq_core::dtype::{bf16_to_f32, f32_to_bf16, f32_to_e4m3, f32_to_e5m2, DType, E4M3_MAX, E5M2_MAX};
use llmq_core::{AdamStep, AdamW, Backend, Segment, Tensor, ADAM_SCALARS};

const F32: DType = DType::F32;
const BF16: DType = DType::BF16;
/// Value written into padding, to check it is never touched.
const PAD: f32 = 12345.0;

struct Hyper {
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    wd: f32,
    scale: f32,
}

const HP: Hyper = Hyper { lr: 1e-2, b1: 0.9, b2: 0.95, eps: 1e-8, wd: 0.1, scale: 0.5 };

#[allow(clippy::too_many_arguments)]
fn args<'a>(p: &'a Tensor, master: &'a Tensor, g: &'a Tensor, m: &'a Tensor, v: &'a Tensor, scalars: &'a Tensor, absmax: Option<&'a Tensor>) -> AdamW<'a> {
    AdamW { params: p, master, grads: g, m, v, scalars, beta1: HP.b1, beta2: HP.b2, eps: HP.eps, weight_decay: HP.wd, absmax }
}

/// The per-step scalars of `step` with `seed` and the test's learning rate and gradient scale,
/// in a new tensor.
fn scalars(cx: &mut Ctx, step: u64, seed: u64) -> Tensor {
    let t = cx.zeros(DType::I32, &[ADAM_SCALARS]);
    cx.be.upload(&t, &AdamStep { lr: HP.lr, step, grad_scale: HP.scale, seed }.bytes(HP.b1, HP.b2).unwrap()).unwrap();
    t
}

/// Scalar f64 AdamW step on (p, m, v).
fn adamw_ref(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, step: u64, decay: bool) {
    let (b1, b2) = (HP.b1 as f64, HP.b2 as f64);
    let g = g * HP.scale as f64;
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    let mh = *m / (1.0 - b1.powi(step as i32));
    let vh = *v / (1.0 - b2.powi(step as i32));
    let wd = if decay { HP.wd as f64 } else { 0.0 };
    *p -= HP.lr as f64 * (mh / (vh.sqrt() + HP.eps as f64) + wd * *p);
}

/// Two segments with padding around them: [pad 3][decay 37][pad 5][no decay 20][pad 7].
fn segments() -> (usize, Vec<Segment>) {
    (72, vec![Segment { offset: 3, len: 37, decay: true }, Segment { offset: 45, len: 20, decay: false }])
}

fn seg_of(i: usize, segs: &[Segment]) -> Option<&Segment> {
    segs.iter().find(|s| (s.offset..s.offset + s.len).contains(&i))
}

#[test]
fn adamw_f32_matches_f64_reference() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(21);
    let (n, segs) = segments();
    let mut p0 = rng.vec(n, 1.0);
    for (i, x) in p0.iter_mut().enumerate() {
        if seg_of(i, &segs).is_none() {
            *x = PAD;
        }
    }
    let pad_vals: Vec<f32> = (0..n).map(|i| if seg_of(i, &segs).is_none() { PAD } else { 0.0 }).collect();
    let p = cx.f32(&[n], &p0);
    let m = cx.f32(&[n], &pad_vals);
    let v = cx.f32(&[n], &pad_vals);
    let g = cx.zeros(F32, &[n]);
    let am = cx.zeros(F32, &[2]);
    let mut rp: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let (mut rm, mut rv) = (vec![0f64; n], vec![0f64; n]);
    for step in 1..=4 {
        let gv: Vec<f32> = (0..n).map(|_| rng.normal() * 0.3).collect();
        cx.set(&g, &gv);
        let sc = scalars(&mut cx, step, 0);
        cx.be.adamw(&args(&p, &p, &g, &m, &v, &sc, Some(&am)), &segs).unwrap();
        for i in 0..n {
            if let Some(s) = seg_of(i, &segs) {
                adamw_ref(&mut rp[i], &mut rm[i], &mut rv[i], gv[i] as f64, step, s.decay);
            }
        }
        let (gp, gm, gvv) = (cx.get(&p), cx.get(&m), cx.get(&v));
        for i in 0..n {
            if seg_of(i, &segs).is_none() {
                assert_eq!((gp[i], gm[i], gvv[i]), (PAD, PAD, PAD), "padding element {i} touched");
                continue;
            }
            // f32 arithmetic: relative errors of a few ulps in m, v and the update (~1e-6 of lr)
            // plus the f32 rounding of p, accumulated over 4 steps.
            assert!((gp[i] as f64 - rp[i]).abs() <= 1e-6 * (rp[i].abs() + 1.0), "step {step} p[{i}]: {} vs {}", gp[i], rp[i]);
            assert!((gm[i] as f64 - rm[i]).abs() <= 1e-6 * rm[i].abs() + 1e-9, "m[{i}]");
            assert!((gvv[i] as f64 - rv[i]).abs() <= 1e-5 * rv[i].abs() + 1e-12, "v[{i}]");
        }
        let a = cx.get(&am);
        for (k, s) in segs.iter().enumerate() {
            let want = gp[s.offset..s.offset + s.len].iter().fold(0f32, |x, &y| x.max(y.abs()));
            assert_eq!(a[k], want, "absmax of segment {k}");
        }
    }
}

#[test]
fn adamw_weight_decay_only_on_decay_segments() {
    // zero gradients: m = v = 0, the Adam term is 0 / (0 + eps) = 0, only decay moves p
    let mut cx = Ctx::new();
    let mut rng = Rng::new(22);
    let (n, segs) = segments();
    let p0 = rng.vec(n, 2.0);
    let p = cx.f32(&[n], &p0);
    let zeros = vec![0f32; n];
    let (g, m, v) = (cx.f32(&[n], &zeros), cx.f32(&[n], &zeros), cx.f32(&[n], &zeros));
    let sc = scalars(&mut cx, 1, 0);
    cx.be.adamw(&args(&p, &p, &g, &m, &v, &sc, None), &segs).unwrap();
    let got = cx.get(&p);
    for i in 0..n {
        let want = match seg_of(i, &segs) {
            Some(s) if s.decay => p0[i] - HP.lr * (0.0 + HP.wd * p0[i]),
            _ => p0[i],
        };
        assert_eq!(got[i], want, "p[{i}]");
    }
}

#[test]
fn adamw_bf16_master_stochastic_rounding() {
    // p = 1 - lr·(g/(|g|+eps)) ≈ 0.99 is between bf16 values 0.98828125 and 0.9921875: RNE would
    // always give 0.9921875; stochastic rounding must average to the exact value.
    let n = 100_000;
    let segs = [Segment { offset: 0, len: n, decay: false }];
    let mut cx = Ctx::new();
    let ones = vec![1f32; n];
    let p = cx.t(BF16, &[n], &ones);
    let g = cx.t(F32, &[n], &vec![0.25f32; n]);
    let (m, v) = (cx.zeros(BF16, &[n]), cx.zeros(BF16, &[n]));
    let sc = scalars(&mut cx, 1, 42);
    cx.be.adamw(&args(&p, &p, &g, &m, &v, &sc, None), &segs).unwrap();
    let got = cx.get(&p);
    let exact = 1.0f64 - HP.lr as f64 * (0.125 / (0.125 + HP.eps as f64));
    let (lo, hi) = (0.98828125f32, 0.9921875f32);
    assert!(got.iter().all(|&x| x == lo || x == hi), "values must be the two bf16 neighbours");
    let mean = got.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    // std of the mean: ulp/2 / sqrt(n) ≈ 6e-6; allow 8 sigma. RNE would be off by 2e-3.
    assert!((mean - exact).abs() < 5e-5, "mean {mean} vs exact {exact}");
    // m, v stored with RNE
    assert!(cx.get(&m).iter().all(|&x| x == bf16_to_f32(f32_to_bf16(0.1 * 0.125))));
    // deterministic for a seed, different for another seed
    let run = |cx: &mut Ctx, seed: u64| {
        let p = cx.t(BF16, &[n], &ones);
        let (m, v) = (cx.zeros(BF16, &[n]), cx.zeros(BF16, &[n]));
        let sc = scalars(cx, 1, seed);
        cx.be.adamw(&args(&p, &p, &g, &m, &v, &sc, None), &segs).unwrap();
        cx.raw(&p)
    };
    let a = run(&mut cx, 42);
    assert_eq!(a, cx.raw(&p));
    assert_eq!(a, run(&mut cx, 42));
    assert_ne!(a, run(&mut cx, 43));
    // thread count does not matter
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    assert_eq!(pool.install(|| run(&mut cx, 42)), a);
}

#[test]
fn adamw_separate_bf16_params_from_f32_master() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(23);
    let (n, segs) = segments();
    let p0 = rng.vec(n, 1.0);
    let master = cx.f32(&[n], &p0);
    let params = cx.t(BF16, &[n], &vec![PAD; n]);
    let g = cx.t(BF16, &[n], &rng.vec(n, 1.0));
    let (m, v) = (cx.zeros(F32, &[n]), cx.zeros(F32, &[n]));
    let am = cx.zeros(F32, &[2]);
    let sc = scalars(&mut cx, 1, 0);
    cx.be.adamw(&args(&params, &master, &g, &m, &v, &sc, Some(&am)), &segs).unwrap();
    let (gm, gp) = (cx.get(&master), cx.get(&params));
    for i in 0..n {
        if seg_of(i, &segs).is_some() {
            assert_eq!(gp[i], bf16_to_f32(f32_to_bf16(gm[i])), "params[{i}] = RNE(master)");
            assert_ne!(gm[i], p0[i]);
        } else {
            assert_eq!((gp[i], gm[i]), (bf16_to_f32(f32_to_bf16(PAD)), p0[i]), "padding {i}");
        }
    }
    let a = cx.get(&am);
    for (k, s) in segs.iter().enumerate() {
        assert_eq!(a[k], gp[s.offset..s.offset + s.len].iter().fold(0f32, |x, &y| x.max(y.abs())));
    }
}

#[test]
fn adamw_argument_errors() {
    let mut cx = Ctx::new();
    let t = cx.zeros(F32, &[10]);
    let b = cx.zeros(BF16, &[10]);
    let ok = [Segment { offset: 0, len: 10, decay: true }];
    let e = AdamStep { lr: 1.0, step: 0, grad_scale: 1.0, seed: 0 }.words(0.9, 0.95).unwrap_err().to_string();
    assert!(e.contains("step starts at 1"), "{e}");
    let sc = scalars(&mut cx, 1, 0);
    assert!(cx.be.adamw(&args(&t, &t, &t, &t, &t, &sc, None), &ok).is_ok());
    assert!(cx.be.adamw(&args(&t, &t, &t, &t, &t, &sc, None), &[Segment { offset: 5, len: 6, decay: true }]).is_err(), "out of range");
    let overlap = [Segment { offset: 0, len: 6, decay: true }, Segment { offset: 5, len: 2, decay: false }];
    assert!(cx.be.adamw(&args(&t, &t, &t, &t, &t, &sc, None), &overlap).is_err(), "overlap");
    assert!(cx.be.adamw(&args(&b, &t, &t, &t, &t, &sc, Some(&t)), &ok).is_err(), "absmax size");
    let short = cx.zeros(F32, &[9]);
    assert!(cx.be.adamw(&args(&t, &t, &short, &t, &t, &sc, None), &ok).is_err(), "grads size");
    let e = cx.be.adamw(&args(&t, &t, &t, &t, &t, &t, None), &ok).unwrap_err().to_string();
    assert!(e.contains("scalars"), "{e}");
}

#[test]
fn quantize_values_saturation_descale() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(24);
    let (r, c) = (37, 19);
    let xv = rng.vec(r * c, 3.0);
    let x = cx.f32(&[r, c], &xv);
    let amax = cx.zeros(F32, &[1]);
    cx.be.absmax(&amax, &x).unwrap();
    let a = cx.get(&amax)[0];
    assert_eq!(a, xv.iter().fold(0f32, |m, &v| m.max(v.abs())));
    for (dt, fmax, enc) in [(DType::E4M3, E4M3_MAX, f32_to_e4m3 as fn(f32) -> u8), (DType::E5M2, E5M2_MAX, f32_to_e5m2)] {
        let q = cx.zeros(dt, &[r, c]);
        let ds = cx.zeros(F32, &[1]);
        cx.be.quantize(&q, &ds, &x, &amax, false).unwrap();
        let scale = fmax / a;
        let want: Vec<u8> = xv.iter().map(|&v| enc(v * scale)).collect();
        assert_eq!(cx.raw(&q), want, "{dt} values");
        assert_eq!(cx.get(&ds)[0], 1.0 / scale, "{dt} descale");
        let dq = cx.get(&q);
        assert_eq!(dq.iter().fold(0f32, |m, &v| m.max(v.abs())), fmax, "{dt}: the absmax element maps to the max");
        // dequantised values approximate the input
        for (d, &v) in dq.iter().zip(&xv) {
            assert!((d * cx.get(&ds)[0] - v).abs() <= v.abs() * 0.13 + a * 1e-3, "{dt}: {v} -> {d}");
        }
        // saturation: an absmax half the real one clips to ±max, never NaN
        let half = cx.f32(&[1], &[a / 2.0]);
        cx.be.quantize(&q, &ds, &x, &half, false).unwrap();
        let dq = cx.get(&q);
        assert!(dq.iter().all(|v| v.is_finite() && v.abs() <= fmax));
        assert!(dq.iter().filter(|v| v.abs() == fmax).count() > r * c / 4);
        // transpose variant == quantize then transpose (bytes)
        let qt = cx.zeros(dt, &[c, r]);
        let qt2 = cx.zeros(dt, &[c, r]);
        cx.be.quantize(&qt, &ds, &x, &amax, true).unwrap();
        cx.be.quantize(&q, &ds, &x, &amax, false).unwrap();
        cx.be.transpose(&qt2, &q).unwrap();
        assert_eq!(cx.raw(&qt), cx.raw(&qt2), "{dt} transposed quantisation");
        let qb = cx.raw(&q);
        let qtb = cx.raw(&qt);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(qtb[j * r + i], qb[i * c + j]);
            }
        }
    }
    // zero input: absmax floor 1e-10, zeros out
    let z = cx.zeros(F32, &[5]);
    let (q, ds) = (cx.zeros(DType::E4M3, &[5]), cx.zeros(F32, &[1]));
    cx.be.absmax(&amax, &z).unwrap();
    cx.be.quantize(&q, &ds, &z, &amax, false).unwrap();
    assert_eq!(cx.raw(&q), vec![0u8; 5]);
    assert_eq!(cx.get(&ds)[0], 1.0 / (448.0f32 / 1e-10));
}

#[test]
fn absmax_and_transpose_bit_exact() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(25);
    let x = cx.f32(&[6], &[1.0, -7.5, 3.0, f32::NAN, 2.0, 0.0]);
    let am = cx.zeros(F32, &[1]);
    cx.be.absmax(&am, &x).unwrap();
    assert!(cx.get(&am)[0].is_nan(), "NaN propagates into absmax");
    let x = cx.f32(&[3], &[1.0, -7.5, 3.0]);
    cx.be.absmax(&am, &x).unwrap();
    assert_eq!(cx.get(&am)[0], 7.5);
    // raw random bit patterns (NaN payloads included) in every dtype
    for dt in [F32, BF16, DType::E4M3, DType::I32] {
        let (r, c) = (23, 37);
        let src = cx.zeros(dt, &[r, c]);
        let bytes: Vec<u8> = (0..src.bytes()).map(|_| rng.next_u64() as u8).collect();
        cx.be.upload(&src, &bytes).unwrap();
        let dst = cx.zeros(dt, &[c, r]);
        cx.be.transpose(&dst, &src).unwrap();
        let out = cx.raw(&dst);
        let sz = dt.size();
        for i in 0..r {
            for j in 0..c {
                assert_eq!(out[(j * r + i) * sz..][..sz], bytes[(i * c + j) * sz..][..sz], "{dt} [{i},{j}]");
            }
        }
    }
}
