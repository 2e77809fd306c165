//! The fused FP8 up+gate GEMM with the SwiGLU epilogue (`CudaBackend::fp8_swiglu_matmul`, the
//! CUTLASS kernel of kernels/sm90/) against the unfused path it replaces: fp8 matmul into a bf16
//! [up | gate] buffer, then `swiglu_fwd`, on the CPU backend (the reference) and on the GPU
//! (cuBLASLt + the SwiGLU kernel), on random inputs and shapes that are not multiples of the
//! 128 x 256 x 128 tile. The weight row permutation and the launcher's refusals need no GPU.
//! The GPU test skips without a CUDA device (fails under LLMQ_REQUIRE_GPU=1); on a device that is
//! not compute capability 9.x it checks that the launcher refuses clearly.

mod common;

use common::{decode, Pair, Rng};
use llmq_core::{Backend, DType, Matmul, Mem, Shape, Tensor};
use llmq_cuda::{deinterleave_up_gate_rows, fp8_swiglu_check, fp8_swiglu_geometry, interleave_up_gate_rows, SM90_KERNELS_BUILT};

/// Tolerances of h (bf16) per operand dtype, against the unfused path. The fused kernel rounds
/// up and gate to bf16 as the plain matmul's output does, so the two differ only where the
/// f32 sums (another accumulation order; Hopper's fp8 tensor cores add with ~14 significant bits)
/// round to neighbouring bf16 values: one bf16 unit (2^-8 relative) in up or gate, which SwiGLU
/// carries into h amplified by up to 1 + |gate| (|gate| <= ~6 here), plus h's own rounding.
/// Elementwise: rtol, atol (atol relative to the rms of h); norm-wise: relative error.
const TOLERANCES: [(DType, f32, f32, f64); 1] = [(DType::E4M3, 1.0 / 16.0, 1.0 / 256.0, 1e-2)];

fn tolerance(d: DType) -> (f32, f32, f64) {
    let t = TOLERANCES.iter().find(|t| t.0 == d).expect("a tolerance for the operand dtype");
    (t.1, t.2, t.3)
}

#[test]
fn interleave_up_gate_rows_moves_pairs_together_and_inverts() {
    let mut rng = Rng::new(21);
    for &(d, row_bytes) in &[(1usize, 1usize), (3, 16), (37, 5), (64, 2)] {
        let src: Vec<u8> = (0..2 * d * row_bytes).map(|_| rng.next_u64() as u8).collect();
        let il = interleave_up_gate_rows(&src, d, row_bytes).unwrap();
        for j in 0..d {
            let row = |buf: &[u8], r: usize| buf[r * row_bytes..(r + 1) * row_bytes].to_vec();
            assert_eq!(row(&il, 2 * j), row(&src, j), "d {d}: interleaved row {} must be up row {j}", 2 * j);
            assert_eq!(row(&il, 2 * j + 1), row(&src, d + j), "d {d}: interleaved row {} must be gate row {j}", 2 * j + 1);
        }
        assert_eq!(deinterleave_up_gate_rows(&il, d, row_bytes).unwrap(), src, "d {d}: deinterleave must invert interleave");
    }
    let err = interleave_up_gate_rows(&[0u8; 10], 2, 3).unwrap_err().to_string();
    assert!(err.contains("10 bytes") && err.contains("2 * 2 * 3"), "{err}");
}

fn fake(addr: u64, dtype: DType, dims: &[usize]) -> Tensor {
    Tensor { addr, dtype, shape: Shape::new(dims), mem: Mem::Device }
}

/// Bad shapes, dtypes, alignment, memory spaces and aliasing are refused by the checks that run
/// before anything touches the device (addresses here are never dereferenced).
#[test]
fn fp8_swiglu_refuses_bad_inputs_before_launching() {
    let (n, d, k) = (37usize, 100usize, 48usize);
    let x = fake(0x10000, DType::E4M3, &[n, k]);
    let w = fake(0x20000, DType::E4M3, &[2 * d, k]);
    let h = fake(0x40000, DType::BF16, &[n, d]);
    let s = fake(0x50000, DType::F32, &[1]);
    let a = fake(0x50010, DType::F32, &[1]);
    assert_eq!(fp8_swiglu_check(&h, Some(&a), &x, &w, &s, &s).unwrap(), (n, d, k));
    let refuse = |h: &Tensor, amax: Option<&Tensor>, x: &Tensor, w: &Tensor, ds: &Tensor, want: &str| {
        let e = fp8_swiglu_check(h, amax, x, w, ds, ds).expect_err(want).to_string();
        assert!(e.contains("fp8_swiglu_matmul") && e.contains(want), "expected {want:?} in: {e}");
    };
    // K not a multiple of 16 (TMA row strides)
    refuse(&h, None, &fake(0x10000, DType::E4M3, &[n, 40]), &fake(0x20000, DType::E4M3, &[2 * d, 40]), &s, "K = 40 must be a positive multiple of 16");
    // misaligned operands
    refuse(&h, None, &fake(0x10008, DType::E4M3, &[n, k]), &w, &s, "x at 0x10008 is not 16-byte aligned");
    refuse(&h, None, &x, &fake(0x20004, DType::E4M3, &[2 * d, k]), &s, "w at 0x20004 is not 16-byte aligned");
    // dtypes
    refuse(&h, None, &fake(0x10000, DType::E5M2, &[n, k]), &w, &s, &format!("x must be {}", DType::E4M3));
    refuse(&fake(0x40000, DType::F32, &[n, d]), None, &x, &w, &s, &format!("h must be {}", DType::BF16));
    refuse(&h, None, &x, &w, &fake(0x50000, DType::BF16, &[1]), "descale_x");
    refuse(&h, Some(&fake(0x50010, DType::F32, &[2])), &x, &w, &s, "amax");
    // shapes
    refuse(&h, None, &x, &fake(0x20000, DType::E4M3, &[2 * d + 1, k]), &s, "do not agree");
    refuse(&fake(0x40000, DType::BF16, &[n + 1, d]), None, &x, &w, &s, "do not agree");
    refuse(&h, None, &fake(0x10000, DType::E4M3, &[n * k]), &w, &s, "x must be a matrix");
    // memory space and aliasing
    refuse(&h, None, &Tensor { mem: Mem::Host, ..x }, &w, &s, "x must be in device memory");
    refuse(&fake(0x20000 + 64, DType::BF16, &[n, d]), None, &x, &w, &s, "h overlaps w");
}

#[allow(clippy::too_many_arguments)]
fn unfused<B: Backend>(be: &B, x: &Tensor, w: &Tensor, dx: &Tensor, dw: &Tensor, up_gate: &Tensor, h: &Tensor, amax: &Tensor) -> llmq_core::Result<()> {
    be.matmul(&Matmul { descale_a: Some(dx), descale_b: Some(dw), ..Matmul::linear(up_gate, x, w) })?;
    be.swiglu_fwd(h, up_gate, Some(amax))
}

/// CUTLASS's host code (no device needed) accepts the shapes of the GPU test, asks for no
/// workspace, and gives a persistent grid of at most one block per SM (one 128 x 256 tile per
/// block at a time), 384 threads (a producer and two consumer warpgroups) and shared memory
/// within the 227 KiB a Hopper block may have; K not a multiple of 16 is refused by
/// can_implement too (the launcher refuses it earlier).
#[test]
fn fp8_swiglu_host_code_plans_the_launch() {
    if !SM90_KERNELS_BUILT {
        let e = fp8_swiglu_geometry(128, 128, 128, 132).expect_err("no sm90 kernels").to_string();
        assert!(e.contains("without the sm90 CUTLASS kernels"), "{e}");
        println!("SKIPPED: llmq-cuda was built without the sm90 CUTLASS kernels (no CUTLASS headers or LLMQ_NO_KERNELS)");
        return;
    }
    for &(n, d, k) in SHAPES.iter().chain(&[(16384, 4864, 896), (16384, 8960, 1536)]) {
        let tiles = n.div_ceil(128) * (2 * d).div_ceil(256);
        for sms in [1u32, 7, 132] {
            let (grid, block, smem, params) = fp8_swiglu_geometry(n, d, k, sms).unwrap_or_else(|e| panic!("N={n} D={d} K={k}: {e}"));
            let blocks = grid.iter().map(|&g| g as usize).product::<usize>();
            assert!(blocks >= 1 && blocks <= tiles.min(sms as usize), "N={n} D={d} K={k} SMs {sms}: grid {grid:?} for {tiles} tiles");
            assert_eq!(block, [384, 1, 1], "N={n} D={d} K={k}");
            assert!(smem > 0 && smem <= 227 * 1024, "shared memory {smem}");
            assert!(params > 0 && params <= 4096, "parameters {params} bytes");
            if n == 16384 && sms == 132 {
                println!("N={n} D={d} K={k}: grid {grid:?}, block {block:?}, {smem} bytes of shared memory, {params} parameter bytes");
            }
        }
    }
    let e = fp8_swiglu_geometry(64, 64, 40, 132).expect_err("K = 40").to_string();
    assert!(e.contains("cannot run") && e.contains("K = 40"), "{e}");
}

/// (N, D, K) of the GPU test: single elements, ragged tiles in every dimension, K below / between
/// / above the 128-deep k-block, more tiles than SMs (persistent scheduling), the 0.5B width.
const SHAPES: [(usize, usize, usize); 7] = [(1, 1, 16), (37, 100, 48), (130, 257, 144), (200, 128, 272), (256, 384, 128), (2048, 1216, 896), (333, 4864, 896)];

/// One case: random e4m3 x [N, K] and w [2D, K] (as the unfused path stores it), descales that
/// put the gate values in roughly [-6, 6]; h and its abs-max from the fused kernel against the
/// CPU's and the GPU's unfused path.
fn fused_case(p: &mut Pair, n: usize, d: usize, k: usize) {
    let name = format!("fp8_swiglu N={n} D={d} K={k}");
    let x = p.rand(DType::E4M3, &[n, k], 1.0);
    let w = p.rand(DType::E4M3, &[2 * d, k], 1.0);
    let dx = p.vals(DType::F32, &[1], &[0.5]);
    let dw = p.vals(DType::F32, &[1], &[4.0 / (k as f32).sqrt()]);
    // unfused: up_gate = x · wᵀ (bf16), h = swiglu(up_gate) with its abs-max
    let up_gate = p.out(DType::BF16, &[n, 2 * d]);
    let h = p.out(DType::BF16, &[n, d]);
    let amax = p.out(DType::F32, &[1]);
    unfused(&p.cpu, &x.c, &w.c, &dx.c, &dw.c, &up_gate.c, &h.c, &amax.c).unwrap();
    // (cuBLASLt's fp8 kernels may refuse output widths that are not multiples of 16 bytes: then
    // only the comparison with the CPU runs for this shape)
    let h_unfused_gpu = match unfused(&p.gpu, &x.g, &w.g, &dx.g, &dw.g, &up_gate.g, &h.g, &amax.g) {
        Ok(()) => Some(p.gpu.download(&h.g).unwrap()),
        Err(e) => {
            println!("{name}: cuBLASLt + swiglu_fwd not run ({e}); comparing with the CPU only");
            None
        }
    };
    // fused, into the GPU side of `h` / `amax` (garbage first, so that unwritten elements show)
    let (wc, _) = p.raw(&w);
    let wi = p.gpu.alloc(llmq_core::MemCategory::Other, Mem::Device, DType::E4M3, &[2 * d, k]).unwrap();
    p.gpu.upload(&wi, &interleave_up_gate_rows(&wc, d, k).unwrap()).unwrap();
    let garbage: Vec<u8> = (0..n * d * 2).map(|i| (i * 37 % 251) as u8).collect();
    p.gpu.upload(&h.g, &garbage).unwrap();
    p.gpu.upload(&amax.g, &7.0f32.to_le_bytes()).unwrap();
    if let Err(e) = p.gpu.fp8_swiglu_matmul(&h.g, Some(&amax.g), &x.g, &wi, &dx.g, &dw.g) {
        p.fail(format!("{name}: {e}"));
        return;
    }
    let (rtol, atol_rms, rel) = tolerance(DType::E4M3);
    let (hc, hg) = p.get(&h);
    let rms = (hc.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / hc.len() as f64).sqrt() as f32;
    p.close(&format!("{name}: h vs the CPU"), &h, rtol, atol_rms * rms);
    p.rel(&format!("{name}: h vs the CPU (norm)"), &h, rel);
    // against the GPU's unfused path, on the same elementwise terms
    if let Some(hu) = h_unfused_gpu.map(|b| decode(DType::BF16, &b)) {
        let off = hu.iter().zip(&hg).filter(|(u, g)| (*u - *g).abs() > atol_rms * rms + rtol * u.abs() || u.is_nan() != g.is_nan()).count();
        println!("{name}: {} of {} elements bit-identical to cuBLASLt + swiglu_fwd", hu.iter().zip(&hg).filter(|(u, g)| u.to_bits() == g.to_bits()).count(), hu.len());
        if off != 0 {
            p.fail(format!("{name}: {off} elements differ from cuBLASLt + swiglu_fwd beyond rtol {rtol}"));
        }
    }
    // the abs-max is exactly that of the stored h, and close to the CPU's
    let (ac, ag) = p.get(&amax);
    let stored = hg.iter().fold(0f32, |m, v| m.max(v.abs()));
    if ag[0].to_bits() != stored.to_bits() {
        p.fail(format!("{name}: abs-max {} is not the largest |h| stored ({stored})", ag[0]));
    }
    if (ag[0] - ac[0]).abs() > rtol * ac[0] {
        p.fail(format!("{name}: abs-max {} vs the CPU's {}", ag[0], ac[0]));
    }
}

#[test]
fn fp8_swiglu_matches_the_unfused_path() {
    let Some(mut p) = Pair::new(22) else { return };
    if p.gpu.compute_capability().0 != 9 {
        let t = p.out(DType::BF16, &[4, 4]);
        let x = p.rand(DType::E4M3, &[4, 16], 1.0);
        let w = p.rand(DType::E4M3, &[8, 16], 1.0);
        let s = p.vals(DType::F32, &[1], &[1.0]);
        let e = p.gpu.fp8_swiglu_matmul(&t.g, None, &x.g, &w.g, &s.g, &s.g).expect_err("refused off Hopper").to_string();
        assert!(e.contains("compute capability 9.x"), "{e}");
        println!("SKIPPED: fp8_swiglu_matmul needs compute capability 9.x; {} refused it: {e}", p.gpu.device_name());
        return;
    }
    for &(n, d, k) in &SHAPES {
        fused_case(&mut p, n, d, k);
    }
    // deterministic: a second run stores the same bits
    let (n, d, k) = (300, 700, 176);
    let x = p.rand(DType::E4M3, &[n, k], 1.0);
    let w = p.rand(DType::E4M3, &[2 * d, k], 1.0);
    let s = p.vals(DType::F32, &[1], &[0.25]);
    let h = p.out(DType::BF16, &[n, d]);
    let amax = p.out(DType::F32, &[1]);
    p.gpu.fp8_swiglu_matmul(&h.g, Some(&amax.g), &x.g, &w.g, &s.g, &s.g).unwrap();
    let first = (p.gpu.download(&h.g).unwrap(), p.gpu.download(&amax.g).unwrap());
    p.gpu.fp8_swiglu_matmul(&h.g, Some(&amax.g), &x.g, &w.g, &s.g, &s.g).unwrap();
    if first != (p.gpu.download(&h.g).unwrap(), p.gpu.download(&amax.g).unwrap()) {
        p.fail("fp8_swiglu_matmul is not deterministic".into());
    }
}
