//! Before/after timings of the memory-bound kernels at Qwen2.5-0.5B sizes (N = 16384 tokens,
//! C = 896, D = 4864, V = 151936): every op once with the generic kernels
//! (`set_generic_kernels(true)`: one element per thread, runtime dtype switch) and once with the
//! dtype-specialised vector kernels, as effective bandwidth (bytes each op must read and write,
//! once, divided by the time). Also the cross-entropy launch-shape sweep. Asserts nothing but
//! that the ops run. Skips without a CUDA device.

mod common;

use common::{median_time, ok, rand_tensor};
use llmq_core::{AdamW, AttnShape, Backend, DType, Mem, MemCategory, Segment, Tensor};
use llmq_cuda::CudaBackend;

fn out(g: &mut CudaBackend, dt: DType, dims: &[usize]) -> Tensor {
    g.alloc(MemCategory::Other, Mem::Device, dt, dims).unwrap()
}

/// Times `f` with the generic and with the fast kernels and prints one table row.
fn ab<F: FnMut()>(g: &CudaBackend, name: &str, shape: &str, bytes: usize, mut f: F) {
    g.set_generic_kernels(true);
    let tg = median_time(g, &mut f);
    g.set_generic_kernels(false);
    let tf = median_time(g, &mut f);
    let bw = |t: f64| bytes as f64 / t / 1e12;
    println!("| {name} | {shape} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1}x |", tg * 1e6, tf * 1e6, bw(tg), bw(tf), tg / tf);
}

const BF: DType = DType::BF16;
const F32: DType = DType::F32;
const N: usize = 16384;
const C: usize = 896;
const D: usize = 4864;
const V: usize = 151936;

/// Backend, generator and an abs-max slot; prints the table header.
fn setup(seed: u64) -> Option<(CudaBackend, common::Rng, Tensor)> {
    let mut g = common::gpu_or_skip()?;
    println!("device: {} ({} SMs)", g.device_name(), g.sm_count());
    println!("| op | shape | generic us | fast us | generic TB/s | fast TB/s | speed-up |");
    println!("|---|---|---|---|---|---|---|");
    let am = out(&mut g, DType::F32, &[1]);
    Some((g, common::Rng::new(seed), am))
}

#[test]
fn perf_rmsnorm() {
    let _ran = common::OpsRan;
    let Some((mut g, mut rng, am)) = setup(1) else {
        return;
    };
    let (bf, f32_, n, c) = (BF, F32, N, C);

    // rmsnorm
    let x = rand_tensor(&mut g, &mut rng, bf, &[n, c], 1.0);
    let x2 = rand_tensor(&mut g, &mut rng, bf, &[n, c], 1.0);
    let w = rand_tensor(&mut g, &mut rng, bf, &[c], 1.0);
    let y = out(&mut g, bf, &[n, c]);
    let res = out(&mut g, bf, &[n, c]);
    let rstd = out(&mut g, f32_, &[n]);
    let e = n * c * 2;
    ab(&g, "rmsnorm_fwd (+absmax)", &format!("{n}x{c} bf16"), 2 * e, || ok(g.rmsnorm_fwd(&y, &rstd, &x, &w, 1e-6, Some(&am))));
    ab(&g, "residual_rmsnorm_fwd (+absmax)", &format!("{n}x{c} bf16"), 4 * e, || ok(g.residual_rmsnorm_fwd(&res, &y, &rstd, &x, &x2, &w, 1e-6, Some(&am))));
    let dw = out(&mut g, f32_, &[c]);
    let dx = out(&mut g, bf, &[n, c]);
    ab(&g, "rmsnorm_bwd (+dw, absmax)", &format!("{n}x{c} bf16"), 3 * e, || ok(g.rmsnorm_bwd(&dx, &dw, &y, &x, &w, &rstd, None, Some(&am))));
    ab(&g, "rmsnorm_bwd + dres in place", &format!("{n}x{c} bf16"), 4 * e, || ok(g.rmsnorm_bwd(&dx, &dw, &y, &x, &w, &rstd, Some(&dx), None)));
    for &cc in &[1536usize, 3584] {
        let xb = rand_tensor(&mut g, &mut rng, bf, &[n, cc], 1.0);
        let wb = rand_tensor(&mut g, &mut rng, bf, &[cc], 1.0);
        let yb = out(&mut g, bf, &[n, cc]);
        let dwb = out(&mut g, f32_, &[cc]);
        let eb = n * cc * 2;
        ab(&g, "rmsnorm_fwd", &format!("{n}x{cc} bf16"), 2 * eb, || ok(g.rmsnorm_fwd(&yb, &rstd, &xb, &wb, 1e-6, None)));
        ab(&g, "rmsnorm_bwd", &format!("{n}x{cc} bf16"), 3 * eb, || ok(g.rmsnorm_bwd(&yb, &dwb, &xb, &xb, &wb, &rstd, None, None)));
        // as in training: dres in place, abs-max for the fp8 matmuls
        ab(&g, "rmsnorm_bwd + dres in place (+absmax)", &format!("{n}x{cc} bf16"), 4 * eb, || ok(g.rmsnorm_bwd(&yb, &dwb, &xb, &xb, &wb, &rstd, Some(&yb), Some(&am))));
    }
    let xf = rand_tensor(&mut g, &mut rng, f32_, &[n, c], 1.0);
    let yf = out(&mut g, f32_, &[n, c]);
    ab(&g, "rmsnorm_fwd", &format!("{n}x{c} f32"), 2 * n * c * 4, || ok(g.rmsnorm_fwd(&yf, &rstd, &xf, &w, 1e-6, None)));
    ab(&g, "rmsnorm_bwd", &format!("{n}x{c} f32"), 3 * n * c * 4, || ok(g.rmsnorm_bwd(&yf, &dw, &xf, &xf, &w, &rstd, None, None)));
}

#[test]
fn perf_swiglu_rope() {
    let _ran = common::OpsRan;
    let Some((mut g, mut rng, am)) = setup(2) else {
        return;
    };
    let (bf, f32_, n, d) = (BF, F32, N, D);
    // swiglu
    let ug = rand_tensor(&mut g, &mut rng, bf, &[n, 2 * d], 1.0);
    let h = out(&mut g, bf, &[n, d]);
    let dug = out(&mut g, bf, &[n, 2 * d]);
    let ed = n * d * 2;
    ab(&g, "swiglu_fwd (+absmax)", &format!("{n}x{d} bf16"), 3 * ed, || ok(g.swiglu_fwd(&h, &ug, Some(&am))));
    ab(&g, "swiglu_bwd (+absmax)", &format!("{n}x{d} bf16"), 5 * ed, || ok(g.swiglu_bwd(&dug, &h, &ug, Some(&am))));

    // rope (B16 T1024 Hq14 Hkv2 Hd64)
    let s = AttnShape { b: 16, t: 1024, hq: 14, hkv: 2, hd: 64 };
    let q = s.qkv_width();
    let qkv = rand_tensor(&mut g, &mut rng, bf, &[n, q], 1.0);
    let qkv2 = out(&mut g, bf, &[n, q]);
    let freqs = rand_tensor(&mut g, &mut rng, f32_, &[s.t, s.hd / 2, 2], 1.0);
    ab(&g, "rope_fwd", &format!("{n}x{q} bf16"), 2 * n * q * 2, || ok(g.rope_fwd(&qkv2, &qkv, &freqs, s, None)));
    ab(&g, "rope_bwd (+absmax)", &format!("{n}x{q} bf16"), 2 * n * q * 2, || ok(g.rope_bwd(&qkv2, &qkv, &freqs, s, Some(&am))));
}

#[test]
fn perf_cross_entropy() {
    let _ran = common::OpsRan;
    let Some((mut g, mut rng, _am)) = setup(3) else {
        return;
    };
    let (bf, f32_, v) = (BF, F32, V);
    // cross-entropy: 2 reads + 1 write of every logit
    let rows = 2048;
    let logits = rand_tensor(&mut g, &mut rng, bf, &[rows, v], 2.0);
    let losses = out(&mut g, f32_, &[rows]);
    let tg: Vec<i32> = (0..rows as i32).map(|i| (i * 7919) % v as i32).collect();
    let tgt = out(&mut g, DType::I32, &[rows]);
    g.upload(&tgt, &tg.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    ab(&g, "cross_entropy (2R+1W)", &format!("{rows}x{v} bf16"), rows * v * 2 * 3, || ok(g.cross_entropy(&logits, &losses, &tgt, 1.0 / 2048.0)));
    for (threads, per_sm) in [(1024, 1), (1024, 2), (512, 0), (512, 2), (512, 4), (256, 0), (1024, 0)] {
        g.set_cross_entropy_launch(threads, per_sm);
        let t = median_time(&g, || ok(g.cross_entropy(&logits, &losses, &tgt, 1.0 / 2048.0)));
        println!(
            "| cross_entropy sweep: {threads} threads, {} | {rows}x{v} bf16 | | {:.1} | | {:.2} | |",
            if per_sm == 0 { "a block per row".to_string() } else { format!("{per_sm} rows/SM") },
            t * 1e6,
            (rows * v * 6) as f64 / t / 1e12
        );
    }
    let rows16 = 16384;
    let big = out(&mut g, bf, &[rows16, v]);
    let fresh = rand_tensor(&mut g, &mut rng, bf, &[rows, v], 2.0);
    for k in 0..rows16 / rows {
        g.copy(&big.rows(k * rows, rows), &fresh, llmq_core::Stream::Compute).unwrap();
    }
    let losses16 = out(&mut g, f32_, &[rows16]);
    let tg16: Vec<i32> = (0..rows16 as i32).map(|i| (i * 7919) % v as i32).collect();
    let tgt16 = out(&mut g, DType::I32, &[rows16]);
    g.upload(&tgt16, &tg16.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let t = median_time(&g, || ok(g.cross_entropy(&big, &losses16, &tgt16, 1.0 / 16384.0)));
    println!("| cross_entropy (fast, default launch) | {rows16}x{v} bf16 | | {:.1} | | {:.2} | |", t * 1e6, (rows16 * v * 6) as f64 / t / 1e12);
}

#[test]
fn perf_convert_absmax_quantize() {
    let _ran = common::OpsRan;
    let Some((mut g, mut rng, am)) = setup(4) else {
        return;
    };
    let (bf, f32_, n, c, d) = (BF, F32, N, C, D);
    let x = rand_tensor(&mut g, &mut rng, bf, &[n, c], 1.0);
    let h = out(&mut g, bf, &[n, d]);
    // conversions, abs-max, quantisation
    let a = rand_tensor(&mut g, &mut rng, bf, &[n, d], 1.0);
    let af = out(&mut g, f32_, &[n, d]);
    ab(&g, "convert bf16->f32", &format!("{n}x{d}"), n * d * 6, || ok(g.convert(&af, &a)));
    ab(&g, "convert f32->bf16", &format!("{n}x{d}"), n * d * 6, || ok(g.convert(&h, &af)));
    let a8 = out(&mut g, DType::E4M3, &[n, d]);
    ab(&g, "convert bf16->e4m3", &format!("{n}x{d}"), n * d * 3, || ok(g.convert(&a8, &a)));
    ab(&g, "absmax bf16", &format!("{n}x{d}"), n * d * 2, || ok(g.absmax(&am, &a)));
    ab(&g, "absmax f32", &format!("{n}x{d}"), n * d * 4, || ok(g.absmax(&am, &af)));
    let ds = out(&mut g, f32_, &[1]);
    g.absmax(&am, &a).unwrap();
    ab(&g, "quantize bf16->e4m3", &format!("{n}x{d}"), n * d * 3, || ok(g.quantize(&a8, &ds, &a, &am, false)));
    let a8t = out(&mut g, DType::E4M3, &[d, n]);
    ab(&g, "quantize bf16->e4m3 transposed", &format!("{n}x{d}"), n * d * 3, || ok(g.quantize(&a8t, &ds, &a, &am, true)));
    let x8 = out(&mut g, DType::E4M3, &[n, c]);
    ab(&g, "quantize bf16->e4m3", &format!("{n}x{c}"), n * c * 3, || ok(g.quantize(&x8, &ds, &x, &am, false)));
    let x8t = out(&mut g, DType::E4M3, &[c, n]);
    ab(&g, "quantize bf16->e4m3 transposed", &format!("{n}x{c}"), n * c * 3, || ok(g.quantize(&x8t, &ds, &x, &am, true)));
    // plain + transposed in one pass (the fp8 backward's activation gradients): 16384 rows take
    // the 128-row tiles, 16320 (= 255 x 64) the 64-row ones
    for rows in [16384, 16320] {
        for cols in [c, d] {
            let src = a.rows(0, rows);
            let src = if cols == c { x.rows(0, rows) } else { src };
            let (p8, p8t) = (out(&mut g, DType::E4M3, &[rows, cols]), out(&mut g, DType::E4M3, &[cols, rows]));
            ab(&g, &format!("quantize_pair bf16->e4m3, {} tiles", if rows % 128 == 0 { "128-row" } else { "64-row" }), &format!("{rows}x{cols}"), rows * cols * 4, || {
                ok(g.quantize_pair(&p8, &p8t, &ds, &src, &am))
            });
        }
    }
}

#[test]
fn perf_colsum_sum_squares() {
    let _ran = common::OpsRan;
    let Some((mut g, mut rng, _am)) = setup(5) else {
        return;
    };
    let (bf, f32_, n, d) = (BF, F32, N, D);
    let q = 1152;
    let qkv = rand_tensor(&mut g, &mut rng, bf, &[n, q], 1.0);
    let ug = rand_tensor(&mut g, &mut rng, bf, &[n, 2 * d], 1.0);
    // column sums (bias gradient of the qkv projection) and sum of squares
    let cs = out(&mut g, f32_, &[q]);
    ab(&g, "colsum (accumulate)", &format!("{n}x{q} bf16"), n * q * 2, || ok(g.colsum(&cs, &qkv, true)));
    let ss = out(&mut g, f32_, &[2]);
    ab(&g, "sum_squares", &format!("{n}x{} bf16", 2 * d), n * 2 * d * 2, || ok(g.sum_squares(&ss, 0, &ug)));
}

#[test]
fn perf_adamw() {
    let _ran = common::OpsRan;
    let Some((mut g, mut rng, _am)) = setup(6) else {
        return;
    };
    let (bf, f32_) = (BF, F32);
    // AdamW over 64M parameters in 8 segments
    let np = 64 << 20;
    let segs: Vec<Segment> = (0..8).map(|k| Segment { offset: k * (np / 8), len: np / 8, decay: k % 2 == 0 }).collect();
    let abs8 = out(&mut g, f32_, &[8]);
    for (label, mdt, pdt, sdt) in [("f32 master, bf16 params, f32 m/v", f32_, Some(bf), f32_), ("bf16 master (SR), bf16 m/v", bf, None, bf)] {
        let master = rand_tensor(&mut g, &mut rng, mdt, &[np], 0.5);
        let params = pdt.map(|dt| out(&mut g, dt, &[np]));
        let grads = rand_tensor(&mut g, &mut rng, bf, &[np], 0.1);
        let m = out(&mut g, sdt, &[np]);
        let vv = out(&mut g, sdt, &[np]);
        let pp = params.as_ref().unwrap_or(&master);
        let bytes = np * (2 * mdt.size() + 2 + 4 * sdt.size() + pdt.map_or(0, |d| d.size()));
        let mut step = 0u64;
        ab(&g, &format!("adamw ({label}, bf16 grads, absmax)"), "64M", bytes, || {
            step += 1;
            let args = AdamW {
                params: pp,
                master: &master,
                grads: &grads,
                m: &m,
                v: &vv,
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
                grad_scale: 1.0,
                seed: 42,
                absmax: Some(&abs8),
            };
            ok(g.adamw(&args, &segs));
        });
    }
    g.set_generic_kernels(false);
}
