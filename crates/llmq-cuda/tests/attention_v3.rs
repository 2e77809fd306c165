//! The v3 tensor-core attention kernels in every configuration, and the wgmma backward (Hopper
//! only): against the CPU backend on awkward shapes (per part of dqkv), determinism, agreement
//! with the v2 kernels at T = 1024, and timings at Qwen shapes (B*T = 16384) for every
//! configuration next to v2. The wgmma operand forms are checked one by one first
//! (`wgmma_operand_forms`). Skips without a CUDA device (or without compute capability 9.0).

mod common;

use common::{decode, encode, median_time, rand_tensor, Pair};
use llmq_core::{AttnShape, Backend, DType, Mem, MemCategory};
use llmq_cuda::{attn3_configs, attn3_default, attn3_dkv_split, attn4_configs, attn4_default, AttnImpl, CudaBackend, ATTN3_CONFIGS, ATTN4_CONFIGS, ATTN_WS_CONFIGS, ATTN_WS_DKV_CONFIGS, ATTN_WS_DQ_CONFIGS, WS_DKV, WS_DQ, WS_FWD};

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

fn case(p: &mut Pair, s: AttnShape, imp: AttnImpl) {
    p.gpu.set_attention_impl(imp);
    let (n, q) = (s.n(), s.qkv_width());
    let qkv = p.rand(BF16, &[n, q], 1.0);
    let out = p.out(BF16, &[n, s.out_width()]);
    let lse = p.out(F32, &[s.b, s.hq, s.t]);
    p.cpu.attention_fwd(&out.c, &lse.c, &qkv.c, s, None).unwrap();
    p.gpu.attention_fwd(&out.g, &lse.g, &qkv.g, s, None).unwrap();
    let name = format!("{imp:?} {s:?}");
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
fn attention_v3_configs_against_cpu() {
    let Some(mut p) = Pair::new(31) else { return };
    let shapes = AWKWARD;
    for i in 0..ATTN3_CONFIGS as u8 {
        for &s in &shapes {
            case(&mut p, s, AttnImpl::V3 { fwd: i, dq: i, dkv: i, split: 0 });
        }
    }
    // the dK/dV iteration space cut into parts (more parts than iterations leaves some empty)
    for split in [1, 2, 3, 8] {
        for &s in &shapes {
            case(&mut p, s, AttnImpl::V3 { fwd: 0, dq: 1, dkv: 1, split });
        }
    }
    for &s in &shapes {
        case(&mut p, s, AttnImpl::Auto);
    }
}

/// Each wgmma operand form (A from shared memory or registers, B K-major or MN-major) on one
/// 64 x 64 x 64 product against the CPU, with the descriptor strides the kernels use
/// (kernels/wgmma.cuh); where they fail, the swapped (LBO, SBO) order is tried and reported.
#[test]
fn wgmma_operand_forms() {
    let Some(mut g) = common::gpu_or_skip() else { return };
    if !g.has_wgmma() {
        llmq_cuda::skip_gpu_test(&format!("wgmma needs compute capability 9.0, this GPU has {:?}", g.compute_capability()));
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

/// The wgmma kernels in every configuration and with split dK/dV work, against the CPU.
#[test]
fn attention_wg_against_cpu() {
    let Some(mut p) = wgmma_pair(35) else { return };
    let shapes = AWKWARD;
    for i in 0..ATTN4_CONFIGS as u8 {
        for &s in &shapes {
            case(&mut p, s, AttnImpl::Wg { fwd: i, dq: i, dkv: i, split: 0 });
        }
    }
    for split in [1, 2, 3, 8] {
        for &s in &shapes {
            case(&mut p, s, AttnImpl::Wg { fwd: 0, dq: 0, dkv: 1, split });
        }
    }
    // the warp-specialised forward and dK/dV kernels (TMA, producer/consumer warpgroups)
    for i in 0..ATTN_WS_CONFIGS as u8 {
        for &s in &shapes {
            case(&mut p, s, AttnImpl::Wg { fwd: ATTN4_CONFIGS as u8 + i, dq: u8::MAX, dkv: u8::MAX, split: 0 });
        }
    }
    for i in 0..ATTN_WS_DKV_CONFIGS as u8 {
        for split in [0, 3] {
            for &s in &shapes {
                case(&mut p, s, AttnImpl::Wg { fwd: u8::MAX, dq: 0, dkv: ATTN4_CONFIGS as u8 + i, split });
            }
        }
    }
    for i in 0..ATTN_WS_DQ_CONFIGS as u8 {
        for &s in &shapes {
            case(&mut p, s, AttnImpl::Wg { fwd: u8::MAX, dq: ATTN4_CONFIGS as u8 + i, dkv: 0, split: 0 });
        }
    }
}

/// A CPU/GPU pair on a GPU with wgmma (compute capability 9.0), else None with a message.
fn wgmma_pair(seed: u64) -> Option<Pair> {
    let p = Pair::new(seed)?;
    if !p.gpu.has_wgmma() {
        llmq_cuda::skip_gpu_test(&format!("wgmma needs compute capability 9.0, this GPU has {:?}", p.gpu.compute_capability()));
        return None;
    }
    Some(p)
}

/// The awkward shapes plus realistic lengths, for the bitwise comparisons.
fn bitwise_shapes() -> Vec<AttnShape> {
    let mut shapes = AWKWARD.to_vec();
    shapes.extend([shape(2, 1024, 14, 2, 64), shape(2, 1024, 12, 2, 128), shape(3, 1000, 8, 8, 128)]);
    shapes
}

/// How many values of dtype `dt` differ in their bits between two downloads.
fn values_differing(dt: llmq_core::DType, a: &[u8], b: &[u8]) -> usize {
    decode(dt, a).iter().zip(&decode(dt, b)).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

/// The warp-specialised forward does the wgmma forward's arithmetic in the same order, so for the
/// same keys per tile its outputs must be bit-identical (only the loads and the scheduling differ).
#[test]
fn attention_ws_forward_bitwise_equal_to_wg() {
    let Some(mut p) = wgmma_pair(36) else { return };
    let mut checked = 0;
    for s in bitwise_shapes() {
        let (n, q) = (s.n(), s.qkv_width());
        let qkv = p.rand(BF16, &[n, q], 2.0);
        let run = |p: &mut Pair, fwd: usize| {
            let out = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, s.out_width()]).unwrap();
            let lse = p.gpu.alloc(MemCategory::Other, Mem::Device, F32, &[s.b * s.hq * s.t]).unwrap();
            p.gpu.set_attention_impl(AttnImpl::Wg { fwd: fwd as u8, dq: u8::MAX, dkv: u8::MAX, split: 0 });
            p.gpu.attention_fwd(&out, &lse, &qkv.g, s, None).unwrap();
            (p.gpu.download(&out).unwrap(), p.gpu.download(&lse).unwrap())
        };
        for (wi, &(bk, _)) in WS_FWD.iter().enumerate() {
            // a wgmma forward configuration with the same keys per tile
            let Some(fi) = (0..ATTN4_CONFIGS).find(|&i| attn4_configs(s.hd, i).0.tile == bk) else { continue };
            let want = run(&mut p, fi);
            let got = run(&mut p, ATTN4_CONFIGS + wi);
            checked += 1;
            if got != want {
                let (od, ld) = (values_differing(BF16, &got.0, &want.0), values_differing(F32, &got.1, &want.1));
                p.fail(format!("{s:?}: warp-specialised forward {wi} differs from wgmma forward {fi}: {od} outputs, {ld} lse values"));
            }
        }
    }
    assert!(checked > 0, "no configuration pair with equal tiles");
}

/// Likewise the warp-specialised dK/dV and dQ kernels against the wgmma ones with two warpgroups
/// and 64-row tiles (same iteration space, parts and arithmetic): bit-identical dqkv.
#[test]
fn attention_ws_backward_bitwise_equal_to_wg() {
    let Some(mut p) = wgmma_pair(37) else { return };
    let mut checked = 0;
    for s in bitwise_shapes() {
        let (n, q) = (s.n(), s.qkv_width());
        let qkv = p.rand(BF16, &[n, q], 2.0);
        let dout = p.rand(BF16, &[n, s.out_width()], 1.0);
        let out = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, s.out_width()]).unwrap();
        let lse = p.gpu.alloc(MemCategory::Other, Mem::Device, F32, &[s.b * s.hq * s.t]).unwrap();
        p.gpu.set_attention_impl(AttnImpl::Auto);
        p.gpu.attention_fwd(&out, &lse, &qkv.g, s, None).unwrap();
        let run = |p: &mut Pair, dq: usize, dkv: usize, split: u8| {
            let dqkv = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, q]).unwrap();
            p.gpu.set_attention_impl(AttnImpl::Wg { fwd: u8::MAX, dq: dq as u8, dkv: dkv as u8, split });
            p.gpu.attention_bwd(&dqkv, &dout.g, &qkv.g, &out, &lse, s, None, None).unwrap();
            p.gpu.download(&dqkv).unwrap()
        };
        for (wi, &st) in WS_DKV.iter().enumerate() {
            let want_cfg = llmq_cuda::Attn4Cfg { tile: 64, wgs: 2, stages: st };
            let Some(ki) = (0..ATTN4_CONFIGS).find(|&i| attn4_configs(s.hd, i).2 == want_cfg) else { continue };
            for split in [0u8, 2] {
                let want = run(&mut p, 0, ki, split);
                let got = run(&mut p, 0, ATTN4_CONFIGS + wi, split);
                checked += 1;
                if got != want {
                    let d = values_differing(BF16, &got, &want);
                    p.fail(format!("{s:?} split {split}: warp-specialised dK/dV {wi} differs from wgmma dK/dV {ki} in {d} values"));
                }
            }
        }
        for (wi, &st) in WS_DQ.iter().enumerate() {
            let want_cfg = llmq_cuda::Attn4Cfg { tile: 64, wgs: 2, stages: st };
            let Some(qi) = (0..ATTN4_CONFIGS).find(|&i| attn4_configs(s.hd, i).1 == want_cfg) else { continue };
            let want = run(&mut p, qi, 0, 0);
            let got = run(&mut p, ATTN4_CONFIGS + wi, 0, 0);
            checked += 1;
            if got != want {
                let d = values_differing(BF16, &got, &want);
                p.fail(format!("{s:?}: warp-specialised dQ {wi} differs from wgmma dQ {qi} in {d} values"));
            }
        }
    }
    assert!(checked > 0, "no configuration pair with equal tiles");
}

/// Every configuration against v2 on a realistic length (GPU only), bf16 outputs.
#[test]
fn attention_v3_configs_agree_with_v2_at_length_1024() {
    let Some(mut p) = Pair::new(32) else { return };
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
        let run = |p: &mut Pair, imp| {
            p.gpu.set_attention_impl(imp);
            p.gpu.attention_fwd(&out, &lse, &qkv, s, None).unwrap();
            let o = decode(BF16, &p.gpu.download(&out).unwrap());
            let l = decode(F32, &p.gpu.download(&lse).unwrap());
            // the backward from v2's forward results, so that only the backward differs
            p.gpu.set_attention_impl(AttnImpl::MmaV2);
            p.gpu.attention_fwd(&out, &lse, &qkv, s, None).unwrap();
            p.gpu.set_attention_impl(imp);
            p.gpu.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap();
            (o, l, decode(BF16, &p.gpu.download(&dqkv).unwrap()))
        };
        let (o2, l2, d2) = run(&mut p, AttnImpl::MmaV2);
        let mut imps: Vec<AttnImpl> = (0..ATTN3_CONFIGS as u8).map(|i| AttnImpl::V3 { fwd: i, dq: i, dkv: i, split: 0 }).collect();
        if p.gpu.has_wgmma() {
            imps.extend((0..ATTN4_CONFIGS as u8).map(|i| AttnImpl::Wg { fwd: i, dq: i, dkv: i, split: 0 }));
            imps.extend((0..ATTN_WS_CONFIGS as u8).map(|i| AttnImpl::Wg { fwd: ATTN4_CONFIGS as u8 + i, dq: 0, dkv: 0, split: 0 }));
        }
        for (i, imp) in imps.into_iter().enumerate() {
            let (o, l, d) = run(&mut p, imp);
            let lerr = l.iter().zip(&l2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let r = parts(s, &d2, &d);
            println!("Hd={hd} config {i} {imp:?} vs v2: out {:.2e}, lse max abs {lerr:.2e}, dq {:.2e} dk {:.2e} dv {:.2e}", rel(&o2, &o), r[0], r[1], r[2]);
            if !(rel(&o2, &o) < 1e-2 && lerr < 1e-3 && r.iter().all(|&x| x < 2e-2)) {
                p.fail(format!("Hd={hd} config {i} differs from v2: out {:.2e} lse {lerr:.2e} parts {r:?}", rel(&o2, &o)));
            }
        }
    }
}

/// Prints fwd / bwd times (median ms) of v2, every v3 configuration and every dq x dkv
/// combination, B16 T1024, Qwen2.5-0.5B (Hd 64) and -1.5B-like (Hd 128) head shapes.
#[test]
fn attention_v3_timings() {
    let Some(mut g) = common::gpu_or_skip() else { return };
    let mut rng = common::Rng::new(33);
    for &(hq, hkv, hd) in &[(14, 2, 64), (12, 2, 128)] {
        let s = AttnShape { b: 16, t: 1024, hq, hkv, hd };
        let (n, q) = (s.n(), s.qkv_width());
        let qkv = rand_tensor(&mut g, &mut rng, BF16, &[n, q], 1.0);
        let dout = rand_tensor(&mut g, &mut rng, BF16, &[n, s.out_width()], 1.0);
        let out = g.alloc(MemCategory::Other, Mem::Device, BF16, &[n, s.out_width()]).unwrap();
        let lse = g.alloc(MemCategory::Other, Mem::Device, F32, &[s.b * hq * s.t]).unwrap();
        let dqkv = g.alloc(MemCategory::Other, Mem::Device, BF16, &[n, q]).unwrap();
        let flops = 4.0 * (s.b * hq * hd) as f64 * (s.t * s.t) as f64 / 2.0; // causal
        println!("## B16 T1024 Hq{hq} Hkv{hkv} Hd{hd}: fwd / bwd ms (TFLOP/s, bwd counted as 2.5 x fwd)");
        let line = |g: &CudaBackend, name: String, imp: AttnImpl| {
            g.set_attention_impl(imp);
            let tf = median_time(g, || g.attention_fwd(&out, &lse, &qkv, s, None).unwrap());
            let tb = median_time(g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
            println!("| {name} | {:.3} ({:.0}) | {:.3} ({:.0}) |", tf * 1e3, flops / tf / 1e12, tb * 1e3, 2.5 * flops / tb / 1e12);
        };
        line(&g, "v2".into(), AttnImpl::MmaV2);
        line(&g, format!("v3 default {:?}", attn3_default(hd)), AttnImpl::V3 { fwd: u8::MAX, dq: u8::MAX, dkv: u8::MAX, split: 0 });
        for i in 0..ATTN3_CONFIGS {
            let (f, dq, dkv) = attn3_configs(hd, i);
            line(&g, format!("v3 {i}: fwd {f:?} dq {dq:?} dkv {dkv:?} split {}", attn3_dkv_split(&s, i)), AttnImpl::V3 { fwd: i as u8, dq: i as u8, dkv: i as u8, split: 0 });
        }
        if g.has_wgmma() {
            for i in 0..ATTN4_CONFIGS {
                let (f, dq, dkv) = attn4_configs(hd, i);
                line(&g, format!("wgmma {i}: fwd {f:?} dq {dq:?} dkv {dkv:?}"), AttnImpl::Wg { fwd: i as u8, dq: i as u8, dkv: i as u8, split: 0 });
            }
            line(&g, format!("wgmma default {:?}", attn4_default(hd)), AttnImpl::Wg { fwd: u8::MAX, dq: u8::MAX, dkv: u8::MAX, split: 0 });
            for (i, (bk, st)) in WS_FWD.iter().enumerate() {
                line(&g, format!("warp-specialised fwd {i}: {bk} keys per tile, {st} stages"), AttnImpl::Wg { fwd: (ATTN4_CONFIGS + i) as u8, dq: u8::MAX, dkv: u8::MAX, split: 0 });
            }
            for (i, st) in WS_DQ.iter().enumerate() {
                let mut row = format!("warp-specialised dQ {i} ({st} stages), bwd ms with dkv 0..{}:", ATTN4_CONFIGS + ATTN_WS_DKV_CONFIGS);
                for dkv in 0..(ATTN4_CONFIGS + ATTN_WS_DKV_CONFIGS) as u8 {
                    g.set_attention_impl(AttnImpl::Wg { fwd: 0, dq: (ATTN4_CONFIGS + i) as u8, dkv, split: 0 });
                    let tb = median_time(&g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
                    row.push_str(&format!(" {:.3}", tb * 1e3));
                }
                println!("{row}");
            }
            for (i, st) in WS_DKV.iter().enumerate() {
                let imp = AttnImpl::Wg { fwd: u8::MAX, dq: u8::MAX, dkv: (ATTN4_CONFIGS + i) as u8, split: 0 };
                line(&g, format!("warp-specialised dK/dV {i}: {st} stages, dq default"), imp);
                let mut row = format!("warp-specialised dK/dV {i}, bwd ms with dq 0..{ATTN4_CONFIGS}:");
                for dq in 0..ATTN4_CONFIGS as u8 {
                    g.set_attention_impl(AttnImpl::Wg { fwd: 0, dq, dkv: (ATTN4_CONFIGS + i) as u8, split: 0 });
                    let tb = median_time(&g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
                    row.push_str(&format!(" {:.3}", tb * 1e3));
                }
                println!("{row}");
            }
            println!("wgmma bwd ms, dq config (rows) x dkv config (columns):");
            for i in 0..ATTN4_CONFIGS as u8 {
                let mut row = format!("dq {i}:");
                for j in 0..ATTN4_CONFIGS as u8 {
                    g.set_attention_impl(AttnImpl::Wg { fwd: 0, dq: i, dkv: j, split: 0 });
                    let tb = median_time(&g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
                    row.push_str(&format!(" {:.3}", tb * 1e3));
                }
                println!("{row}");
            }
            let (_, dq, dkv) = attn4_default(hd);
            let mut row = format!("wgmma bwd ms, dq {dq} dkv {dkv}, dK/dV parts 1, 2, 3, 4, 6, 8:");
            for split in [1u8, 2, 3, 4, 6, 8] {
                g.set_attention_impl(AttnImpl::Wg { fwd: 0, dq: dq as u8, dkv: dkv as u8, split });
                let tb = median_time(&g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
                row.push_str(&format!(" {:.3}", tb * 1e3));
            }
            println!("{row}");
        }
        if std::env::var("LLMQ_TIMINGS_V3").is_err() {
            println!("(v3 sweeps skipped: LLMQ_TIMINGS_V3=1 runs them)");
            g.set_attention_impl(AttnImpl::Auto);
            continue;
        }
        println!("bwd ms, dkv config (rows) x dK/dV parts 1, 2, 3, 4, 6, 8 (columns), dq config {}:", attn3_default(hd).1);
        for j in 0..ATTN3_CONFIGS as u8 {
            let mut row = format!("dkv {j} (auto {}):", attn3_dkv_split(&s, j as usize));
            for split in [1u8, 2, 3, 4, 6, 8] {
                g.set_attention_impl(AttnImpl::V3 { fwd: 0, dq: attn3_default(hd).1 as u8, dkv: j, split });
                let tb = median_time(&g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
                row.push_str(&format!(" {:.3}", tb * 1e3));
            }
            println!("{row}");
        }
        println!("bwd ms, dq config (rows) x dkv config (columns):");
        for i in 0..ATTN3_CONFIGS as u8 {
            let mut row = format!("dq {i}:");
            for j in 0..ATTN3_CONFIGS as u8 {
                g.set_attention_impl(AttnImpl::V3 { fwd: 0, dq: i, dkv: j, split: 0 });
                let tb = median_time(&g, || g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None).unwrap());
                row.push_str(&format!(" {:.3}", tb * 1e3));
            }
            println!("{row}");
        }
        g.set_attention_impl(AttnImpl::Auto);
    }
}
