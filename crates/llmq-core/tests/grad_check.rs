//! Every backward op against central finite differences of its forward op.
//!
//! For each op: L = Σ out · R with R random, the analytic gradient comes from the backward op
//! called with dout = R, and `common::check_grad` compares it with central differences of L
//! (f32 tensors, L evaluated in f64). See `check_grad` for the tolerance argument.

mod common;

use common::{check_grad, dot64, Ctx, Rng};
use llmq_core::{AttnShape, Backend, DType, Matmul};

const F32: DType = DType::F32;
/// Step and relative tolerance used throughout (see `check_grad`).
const H: f32 = 1e-2;
const TOL: f64 = 3e-3;

#[test]
fn matmul_all_transposes_with_bias() {
    let (m, k, n) = (5, 7, 6);
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let mut cx = Ctx::new();
            let mut rng = Rng::new(1 + trans_a as u64 * 2 + trans_b as u64);
            let adims = if trans_a { [k, m] } else { [m, k] };
            let bdims = if trans_b { [n, k] } else { [k, n] };
            let av = rng.vec(m * k, 1.0);
            let bv = rng.vec(k * n, 1.0);
            let biasv = rng.vec(n, 1.0);
            let rv = rng.vec(m * n, 1.0);
            let a = cx.f32(&adims, &av);
            let b = cx.f32(&bdims, &bv);
            let bias = cx.f32(&[n], &biasv);
            let out = cx.zeros(F32, &[m, n]);
            let g = cx.f32(&[m, n], &rv);
            let fwd = Matmul { out: &out, a: &a, trans_a, b: &b, trans_b, bias: Some(&bias), accumulate: false, descale_a: None, descale_b: None, side_algo: false, fast_accumulation: false };

            // dA: d op(A) = G op(B)ᵀ; stored transposed when trans_a: dA = op(B) Gᵀ.
            let da = cx.zeros(F32, &adims);
            let mm_da = if trans_a {
                Matmul { out: &da, a: &b, trans_a: trans_b, b: &g, trans_b: true, ..fwd }
            } else {
                Matmul { out: &da, a: &g, trans_a: false, b: &b, trans_b: !trans_b, ..fwd }
            };
            cx.be.matmul(&Matmul { bias: None, ..mm_da }).unwrap();
            // dB: d op(B) = op(A)ᵀ G; stored transposed when trans_b: dB = Gᵀ op(A).
            let db = cx.zeros(F32, &bdims);
            let mm_db = if trans_b {
                Matmul { out: &db, a: &g, trans_a: true, b: &a, trans_b: trans_a, ..fwd }
            } else {
                Matmul { out: &db, a: &a, trans_a: !trans_a, b: &g, trans_b: false, ..fwd }
            };
            cx.be.matmul(&Matmul { bias: None, ..mm_db }).unwrap();
            let dbias = cx.zeros(F32, &[n]);
            cx.be.colsum(&dbias, &g, false).unwrap();
            let (dav, dbv, dbiasv) = (cx.get(&da), cx.get(&db), cx.get(&dbias));

            let name = format!("matmul ta={trans_a} tb={trans_b}");
            let loss = |av: &[f32], bv: &[f32], biasv: &[f32]| {
                cx.set(&a, av);
                cx.set(&b, bv);
                cx.set(&bias, biasv);
                cx.be.matmul(&fwd).unwrap();
                dot64(&cx.get(&out), &rv)
            };
            check_grad(&format!("{name} dA"), &av, &dav, |x| loss(x, &bv, &biasv), &mut rng, H, TOL);
            check_grad(&format!("{name} dB"), &bv, &dbv, |x| loss(&av, x, &biasv), &mut rng, H, TOL);
            check_grad(&format!("{name} dbias"), &biasv, &dbiasv, |x| loss(&av, &bv, x), &mut rng, H, TOL);
        }
    }
}

#[test]
fn embedding() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(7);
    let (v, c) = (11, 5);
    let idv = [3, 0, 3, 10, 7, 3, 0, 5, 9];
    let n = idv.len();
    let tv = rng.vec(v * c, 1.0);
    let rv = rng.vec(n * c, 1.0);
    let table = cx.f32(&[v, c], &tv);
    let ids = cx.ids(&idv);
    let out = cx.zeros(F32, &[n, c]);
    let dout = cx.f32(&[n, c], &rv);
    let dtable = cx.zeros(F32, &[v, c]);
    cx.be.embedding_bwd(&dtable, &ids, &dout).unwrap();
    let g = cx.get(&dtable);
    check_grad(
        "embedding dtable",
        &tv,
        &g,
        |x| {
            cx.set(&table, x);
            cx.be.embedding_fwd(&out, &ids, &table).unwrap();
            dot64(&cx.get(&out), &rv)
        },
        &mut rng,
        H,
        TOL,
    );
}

#[test]
fn rmsnorm() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(11);
    let (n, c) = (5, 13);
    let eps = 1e-5;
    let xv = rng.vec(n * c, 1.5);
    let wv: Vec<f32> = rng.vec(c, 0.5).iter().map(|w| w + 1.0).collect();
    let rv = rng.vec(n * c, 1.0);
    let x = cx.f32(&[n, c], &xv);
    let w = cx.f32(&[c], &wv);
    let out = cx.zeros(F32, &[n, c]);
    let rstd = cx.zeros(F32, &[n]);
    let dout = cx.f32(&[n, c], &rv);
    let dx = cx.zeros(F32, &[n, c]);
    let dw = cx.zeros(F32, &[c]);
    cx.be.rmsnorm_fwd(&out, &rstd, &x, &w, eps, None).unwrap();
    cx.be.rmsnorm_bwd(&dx, &dw, &dout, &x, &w, &rstd, None, None).unwrap();
    let (dxv, dwv) = (cx.get(&dx), cx.get(&dw));
    let loss = |xv: &[f32], wv: &[f32]| {
        cx.set(&x, xv);
        cx.set(&w, wv);
        cx.be.rmsnorm_fwd(&out, &rstd, &x, &w, eps, None).unwrap();
        dot64(&cx.get(&out), &rv)
    };
    check_grad("rmsnorm dx", &xv, &dxv, |p| loss(p, &wv), &mut rng, H, TOL);
    check_grad("rmsnorm dw", &wv, &dwv, |p| loss(&xv, p), &mut rng, H, TOL);
}

#[test]
fn residual_rmsnorm() {
    // L = Σ out·R1 + Σ res_out·R2; dL/dx = dL/ddelta = rmsnorm_bwd(dout = R1, dres = R2).
    let mut cx = Ctx::new();
    let mut rng = Rng::new(12);
    let (n, c) = (4, 9);
    let eps = 1e-6;
    let xv = rng.vec(n * c, 1.0);
    let deltav = rng.vec(n * c, 1.0);
    let wv: Vec<f32> = rng.vec(c, 0.5).iter().map(|w| w + 1.0).collect();
    let r1 = rng.vec(n * c, 1.0);
    let r2 = rng.vec(n * c, 1.0);
    let x = cx.f32(&[n, c], &xv);
    let delta = cx.f32(&[n, c], &deltav);
    let w = cx.f32(&[c], &wv);
    let res = cx.zeros(F32, &[n, c]);
    let out = cx.zeros(F32, &[n, c]);
    let rstd = cx.zeros(F32, &[n]);
    cx.be.residual_rmsnorm_fwd(&res, &out, &rstd, &x, &delta, &w, eps, None).unwrap();
    let dout = cx.f32(&[n, c], &r1);
    let dres = cx.f32(&[n, c], &r2);
    let dx = cx.zeros(F32, &[n, c]);
    let dw = cx.zeros(F32, &[c]);
    cx.be.rmsnorm_bwd(&dx, &dw, &dout, &res, &w, &rstd, Some(&dres), None).unwrap();
    let (dxv, dwv) = (cx.get(&dx), cx.get(&dw));
    let loss = |xv: &[f32], dv: &[f32], wv: &[f32]| {
        cx.set(&x, xv);
        cx.set(&delta, dv);
        cx.set(&w, wv);
        cx.be.residual_rmsnorm_fwd(&res, &out, &rstd, &x, &delta, &w, eps, None).unwrap();
        dot64(&cx.get(&out), &r1) + dot64(&cx.get(&res), &r2)
    };
    check_grad("residual_rmsnorm dx", &xv, &dxv, |p| loss(p, &deltav, &wv), &mut rng, H, TOL);
    check_grad("residual_rmsnorm ddelta", &deltav, &dxv, |p| loss(&xv, p, &wv), &mut rng, H, TOL);
    check_grad("residual_rmsnorm dw", &wv, &dwv, |p| loss(&xv, &deltav, p), &mut rng, H, TOL);
}

#[test]
fn qk_norm() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(13);
    let s = AttnShape { b: 1, t: 3, hq: 4, hkv: 2, hd: 6 };
    let (n, q) = (s.n(), s.qkv_width());
    let xv = rng.vec(n * q, 1.0);
    let qwv: Vec<f32> = rng.vec(s.hd, 0.5).iter().map(|w| w + 1.0).collect();
    let kwv: Vec<f32> = rng.vec(s.hd, 0.5).iter().map(|w| w + 1.0).collect();
    let rv = rng.vec(n * q, 1.0);
    let x = cx.f32(&[n, q], &xv);
    let qw = cx.f32(&[s.hd], &qwv);
    let kw = cx.f32(&[s.hd], &kwv);
    let out = cx.zeros(F32, &[n, q]);
    let rstd = cx.zeros(F32, &[n, s.hq + s.hkv]);
    let dout = cx.f32(&[n, q], &rv);
    let dx = cx.zeros(F32, &[n, q]);
    let dqw = cx.zeros(F32, &[s.hd]);
    let dkw = cx.zeros(F32, &[s.hd]);
    cx.be.qk_norm_fwd(&out, &rstd, &x, &qw, &kw, s, 1e-6).unwrap();
    cx.be.qk_norm_bwd(&dx, &dqw, &dkw, &dout, &x, &qw, &kw, &rstd, s, None).unwrap();
    let (dxv, dqwv, dkwv) = (cx.get(&dx), cx.get(&dqw), cx.get(&dkw));
    // the fused abs-max (for the fp8 matmul that consumes dqkv) is that of dqkv as stored
    let (dx2, am, am_pass) = (cx.zeros(F32, &[n, q]), cx.zeros(F32, &[1]), cx.zeros(F32, &[1]));
    let (dqw2, dkw2) = (cx.zeros(F32, &[s.hd]), cx.zeros(F32, &[s.hd]));
    cx.be.qk_norm_bwd(&dx2, &dqw2, &dkw2, &dout, &x, &qw, &kw, &rstd, s, Some(&am)).unwrap();
    cx.be.absmax(&am_pass, &dx2).unwrap();
    assert_eq!(cx.get(&dx2), dxv);
    assert_eq!(cx.get(&am)[0].to_bits(), cx.get(&am_pass)[0].to_bits());
    assert!(cx.get(&am)[0] > 0.0);
    let loss = |xv: &[f32], qwv: &[f32], kwv: &[f32]| {
        cx.set(&x, xv);
        cx.set(&qw, qwv);
        cx.set(&kw, kwv);
        cx.be.qk_norm_fwd(&out, &rstd, &x, &qw, &kw, s, 1e-6).unwrap();
        dot64(&cx.get(&out), &rv)
    };
    check_grad("qk_norm dqkv", &xv, &dxv, |p| loss(p, &qwv, &kwv), &mut rng, H, TOL);
    check_grad("qk_norm dqw", &qwv, &dqwv, |p| loss(&xv, p, &kwv), &mut rng, H, TOL);
    check_grad("qk_norm dkw", &kwv, &dkwv, |p| loss(&xv, &qwv, p), &mut rng, H, TOL);
}

/// (cos, sin) table f32 [T, Hd/2, 2] for rotary embeddings with base 10000.
pub fn rope_table(t: usize, hd: usize) -> Vec<f32> {
    let mut f = Vec::with_capacity(t * hd);
    for pos in 0..t {
        for i in 0..hd / 2 {
            let inv = 10000f64.powf(-(2.0 * i as f64) / hd as f64);
            let a = pos as f64 * inv;
            f.push(a.cos() as f32);
            f.push(a.sin() as f32);
        }
    }
    f
}

#[test]
fn rope() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(14);
    let s = AttnShape { b: 2, t: 3, hq: 2, hkv: 1, hd: 8 };
    let (n, q) = (s.n(), s.qkv_width());
    let xv = rng.vec(n * q, 1.0);
    let rv = rng.vec(n * q, 1.0);
    let x = cx.f32(&[n, q], &xv);
    let freqs = cx.f32(&[s.t, s.hd / 2, 2], &rope_table(s.t, s.hd));
    let out = cx.zeros(F32, &[n, q]);
    let dout = cx.f32(&[n, q], &rv);
    let dx = cx.zeros(F32, &[n, q]);
    cx.be.rope_bwd(&dx, &dout, &freqs, s, None).unwrap();
    let dxv = cx.get(&dx);
    check_grad(
        "rope dqkv",
        &xv,
        &dxv,
        |p| {
            cx.set(&x, p);
            cx.be.rope_fwd(&out, &x, &freqs, s, None).unwrap();
            dot64(&cx.get(&out), &rv)
        },
        &mut rng,
        H,
        TOL,
    );
}

#[test]
fn attention_gqa_odd_t() {
    for (hq, hkv) in [(4, 2), (2, 2), (3, 1)] {
        let mut cx = Ctx::new();
        let mut rng = Rng::new(15 + hq as u64);
        let s = AttnShape { b: 2, t: 7, hq, hkv, hd: 8 };
        let (n, q, ow) = (s.n(), s.qkv_width(), s.out_width());
        let xv = rng.vec(n * q, 1.0);
        let rv = rng.vec(n * ow, 1.0);
        let x = cx.f32(&[n, q], &xv);
        let out = cx.zeros(F32, &[n, ow]);
        let lse = cx.zeros(F32, &[s.b, s.hq, s.t]);
        let dout = cx.f32(&[n, ow], &rv);
        let dx = cx.f32(&[n, q], &rng.vec(n * q, 1.0)); // garbage: must be overwritten
        cx.be.attention_fwd(&out, &lse, &x, s, None).unwrap();
        cx.be.attention_bwd(&dx, &dout, &x, &out, &lse, s, None, None).unwrap();
        let dxv = cx.get(&dx);
        check_grad(
            &format!("attention Hq={hq} Hkv={hkv} dqkv"),
            &xv,
            &dxv,
            |p| {
                cx.set(&x, p);
                cx.be.attention_fwd(&out, &lse, &x, s, None).unwrap();
                dot64(&cx.get(&out), &rv)
            },
            &mut rng,
            H,
            TOL,
        );
    }
}

#[test]
fn swiglu() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(16);
    let (n, d) = (4, 9);
    let xv = rng.vec(n * 2 * d, 3.0);
    let rv = rng.vec(n * d, 1.0);
    let x = cx.f32(&[n, 2 * d], &xv);
    let out = cx.zeros(F32, &[n, d]);
    let dout = cx.f32(&[n, d], &rv);
    let dx = cx.zeros(F32, &[n, 2 * d]);
    cx.be.swiglu_bwd(&dx, &dout, &x, None).unwrap();
    let dxv = cx.get(&dx);
    check_grad(
        "swiglu dinp",
        &xv,
        &dxv,
        |p| {
            cx.set(&x, p);
            cx.be.swiglu_fwd(&out, &x, None).unwrap();
            dot64(&cx.get(&out), &rv)
        },
        &mut rng,
        H,
        TOL,
    );
}

#[test]
fn cross_entropy_mean_loss_with_ignored_rows() {
    for z in [0.0, 1e-2, 0.3] {
        cross_entropy_case(z);
    }
}

/// The mean loss (with z-loss coefficient `z`) and its gradient, by finite differences.
fn cross_entropy_case(z: f32) {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(17);
    let (r, v) = (6, 11);
    let tv = [3, -100, 0, 10, -100, 7];
    let valid = tv.iter().filter(|&&t| t != -100).count();
    let dloss = 1.0 / valid as f32;
    let xv = rng.vec(r * v, 3.0);
    let logits = cx.f32(&[r, v], &xv);
    let losses = cx.zeros(F32, &[r]);
    let targets = cx.ids(&tv);
    cx.be.cross_entropy(&logits, &losses, &targets, dloss, z).unwrap();
    let g = cx.get(&logits);
    for (row, &t) in tv.iter().enumerate() {
        if t == -100 {
            assert!(g[row * v..(row + 1) * v].iter().all(|&x| x == 0.0), "ignored row {row} must have a zero gradient");
        }
    }
    check_grad(
        &format!("cross_entropy dlogits (z-loss {z})"),
        &xv,
        &g,
        |p| {
            cx.set(&logits, p);
            cx.be.cross_entropy(&logits, &losses, &targets, dloss, z).unwrap();
            cx.get(&losses).iter().map(|&l| l as f64).sum::<f64>() / valid as f64
        },
        &mut rng,
        H,
        TOL,
    );
}
