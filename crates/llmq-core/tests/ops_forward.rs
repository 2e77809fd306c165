//! Forward ops against naive f64 references, low-precision rounding rules, error handling and
//! determinism (independence from M, from the thread count, and across runs).

mod common;

use common::{assert_close, dot64, max_abs, rounded, Ctx, Rng};
use llmq_core::dtype::{bf16_to_f32, f32_to_bf16, round_through};
use llmq_core::{AttnShape, Backend, DType, Matmul, Stream, Tensor};

const F32: DType = DType::F32;
const BF16: DType = DType::BF16;

/// Naive op(A)·op(B) (+ bias) in f64 with the bound Σ|a b| + |bias| per element.
#[allow(clippy::too_many_arguments)]
fn matmul_ref(a: &[f32], ta: bool, b: &[f32], tb: bool, m: usize, n: usize, k: usize, bias: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut g) = (0f64, 0f64);
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] } as f64;
                let bv = if tb { b[j * k + p] } else { b[p * n + j] } as f64;
                s += av * bv;
                g += (av * bv).abs();
            }
            if let Some(bias) = bias {
                s += bias[j] as f64;
                g += (bias[j] as f64).abs();
            }
            out[i * n + j] = s;
            mag[i * n + j] = g;
        }
    }
    (out, mag)
}

fn mm<'a>(out: &'a Tensor, a: &'a Tensor, trans_a: bool, b: &'a Tensor, trans_b: bool) -> Matmul<'a> {
    Matmul { out, a, trans_a, b, trans_b, bias: None, accumulate: false, descale_a: None, descale_b: None, side_algo: false, fast_accumulation: false }
}

#[test]
fn matmul_f32_against_triple_loop() {
    // awkward sizes: M crosses the 64-row block, K crosses sgemm's k blocking (256)
    for &(m, n, k) in &[(67, 13, 29), (130, 5, 300), (1, 1, 1), (3, 70, 2)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut cx = Ctx::new();
                let mut rng = Rng::new((m * 1000 + n * 10 + k) as u64);
                let av = rng.vec(m * k, 1.0);
                let bv = rng.vec(k * n, 1.0);
                let biasv = rng.vec(n, 1.0);
                let oldv = rng.vec(m * n, 1.0);
                let a = cx.f32(&if ta { [k, m] } else { [m, k] }, &av);
                let b = cx.f32(&if tb { [n, k] } else { [k, n] }, &bv);
                let bias = cx.f32(&[n], &biasv);
                let out = cx.f32(&[m, n], &oldv);
                let (want, mag) = matmul_ref(&av, ta, &bv, tb, m, n, k, Some(&biasv));
                // f32 accumulation over k terms: error <= k * 2^-24 * Σ|ab| (generously 2x).
                let tol = |i: usize| 2.0 * (k + 2) as f64 * 6e-8 * (mag[i] + 1.0);
                // plain, with bias
                cx.be.matmul(&Matmul { bias: Some(&bias), ..mm(&out, &a, ta, &b, tb) }).unwrap();
                let got = cx.get(&out);
                for i in 0..m * n {
                    assert!((got[i] as f64 - want[i]).abs() <= tol(i), "m{m} n{n} k{k} ta{ta} tb{tb} [{i}]: {} vs {}", got[i], want[i]);
                }
                // accumulate onto the old value
                cx.set(&out, &oldv);
                cx.be.matmul(&Matmul { bias: Some(&bias), accumulate: true, ..mm(&out, &a, ta, &b, tb) }).unwrap();
                let got = cx.get(&out);
                for i in 0..m * n {
                    let w = want[i] + oldv[i] as f64;
                    assert!((got[i] as f64 - w).abs() <= tol(i) + 1e-6 * w.abs(), "accumulate [{i}]: {} vs {w}", got[i]);
                }
            }
        }
    }
}

#[test]
fn matmul_bf16_inputs_and_output() {
    let (m, n, k) = (37, 11, 45);
    let mut cx = Ctx::new();
    let mut rng = Rng::new(3);
    let av = rounded(BF16, &rng.vec(m * k, 2.0));
    let bv = rounded(BF16, &rng.vec(n * k, 2.0));
    let biasv = rounded(BF16, &rng.vec(n, 1.0));
    let a = cx.t(BF16, &[m, k], &av);
    let w = cx.t(BF16, &[n, k], &bv);
    let bias = cx.t(BF16, &[n], &biasv);
    let out = cx.zeros(BF16, &[m, n]);
    let out32 = cx.zeros(F32, &[m, n]);
    cx.be.matmul(&Matmul::linear(&out, &a, &w).with_bias(Some(&bias))).unwrap();
    cx.be.matmul(&Matmul::linear(&out32, &a, &w).with_bias(Some(&bias))).unwrap();
    let (want, mag) = matmul_ref(&av, false, &bv, true, m, n, k, Some(&biasv));
    let (got, got32) = (cx.get(&out), cx.get(&out32));
    for i in 0..m * n {
        // the bf16 output is exactly the RNE rounding of the f32 result (one rounding)...
        assert_eq!(got[i], bf16_to_f32(f32_to_bf16(got32[i])), "[{i}] bf16 output is not RNE(f32 result)");
        // ...and within half a bf16 ulp (2^(e-8) for |want| in [2^e, 2^(e+1))) of the exact
        // product, plus the f32 accumulation error.
        let half_ulp = 2f64.powi(want[i].abs().log2().floor() as i32 - 8);
        let err = (got[i] as f64 - want[i]).abs();
        assert!(err <= half_ulp + (k as f64) * 1.2e-7 * mag[i], "[{i}] {} vs {}", got[i], want[i]);
    }
    // accumulate into bf16: one rounding of (old + product)
    let oldv = rounded(BF16, &rng.vec(m * n, 4.0));
    cx.set(&out, &oldv);
    cx.be.matmul(&Matmul::linear(&out, &a, &w).accumulate(true)).unwrap();
    cx.be.matmul(&Matmul::linear(&out32, &a, &w)).unwrap();
    let (got, prod) = (cx.get(&out), cx.get(&out32));
    for i in 0..m * n {
        assert_eq!(got[i], round_through(BF16, oldv[i] + prod[i]), "[{i}] accumulate must round old + product once");
    }
}

#[test]
fn matmul_fp8_with_descale() {
    let (m, n, k) = (19, 7, 33);
    let mut cx = Ctx::new();
    let mut rng = Rng::new(4);
    let xv = rng.vec(m * k, 3.0);
    let wv = rng.vec(n * k, 0.1);
    let x = cx.f32(&[m, k], &xv);
    let w = cx.f32(&[n, k], &wv);
    let (xq, wq) = (cx.zeros(DType::E4M3, &[m, k]), cx.zeros(DType::E5M2, &[n, k]));
    let (xd, wd, xa, wa) = (cx.zeros(F32, &[1]), cx.zeros(F32, &[1]), cx.zeros(F32, &[1]), cx.zeros(F32, &[1]));
    cx.be.absmax(&xa, &x).unwrap();
    cx.be.absmax(&wa, &w).unwrap();
    cx.be.quantize(&xq, &xd, &x, &xa, false).unwrap();
    cx.be.quantize(&wq, &wd, &w, &wa, false).unwrap();
    let biasv = rng.vec(n, 1.0);
    let bias = cx.f32(&[n], &biasv);
    let out = cx.zeros(F32, &[m, n]);
    let args = Matmul { descale_a: Some(&xd), descale_b: Some(&wd), ..Matmul::linear(&out, &xq, &wq).with_bias(Some(&bias)) };
    cx.be.matmul(&args).unwrap();
    let (da, db) = (cx.get(&xd)[0], cx.get(&wd)[0]);
    let (xdec, wdec) = (cx.get(&xq), cx.get(&wq));
    let got = cx.get(&out);
    let (prod, mag) = matmul_ref(&xdec, false, &wdec, true, m, n, k, None);
    for i in 0..m * n {
        let want = prod[i] * (da * db) as f64 + biasv[i % n] as f64;
        let tol = (k as f64 + 3.0) * 1.2e-7 * (mag[i] * (da * db) as f64 + 1.0);
        assert!((got[i] as f64 - want).abs() <= tol, "[{i}] {} vs {want}", got[i]);
        // and the fp8 product approximates the real one (sanity of quantisation)
        let real: f64 = (0..k).map(|p| xv[(i / n) * k + p] as f64 * wv[(i % n) * k + p] as f64).sum::<f64>() + biasv[i % n] as f64;
        assert!((got[i] as f64 - real).abs() < 0.3, "[{i}] fp8 product {} far from real {real}", got[i]);
    }
}

/// The CPU backend runs every stream in call order, so the side stream gives the same bytes; no
/// op runs on the copy stream.
#[test]
fn side_stream_ops_give_the_same_bytes() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(5);
    let (a, b) = (cx.f32(&[9, 13], &rng.vec(9 * 13, 1.0)), cx.f32(&[11, 13], &rng.vec(11 * 13, 1.0)));
    let outs = [cx.zeros(F32, &[9, 11]), cx.zeros(F32, &[9, 11])];
    for (o, s) in outs.iter().zip([Stream::Compute, Stream::Side]) {
        cx.be.set_stream(s).unwrap();
        cx.be.matmul(&Matmul::linear(o, &a, &b)).unwrap();
    }
    cx.be.set_stream(Stream::Compute).unwrap();
    assert_eq!(cx.be.download(&outs[0]).unwrap(), cx.be.download(&outs[1]).unwrap());
    assert!(cx.get(&outs[0]).iter().any(|&x| x != 0.0));
    let e = cx.be.set_stream(Stream::Copy).unwrap_err().to_string();
    assert!(e.contains("not a copy stream"), "{e}");
}

#[test]
fn matmul_rows_independent_of_m_and_threads() {
    let (m, n, k) = (200, 19, 301);
    let mut cx = Ctx::new();
    let mut rng = Rng::new(5);
    let av = rng.vec(m * k, 1.0);
    let bv = rng.vec(n * k, 1.0);
    for ta in [false, true] {
        // A stored [M, K] or [K, M]
        let a_full: Vec<f32> = if ta { (0..k * m).map(|i| av[(i % m) * k + i / m]).collect() } else { av.clone() };
        let a = cx.f32(&if ta { [k, m] } else { [m, k] }, &a_full);
        let b = cx.f32(&[n, k], &bv);
        let out = cx.zeros(F32, &[m, n]);
        cx.be.matmul(&mm(&out, &a, ta, &b, true)).unwrap();
        let full = cx.raw(&out);
        for &(r0, rows) in &[(0, 3), (70, 5), (63, 2), (190, 10), (0, 64), (1, 64)] {
            let sub: Vec<f32> = if ta {
                (0..k * rows).map(|i| av[(r0 + i % rows) * k + i / rows]).collect()
            } else {
                av[r0 * k..(r0 + rows) * k].to_vec()
            };
            let sa = cx.f32(&if ta { [k, rows] } else { [rows, k] }, &sub);
            let so = cx.zeros(F32, &[rows, n]);
            cx.be.matmul(&mm(&so, &sa, ta, &b, true)).unwrap();
            assert_eq!(cx.raw(&so), full[r0 * n * 4..(r0 + rows) * n * 4], "ta={ta}: rows {r0}..{} differ from the full matmul", r0 + rows);
        }
        // same bits on a second run and with 1 or 3 threads
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            cx.be.zero(&out, Stream::Compute).unwrap();
            pool.install(|| cx.be.matmul(&mm(&out, &a, ta, &b, true)).unwrap());
            assert_eq!(cx.raw(&out), full, "ta={ta}: {threads} threads");
        }
    }
}

/// Runs `f` on pools of 1, 2 and 3 threads and checks that the downloaded outputs agree bitwise.
fn same_across_threads(what: &str, cx: &Ctx, outs: &[Tensor], f: impl Fn() + Sync) {
    let mut first: Option<Vec<Vec<u8>>> = None;
    for threads in [1, 2, 3, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(&f);
        let got: Vec<Vec<u8>> = outs.iter().map(|t| cx.raw(t)).collect();
        match &first {
            None => first = Some(got),
            Some(f0) => assert!(f0 == &got, "{what}: result differs with {threads} threads"),
        }
    }
}

#[test]
fn reductions_are_deterministic() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(6);
    // rmsnorm_bwd: dw reduction over many rows (bf16 dx to exercise rounding)
    let (n, c) = (300, 70);
    let x = cx.f32(&[n, c], &rng.vec(n * c, 2.0));
    let w = cx.f32(&[c], &rng.vec(c, 1.0));
    let out = cx.zeros(BF16, &[n, c]);
    let rstd = cx.zeros(F32, &[n]);
    cx.be.rmsnorm_fwd(&out, &rstd, &x, &w, 1e-5, None).unwrap();
    let dout = cx.t(BF16, &[n, c], &rng.vec(n * c, 1.0));
    let dx = cx.zeros(BF16, &[n, c]);
    let dw = cx.zeros(F32, &[c]);
    let am = cx.zeros(F32, &[1]);
    same_across_threads("rmsnorm_bwd", &cx, &[dx, dw, am], || {
        cx.be.zero(&dw, Stream::Compute).unwrap();
        cx.be.rmsnorm_bwd(&dx, &dw, &dout, &x, &w, &rstd, None, Some(&am)).unwrap();
    });
    // embedding_bwd with many repeats
    let (v, n2) = (17, 500);
    let idv: Vec<i32> = (0..n2).map(|_| rng.below(v) as i32).collect();
    let ids = cx.ids(&idv);
    let g = cx.f32(&[n2, c], &rng.vec(n2 * c, 1.0));
    let dt = cx.zeros(F32, &[v, c]);
    same_across_threads("embedding_bwd", &cx, &[dt], || {
        cx.be.zero(&dt, Stream::Compute).unwrap();
        cx.be.embedding_bwd(&dt, &ids, &g).unwrap();
    });
    // attention backward (dK/dV sums over the group's heads)
    let s = AttnShape { b: 2, t: 33, hq: 4, hkv: 2, hd: 16 };
    let qkv = cx.f32(&[s.n(), s.qkv_width()], &rng.vec(s.n() * s.qkv_width(), 1.0));
    let o = cx.zeros(F32, &[s.n(), s.out_width()]);
    let lse = cx.zeros(F32, &[s.b, s.hq, s.t]);
    cx.be.attention_fwd(&o, &lse, &qkv, s, None).unwrap();
    let d_o = cx.f32(&[s.n(), s.out_width()], &rng.vec(s.n() * s.out_width(), 1.0));
    let dqkv = cx.zeros(F32, &[s.n(), s.qkv_width()]);
    same_across_threads("attention", &cx, &[o, lse, dqkv], || {
        cx.be.attention_fwd(&o, &lse, &qkv, s, None).unwrap();
        cx.be.attention_bwd(&dqkv, &d_o, &qkv, &o, &lse, s, None, None).unwrap();
    });
    // colsum and sum_squares
    let big = cx.f32(&[1000, 40], &rng.vec(40_000, 1.0));
    let cs = cx.zeros(F32, &[40]);
    let ss = cx.zeros(F32, &[3]);
    same_across_threads("colsum/sum_squares", &cx, &[cs, ss], || {
        cx.be.colsum(&cs, &big, false).unwrap();
        cx.be.sum_squares(&ss, 1, &big).unwrap();
    });
}

#[test]
fn embedding_forward_and_backward() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(8);
    let (v, c) = (9, 7);
    let tv = rounded(BF16, &rng.vec(v * c, 1.0));
    let table = cx.t(BF16, &[v, c], &tv);
    let idv = [8, 0, 4, 4, 8, 1, 4];
    let n = idv.len();
    let ids = cx.ids(&idv);
    let out = cx.zeros(BF16, &[n, c]);
    let out32 = cx.zeros(F32, &[n, c]);
    cx.be.embedding_fwd(&out, &ids, &table).unwrap();
    cx.be.embedding_fwd(&out32, &ids, &table).unwrap();
    let (got, got32) = (cx.get(&out), cx.get(&out32));
    for (r, &id) in idv.iter().enumerate() {
        assert_eq!(got[r * c..(r + 1) * c], tv[id as usize * c..(id as usize + 1) * c]);
        assert_eq!(got32[r * c..(r + 1) * c], tv[id as usize * c..(id as usize + 1) * c]);
    }
    // backward into a bf16 table with old values: per row, old + dout rows in increasing n (f32),
    // rounded once; untouched rows keep their bits
    let gv = rng.vec(n * c, 1.0);
    let g = cx.f32(&[n, c], &gv);
    let oldv = rounded(BF16, &rng.vec(v * c, 1.0));
    let dt = cx.t(BF16, &[v, c], &oldv);
    cx.be.embedding_bwd(&dt, &ids, &g).unwrap();
    let got = cx.get(&dt);
    for row in 0..v {
        for j in 0..c {
            let mut acc = oldv[row * c + j];
            for (p, &id) in idv.iter().enumerate() {
                if id as usize == row {
                    acc += gv[p * c + j];
                }
            }
            assert_eq!(got[row * c + j], round_through(BF16, acc), "dtable[{row}, {j}]");
        }
    }
    // bad ids are errors, not panics
    let bad = cx.ids(&[0, 9, 1, 2, 3, 4, 5]);
    let e = cx.be.embedding_fwd(&out, &bad, &table).unwrap_err().to_string();
    assert!(e.contains("ids[1] = 9"), "{e}");
    let neg = cx.ids(&[0, 1, 2, -1, 3, 4, 5]);
    assert!(cx.be.embedding_bwd(&dt, &neg, &g).is_err());
}

fn rmsnorm_ref(x: &[f32], w: &[f32], n: usize, c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0f64; n * c];
    let mut rs = vec![0f64; n];
    for r in 0..n {
        let row = &x[r * c..(r + 1) * c];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        rs[r] = 1.0 / (ms + eps).sqrt();
        for j in 0..c {
            out[r * c + j] = row[j] as f64 * rs[r] * w[j] as f64;
        }
    }
    (out, rs)
}

#[test]
fn rmsnorm_forward() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(9);
    let (n, c) = (13, 101);
    let xv = rng.vec(n * c, 3.0);
    let wv = rng.vec(c, 2.0);
    let x = cx.f32(&[n, c], &xv);
    let w = cx.f32(&[c], &wv);
    let out = cx.zeros(F32, &[n, c]);
    let rstd = cx.zeros(F32, &[n]);
    let am = cx.zeros(F32, &[1]);
    cx.be.rmsnorm_fwd(&out, &rstd, &x, &w, 1e-5, Some(&am)).unwrap();
    let (want, wr) = rmsnorm_ref(&xv, &wv, n, c, 1e-5);
    let got = cx.get(&out);
    assert_close("rmsnorm out", &got, &want, 1e-6, 1e-6);
    assert_close("rmsnorm rstd", &cx.get(&rstd), &wr, 1e-6, 0.0);
    assert_eq!(cx.get(&am)[0], max_abs(&got));
}

#[test]
fn residual_rmsnorm_matches_rmsnorm_of_rounded_residual_bitwise() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(10);
    let (n, c) = (9, 77);
    let xv = rng.vec(n * c, 4.0);
    let dv = rng.vec(n * c, 1.0);
    let x = cx.t(BF16, &[n, c], &xv);
    let delta = cx.t(BF16, &[n, c], &dv);
    let w = cx.t(BF16, &[c], &rng.vec(c, 1.5));
    let res = cx.zeros(BF16, &[n, c]);
    let (out, out2) = (cx.zeros(BF16, &[n, c]), cx.zeros(BF16, &[n, c]));
    let (rstd, rstd2) = (cx.zeros(F32, &[n]), cx.zeros(F32, &[n]));
    let (am, am2) = (cx.zeros(F32, &[1]), cx.zeros(F32, &[1]));
    cx.be.residual_rmsnorm_fwd(&res, &out, &rstd, &x, &delta, &w, 1e-6, Some(&am)).unwrap();
    // the residual is RNE(x + delta) of the bf16 inputs
    let (xb, db) = (cx.get(&x), cx.get(&delta));
    let want: Vec<f32> = xb.iter().zip(&db).map(|(&a, &b)| round_through(BF16, a + b)).collect();
    assert_eq!(cx.get(&res), want);
    cx.be.rmsnorm_fwd(&out2, &rstd2, &res, &w, 1e-6, Some(&am2)).unwrap();
    assert_eq!(cx.raw(&out), cx.raw(&out2), "out must equal rmsnorm_fwd(res_out) bit for bit");
    assert_eq!(cx.raw(&rstd), cx.raw(&rstd2));
    assert_eq!(cx.raw(&am), cx.raw(&am2));
}

#[test]
fn rmsnorm_bwd_in_place_residual_and_dw_accumulation() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(11);
    let (n, c) = (6, 19);
    let x = cx.f32(&[n, c], &rng.vec(n * c, 1.0));
    let w = cx.f32(&[c], &rng.vec(c, 1.0));
    let out = cx.zeros(F32, &[n, c]);
    let rstd = cx.zeros(F32, &[n]);
    cx.be.rmsnorm_fwd(&out, &rstd, &x, &w, 1e-5, None).unwrap();
    let dout = cx.f32(&[n, c], &rng.vec(n * c, 1.0));
    let resv = rng.vec(n * c, 1.0);
    let dres = cx.f32(&[n, c], &resv);
    let dx = cx.zeros(F32, &[n, c]);
    let dw = cx.zeros(F32, &[c]);
    cx.be.rmsnorm_bwd(&dx, &dw, &dout, &x, &w, &rstd, Some(&dres), None).unwrap();
    let dw1 = cx.get(&dw);
    // in place: dx == dres
    let inplace = cx.f32(&[n, c], &resv);
    cx.be.rmsnorm_bwd(&inplace, &dw, &dout, &x, &w, &rstd, Some(&inplace), None).unwrap();
    assert_eq!(cx.raw(&inplace), cx.raw(&dx));
    // dx without dres + dres == dx with dres (one f32 addition)
    let plain = cx.zeros(F32, &[n, c]);
    cx.be.rmsnorm_bwd(&plain, &dw, &dout, &x, &w, &rstd, None, None).unwrap();
    let sum: Vec<f32> = cx.get(&plain).iter().zip(&resv).map(|(a, b)| a + b).collect();
    assert_eq!(cx.get(&dx), sum);
    // dw accumulated three times
    let want: Vec<f64> = dw1.iter().map(|&v| 3.0 * v as f64).collect();
    assert_close("dw accumulation", &cx.get(&dw), &want, 1e-6, 1e-7);
}

#[test]
fn qk_norm_forward_and_v_copy() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(12);
    let s = AttnShape { b: 2, t: 5, hq: 4, hkv: 2, hd: 12 };
    let (n, q, hd) = (s.n(), s.qkv_width(), s.hd);
    let xv = rng.vec(n * q, 2.0);
    let (qwv, kwv) = (rng.vec(hd, 1.0), rng.vec(hd, 1.0));
    let x = cx.f32(&[n, q], &xv);
    let (qw, kw) = (cx.f32(&[hd], &qwv), cx.f32(&[hd], &kwv));
    let out = cx.zeros(F32, &[n, q]);
    let rstd = cx.zeros(F32, &[n, 6]);
    cx.be.qk_norm_fwd(&out, &rstd, &x, &qw, &kw, s, 1e-6).unwrap();
    let got = cx.get(&out);
    let gr = cx.get(&rstd);
    for r in 0..n {
        for h in 0..8 {
            let seg = &xv[r * q + h * hd..r * q + (h + 1) * hd];
            let g = &got[r * q + h * hd..r * q + (h + 1) * hd];
            if h >= 6 {
                assert_eq!(g, seg, "v head copied");
                continue;
            }
            let w = if h < 4 { &qwv } else { &kwv };
            let (want, wr) = rmsnorm_ref(seg, w, 1, hd, 1e-6);
            assert_close("qk_norm", g, &want, 1e-6, 1e-6);
            assert_close("qk_norm rstd", &gr[r * 6 + h..r * 6 + h + 1], &wr, 1e-6, 0.0);
        }
    }
}

#[test]
fn rope_forward_reference_and_inverse() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(13);
    let s = AttnShape { b: 2, t: 5, hq: 2, hkv: 1, hd: 10 };
    let (n, q, hd) = (s.n(), s.qkv_width(), s.hd);
    let xv = rng.vec(n * q, 1.0);
    let fv: Vec<f32> = (0..s.t * hd / 2).flat_map(|i| {
        let a = 0.37 * i as f64 + 0.1;
        [a.cos() as f32, a.sin() as f32]
    }).collect();
    let x = cx.f32(&[n, q], &xv);
    let freqs = cx.f32(&[s.t, hd / 2, 2], &fv);
    let out = cx.zeros(F32, &[n, q]);
    cx.be.rope_fwd(&out, &x, &freqs, s, None).unwrap();
    let got = cx.get(&out);
    let mut want = vec![0f64; n * q];
    let half = hd / 2;
    for r in 0..n {
        let pos = r % s.t;
        for h in 0..s.hq + 2 * s.hkv {
            let b = r * q + h * hd;
            for i in 0..half {
                let (c, si) = (fv[(pos * half + i) * 2] as f64, fv[(pos * half + i) * 2 + 1] as f64);
                let (x0, x1) = (xv[b + i] as f64, xv[b + i + half] as f64);
                if h < s.hq + s.hkv {
                    want[b + i] = x0 * c - x1 * si;
                    want[b + i + half] = x1 * c + x0 * si;
                } else {
                    want[b + i] = x0;
                    want[b + i + half] = x1;
                }
            }
        }
    }
    assert_close("rope", &got, &want, 1e-6, 1e-6);
    // backward of forward gives the input back (rotation by -angle), v heads bit-exact
    let back = cx.zeros(F32, &[n, q]);
    let am = cx.zeros(F32, &[1]);
    cx.be.rope_bwd(&back, &out, &freqs, s, Some(&am)).unwrap();
    let bv = cx.get(&back);
    let xw: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
    assert_close("rope inverse", &bv, &xw, 1e-6, 1e-6);
    assert_eq!(cx.get(&am)[0], max_abs(&bv));
    assert!(cx.be.rope_fwd(&out, &x, &freqs, AttnShape { hd: 9, ..s }, None).is_err(), "odd head size must be rejected");
    // a fused bias is RoPE of (x + bias), v heads included: bitwise in f32
    let bv: Vec<f32> = rng.vec(q, 1.0);
    let xb: Vec<f32> = xv.iter().enumerate().map(|(i, &v)| v + bv[i % q]).collect();
    let (bias, xbt, with) = (cx.f32(&[q], &bv), cx.f32(&[n, q], &xb), cx.zeros(F32, &[n, q]));
    cx.be.rope_fwd(&with, &x, &freqs, s, Some(&bias)).unwrap();
    cx.be.rope_fwd(&out, &xbt, &freqs, s, None).unwrap();
    assert_eq!(cx.get(&with), cx.get(&out), "rope with a bias = rope of x + bias");
    let short = cx.zeros(F32, &[q - 1]);
    assert!(cx.be.rope_fwd(&out, &x, &freqs, s, Some(&short)).is_err(), "bias of the wrong length");
}

/// attention_bwd with RoPE fused = attention_bwd then rope_bwd (bitwise in f32, where nothing is
/// rounded in between), with the abs-max of the result; in bf16 the fused op rounds once.
#[test]
fn attention_backward_with_fused_rope() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(17);
    let s = AttnShape { b: 2, t: 9, hq: 4, hkv: 2, hd: 8 };
    let (n, q) = (s.n(), s.qkv_width());
    let fv: Vec<f32> = (0..s.t * s.hd / 2).flat_map(|i| {
        let a = 0.21 * i as f64 + 0.3;
        [a.cos() as f32, a.sin() as f32]
    }).collect();
    let freqs = cx.f32(&[s.t, s.hd / 2, 2], &fv);
    let qkv = cx.f32(&[n, q], &rng.vec(n * q, 1.0));
    let o = cx.zeros(F32, &[n, s.out_width()]);
    let lse = cx.zeros(F32, &[s.b, s.hq, s.t]);
    cx.be.attention_fwd(&o, &lse, &qkv, s, None).unwrap();
    let d_o = cx.f32(&[n, s.out_width()], &rng.vec(n * s.out_width(), 1.0));
    let (plain, roped, fused, am) = (cx.zeros(F32, &[n, q]), cx.zeros(F32, &[n, q]), cx.zeros(F32, &[n, q]), cx.zeros(F32, &[1]));
    cx.be.attention_bwd(&plain, &d_o, &qkv, &o, &lse, s, None, None).unwrap();
    cx.be.rope_bwd(&roped, &plain, &freqs, s, None).unwrap();
    cx.be.attention_bwd(&fused, &d_o, &qkv, &o, &lse, s, Some(&freqs), Some(&am)).unwrap();
    let fv = cx.get(&fused);
    assert_eq!(fv, cx.get(&roped));
    assert_ne!(fv, cx.get(&plain), "the rotation must change dQ/dK");
    assert_eq!(cx.get(&am)[0], max_abs(&fv));
    // bf16 output: the f32 result rounded once
    let fb = cx.zeros(DType::BF16, &[n, q]);
    cx.be.attention_bwd(&fb, &d_o, &qkv, &o, &lse, s, Some(&freqs), Some(&am)).unwrap();
    let want: Vec<f32> = fv.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect();
    assert_eq!(cx.get(&fb), want);
    assert_eq!(cx.get(&am)[0], max_abs(&want));
    let short = cx.zeros(F32, &[3]);
    assert!(cx.be.attention_bwd(&fb, &d_o, &qkv, &o, &lse, s, Some(&short), None).is_err(), "short RoPE table");
}

/// Naive causal GQA attention in f64: (out [N, Hq Hd], lse [B, Hq, T]).
fn attention_ref(x: &[f32], s: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let (q, hd, t) = (s.qkv_width(), s.hd, s.t);
    let mut out = vec![0f64; s.n() * s.out_width()];
    let mut lse = vec![0f64; s.b * s.hq * t];
    let scale = 1.0 / (hd as f64).sqrt();
    for b in 0..s.b {
        for h in 0..s.hq {
            let g = h / (s.hq / s.hkv);
            for i in 0..t {
                let qr = &x[(b * t + i) * q + h * hd..][..hd];
                let sc: Vec<f64> = (0..=i).map(|j| dot64(qr, &x[(b * t + j) * q + (s.hq + g) * hd..][..hd]) * scale).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                lse[(b * s.hq + h) * t + i] = m + z.ln();
                for (j, v) in sc.iter().enumerate() {
                    let p = (v - m).exp() / z;
                    let vr = &x[(b * t + j) * q + (s.hq + s.hkv + g) * hd..][..hd];
                    for d in 0..hd {
                        out[(b * t + i) * s.out_width() + h * hd + d] += p * vr[d] as f64;
                    }
                }
            }
        }
    }
    (out, lse)
}

#[test]
fn attention_forward_against_naive() {
    for s in [
        AttnShape { b: 2, t: 7, hq: 4, hkv: 2, hd: 16 },
        AttnShape { b: 1, t: 13, hq: 3, hkv: 3, hd: 6 },
        AttnShape { b: 3, t: 1, hq: 2, hkv: 1, hd: 4 },
    ] {
        let mut cx = Ctx::new();
        let mut rng = Rng::new(14 + s.t as u64);
        let xv = rng.vec(s.n() * s.qkv_width(), 2.0);
        let x = cx.f32(&[s.n(), s.qkv_width()], &xv);
        let out = cx.zeros(F32, &[s.n(), s.out_width()]);
        let lse = cx.zeros(F32, &[s.b, s.hq, s.t]);
        cx.be.attention_fwd(&out, &lse, &x, s, None).unwrap();
        let (wo, wl) = attention_ref(&xv, s);
        assert_close(&format!("attention out {s:?}"), &cx.get(&out), &wo, 1e-5, 1e-5);
        assert_close(&format!("attention lse {s:?}"), &cx.get(&lse), &wl, 1e-5, 1e-5);
        // bf16 output is the rounding of the f32 one
        let (ob, am) = (cx.zeros(BF16, &[s.n(), s.out_width()]), cx.zeros(F32, &[1]));
        cx.be.attention_fwd(&ob, &lse, &x, s, Some(&am)).unwrap();
        assert_eq!(cx.get(&ob), rounded(BF16, &cx.get(&out)));
        assert_eq!(cx.get(&am)[0], max_abs(&cx.get(&ob)), "the abs-max of the stored (bf16) output");
    }
    let mut cx = Ctx::new();
    let s = AttnShape { b: 1, t: 2, hq: 3, hkv: 2, hd: 4 };
    let x = cx.zeros(F32, &[2, 28]);
    let (o, l) = (cx.zeros(F32, &[2, 12]), cx.zeros(F32, &[1, 3, 2]));
    assert!(cx.be.attention_fwd(&o, &l, &x, s, None).is_err(), "Hq not a multiple of Hkv");
}

#[test]
fn swiglu_forward_and_backward_reference() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(15);
    let (n, d) = (7, 33);
    let mut xv = rng.vec(n * 2 * d, 5.0);
    xv[d] = -200.0; // exp overflow region of the gate: must stay finite
    xv[d + 1] = 200.0;
    let x = cx.f32(&[n, 2 * d], &xv);
    let out = cx.zeros(F32, &[n, d]);
    let am = cx.zeros(F32, &[1]);
    cx.be.swiglu_fwd(&out, &x, Some(&am)).unwrap();
    let dov = rng.vec(n * d, 1.0);
    let dout = cx.f32(&[n, d], &dov);
    let dx = cx.zeros(F32, &[n, 2 * d]);
    cx.be.swiglu_bwd(&dx, &dout, &x, None).unwrap();
    let mut want = vec![0f64; n * d];
    let mut wantd = vec![0f64; n * 2 * d];
    for r in 0..n {
        for i in 0..d {
            let (u, g) = (xv[r * 2 * d + i] as f64, xv[r * 2 * d + d + i] as f64);
            let sg = 1.0 / (1.0 + (-g).exp());
            want[r * d + i] = u * g * sg;
            let dy = dov[r * d + i] as f64;
            wantd[r * 2 * d + i] = dy * g * sg;
            wantd[r * 2 * d + d + i] = dy * u * sg * (1.0 + g * (1.0 - sg));
        }
    }
    let got = cx.get(&out);
    assert_close("swiglu", &got, &want, 1e-6, 1e-6);
    assert_close("swiglu_bwd", &cx.get(&dx), &wantd, 1e-5, 1e-6);
    assert_eq!(cx.get(&am)[0], max_abs(&got));
    let wrong = cx.zeros(F32, &[n, d + 1]);
    assert!(cx.be.swiglu_fwd(&wrong, &x, None).is_err());
}

#[test]
fn cross_entropy_reference_and_errors() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(16);
    let (r, v) = (5, 300);
    let mut xv = rng.vec(r * v, 10.0);
    xv[5] = 1000.0; // a huge logit must not overflow
    let tv = [5, 299, -100, 0, 17];
    for dt in [F32, BF16] {
        let logits = cx.t(dt, &[r, v], &xv);
        let xr = cx.get(&logits);
        let losses = cx.zeros(F32, &[r]);
        let targets = cx.ids(&tv);
        cx.be.cross_entropy(&logits, &losses, &targets, 0.25, 0.0).unwrap();
        let (gl, gg) = (cx.get(&losses), cx.get(&logits));
        for row in 0..r {
            let x = &xr[row * v..(row + 1) * v];
            if tv[row] == -100 {
                assert_eq!(gl[row], 0.0);
                assert!(gg[row * v..(row + 1) * v].iter().all(|&g| g == 0.0));
                continue;
            }
            let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let z: f64 = x.iter().map(|&xi| (xi as f64 - m).exp()).sum();
            let lse = m + z.ln();
            let t = tv[row] as usize;
            assert_close(&format!("{dt} loss row {row}"), &gl[row..row + 1], &[lse - x[t] as f64], 1e-6, 1e-5);
            let want: Vec<f64> = (0..v).map(|i| 0.25 * ((x[i] as f64 - lse).exp() - if i == t { 1.0 } else { 0.0 })).collect();
            let (rt, at) = if dt == BF16 { (2f64.powi(-8), 1e-9) } else { (1e-5, 1e-9) };
            assert_close(&format!("{dt} grad row {row}"), &gg[row * v..(row + 1) * v], &want, rt, at);
        }
    }
    // out-of-range target: error naming row and value, logits untouched
    let logits = cx.f32(&[r, v], &xv);
    let losses = cx.zeros(F32, &[r]);
    let before = cx.raw(&logits);
    let (bad1, bad2) = (cx.ids(&[1, 2, 3, 300, 4]), cx.ids(&[1, -5, 3, 3, 4]));
    let e = cx.be.cross_entropy(&logits, &losses, &bad1, 1.0, 0.0).unwrap_err().to_string();
    assert!(e.contains("row 3") && e.contains("300"), "{e}");
    let e = cx.be.cross_entropy(&logits, &losses, &bad2, 1.0, 0.0).unwrap_err().to_string();
    assert!(e.contains("row 1") && e.contains("-5"), "{e}");
    assert_eq!(cx.raw(&logits), before);
}

#[test]
fn colsum_and_sum_squares() {
    let mut cx = Ctx::new();
    let mut rng = Rng::new(17);
    let (r, c) = (123, 45);
    let xv = rng.vec(r * c, 1.0);
    let x = cx.f32(&[r, c], &xv);
    let want: Vec<f64> = (0..c).map(|j| (0..r).map(|i| xv[i * c + j] as f64).sum()).collect();
    let oldv = rng.vec(c, 1.0);
    let out = cx.t(BF16, &[c], &oldv);
    cx.be.colsum(&out, &x, false).unwrap();
    assert_eq!(cx.get(&out), want.iter().map(|&w| round_through(BF16, w as f32)).collect::<Vec<_>>());
    let out = cx.f32(&[c], &oldv);
    cx.be.colsum(&out, &x, true).unwrap();
    let wacc: Vec<f64> = want.iter().zip(&oldv).map(|(w, &o)| w + o as f64).collect();
    assert_close("colsum accumulate", &cx.get(&out), &wacc, 1e-7, 1e-7);

    let ss = cx.f32(&[4], &[7.0, 7.0, 7.0, 7.0]);
    let xb = cx.t(BF16, &[r, c], &xv);
    cx.be.sum_squares(&ss, 2, &xb).unwrap();
    let want: f64 = cx.get(&xb).iter().map(|&v| (v as f64).powi(2)).sum();
    let got = cx.get(&ss);
    assert_eq!(got[2], want as f32);
    assert_eq!([got[0], got[1], got[3]], [7.0, 7.0, 7.0], "other slots untouched");
    assert!(cx.be.sum_squares(&ss, 4, &xb).is_err());
}

#[test]
fn bad_shapes_are_errors() {
    let mut cx = Ctx::new();
    let a = cx.zeros(F32, &[4, 5]);
    let b = cx.zeros(F32, &[6, 5]);
    let out = cx.zeros(F32, &[4, 7]);
    let e = cx.be.matmul(&Matmul::linear(&out, &a, &b)).unwrap_err().to_string();
    assert!(e.contains("matmul"), "{e}");
    let bias = cx.zeros(F32, &[5]);
    let out6 = cx.zeros(F32, &[4, 6]);
    assert!(cx.be.matmul(&Matmul::linear(&out6, &a, &b).with_bias(Some(&bias))).is_err());
    let ids = cx.ids(&[0; 20]);
    let e = cx.be.matmul(&Matmul::linear(&out6, &ids.reshape(&[4, 5]), &b)).unwrap_err().to_string();
    assert!(e.contains("float"), "{e}");
    let rstd = cx.zeros(F32, &[4]);
    let w = cx.zeros(F32, &[6]);
    assert!(cx.be.rmsnorm_fwd(&a, &rstd, &a, &w, 1e-5, None).is_err(), "C mismatch");
    let rstd_bf = cx.zeros(BF16, &[4]);
    let w5 = cx.zeros(F32, &[5]);
    assert!(cx.be.rmsnorm_fwd(&a, &rstd_bf, &a, &w5, 1e-5, None).is_err(), "rstd must be f32");
    let am2 = cx.zeros(F32, &[2]);
    assert!(cx.be.rmsnorm_fwd(&a, &rstd, &a, &w5, 1e-5, Some(&am2)).is_err(), "absmax must be f32[1]");
    let q = cx.zeros(BF16, &[4, 5]);
    let d = cx.zeros(F32, &[1]);
    assert!(cx.be.quantize(&q, &d, &a, &d, false).is_err(), "quantize to bf16");
    let t = cx.zeros(F32, &[4, 5]);
    assert!(cx.be.transpose(&t, &a).is_err(), "transpose shape");
}
