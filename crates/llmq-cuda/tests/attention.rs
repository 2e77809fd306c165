//! The attention kernels against the CPU backend on awkward shapes (per part of dqkv), with the
//! fused epilogues and determinism: the kernels a run uses on this GPU (`Auto`: on compute
//! capability 9.0 the wgmma / warp-specialised ones, elsewhere mma.sync), the mma.sync kernels
//! (their cross-check on 9.0) and the simple reference kernels; the dK/dV work cut into parts; the
//! tensor-core kernels against the simple ones at T = 1024; the wgmma operand forms one by one
//! (`wgmma_operand_forms`). Skips without a CUDA device (or, where noted, compute capability 9.0).
//! Timings: benches/kernels.rs.

mod common;

use common::{decode, encode, rand_tensor, Pair};
use llmq_core::{AttentionKernels, AttnShape, Backend, DType, Mem, MemCategory};
use llmq_cuda::CudaBackend;

const F32: DType = DType::F32;
const BF16: DType = DType::BF16;

const fn shape(b: usize, t: usize, hq: usize, hkv: usize, hd: usize) -> AttnShape {
    AttnShape { b, t, hq, hkv, hd }
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    if num.is_nan() {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Relative errors of the dQ, dK and dV columns of dqkv [N, (Hq + 2 Hkv) Hd]; a part whose
/// reference is (near) zero, e.g. dQ and dK at T = 1, is measured against the norm of the whole.
fn parts(s: AttnShape, c: &[f32], g: &[f32]) -> [f64; 3] {
    let all = c.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let w = s.qkv_width();
    let ranges = [(0, s.hq * s.hd), (s.hq * s.hd, (s.hq + s.hkv) * s.hd), ((s.hq + s.hkv) * s.hd, w)];
    ranges.map(|(a, b)| {
        let (mut cc, mut gg) = (Vec::new(), Vec::new());
        for r in 0..s.n() {
            cc.extend_from_slice(&c[r * w + a..r * w + b]);
            gg.extend_from_slice(&g[r * w + a..r * w + b]);
        }
        let den = cc.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let num = cc.iter().zip(&gg).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        if num.is_nan() {
            return f64::INFINITY;
        }
        num / den.max(1e-3 * all).max(1e-300)
    })
}

/// Shapes not multiples of the tiles (T = 1, 37, 70, 130, 200, 257, 300), both head sizes, GQA
/// groups of 1 to 12.
const AWKWARD: [AttnShape; 9] = [
    shape(2, 37, 4, 2, 64),
    shape(1, 130, 14, 2, 64),
    shape(2, 70, 6, 3, 64),
    shape(1, 1, 2, 1, 64),
    shape(1, 300, 7, 1, 64),
    shape(2, 64, 4, 4, 128),
    shape(1, 200, 12, 2, 128),
    shape(2, 37, 6, 2, 128),
    shape(1, 257, 4, 1, 128),
];

/// One shape through `kernels` with the dK/dV work in `split` parts (0: chosen from the shape):
/// forward (+ fused abs-max) and backward (+ fused RoPE backward and abs-max) against the CPU,
/// each deterministic.
fn case(p: &mut Pair, s: AttnShape, kernels: AttentionKernels, split: usize) {
    p.gpu.set_attention_kernels(kernels);
    p.gpu.set_attention_dkv_split(split);
    let (n, q) = (s.n(), s.qkv_width());
    let qkv = p.rand(BF16, &[n, q], 1.0);
    let out = p.out(BF16, &[n, s.out_width()]);
    let lse = p.out(F32, &[s.b, s.hq, s.t]);
    p.cpu.attention_fwd(&out.c, &lse.c, &qkv.c, s, None).unwrap();
    p.gpu.attention_fwd(&out.g, &lse.g, &qkv.g, s, None).unwrap();
    let name = format!("{kernels:?} split {split} {s:?}");
    p.rel(&format!("fwd {name}: out"), &out, 1e-2);
    p.close(&format!("fwd {name}: lse"), &lse, 1e-4, 1e-4);
    // the fused abs-max: the same output, and exactly its abs-max
    let first = p.gpu.download(&out.g).unwrap();
    let am = p.out(F32, &[1]);
    p.gpu.attention_fwd(&out.g, &lse.g, &qkv.g, s, Some(&am.g)).unwrap();
    let want = decode(BF16, &first).iter().fold(0f32, |m, x| m.max(x.abs()));
    if p.gpu.download(&out.g).unwrap() != first || p.get(&am).1[0].to_bits() != want.to_bits() {
        p.fail(format!("fwd {name}: with the abs-max, out changed or abs-max {} != {want}", p.get(&am).1[0]));
    }
    // backward from the CPU's forward output (same inputs on both sides)
    let (oc, _) = p.raw(&out);
    p.gpu.upload(&out.g, &oc).unwrap();
    let (lc, _) = p.raw(&lse);
    p.gpu.upload(&lse.g, &lc).unwrap();
    let dout = p.rand(BF16, &[n, s.out_width()], 1.0);
    let dqkv = p.out(BF16, &[n, q]);
    p.cpu.attention_bwd(&dqkv.c, &dout.c, &qkv.c, &out.c, &lse.c, s, None, None).unwrap();
    p.gpu.attention_bwd(&dqkv.g, &dout.g, &qkv.g, &out.g, &lse.g, s, None, None).unwrap();
    p.rel(&format!("bwd {name}: dqkv"), &dqkv, 2e-2);
    let (c, g) = p.get(&dqkv);
    let r = parts(s, &c, &g);
    println!("bwd {name}: dq {:.2e} dk {:.2e} dv {:.2e}", r[0], r[1], r[2]);
    if r.iter().any(|&x| x >= 2e-2) {
        p.fail(format!("bwd {name}: part errors dq {:.2e} dk {:.2e} dv {:.2e}", r[0], r[1], r[2]));
    }
    let first = p.gpu.download(&dqkv.g).unwrap();
    p.gpu.attention_bwd(&dqkv.g, &dout.g, &qkv.g, &out.g, &lse.g, s, None, None).unwrap();
    if first != p.gpu.download(&dqkv.g).unwrap() {
        p.fail(format!("bwd {name} is not deterministic"));
    }
    fused_epilogue(p, s, &name, [&qkv, &out, &lse, &dout]);
}

/// RoPE table f32 [T, Hd/2, 2] (theta 10000).
fn rope_table(s: AttnShape) -> Vec<f32> {
    let half = s.hd / 2;
    (0..s.t)
        .flat_map(|t| (0..half).flat_map(move |i| {
            let a = t as f64 * 10000f64.powf(-((2 * i) as f64) / s.hd as f64);
            [a.cos() as f32, a.sin() as f32]
        }))
        .collect()
}

/// The backward with RoPE's transpose and the abs-max fused into its stores, against the CPU
/// (which rotates the f32 gradient before rounding, as the fused kernels do); the abs-max must be
/// exactly that of the stored dqkv, and the result deterministic.
fn fused_epilogue(p: &mut Pair, s: AttnShape, name: &str, [qkv, out, lse, dout]: [&common::T2; 4]) {
    let (n, q) = (s.n(), s.qkv_width());
    let freqs = p.vals(F32, &[s.t, s.hd / 2, 2], &rope_table(s));
    let dqkv = p.out(BF16, &[n, q]);
    let am = p.out(F32, &[1]);
    p.cpu.attention_bwd(&dqkv.c, &dout.c, &qkv.c, &out.c, &lse.c, s, Some(&freqs.c), Some(&am.c)).unwrap();
    p.gpu.attention_bwd(&dqkv.g, &dout.g, &qkv.g, &out.g, &lse.g, s, Some(&freqs.g), Some(&am.g)).unwrap();
    let (c, g) = p.get(&dqkv);
    let r = parts(s, &c, &g);
    println!("bwd+rope {name}: dq {:.2e} dk {:.2e} dv {:.2e}", r[0], r[1], r[2]);
    if r.iter().any(|&x| x >= 2e-2) {
        p.fail(format!("bwd+rope {name}: part errors dq {:.2e} dk {:.2e} dv {:.2e}", r[0], r[1], r[2]));
    }
    let want = g.iter().fold(0f32, |m, x| m.max(x.abs()));
    let got = p.get(&am).1[0];
    if got.to_bits() != want.to_bits() {
        p.fail(format!("bwd+rope {name}: abs-max {got} but the stored dqkv's is {want}"));
    }
    let first = p.gpu.download(&dqkv.g).unwrap();
    p.gpu.attention_bwd(&dqkv.g, &dout.g, &qkv.g, &out.g, &lse.g, s, Some(&freqs.g), Some(&am.g)).unwrap();
    if first != p.gpu.download(&dqkv.g).unwrap() || p.get(&am).1[0].to_bits() != want.to_bits() {
        p.fail(format!("bwd+rope {name} is not deterministic"));
    }
}

#[test]
fn default_kernels_against_cpu() {
    let Some(mut p) = Pair::new(31) else { return };
    println!("compute capability {:?}: {}", p.gpu.compute_capability(), if p.gpu.has_wgmma() { "wgmma / warp-specialised kernels" } else { "mma.sync kernels" });
    // the dK/dV iteration space cut into parts (more parts than iterations leaves some empty)
    for split in [0, 1, 2, 3, 8] {
        for s in AWKWARD {
            case(&mut p, s, AttentionKernels::Auto, split);
        }
    }
}

#[test]
fn mma_kernels_against_cpu() {
    let Some(mut p) = Pair::new(32) else { return };
    for split in [0, 1, 2, 3, 8] {
        for s in AWKWARD {
            case(&mut p, s, AttentionKernels::Mma, split);
        }
    }
}

/// The reference kernels, with the separate D, RoPE-backward and abs-max passes.
#[test]
fn simple_kernels_against_cpu() {
    let Some(mut p) = Pair::new(33) else { return };
    for s in AWKWARD {
        case(&mut p, s, AttentionKernels::Simple, 0);
    }
}

/// The tensor-core kernels against the simple ones on a realistic length (GPU only), bf16
/// outputs; the backward of each runs from the simple forward's results, so that only the
/// backward differs.
#[test]
fn tensor_core_kernels_agree_with_simple_at_length_1024() {
    let Some(mut p) = Pair::new(34) else { return };
    for hd in [64, 128] {
        let s = shape(2, 1024, 8, 2, hd);
        let (n, q) = (s.n(), s.qkv_width());
        let vals = p.rng.vec(n * q, 1.0);
        let qkv = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, q]).unwrap();
        p.gpu.upload(&qkv, &encode(BF16, &vals)).unwrap();
        let dvals = p.rng.vec(n * s.out_width(), 1.0);
        let dout = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, s.out_width()]).unwrap();
        p.gpu.upload(&dout, &encode(BF16, &dvals)).unwrap();
        let out = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, s.out_width()]).unwrap();
        let lse = p.gpu.alloc(MemCategory::Other, Mem::Device, F32, &[s.b * s.hq * s.t]).unwrap();
        let dqkv = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, q]).unwrap();
        let run = |p: &mut Pair, k| {
            p.gpu.set_attention_kernels(k);
            p.gpu.attention_fwd(&out, &lse, &qkv, s, None).unwrap();
            let o = decode(BF16, &p.gpu.download(&out).unwrap());
            let l = decode(F32, &p.gpu.download(&lse).unwrap());
            p.gpu.set_attention_kernels(AttentionKernels::Simple);
            p.gpu.attention_fwd(&out, &lse, &qkv, s, None).unwrap();
            p.gpu.set_attention_kernels(k);
            p.gpu.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap();
            (o, l, decode(BF16, &p.gpu.download(&dqkv).unwrap()))
        };
        let (o0, l0, d0) = run(&mut p, AttentionKernels::Simple);
        for k in [AttentionKernels::Mma, AttentionKernels::Auto] {
            let (o, l, d) = run(&mut p, k);
            let lerr = l.iter().zip(&l0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let r = parts(s, &d0, &d);
            println!("Hd={hd} {k:?} vs simple: out {:.2e}, lse max abs {lerr:.2e}, dq {:.2e} dk {:.2e} dv {:.2e}", rel(&o0, &o), r[0], r[1], r[2]);
            if !(rel(&o0, &o) < 1e-2 && lerr < 1e-3 && r.iter().all(|&x| x < 2e-2)) {
                p.fail(format!("Hd={hd} {k:?} differs from the simple kernels: out {:.2e} lse {lerr:.2e} parts {r:?}", rel(&o0, &o)));
            }
        }
    }
}

/// Each wgmma operand form (A from shared memory or registers, B K-major or MN-major) on one
/// 64 x 64 x 64 product against the CPU, with the descriptor strides the kernels use
/// (kernels/wgmma.cuh); where they fail, the swapped (LBO, SBO) order is tried and reported.
#[test]
fn wgmma_operand_forms() {
    let Some(mut g) = common::gpu_or_skip() else { return };
    if !g.has_wgmma() {
        println!("skipped: wgmma needs compute capability 9.0, this GPU has {:?}", g.compute_capability());
        return;
    }
    let mut rng = common::Rng::new(34);
    let round = |v: Vec<f32>| decode(BF16, &encode(BF16, &v));
    let (av, bv) = (round(rng.vec(64 * 64, 1.0)), round(rng.vec(64 * 64, 1.0)));
    let mut want = vec![0f32; 64 * 64];
    for i in 0..64 {
        for j in 0..64 {
            want[i * 64 + j] = (0..64).map(|k| av[i * 64 + k] as f64 * bv[k * 64 + j] as f64).sum::<f64>() as f32;
        }
    }
    let a = rand_tensor(&mut g, &mut rng, BF16, &[64, 64], 1.0);
    let b = rand_tensor(&mut g, &mut rng, BF16, &[64, 64], 1.0);
    g.upload(&a, &encode(BF16, &av)).unwrap();
    g.upload(&b, &encode(BF16, &bv)).unwrap();
    let c = g.alloc(MemCategory::Other, Mem::Device, F32, &[64, 64]).unwrap();
    let mut failed = Vec::new();
    for mode in 0..4 {
        // 128-byte swizzle (kernels/wgmma.cuh): K-major SBO = 1024, LBO unused; MN-major SBO =
        // 1024, LBO = the next 64 columns (64 rows x 128 bytes)
        let a_ls = (16, 1024);
        let b_ls = if mode & 1 == 1 { (64 * 128, 1024) } else { (16, 1024) };
        let run = |g: &CudaBackend, a_ls: (i32, i32), b_ls: (i32, i32)| {
            g.zero(&c, llmq_core::Stream::Compute).unwrap();
            g.wgmma_selftest(&c, &a, &b, mode, a_ls, b_ls).unwrap();
            rel(&want, &decode(F32, &g.download(&c).unwrap()))
        };
        let e = run(&g, a_ls, b_ls);
        let form = format!("A {}, B {}", if mode & 2 == 2 { "registers" } else { "smem K-major" }, if mode & 1 == 1 { "MN-major" } else { "K-major" });
        println!("wgmma {form}: A (LBO, SBO) {a_ls:?}, B {b_ls:?}: rel err {e:.2e}");
        if e.is_nan() || e >= 1e-5 {
            for (al, bl) in [((a_ls.1, a_ls.0), b_ls), (a_ls, (b_ls.1, b_ls.0)), ((a_ls.1, a_ls.0), (b_ls.1, b_ls.0))] {
                println!("  with A {al:?}, B {bl:?}: rel err {:.2e}", run(&g, al, bl));
            }
            failed.push(form);
        }
    }
    assert!(failed.is_empty(), "wgmma forms wrong: {failed:?}");
}
