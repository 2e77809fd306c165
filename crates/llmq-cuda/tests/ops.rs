//! Every CUDA op against the CPU reference backend on random inputs of awkward sizes.
//! Data movement, conversions, transposes and fp8 quantisation must be bit-exact; the rest is
//! held to the per-dtype tolerances of `common::tol` or to a relative-norm bound where the
//! summation order differs (matmul, attention). Skips without a CUDA device.

mod common;

use common::{decode, encode, Pair};
use llmq_core::{AdamStep, AdamW, AttnShape, Backend, DType, Matmul, Mem, MemCategory, Segment, Stream, ADAM_SCALARS};

const F32: DType = DType::F32;
const BF16: DType = DType::BF16;
const E4M3: DType = DType::E4M3;
const E5M2: DType = DType::E5M2;

/// The hardware bf16 encoders (cvt.rn with a NaN fallback) and the branch-free IEEE reciprocal
/// of the SwiGLU kernels, exhaustively against their references on the GPU. The references are
/// the integer encoder that `convert_is_bit_exact` holds to the CPU's bytes, and `1.0f / x`.
#[test]
fn hardware_encoders_match_references_on_all_inputs() {
    let Some(g) = common::gpu_or_skip() else { return };
    let t = std::time::Instant::now();
    let (bad, first) = g.encode_selftest().unwrap();
    println!("encode selftest: {bad} mismatches in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    assert_eq!(bad, 0, "{bad} mismatches; the first at f32 bits {first:#010x} ({:e})", f32::from_bits(first));
}

#[test]
fn convert_is_bit_exact() {
    let Some(mut p) = Pair::new(1) else { return };
    let n = 1000;
    let mut v = p.rng.vec(n, 3.0);
    // special values: saturation, subnormals of every target, ties, signed zero, inf, NaN
    let specials = [
        0.0, -0.0, 448.0, 449.0, 464.0, 465.0, -1e6, 57344.0, 61440.0, 1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, 1e-3,
        -2e-3, 0.0009765625, 1.5e-5, 3.0e-8, 1e-40, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 2.5, 3.5,
    ];
    v[..specials.len()].copy_from_slice(&specials);
    for (i, x) in v.iter_mut().enumerate().skip(specials.len()).take(200) {
        *x *= 10f32.powi((i % 20) as i32 - 10); // a wide range of magnitudes
    }
    let src32 = p.vals(F32, &[n], &v);
    let src16 = p.vals(BF16, &[n], &v);
    for (name, src) in [("f32", src32), ("bf16", src16)] {
        for d in [F32, BF16, E4M3, E5M2] {
            if d == src.c.dtype {
                continue;
            }
            let out = p.out(d, &[n]);
            p.cpu.convert(&out.c, &src.c).unwrap();
            p.gpu.convert(&out.g, &src.g).unwrap();
            p.exact(&format!("convert {name}->{d}"), &out);
        }
    }
    // sizes that are not a multiple of the 8-element chunks of the vector kernels
    for n2 in [1003, 7] {
        let v2 = p.rng.vec(n2, 3.0);
        for sd in [F32, BF16] {
            let src = p.vals(sd, &[n2], &v2);
            for d in [F32, BF16, E4M3, E5M2] {
                if d == sd {
                    continue;
                }
                let out = p.out(d, &[n2]);
                p.cpu.convert(&out.c, &src.c).unwrap();
                p.gpu.convert(&out.g, &src.g).unwrap();
                p.exact(&format!("convert {sd}->{d} n={n2}"), &out);
                if d.is_fp8() {
                    let back = p.out(sd, &[n2]);
                    p.cpu.convert(&back.c, &out.c).unwrap();
                    p.gpu.convert(&back.g, &out.g).unwrap();
                    p.exact(&format!("convert {d}->{sd} n={n2}"), &back);
                }
            }
        }
    }
    // fp8 -> wider: all 256 codes
    let codes: Vec<u8> = (0..=255u8).collect();
    for s in [E4M3, E5M2] {
        let src = p.bytes(s, &[256], &codes);
        for d in [F32, BF16] {
            let out = p.out(d, &[256]);
            p.cpu.convert(&out.c, &src.c).unwrap();
            p.gpu.convert(&out.g, &src.g).unwrap();
            p.exact(&format!("convert {s}->{d} (all codes)"), &out);
        }
    }
}

#[test]
fn memory_copies_events_and_pinned_host() {
    let Some(mut p) = Pair::new(2) else { return };
    let g = &mut p.gpu;
    let n = 12345;
    let data: Vec<u8> = (0..n * 2).map(|i| (i * 7 + 3) as u8).collect();
    let a = g.alloc(MemCategory::Activations, Mem::Device, BF16, &[n]).unwrap();
    let h = g.alloc(MemCategory::Master, Mem::Host, BF16, &[n]).unwrap();
    let b = g.alloc(MemCategory::Activations, Mem::Device, BF16, &[n]).unwrap();
    // fresh allocations are zero
    assert!(g.download(&h).unwrap().iter().all(|&x| x == 0));
    assert!(g.download(&a).unwrap().iter().all(|&x| x == 0));
    g.upload(&a, &data).unwrap();
    let ev = g.create_event().unwrap();
    g.record(ev, Stream::Compute).unwrap();
    g.wait(Stream::Copy, ev).unwrap();
    g.copy(&h, &a, Stream::Copy).unwrap(); // device -> pinned host on the copy stream
    let ev2 = g.create_event().unwrap();
    g.record(ev2, Stream::Copy).unwrap();
    g.wait(Stream::Compute, ev2).unwrap();
    g.copy(&b, &h, Stream::Compute).unwrap(); // pinned host -> device
    assert_eq!(g.download(&b).unwrap(), data);
    assert_eq!(g.download(&h).unwrap(), data);
    // sub-slices
    let s = b.slice(100, &[50]);
    g.zero(&s, Stream::Compute).unwrap();
    let back = g.download(&b).unwrap();
    assert!(back[200..300].iter().all(|&x| x == 0));
    assert_eq!(&back[..200], &data[..200]);
    assert_eq!(&back[300..], &data[300..]);
    // accounting
    let acc = g.memory_by_category();
    assert!(acc.iter().any(|&(c, m, bytes)| c == MemCategory::Master && m == Mem::Host && bytes == n * 2));
    assert!(g.free_memory().unwrap() > 0);
    // out of memory is a clean error naming the request
    match g.alloc(MemCategory::Weights, Mem::Device, F32, &[1 << 40]) {
        Err(llmq_core::Error::OutOfMemory(msg)) => println!("oom: {msg}"),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    // dtype mismatch in copy is an op error
    let f = g.alloc(MemCategory::Other, Mem::Device, F32, &[n]).unwrap();
    assert!(g.copy(&f, &a, Stream::Compute).is_err());
    println!("device: {} cc {:?}, {} SMs, cuBLASLt {}", g.device_name(), g.compute_capability(), g.sm_count(), g.cublaslt_version());
}

#[test]
fn transpose_and_quantize_are_bit_exact() {
    let Some(mut p) = Pair::new(3) else { return };
    for &(r, c) in &[(77, 100), (1, 33), (64, 64), (130, 7), (128, 192), (192, 1152), (384, 320)] {
        for d in [F32, BF16, E4M3] {
            let inp = p.rand(d, &[r, c], 2.0);
            let out = p.out(d, &[c, r]);
            p.cpu.transpose(&out.c, &inp.c).unwrap();
            p.gpu.transpose(&out.g, &inp.g).unwrap();
            p.exact(&format!("transpose {d} [{r},{c}]"), &out);
        }
        for src in [F32, BF16] {
            let inp = p.rand(src, &[r, c], 5.0);
            let am = p.out(F32, &[1]);
            p.cpu.absmax(&am.c, &inp.c).unwrap();
            p.gpu.absmax(&am.g, &inp.g).unwrap();
            p.exact("absmax", &am);
            for q in [E4M3, E5M2] {
                for tr in [false, true] {
                    let dims = if tr { [c, r] } else { [r, c] };
                    let out = p.out(q, &dims);
                    let ds = p.out(F32, &[1]);
                    p.cpu.quantize(&out.c, &ds.c, &inp.c, &am.c, tr).unwrap();
                    p.gpu.quantize(&out.g, &ds.g, &inp.g, &am.g, tr).unwrap();
                    p.exact(&format!("quantize {src}->{q} transpose={tr} [{r},{c}]"), &out);
                    p.exact("descale", &ds);
                }
                // both forms in one pass (the fused kernel where rows and cols are multiples of 64)
                let (out, out_t, ds) = (p.out(q, &[r, c]), p.out(q, &[c, r]), p.out(F32, &[1]));
                p.cpu.quantize_pair(&out.c, &out_t.c, &ds.c, &inp.c, &am.c).unwrap();
                p.gpu.quantize_pair(&out.g, &out_t.g, &ds.g, &inp.g, &am.g).unwrap();
                p.exact(&format!("quantize_pair {src}->{q} plain [{r},{c}]"), &out);
                p.exact(&format!("quantize_pair {src}->{q} transposed [{r},{c}]"), &out_t);
                p.exact("quantize_pair descale", &ds);
            }
            // an absmax smaller than the data saturates
            let small = p.vals(F32, &[1], &[0.5]);
            let out = p.out(E4M3, &[r, c]);
            let ds = p.out(F32, &[1]);
            p.cpu.quantize(&out.c, &ds.c, &inp.c, &small.c, false).unwrap();
            p.gpu.quantize(&out.g, &ds.g, &inp.g, &small.g, false).unwrap();
            p.exact("quantize saturating", &out);
        }
    }
    // NaN propagates through absmax
    let mut v = p.rng.vec(1000, 1.0);
    v[517] = f32::NAN;
    let t = p.vals(F32, &[1000], &v);
    let am = p.out(F32, &[1]);
    p.gpu.absmax(&am.g, &t.g).unwrap();
    assert!(decode(F32, &p.gpu.download(&am.g).unwrap())[0].is_nan());
}

#[test]
fn embedding_forward_and_backward() {
    let Some(mut p) = Pair::new(4) else { return };
    let (v, c, n) = (97, 100, 300);
    let ids: Vec<i32> = (0..n).map(|i| if i % 5 == 0 { 7 } else { p.rng.below(v) as i32 }).collect();
    let idt = p.i32s(&[n], &ids);
    for d in [F32, BF16] {
        let table = p.rand(d, &[v, c], 1.0);
        let out = p.out(d, &[n, c]);
        p.cpu.embedding_fwd(&out.c, &idt.c, &table.c).unwrap();
        p.gpu.embedding_fwd(&out.g, &idt.g, &table.g).unwrap();
        p.exact(&format!("embedding_fwd {d}"), &out);
        let dout = p.rand(d, &[n, c], 1.0);
        let dtab = p.rand(d, &[v, c], 1.0);
        p.cpu.embedding_bwd(&dtab.c, &idt.c, &dout.c).unwrap();
        p.gpu.embedding_bwd(&dtab.g, &idt.g, &dout.g).unwrap();
        p.exact(&format!("embedding_bwd {d} (rows added in order)"), &dtab);
    }
    // The sort runs in 2048-key tiles plus global steps: 16384 rows (a 16 x 1024 micro-batch),
    // just above a power of two (padding), 4000 rows, 40000 (padding to 65536), 65536 (64 x 1024),
    // skewed ids (one id on every 3rd row).
    for &(v, c, n) in &[(151_936, 64, 16_384), (1000, 24, 16_385), (50, 40, 4000), (3000, 16, 40_000), (151_936, 8, 65_536)] {
        let ids: Vec<i32> = (0..n).map(|i| if i % 3 == 0 { 11 } else { p.rng.below(v) as i32 }).collect();
        let idt = p.i32s(&[n], &ids);
        let dout = p.rand(BF16, &[n, c], 1.0);
        let dtab = p.rand(F32, &[v, c], 1.0);
        p.cpu.embedding_bwd(&dtab.c, &idt.c, &dout.c).unwrap();
        p.gpu.embedding_bwd(&dtab.g, &idt.g, &dout.g).unwrap();
        p.exact(&format!("embedding_bwd [{n} rows, V {v}, C {c}]"), &dtab);
    }
    // no rows: nothing changes; more rows than the sort keys' scratch holds (2^24): refused
    let dtab = p.rand(F32, &[10, 4], 1.0);
    let before = p.gpu.download(&dtab.g).unwrap();
    let (none, dnone) = (p.i32s(&[0], &[]), p.rand(BF16, &[0, 4], 1.0));
    p.gpu.embedding_bwd(&dtab.g, &none.g, &dnone.g).unwrap();
    assert_eq!(p.gpu.download(&dtab.g).unwrap(), before, "embedding_bwd with no rows changed the table");
    let n = (1 << 24) + 1;
    let ids = p.gpu.alloc(MemCategory::Other, Mem::Device, DType::I32, &[n]).unwrap();
    let dout = p.gpu.alloc(MemCategory::Other, Mem::Device, BF16, &[n, 4]).unwrap();
    let e = p.gpu.embedding_bwd(&dtab.g, &ids, &dout).unwrap_err().to_string();
    assert!(e.contains("embedding_bwd") && e.contains(&n.to_string()) && e.contains("scratch"), "{e}");
    // Out-of-range ids (the forward wrote NaN rows for them) add nothing on the GPU: the same
    // table as with those rows left out.
    let (v, c, n) = (40, 16, 600);
    let ids: Vec<i32> = (0..n).map(|i| if i % 7 == 0 { -1 } else if i % 11 == 0 { v as i32 } else { p.rng.below(v) as i32 }).collect();
    let dout = p.rng.vec(n * c, 1.0);
    let keep: Vec<usize> = (0..n).filter(|&i| ids[i] >= 0 && ids[i] < v as i32).collect();
    let kept_ids: Vec<i32> = keep.iter().map(|&i| ids[i]).collect();
    let kept_dout: Vec<f32> = keep.iter().flat_map(|&i| dout[i * c..(i + 1) * c].to_vec()).collect();
    let table = p.rng.vec(v * c, 1.0);
    let (a, b) = (p.vals(F32, &[v, c], &table), p.vals(F32, &[v, c], &table));
    let (ia, da) = (p.i32s(&[n], &ids), p.vals(F32, &[n, c], &dout));
    let (ib, db) = (p.i32s(&[keep.len()], &kept_ids), p.vals(F32, &[keep.len(), c], &kept_dout));
    p.gpu.embedding_bwd(&a.g, &ia.g, &da.g).unwrap();
    p.gpu.embedding_bwd(&b.g, &ib.g, &db.g).unwrap();
    assert_eq!(p.gpu.download(&a.g).unwrap(), p.gpu.download(&b.g).unwrap(), "embedding_bwd: out-of-range ids must add nothing");
}

#[test]
fn rmsnorm_forward_residual_backward() {
    let Some(mut p) = Pair::new(5) else { return };
    // C = 100 and 2500: partial chunks (runtime-dtype kernels); 896, 1536, 3584, 5000: typed
    // kernels with 1, 2, 4 and 8 warps per row (5000: generic backward); 9000: generic forward too
    for &(n, c) in &[(77, 100), (5, 896), (33, 1536), (9, 3584), (6, 2500), (4, 5000), (3, 9000)] {
        for d in [F32, BF16] {
            let x = p.rand(d, &[n, c], 1.5);
            let w = p.rand(d, &[c], 1.0);
            let out = p.out(d, &[n, c]);
            let rstd = p.out(F32, &[n]);
            let am = p.out(F32, &[1]);
            p.cpu.rmsnorm_fwd(&out.c, &rstd.c, &x.c, &w.c, 1e-5, Some(&am.c)).unwrap();
            p.gpu.rmsnorm_fwd(&out.g, &rstd.g, &x.g, &w.g, 1e-5, Some(&am.g)).unwrap();
            p.close_dt(&format!("rmsnorm_fwd rstd {d} [{n},{c}]"), &rstd);
            p.close_dt(&format!("rmsnorm_fwd out {d}"), &out);
            p.close_dt("rmsnorm_fwd absmax", &am);

            let delta = p.rand(d, &[n, c], 1.0);
            let res = p.out(d, &[n, c]);
            p.cpu.residual_rmsnorm_fwd(&res.c, &out.c, &rstd.c, &x.c, &delta.c, &w.c, 1e-6, Some(&am.c)).unwrap();
            p.gpu.residual_rmsnorm_fwd(&res.g, &out.g, &rstd.g, &x.g, &delta.g, &w.g, 1e-6, Some(&am.g)).unwrap();
            p.exact(&format!("residual {d}"), &res);
            p.close_dt(&format!("residual_rmsnorm out {d}"), &out);
            p.close_dt("residual_rmsnorm rstd", &rstd);
            // in place: the residual stream updated where it lies (res_out == x)
            let xr = p.rand(d, &[n, c], 1.5);
            p.cpu.residual_rmsnorm_fwd(&xr.c, &out.c, &rstd.c, &xr.c, &delta.c, &w.c, 1e-6, None).unwrap();
            p.gpu.residual_rmsnorm_fwd(&xr.g, &out.g, &rstd.g, &xr.g, &delta.g, &w.g, 1e-6, None).unwrap();
            p.exact(&format!("residual in place {d}"), &xr);
            p.close_dt(&format!("residual_rmsnorm in place out {d}"), &out);

            let dout = p.rand(d, &[n, c], 1.0);
            for with_res in [false, true] {
                let dx = p.out(d, &[n, c]);
                let dw = p.rand(F32, &[c], 1.0);
                let am = p.out(F32, &[1]);
                if with_res {
                    // in place: dx is dres
                    p.cpu.rmsnorm_bwd(&dx.c, &dw.c, &dout.c, &x.c, &w.c, &rstd.c, Some(&dx.c), Some(&am.c)).unwrap();
                    p.gpu.rmsnorm_bwd(&dx.g, &dw.g, &dout.g, &x.g, &w.g, &rstd.g, Some(&dx.g), Some(&am.g)).unwrap();
                } else {
                    p.cpu.rmsnorm_bwd(&dx.c, &dw.c, &dout.c, &x.c, &w.c, &rstd.c, None, Some(&am.c)).unwrap();
                    p.gpu.rmsnorm_bwd(&dx.g, &dw.g, &dout.g, &x.g, &w.g, &rstd.g, None, Some(&am.g)).unwrap();
                }
                p.close(&format!("rmsnorm_bwd dx {d} dres={with_res}"), &dx, common::tol(d).0, 1e-5);
                p.close("rmsnorm_bwd dw (f32, +=)", &dw, 1e-5, 1e-6);
                p.close("rmsnorm_bwd absmax", &am, common::tol(d).0, 1e-6);
            }
        }
    }
    // mixed dtypes (runtime-dtype kernels): bf16 activations, f32 weight and output
    let (n, c) = (7, 896);
    let x = p.rand(BF16, &[n, c], 1.5);
    let w = p.rand(F32, &[c], 1.0);
    let out = p.out(F32, &[n, c]);
    let rstd = p.out(F32, &[n]);
    p.cpu.rmsnorm_fwd(&out.c, &rstd.c, &x.c, &w.c, 1e-5, None).unwrap();
    p.gpu.rmsnorm_fwd(&out.g, &rstd.g, &x.g, &w.g, 1e-5, None).unwrap();
    p.close_dt("rmsnorm_fwd mixed dtypes out", &out);
    p.close_dt("rmsnorm_fwd mixed dtypes rstd", &rstd);
    // the GPU's own consistency: rmsnorm_fwd(res) reproduces residual_rmsnorm_fwd bit for bit, and
    // the backward gives the same bits twice
    let g = &mut p.gpu;
    for (n, c) in [(300, 896), (40, 1536)] {
        let mk = |g: &mut llmq_cuda::CudaBackend, dt: DType, dims: &[usize], seed: u64| {
            let mut r = common::Rng::new(seed);
            let t = g.alloc(MemCategory::Other, Mem::Device, dt, dims).unwrap();
            g.upload(&t, &encode(dt, &r.vec(dims.iter().product(), 1.0))).unwrap();
            t
        };
        let x = mk(g, BF16, &[n, c], 1);
        let delta = mk(g, BF16, &[n, c], 2);
        let w = mk(g, BF16, &[c], 3);
        let res = mk(g, BF16, &[n, c], 4);
        let out1 = mk(g, BF16, &[n, c], 5);
        let out2 = mk(g, BF16, &[n, c], 6);
        let r1 = mk(g, F32, &[n], 7);
        let r2 = mk(g, F32, &[n], 8);
        g.residual_rmsnorm_fwd(&res, &out1, &r1, &x, &delta, &w, 1e-6, None).unwrap();
        g.rmsnorm_fwd(&out2, &r2, &res, &w, 1e-6, None).unwrap();
        assert_eq!(g.download(&out1).unwrap(), g.download(&out2).unwrap(), "residual_rmsnorm_fwd vs rmsnorm_fwd(res) [{n},{c}]: out");
        assert_eq!(g.download(&r1).unwrap(), g.download(&r2).unwrap(), "residual_rmsnorm_fwd vs rmsnorm_fwd(res) [{n},{c}]: rstd");
        let dw1 = g.alloc(MemCategory::Other, Mem::Device, F32, &[c]).unwrap();
        let dw2 = g.alloc(MemCategory::Other, Mem::Device, F32, &[c]).unwrap();
        g.rmsnorm_bwd(&out2, &dw1, &delta, &res, &w, &r1, None, None).unwrap();
        let dx1 = g.download(&out2).unwrap();
        g.rmsnorm_bwd(&out2, &dw2, &delta, &res, &w, &r1, None, None).unwrap();
        assert_eq!(dx1, g.download(&out2).unwrap(), "rmsnorm_bwd dx deterministic [{n},{c}]");
        assert_eq!(g.download(&dw1).unwrap(), g.download(&dw2).unwrap(), "rmsnorm_bwd dw deterministic [{n},{c}]");
    }
}

fn attn_shape(b: usize, t: usize, hq: usize, hkv: usize, hd: usize) -> AttnShape {
    AttnShape { b, t, hq, hkv, hd }
}

#[test]
fn qk_norm_forward_backward() {
    let Some(mut p) = Pair::new(6) else { return };
    for &(s, d) in &[(attn_shape(2, 37, 4, 2, 64), F32), (attn_shape(1, 19, 6, 2, 128), BF16), (attn_shape(3, 5, 2, 1, 48), F32)] {
        let (n, q, hd) = (s.n(), s.qkv_width(), s.hd);
        let qkv = p.rand(d, &[n, q], 1.0);
        let qw = p.rand(d, &[hd], 1.0);
        let kw = p.rand(d, &[hd], 1.0);
        let out = p.out(d, &[n, q]);
        let rstd = p.out(F32, &[n, s.hq + s.hkv]);
        p.cpu.qk_norm_fwd(&out.c, &rstd.c, &qkv.c, &qw.c, &kw.c, s, 1e-6).unwrap();
        p.gpu.qk_norm_fwd(&out.g, &rstd.g, &qkv.g, &qw.g, &kw.g, s, 1e-6).unwrap();
        p.close_dt(&format!("qk_norm_fwd out {d} {s:?}"), &out);
        p.close_dt("qk_norm_fwd rstd", &rstd);
        let dout = p.rand(d, &[n, q], 1.0);
        let dqkv = p.out(d, &[n, q]);
        let dqw = p.rand(F32, &[hd], 1.0);
        let dkw = p.rand(F32, &[hd], 1.0);
        let am = p.out(F32, &[1]);
        p.cpu.qk_norm_bwd(&dqkv.c, &dqw.c, &dkw.c, &dout.c, &qkv.c, &qw.c, &kw.c, &rstd.c, s, Some(&am.c)).unwrap();
        p.gpu.qk_norm_bwd(&dqkv.g, &dqw.g, &dkw.g, &dout.g, &qkv.g, &qw.g, &kw.g, &rstd.g, s, Some(&am.g)).unwrap();
        p.close(&format!("qk_norm_bwd dqkv {d}"), &dqkv, common::tol(d).0, 1e-5);
        p.close(&format!("qk_norm_bwd absmax {d}"), &am, common::tol(d).0, 1e-6);
        p.close("qk_norm_bwd dqw", &dqw, 1e-5, 1e-6);
        p.close("qk_norm_bwd dkw", &dkw, 1e-5, 1e-6);
    }
}

/// `t`'s elements from `offset` on as a tensor of shape `dims` in both backends: views one
/// element past a 16-byte boundary take the generic kernels (the vector kernels need aligned rows).
fn view(t: &common::T2, offset: usize, dims: &[usize]) -> common::T2 {
    common::T2 { c: t.c.slice(offset, dims), g: t.g.slice(offset, dims) }
}

/// The inputs the fast memory-bound kernels do not take (unaligned pointers, fp8 inputs of the
/// reductions) run the generic kernels; each against the CPU. (Odd widths: the tests above.)
#[test]
fn generic_kernels_on_unaligned_and_fp8_inputs() {
    let Some(mut p) = Pair::new(17) else { return };
    let (n, c) = (13, 64);
    for d in [F32, BF16] {
        let xb = p.rand(d, &[n * c + 1], 1.5);
        let x = view(&xb, 1, &[n, c]);
        for dst in [F32, BF16, E4M3, E5M2] {
            if dst != d {
                let ob = p.out(dst, &[n * c + 1]);
                let o = view(&ob, 1, &[n, c]);
                p.cpu.convert(&o.c, &x.c).unwrap();
                p.gpu.convert(&o.g, &x.g).unwrap();
                p.exact(&format!("convert unaligned {d}->{dst}"), &o);
            }
        }
        let am = p.out(F32, &[1]);
        p.cpu.absmax(&am.c, &x.c).unwrap();
        p.gpu.absmax(&am.g, &x.g).unwrap();
        p.exact(&format!("absmax unaligned {d}"), &am);
        let qb = p.out(E4M3, &[n * c + 1]);
        let (q, ds) = (view(&qb, 1, &[n, c]), p.out(F32, &[1]));
        p.cpu.quantize(&q.c, &ds.c, &x.c, &am.c, false).unwrap();
        p.gpu.quantize(&q.g, &ds.g, &x.g, &am.g, false).unwrap();
        p.exact(&format!("quantize unaligned {d}"), &q);
        let ss = p.rand(F32, &[1], 1.0);
        p.cpu.sum_squares(&ss.c, 0, &x.c).unwrap();
        p.gpu.sum_squares(&ss.g, 0, &x.g).unwrap();
        p.close(&format!("sum_squares unaligned {d}"), &ss, 1e-6, 0.0);
        let cs = p.rand(F32, &[c], 1.0);
        p.cpu.colsum(&cs.c, &x.c, true).unwrap();
        p.gpu.colsum(&cs.g, &x.g, true).unwrap();
        p.close(&format!("colsum unaligned {d}"), &cs, 1e-6, 1e-7);
        // rmsnorm: the runtime-dtype team kernel (same summation order as the typed one)
        let w = p.rand(d, &[c], 1.0);
        let (ob, rstd) = (p.out(d, &[n * c + 1]), p.out(F32, &[n]));
        let o = view(&ob, 1, &[n, c]);
        p.cpu.rmsnorm_fwd(&o.c, &rstd.c, &x.c, &w.c, 1e-5, None).unwrap();
        p.gpu.rmsnorm_fwd(&o.g, &rstd.g, &x.g, &w.g, 1e-5, None).unwrap();
        p.close_dt(&format!("rmsnorm_fwd unaligned {d}"), &o);
        // swiglu: up|gate rows of 2 x 32
        let (hb, dh) = (p.out(d, &[n * c / 2 + 1]), p.rand(d, &[n, c / 2], 1.0));
        let h = view(&hb, 1, &[n, c / 2]);
        p.cpu.swiglu_fwd(&h.c, &x.c, None).unwrap();
        p.gpu.swiglu_fwd(&h.g, &x.g, None).unwrap();
        p.close_dt(&format!("swiglu_fwd unaligned {d}"), &h);
        let gb = p.out(d, &[n * c + 1]);
        let g = view(&gb, 1, &[n, c]);
        p.cpu.swiglu_bwd(&g.c, &dh.c, &x.c, None).unwrap();
        p.gpu.swiglu_bwd(&g.g, &dh.g, &x.g, None).unwrap();
        p.close_dt(&format!("swiglu_bwd unaligned {d}"), &g);
    }
    // RoPE over an unaligned qkv (Hd 64)
    let s = attn_shape(1, 5, 2, 1, 64);
    let q = s.qkv_width();
    let fr: Vec<f32> = (0..s.t * 32).flat_map(|i| {
        let a = (i / 32) as f32 * 10000f32.powf(-((2 * (i % 32)) as f32) / 64.0);
        [a.cos(), a.sin()]
    }).collect();
    let freqs = p.vals(F32, &[s.t, 32, 2], &fr);
    let xb = p.rand(BF16, &[s.n() * q + 1], 1.0);
    let ob = p.out(BF16, &[s.n() * q + 1]);
    let (x, o) = (view(&xb, 1, &[s.n(), q]), view(&ob, 1, &[s.n(), q]));
    p.cpu.rope_fwd(&o.c, &x.c, &freqs.c, s, None).unwrap();
    p.gpu.rope_fwd(&o.g, &x.g, &freqs.g, s, None).unwrap();
    p.exact("rope_fwd unaligned", &o);
    // reductions over fp8 tensors: the vector kernels take f32 and bf16 only
    for d in [E4M3, E5M2] {
        let x = p.rand(d, &[n, c], 2.0);
        let am = p.out(F32, &[1]);
        p.cpu.absmax(&am.c, &x.c).unwrap();
        p.gpu.absmax(&am.g, &x.g).unwrap();
        p.exact(&format!("absmax {d}"), &am);
        let ss = p.rand(F32, &[1], 1.0);
        p.cpu.sum_squares(&ss.c, 0, &x.c).unwrap();
        p.gpu.sum_squares(&ss.g, 0, &x.g).unwrap();
        p.close(&format!("sum_squares {d}"), &ss, 1e-6, 0.0);
    }
}

#[test]
fn rope_forward_backward() {
    let Some(mut p) = Pair::new(7) else { return };
    for &(s, d) in &[(attn_shape(2, 37, 4, 2, 64), F32), (attn_shape(2, 37, 14, 2, 64), BF16), (attn_shape(1, 10, 3, 1, 128), BF16)] {
        let (n, q, hd) = (s.n(), s.qkv_width(), s.hd);
        let mut fr = vec![0f32; s.t * hd];
        for t in 0..s.t {
            for i in 0..hd / 2 {
                let ang = t as f32 * (10000f32).powf(-((2 * i) as f32) / hd as f32);
                fr[(t * hd / 2 + i) * 2] = ang.cos();
                fr[(t * hd / 2 + i) * 2 + 1] = ang.sin();
            }
        }
        let freqs = p.vals(F32, &[s.t, hd / 2, 2], &fr);
        let x = p.rand(d, &[n, q], 1.0);
        let out = p.out(d, &[n, q]);
        p.cpu.rope_fwd(&out.c, &x.c, &freqs.c, s, None).unwrap();
        p.gpu.rope_fwd(&out.g, &x.g, &freqs.g, s, None).unwrap();
        p.exact(&format!("rope_fwd {d} {s:?}"), &out);
        // the QKV bias fused into the forward (f32 and bf16 biases; the generic kernel for f32)
        for bd in [F32, BF16] {
            let bias = p.rand(bd, &[q], 1.0);
            p.cpu.rope_fwd(&out.c, &x.c, &freqs.c, s, Some(&bias.c)).unwrap();
            p.gpu.rope_fwd(&out.g, &x.g, &freqs.g, s, Some(&bias.g)).unwrap();
            p.exact(&format!("rope_fwd {d} + {bd} bias {s:?}"), &out);
        }
        let am = p.out(F32, &[1]);
        p.cpu.rope_bwd(&out.c, &x.c, &freqs.c, s, Some(&am.c)).unwrap();
        p.gpu.rope_bwd(&out.g, &x.g, &freqs.g, s, Some(&am.g)).unwrap();
        p.exact(&format!("rope_bwd {d}"), &out);
        p.exact("rope_bwd absmax", &am);
    }
}

#[test]
fn swiglu_forward_backward() {
    let Some(mut p) = Pair::new(8) else { return };
    for &(n, dd) in &[(77, 100), (3, 4864)] {
        for d in [F32, BF16] {
            let inp = p.rand(d, &[n, 2 * dd], 2.0);
            let out = p.out(d, &[n, dd]);
            let am = p.out(F32, &[1]);
            p.cpu.swiglu_fwd(&out.c, &inp.c, Some(&am.c)).unwrap();
            p.gpu.swiglu_fwd(&out.g, &inp.g, Some(&am.g)).unwrap();
            p.close_dt(&format!("swiglu_fwd {d} [{n},{dd}]"), &out);
            p.close_dt("swiglu_fwd absmax", &am);
            let dout = p.rand(d, &[n, dd], 1.0);
            let dinp = p.out(d, &[n, 2 * dd]);
            p.cpu.swiglu_bwd(&dinp.c, &dout.c, &inp.c, Some(&am.c)).unwrap();
            p.gpu.swiglu_bwd(&dinp.g, &dout.g, &inp.g, Some(&am.g)).unwrap();
            p.close_dt(&format!("swiglu_bwd {d}"), &dinp);
            p.close_dt("swiglu_bwd absmax", &am);
        }
    }
}

#[test]
fn cross_entropy_in_place() {
    let Some(mut p) = Pair::new(9) else { return };
    // V = 1001 and 50257: rows start at every alignment (scalar head and tail of the vector kernel)
    for &(r, v, z) in &[(37, 1000, 0.0), (4, 151936, 1e-4), (9, 1001, 0.0), (3, 50257, 0.0), (5, 1001, 1e-2)] {
        for d in [F32, BF16] {
            let logits = p.rand(d, &[r, v], 3.0);
            let tg: Vec<i32> = (0..r).map(|i| if i % 7 == 3 { -100 } else { p.rng.below(v) as i32 }).collect();
            let targets = p.i32s(&[r], &tg);
            let losses = p.out(F32, &[r]);
            p.cpu.cross_entropy(&logits.c, &losses.c, &targets.c, 1.0 / r as f32, z).unwrap();
            p.gpu.cross_entropy(&logits.g, &losses.g, &targets.g, 1.0 / r as f32, z).unwrap();
            p.close(&format!("cross_entropy losses {d} [{r},{v}] z {z}"), &losses, 1e-5, 1e-6);
            let (rt, _) = common::tol(d);
            p.close(&format!("cross_entropy dlogits {d}"), &logits, rt.max(1e-5), 1e-9);
        }
    }
    // a target outside 0..V cannot be an error from the device: its row becomes NaN, loss too
    for d in [F32, BF16] {
        let logits = p.rand(d, &[3, 1000], 3.0);
        let targets = p.i32s(&[3], &[5, 1000, 7]);
        let losses = p.out(F32, &[3]);
        p.gpu.cross_entropy(&logits.g, &losses.g, &targets.g, 1.0, 0.0).unwrap();
        let l = decode(F32, &p.gpu.download(&losses.g).unwrap());
        let g = decode(d, &p.gpu.download(&logits.g).unwrap());
        let ok = l[0].is_finite() && l[1].is_nan() && l[2].is_finite() && g[1000..2000].iter().all(|x| x.is_nan()) && g[..1000].iter().chain(&g[2000..]).all(|x| x.is_finite());
        if !ok {
            p.failures.borrow_mut().push(format!("cross_entropy {d} with target 1000 of V 1000: losses {l:?}"));
        }
    }
}

#[test]
fn colsum_absmax_sum_squares() {
    let Some(mut p) = Pair::new(10) else { return };
    for &(r, c) in &[(77, 100), (4096, 37), (1, 5), (4096, 128), (300, 1152), (3, 8)] {
        for d in [F32, BF16] {
            let inp = p.rand(d, &[r, c], 1.0);
            for acc in [false, true] {
                let out = p.rand(F32, &[c], 1.0);
                p.cpu.colsum(&out.c, &inp.c, acc).unwrap();
                p.gpu.colsum(&out.g, &inp.g, acc).unwrap();
                p.close(&format!("colsum {d} [{r},{c}] accumulate={acc}"), &out, 1e-6, 1e-7);
            }
            let out = p.rand(BF16, &[c], 1.0);
            p.cpu.colsum(&out.c, &inp.c, true).unwrap();
            p.gpu.colsum(&out.g, &inp.g, true).unwrap();
            p.close_dt("colsum into bf16", &out);
            let am = p.out(F32, &[1]);
            p.cpu.absmax(&am.c, &inp.c).unwrap();
            p.gpu.absmax(&am.g, &inp.g).unwrap();
            p.exact("absmax", &am);
            let ss = p.rand(F32, &[4], 1.0);
            p.cpu.sum_squares(&ss.c, 2, &inp.c).unwrap();
            p.gpu.sum_squares(&ss.g, 2, &inp.g).unwrap();
            p.close(&format!("sum_squares {d}"), &ss, 1e-6, 0.0);
        }
    }
    // determinism: the same bits twice
    let inp = p.rand(F32, &[1 << 20], 1.0);
    let a = p.out(F32, &[2]);
    p.gpu.sum_squares(&a.g, 0, &inp.g).unwrap();
    p.gpu.sum_squares(&a.g, 1, &inp.g).unwrap();
    let v = decode(F32, &p.gpu.download(&a.g).unwrap());
    assert_eq!(v[0].to_bits(), v[1].to_bits());
}

fn adamw_case(p: &mut Pair, master_dt: DType, params_dt: Option<DType>, mv_dt: DType, nseg: usize, pad: usize) {
    // segments with alignment gaps and alternating decay
    let mut segs = Vec::new();
    let mut off = 0;
    for s in 0..nseg {
        let len = 37 + 91 * (s % 5) + if s == 0 { 5000 } else { 0 };
        segs.push(Segment { offset: off, len, decay: s % 2 == 0 });
        off += len.div_ceil(pad) * pad;
    }
    let n = off;
    let master = p.rand(master_dt, &[n], 0.5);
    let params = params_dt.map(|d| p.rand(d, &[n], 0.5));
    let grads = p.rand(BF16, &[n], 0.1);
    let m = p.rand(mv_dt, &[n], 0.01);
    let vv: Vec<f32> = (0..n).map(|_| p.rng.uniform() * 1e-3).collect();
    let v = p.vals(mv_dt, &[n], &vv);
    let am = p.out(F32, &[nseg]);
    for step in [1u64, 7] {
        // the per-step scalars come from device memory on both backends
        let words = AdamStep { lr: 1e-3, step, grad_scale: 0.7, seed: 1234 + (step << 40) }.bytes(0.9, 0.95).unwrap();
        let sc = p.bytes(DType::I32, &[ADAM_SCALARS], &words);
        for (cpu, t) in [(true, 0), (false, 1)] {
            let _ = t;
            let pick = |x: &common::T2| if cpu { x.c } else { x.g };
            let pm = pick(&master);
            let pp = params.as_ref().map(pick).unwrap_or(pm);
            let args = AdamW {
                params: &pp,
                master: &pm,
                grads: &pick(&grads),
                m: &pick(&m),
                v: &pick(&v),
                scalars: &pick(&sc),
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                absmax: Some(&pick(&am)),
            };
            if cpu {
                p.cpu.adamw(&args, &segs).unwrap();
            } else {
                p.gpu.adamw(&args, &segs).unwrap();
            }
        }
    }
    let tag = format!("adamw master {master_dt} params {params_dt:?} m/v {mv_dt} {nseg} segments");
    p.exact(&format!("{tag}: master"), &master);
    if let Some(pp) = &params {
        p.exact(&format!("{tag}: params"), pp);
    }
    p.exact(&format!("{tag}: m"), &m);
    p.exact(&format!("{tag}: v"), &v);
    p.exact(&format!("{tag}: absmax"), &am);
}

/// Write-combined pinned host memory (`--write-combined`): accounted apart, uploads and
/// downloads (through the device) round-trip, the copy engines move it both ways, and the AdamW
/// op updating master, m and v in place there (`--zero-copy`) or in ordinary pinned memory gives
/// the bits of the same update in device memory.
#[test]
fn write_combined_host_memory_copies_and_feeds_the_optimizer_in_place() {
    let Some(mut p) = Pair::new(12) else { return };
    let n = 20_000;
    // values in [-0.1, 0.1]; v, a second moment, takes their absolute values
    let vals = |seed: u32| -> Vec<f32> { (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 * 1e-4 - 0.1).collect() };
    let g = &mut p.gpu;
    let v: Vec<f32> = vals(4).iter().map(|x| x.abs()).collect();
    let init = [encode(F32, &vals(1)), encode(BF16, &vals(2)), encode(F32, &vals(3)), encode(F32, &v)];
    let dts = [F32, BF16, F32, F32]; // master, grads, m, v
    let mut sets = vec![];
    for mem in [Mem::Device, Mem::Host, Mem::HostWriteCombined] {
        let ts: Vec<_> = dts.iter().zip(&init).map(|(dt, b)| {
            let t = g.alloc(MemCategory::AdamM, mem, *dt, &[n]).unwrap();
            g.upload(&t, b).unwrap();
            t
        }).collect();
        sets.push(ts);
    }
    let wc = &sets[2];
    assert_eq!(g.download(&wc[1]).unwrap(), init[1], "write-combined round trip");
    let dev = g.alloc(MemCategory::Activations, Mem::Device, BF16, &[n]).unwrap();
    g.copy(&dev, &wc[1], Stream::Copy).unwrap();
    g.synchronize().unwrap();
    assert_eq!(g.download(&dev).unwrap(), init[1], "write-combined host -> device");
    g.copy(&wc[1], &dev, Stream::CopyBack).unwrap();
    g.synchronize().unwrap();
    assert_eq!(g.download(&wc[1]).unwrap(), init[1], "device -> write-combined host");
    assert!(g.memory_by_category().iter().any(|&(c, m, b)| c == MemCategory::AdamM && m == Mem::HostWriteCombined && b == n * (4 + 2 + 4 + 4)));
    let segs = [Segment { offset: 0, len: n / 2, decay: true }, Segment { offset: n / 2, len: n - n / 2, decay: false }];
    let scalars: Vec<_> = [1u64, 2]
        .iter()
        .map(|&step| {
            let t = g.alloc(MemCategory::Activations, Mem::Device, DType::I32, &[ADAM_SCALARS]).unwrap();
            g.upload(&t, &AdamStep { lr: 1e-3, step, grad_scale: 0.5, seed: 9 }.bytes(0.9, 0.95).unwrap()).unwrap();
            t
        })
        .collect();
    for ts in &sets {
        for sc in &scalars {
            let args = AdamW { params: &ts[0], master: &ts[0], grads: &ts[1], m: &ts[2], v: &ts[3], scalars: sc, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, absmax: None };
            g.adamw(&args, &segs).unwrap();
        }
    }
    for (i, name) in ["master", "grads", "m", "v"].iter().enumerate() {
        let want = g.download(&sets[0][i]).unwrap();
        for (k, mem) in [(1, Mem::Host), (2, Mem::HostWriteCombined)] {
            assert!(g.download(&sets[k][i]).unwrap() == want, "adamw in place in {mem:?}: {name} differs from the device update");
        }
    }
}

#[test]
fn adamw_matches_cpu_bitwise() {
    let Some(mut p) = Pair::new(11) else { return };
    adamw_case(&mut p, F32, None, F32, 5, 64);
    adamw_case(&mut p, BF16, None, BF16, 3, 64);
    adamw_case(&mut p, F32, Some(BF16), BF16, 9, 64);
    adamw_case(&mut p, F32, None, F32, 20, 64); // more than one launch's segment table
    // segments packed without gaps: starts at every alignment (partial vector chunks at both ends)
    adamw_case(&mut p, F32, Some(BF16), F32, 6, 1);
    adamw_case(&mut p, BF16, None, BF16, 4, 1);
    adamw_case(&mut p, BF16, Some(F32), F32, 3, 3);
}

#[allow(clippy::too_many_arguments)]
fn mm_case(p: &mut Pair, m: usize, n: usize, k: usize, ta: bool, tb: bool, dt: DType, out_dt: DType, bias: bool, acc: bool, tol: f64) {
    let a = p.rand(dt, &if ta { [k, m] } else { [m, k] }, 1.0);
    let b = p.rand(dt, &if tb { [n, k] } else { [k, n] }, 1.0);
    let bias_t = bias.then(|| p.rand(out_dt, &[n], 1.0));
    let out = p.rand(out_dt, &[m, n], 1.0);
    for cpu in [true, false] {
        let pick = |x: &common::T2| if cpu { x.c } else { x.g };
        let (oa, ob, oo) = (pick(&a), pick(&b), pick(&out));
        let ob_bias = bias_t.as_ref().map(pick);
        let args = Matmul { out: &oo, a: &oa, trans_a: ta, b: &ob, trans_b: tb, bias: ob_bias.as_ref(), accumulate: acc, descale_a: None, descale_b: None, side_algo: false, fast_accumulation: false };
        if cpu {
            p.cpu.matmul(&args).unwrap();
        } else if let Err(e) = p.gpu.matmul(&args) {
            p.fail(format!("matmul {dt}->{out_dt} M={m} N={n} K={k} ta={ta} tb={tb} bias={bias} acc={acc}: {e}"));
            return;
        }
    }
    p.rel(&format!("matmul {dt}->{out_dt} M={m} N={n} K={k} ta={ta} tb={tb} bias={bias} acc={acc}"), &out, tol);
}

#[test]
fn matmul_bf16_f32_all_transposes() {
    let Some(mut p) = Pair::new(12) else { return };
    for &(m, n, k) in &[(77, 48, 100), (130, 200, 64), (5, 8, 3)] {
        for ta in [false, true] {
            for tb in [false, true] {
                mm_case(&mut p, m, n, k, ta, tb, F32, F32, false, false, 1e-5);
                mm_case(&mut p, m, n, k, ta, tb, BF16, BF16, false, false, 1e-2);
                mm_case(&mut p, m, n, k, ta, tb, BF16, F32, false, true, 1e-5);
            }
        }
        mm_case(&mut p, m, n, k, false, true, BF16, BF16, true, false, 1e-2);
        mm_case(&mut p, m, n, k, false, true, F32, F32, true, true, 1e-5);
        mm_case(&mut p, m, n, k, true, false, BF16, BF16, false, true, 1e-2);
    }
    // bias: the vector kernel (N a multiple of 8) and the generic one (N = 37)
    for &(m, n, k) in &[(300, 1152, 96), (40, 37, 16)] {
        for acc in [false, true] {
            mm_case(&mut p, m, n, k, false, true, BF16, BF16, true, acc, 1e-2);
            mm_case(&mut p, m, n, k, false, true, F32, F32, true, acc, 1e-5);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fp8_case(p: &mut Pair, m: usize, n: usize, k: usize, da: DType, db: DType, out_dt: DType, bias_dt: Option<DType>, acc: bool, fast: bool) -> Result<f64, String> {
    // quantize real operands on both backends (bit-exact, tested above), then multiply
    let a32 = p.rand(F32, &[m, k], 1.0);
    let b32 = p.rand(F32, &[n, k], 0.05);
    let mut q = |src: &common::T2, d: DType, dims: [usize; 2]| {
        let am = p.out(F32, &[1]);
        let ds = p.out(F32, &[1]);
        let out = p.out(d, &dims);
        p.cpu.absmax(&am.c, &src.c).unwrap();
        p.gpu.absmax(&am.g, &src.g).unwrap();
        p.cpu.quantize(&out.c, &ds.c, &src.c, &am.c, false).unwrap();
        p.gpu.quantize(&out.g, &ds.g, &src.g, &am.g, false).unwrap();
        (out, ds)
    };
    let (a, da_s) = q(&a32, da, [m, k]);
    let (b, db_s) = q(&b32, db, [n, k]);
    let bias = bias_dt.map(|d| p.rand(d, &[n], 1.0));
    let out = p.rand(out_dt, &[m, n], 1.0);
    for cpu in [true, false] {
        let pick = |x: &common::T2| if cpu { x.c } else { x.g };
        let (oa, ob, oo, sa, sb) = (pick(&a), pick(&b), pick(&out), pick(&da_s), pick(&db_s));
        let obias = bias.as_ref().map(pick);
        let args = Matmul { out: &oo, a: &oa, trans_a: false, b: &ob, trans_b: true, bias: obias.as_ref(), accumulate: acc, descale_a: Some(&sa), descale_b: Some(&sb), side_algo: false, fast_accumulation: fast };
        if cpu {
            p.cpu.matmul(&args).unwrap();
        } else {
            p.gpu.matmul(&args).map_err(|e| e.to_string())?;
        }
    }
    // Hopper's fp8 tensor cores add products with about 14 significant bits before the f32
    // accumulator takes over, so an f32 output differs from the exact f32 product by ~1e-4;
    // without promotion (fast accumulation) the whole sum is kept that way.
    let tol = match (out_dt, fast) {
        (F32, false) => 5e-4,
        (F32, true) => 3e-3,
        _ => 1e-2,
    };
    Ok(p.rel(&format!("fp8 matmul {da}x{db}->{out_dt} M={m} N={n} K={k} bias={bias_dt:?} acc={acc} fast={fast}"), &out, tol))
}

#[test]
fn matmul_fp8_tn() {
    let Some(mut p) = Pair::new(13) else { return };
    let mut failures = Vec::new();
    for &(m, n, k) in &[(128, 64, 96), (77, 48, 160), (256, 896, 128)] {
        for (da, db) in [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)] {
            for out_dt in [BF16, F32] {
                for bias in [None, Some(BF16)] {
                    for acc in [false, true] {
                        if let Err(e) = fp8_case(&mut p, m, n, k, da, db, out_dt, bias, acc, false) {
                            println!("UNSUPPORTED fp8 {da}x{db}->{out_dt} M={m} N={n} K={k} bias={bias:?} acc={acc}: {e}");
                            failures.push(e);
                        }
                    }
                }
            }
        }
    }
    // The configurations the model uses must work: e4m3 x e4m3 -> bf16 (no bias, with bias,
    // accumulate) and e5m2 gradients x e4m3.
    // With fast accumulation (--fp8-fast-accumulation) as well, also over a long sum.
    for (da, db, out_dt, bias, acc) in [(E4M3, E4M3, BF16, None, false), (E4M3, E4M3, BF16, Some(BF16), false), (E5M2, E4M3, BF16, None, false), (E4M3, E4M3, F32, None, true)] {
        for (fast, k) in [(false, 96), (false, 4096), (true, 96), (true, 4096)] {
            if let Err(e) = fp8_case(&mut p, 128, 64, k, da, db, out_dt, bias, acc, fast) {
                p.fail(format!("required fp8 configuration {da}x{db}->{out_dt} bias {bias:?} acc {acc} fast {fast} K {k}: {e}"));
            }
        }
    }
    println!("fp8 configurations refused: {}", failures.len());
    // a non-TN fp8 layout is a clear op error
    let a = p.rand(E4M3, &[32, 64], 1.0);
    let b = p.rand(E4M3, &[64, 16], 1.0);
    let o = p.out(BF16, &[32, 16]);
    let s = p.vals(F32, &[1], &[1.0]);
    let r = p.gpu.matmul(&Matmul { out: &o.g, a: &a.g, trans_a: false, b: &b.g, trans_b: false, bias: None, accumulate: false, descale_a: Some(&s.g), descale_b: Some(&s.g), side_algo: false, fast_accumulation: false });
    assert!(matches!(r, Err(llmq_core::Error::Op(_))), "{r:?}");
}

fn attention_case(p: &mut Pair, s: AttnShape, d: DType, imp: llmq_core::AttentionKernels) {
    p.gpu.set_attention_kernels(imp);
    let (n, q) = (s.n(), s.qkv_width());
    let qkv = p.rand(d, &[n, q], 1.0);
    let out = p.out(d, &[n, s.out_width()]);
    let lse = p.out(F32, &[s.b, s.hq, s.t]);
    p.cpu.attention_fwd(&out.c, &lse.c, &qkv.c, s, None).unwrap();
    p.gpu.attention_fwd(&out.g, &lse.g, &qkv.g, s, None).unwrap();
    let kind = format!("{imp:?}");
    let (tf, tb) = if d == F32 { (1e-5, 1e-4) } else { (1e-2, 2e-2) };
    p.rel(&format!("attention_fwd {kind} {d} {s:?}: out"), &out, tf);
    p.close(&format!("attention_fwd {kind} {d}: lse"), &lse, 1e-4, 1e-4);
    // backward from the CPU's forward output (same inputs on both sides)
    let (oc, _) = p.raw(&out);
    p.gpu.upload(&out.g, &oc).unwrap();
    let (lc, _) = p.raw(&lse);
    p.gpu.upload(&lse.g, &lc).unwrap();
    let dout = p.rand(d, &[n, s.out_width()], 1.0);
    let dqkv = p.out(d, &[n, q]);
    p.cpu.attention_bwd(&dqkv.c, &dout.c, &qkv.c, &out.c, &lse.c, s, None, None).unwrap();
    p.gpu.attention_bwd(&dqkv.g, &dout.g, &qkv.g, &out.g, &lse.g, s, None, None).unwrap();
    p.rel(&format!("attention_bwd {kind} {d} {s:?}: dqkv"), &dqkv, tb);
    // deterministic
    let first = p.gpu.download(&dqkv.g).unwrap();
    p.gpu.attention_bwd(&dqkv.g, &dout.g, &qkv.g, &out.g, &lse.g, s, None, None).unwrap();
    if first != p.gpu.download(&dqkv.g).unwrap() {
        p.fail(format!("attention_bwd {kind} {d} {s:?} is not deterministic"));
    }
}

/// The simple kernels in f32 and at head sizes the tensor-core kernels do not take (48, 256); the
/// tensor-core kernels: tests/attention.rs.
#[test]
fn attention_simple_kernels() {
    let Some(mut p) = Pair::new(14) else { return };
    use llmq_core::AttentionKernels::Simple;
    attention_case(&mut p, attn_shape(2, 37, 4, 2, 64), F32, Simple);
    attention_case(&mut p, attn_shape(1, 70, 3, 1, 48), F32, Simple);
    attention_case(&mut p, attn_shape(2, 37, 4, 2, 128), BF16, Simple);
    attention_case(&mut p, attn_shape(1, 20, 2, 2, 256), F32, Simple);
}

/// `attention_decode` (kernels/decode.cu) against the CPU op: a prompt piece, then single rows
/// and an uneven piece, over caches longer than used; the caches' bytes must agree exactly (the
/// new keys and values are copies rounded to the cache dtype) and positions past the end stay
/// untouched. Head sizes 64 and 256 take the two kernel widths.
#[test]
fn attention_decode_matches_cpu() {
    let Some(mut p) = Pair::new(15) else { return };
    for (s, d) in [(attn_shape(2, 0, 6, 2, 64), F32), (attn_shape(1, 0, 14, 2, 64), BF16), (attn_shape(1, 0, 4, 4, 256), F32), (attn_shape(3, 0, 2, 1, 48), BF16)] {
        let (q, kv, cap) = (s.qkv_width(), s.hkv * s.hd, 300);
        let kc = p.vals(d, &[s.b, cap, kv], &vec![3.0; s.b * cap * kv]);
        let vc = p.vals(d, &[s.b, cap, kv], &vec![-3.0; s.b * cap * kv]);
        let mut pos = 0;
        for t in [37, 1, 1, 5, 1, 200] {
            let st = AttnShape { t, ..s };
            let qkv = p.rand(d, &[st.n(), q], 1.0);
            let out = p.out(d, &[st.n(), st.out_width()]);
            p.cpu.attention_decode(&out.c, &qkv.c, &kc.c, &vc.c, pos, st).unwrap();
            p.gpu.attention_decode(&out.g, &qkv.g, &kc.g, &vc.g, pos, st).unwrap();
            p.rel(&format!("attention_decode {d} {st:?} at {pos}: out"), &out, if d == F32 { 1e-5 } else { 1e-2 });
            pos += t;
        }
        p.exact(&format!("attention_decode {d} {s:?}: k cache"), &kc);
        p.exact(&format!("attention_decode {d} {s:?}: v cache"), &vc);
        let bad = p.out(d, &[s.b, s.out_width()]);
        let one = p.rand(d, &[s.b, q], 1.0);
        let e = p.gpu.attention_decode(&bad.g, &one.g, &kc.g, &vc.g, cap, AttnShape { t: 1, ..s });
        assert!(e.is_err_and(|e| e.to_string().contains("do not fit the cache")));
    }
}

/// The side stream (its own workspace, an SM-count target) runs a matmul to the same bits as the
/// compute stream: weight-gradient shapes of the fp8 models (K = tokens, accumulating) and a bf16
/// one. Ops that need the backend's scratch refuse the side stream; no op runs on the copy stream.
#[test]
fn side_stream_matmuls_match_the_compute_stream_bitwise() {
    let Some(g) = common::gpu_or_skip() else { return };
    let mut g = g;
    let mut rng = common::Rng::new(21);
    // random bytes of normal, moderate numbers (no NaN or infinity codes)
    let mut bytes = |n: usize, dt: DType| -> Vec<u8> {
        let mut v: Vec<u8> = (0..(n * dt.size()).div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
        v.truncate(n * dt.size());
        if dt.is_fp8() {
            v.iter_mut().for_each(|b| *b &= 0xb7); // exponent below the top: no NaN/inf
        } else {
            let w = dt.size();
            v.chunks_mut(w).for_each(|c| c[w - 1] = (c[w - 1] & 0x80) | 0x3e); // |x| in [0.125, 1)
        }
        v
    };
    // with `side_algo` (as the model's weight gradients) and without (the side stream then runs
    // the compute stream's algorithm with its SM target)
    let cases = [(1536, 8960, 16384, E4M3, true), (17920, 1536, 8192, E4M3, true), (2048, 1536, 8192, E4M3, true), (1536, 8960, 16384, E4M3, false), (896, 4864, 4096, BF16, false), (896, 4864, 4096, BF16, true), (17920, 1536, 8192, BF16, true)];
    for &(m, n, k, dt, side_algo) in &cases {
        let fp8 = dt.is_fp8();
        let mut t = |dt: DType, dims: &[usize], g: &mut llmq_cuda::CudaBackend| {
            let t = g.alloc(MemCategory::Other, Mem::Device, dt, dims).unwrap();
            g.upload(&t, &bytes(dims.iter().product(), dt)).unwrap();
            t
        };
        // fp8 needs the TN layout (a [M, K], b [N, K]); the bf16 case is the wgrad's (a [K, M])
        let a = if fp8 { t(dt, &[m, k], &mut g) } else { t(dt, &[k, m], &mut g) };
        let b = if fp8 { t(dt, &[n, k], &mut g) } else { t(dt, &[k, n], &mut g) };
        let init = t(F32, &[m, n], &mut g);
        let outs = [0, 1].map(|_| g.alloc(MemCategory::Other, Mem::Device, F32, &[m, n]).unwrap());
        let ds = g.alloc(MemCategory::Other, Mem::Device, F32, &[1]).unwrap();
        g.upload(&ds, &0.01f32.to_le_bytes()).unwrap();
        let ev = g.create_event().unwrap();
        for (o, stream) in outs.iter().zip([Stream::Compute, Stream::Side]) {
            g.copy(o, &init, Stream::Compute).unwrap();
            g.record(ev, Stream::Compute).unwrap();
            g.wait(stream, ev).unwrap();
            let mm = if fp8 {
                Matmul { descale_a: Some(&ds), descale_b: Some(&ds), accumulate: true, ..Matmul::linear(o, &a, &b) }
            } else {
                Matmul::linear_wgrad(o, &a, &b)
            };
            let mm = Matmul { side_algo, ..mm };
            g.set_stream(stream).unwrap();
            g.matmul(&mm).unwrap();
            g.set_stream(Stream::Compute).unwrap();
        }
        g.synchronize().unwrap();
        let (c, sd) = (g.download(&outs[0]).unwrap(), g.download(&outs[1]).unwrap());
        assert!(c != g.download(&init).unwrap(), "{dt} M={m} N={n} K={k}: the matmul did not run");
        assert!(c == sd, "{dt} M={m} N={n} K={k} side_algo {side_algo}: the side stream's result differs from the compute stream's");
    }
    // scratch users refuse the side stream; nothing runs on the copy stream
    let x = g.alloc(MemCategory::Other, Mem::Device, F32, &[64, 32]).unwrap();
    let o = g.alloc(MemCategory::Other, Mem::Device, F32, &[32]).unwrap();
    g.set_stream(Stream::Side).unwrap();
    let e = g.colsum(&o, &x, false).unwrap_err().to_string();
    g.set_stream(Stream::Compute).unwrap();
    assert!(e.contains("compute stream only"), "{e}");
    assert!(g.set_stream(Stream::Copy).is_err());
    g.colsum(&o, &x, false).unwrap();
}
