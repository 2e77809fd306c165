//! Timings of the kernels at Qwen2.5-0.5B/1.5B sizes (prints tables; checks nothing): the main
//! matmuls and memory-bound ops, every matmul of a training micro-batch, and attention per kernel
//! family. Not a test: `cargo bench -p llmq-cuda --bench kernels -- [kernels] [matmuls]
//! [matmuls-tuning] [attention]` (default: all but matmuls-tuning), on a GPU (without one it says
//! so and exits). Times are medians of host-timed, synchronised repetitions after a warm-up, on
//! random (never zero) data. Whole-run throughput: scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{median_time, rand_tensor};
use llmq_core::{AttentionKernels, AttnShape, Backend, BackendOptions, DType, Matmul, Mem, MemCategory};
use llmq_cuda::CudaBackend;

fn main() {
    // cargo passes --bench; anything else names the sections to run
    let mut which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if which.is_empty() {
        which = ["kernels", "matmuls", "attention"].map(String::from).to_vec();
    }
    let Some(mut g) = common::gpu_or_skip() else { return };
    for w in &which {
        match w.as_str() {
            "kernels" => kernel_timings(&mut g),
            "matmuls" => training_matmuls(&mut g, "tuning embedded"),
            // what cuBLASLt's first heuristic answer leaves on the table: first answers against
            // the best of eight timed in the process (the table it writes is thrown away)
            "matmuls-tuning" => {
                let off = BackendOptions { matmul_tuning: llmq_core::backend_options::TUNING_OFF.into(), ..Default::default() };
                drop(g);
                g = CudaBackend::new(0, &off).unwrap();
                training_matmuls(&mut g, "first answers");
                let out = std::env::temp_dir().join(format!("llmq-bench-tune-{}.txt", std::process::id()));
                let tuned = BackendOptions { matmul_autotune: Some(out.display().to_string()), ..off };
                drop(g);
                g = CudaBackend::new(0, &tuned).unwrap();
                training_matmuls(&mut g, "autotuned");
                let _ = std::fs::remove_file(out);
                drop(g);
                g = CudaBackend::new(0, &BackendOptions::default()).unwrap();
            }
            "attention" => attention_timings(&mut g),
            other => eprintln!("unknown section {other:?}: expected kernels, matmuls, matmuls-tuning or attention"),
        }
    }
}

/// Reports an op error once per call site instead of aborting the whole table.
fn ok(r: llmq_core::Result<()>) {
    if let Err(e) = r {
        static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let msg = e.to_string();
        let mut seen = SEEN.lock().unwrap();
        if !seen.contains(&msg) {
            println!("ERROR: {msg}");
            seen.push(msg);
        }
    }
}

fn kernel_timings(g: &mut CudaBackend) {
    let mut rng = common::Rng::new(99);
    let bf = DType::BF16;
    println!("| op | shape | time ms | rate |");
    println!("|---|---|---|---|");
    // matmuls: N = 16384 tokens, Qwen2.5-0.5B shapes
    let n = 16384;
    for &(name, m, nn, k) in &[("qkv", n, 1152, 896), ("up_gate", n, 9728, 896), ("down", n, 896, 4864), ("lm_head", n, 151936, 896)] {
        let a = rand_tensor(g, &mut rng, bf, &[m, k], 1.0);
        let w = rand_tensor(g, &mut rng, bf, &[nn, k], 0.05);
        let o = g.alloc(MemCategory::Other, Mem::Device, bf, &[m, nn]).unwrap();
        let t = median_time(g, || ok(g.matmul(&Matmul::linear(&o, &a, &w))));
        println!("| matmul bf16 {name} | {m}x{nn}x{k} | {:.3} | {:.0} TFLOP/s |", t * 1e3, 2.0 * (m * nn * k) as f64 / t / 1e12);
        if name != "lm_head" {
            let a8 = g.alloc(MemCategory::Other, Mem::Device, DType::E4M3, &[m, k]).unwrap();
            let w8 = g.alloc(MemCategory::Other, Mem::Device, DType::E4M3, &[nn, k]).unwrap();
            let am = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[1]).unwrap();
            let sa = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[1]).unwrap();
            let sw = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[1]).unwrap();
            g.absmax(&am, &a).unwrap();
            g.quantize(&a8, &sa, &a, &am, false).unwrap();
            g.absmax(&am, &w).unwrap();
            g.quantize(&w8, &sw, &w, &am, false).unwrap();
            let mut mm = Matmul::linear(&o, &a8, &w8);
            mm.descale_a = Some(&sa);
            mm.descale_b = Some(&sw);
            let t = median_time(g, || ok(g.matmul(&mm)));
            println!("| matmul e4m3 {name} | {m}x{nn}x{k} | {:.3} | {:.0} TFLOP/s |", t * 1e3, 2.0 * (m * nn * k) as f64 / t / 1e12);
            let tq = median_time(g, || ok(g.quantize(&a8, &sa, &a, &am, false)));
            println!("| quantize bf16->e4m3 | {m}x{k} | {:.3} | {:.0} GB/s |", tq * 1e3, (m * k * 3) as f64 / tq / 1e9);
            let at = g.alloc(MemCategory::Other, Mem::Device, DType::E4M3, &[k, m]).unwrap();
            let tq = median_time(g, || ok(g.quantize(&at, &sa, &a, &am, true)));
            println!("| quantize+transpose | {m}x{k} | {:.3} | {:.0} GB/s |", tq * 1e3, (m * k * 3) as f64 / tq / 1e9);
        }
    }
    // attention, B*T = 16384
    for &(hq, hkv, hd) in &[(14, 2, 64), (12, 2, 128)] {
        let s = AttnShape { b: 16, t: 1024, hq, hkv, hd };
        let (nn, q) = (s.n(), s.qkv_width());
        let qkv = rand_tensor(g, &mut rng, bf, &[nn, q], 1.0);
        let out = g.alloc(MemCategory::Other, Mem::Device, bf, &[nn, s.out_width()]).unwrap();
        let lse = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[s.b * hq * s.t]).unwrap();
        let dqkv = g.alloc(MemCategory::Other, Mem::Device, bf, &[nn, q]).unwrap();
        let flops = 4.0 * (s.b * hq * hd) as f64 * (s.t * s.t) as f64 / 2.0; // causal
        let tf = median_time(g, || ok(g.attention_fwd(&out, &lse, &qkv, s, None)));
        println!("| attention fwd (auto) | B16 T1024 Hq{hq} Hkv{hkv} Hd{hd} | {:.3} | {:.0} TFLOP/s |", tf * 1e3, flops / tf / 1e12);
        let tb = median_time(g, || ok(g.attention_bwd(&dqkv, &out, &qkv, &out, &lse, s, None, None)));
        println!("| attention bwd (auto) | same | {:.3} | {:.0} TFLOP/s |", tb * 1e3, 2.5 * flops / tb / 1e12);
        g.set_attention_kernels(AttentionKernels::Mma);
        let tf = median_time(g, || ok(g.attention_fwd(&out, &lse, &qkv, s, None)));
        println!("| attention fwd mma.sync | same | {:.3} | {:.0} TFLOP/s |", tf * 1e3, flops / tf / 1e12);
        let tb = median_time(g, || ok(g.attention_bwd(&dqkv, &out, &qkv, &out, &lse, s, None, None)));
        println!("| attention bwd mma.sync | same | {:.3} | {:.0} TFLOP/s |", tb * 1e3, 2.5 * flops / tb / 1e12);
        g.set_attention_kernels(AttentionKernels::Simple);
        let s1 = AttnShape { b: 2, ..s };
        let (q1, o1, l1) = (qkv.rows(0, 2048), out.rows(0, 2048), lse.slice(0, &[2 * hq * 1024]));
        let tf = median_time(g, || ok(g.attention_fwd(&o1, &l1, &q1, s1, None)));
        println!("| attention fwd simple | B2 T1024 Hq{hq} Hd{hd} | {:.3} | {:.1} TFLOP/s |", tf * 1e3, flops / 8.0 / tf / 1e12);
        g.set_attention_kernels(AttentionKernels::Auto);
    }
    // memory-bound ops at N = 16384, C = 896, D = 4864
    let (c, d) = (896, 4864);
    let x = rand_tensor(g, &mut rng, bf, &[n, c], 1.0);
    let w = rand_tensor(g, &mut rng, bf, &[c], 1.0);
    let y = g.alloc(MemCategory::Other, Mem::Device, bf, &[n, c]).unwrap();
    let rstd = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[n]).unwrap();
    let am = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[1]).unwrap();
    let t = median_time(g, || ok(g.rmsnorm_fwd(&y, &rstd, &x, &w, 1e-6, Some(&am))));
    println!("| rmsnorm_fwd | {n}x{c} | {:.3} | {:.0} GB/s |", t * 1e3, (n * c * 4) as f64 / t / 1e9);
    let dw = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[c]).unwrap();
    let dx = g.alloc(MemCategory::Other, Mem::Device, bf, &[n, c]).unwrap();
    let t = median_time(g, || ok(g.rmsnorm_bwd(&dx, &dw, &y, &x, &w, &rstd, None, Some(&am))));
    println!("| rmsnorm_bwd | {n}x{c} | {:.3} | {:.0} GB/s |", t * 1e3, (n * c * 6) as f64 / t / 1e9);
    let ug = rand_tensor(g, &mut rng, bf, &[n, 2 * d], 1.0);
    let h = g.alloc(MemCategory::Other, Mem::Device, bf, &[n, d]).unwrap();
    let t = median_time(g, || ok(g.swiglu_fwd(&h, &ug, Some(&am))));
    println!("| swiglu_fwd | {n}x{d} | {:.3} | {:.0} GB/s |", t * 1e3, (n * d * 6) as f64 / t / 1e9);
    let dug = g.alloc(MemCategory::Other, Mem::Device, bf, &[n, 2 * d]).unwrap();
    let t = median_time(g, || ok(g.swiglu_bwd(&dug, &h, &ug, Some(&am))));
    println!("| swiglu_bwd | {n}x{d} | {:.3} | {:.0} GB/s |", t * 1e3, (n * d * 10) as f64 / t / 1e9);
    let rows = 2048;
    let logits = rand_tensor(g, &mut rng, bf, &[rows, 151936], 2.0);
    let losses = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[rows]).unwrap();
    let tg = g.alloc(MemCategory::Other, Mem::Device, DType::I32, &[rows]).unwrap();
    let t = median_time(g, || ok(g.cross_entropy(&logits, &losses, &tg, 1.0, 0.0)));
    println!("| cross_entropy | {rows}x151936 | {:.3} | {:.0} GB/s |", t * 1e3, (rows * 151936 * 4) as f64 / t / 1e9);
    let t = median_time(g, || ok(g.sum_squares(&am, 0, &ug)));
    println!("| sum_squares bf16 | {}M | {:.3} | {:.0} GB/s |", n * 2 * d / 1_000_000, t * 1e3, (n * 2 * d * 2) as f64 / t / 1e9);
    let big = rand_tensor(g, &mut rng, bf, &[n, 2 * d], 1.0);
    let t = median_time(g, || ok(g.copy(&big, &ug, llmq_core::Stream::Compute)));
    println!("| copy d2d | {} MB | {:.3} | {:.0} GB/s |", n * 2 * d * 2 / 1_000_000, t * 1e3, (n * 2 * d * 4) as f64 / t / 1e9);
    let ids: Vec<i32> = (0..n as i32).map(|i| (i * 7919) % 151936).collect();
    let idt = g.alloc(MemCategory::Other, Mem::Device, DType::I32, &[n]).unwrap();
    g.upload(&idt, &ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let table = g.alloc(MemCategory::Other, Mem::Device, DType::F32, &[151936, c]).unwrap();
    let t = median_time(g, || ok(g.embedding_bwd(&table, &idt, &x)));
    println!("| embedding_bwd | N={n} C={c} | {:.3} | |", t * 1e3);
}

/// Every matmul of a training micro-batch at Qwen2.5-0.5B (B64) and 1.5B (B32) sizes, bf16, in
/// the forms the model runs them (forward, input gradient, f32-accumulated weight gradient; the
/// LM head's logits in LOGITS_ROWS-row products, its gradients on 16384-row groups), with the
/// milliseconds per 16k tokens they add up to. `g` is made with the options to compare, e.g.
/// `matmul_tuning: off` (the heuristic's first answers) against an autotuning backend.
fn training_matmuls(g: &mut CudaBackend, label: &str) {
    let mut rng = common::Rng::new(98);
    let (bf, f32) = (DType::BF16, DType::F32);
    let tune = label;
    for (model, n, c, d, q, layers) in [("0.5B", 65536, 896, 4864, 1152, 24), ("1.5B", 32768, 1536, 8960, 2048, 28)] {
        println!("| {model} ({tune}) | shape | ms | TFLOP/s | ms per 16k tokens |");
        println!("|---|---|---|---|---|");
        let mut total = 0.0;
        // (name, rows, out features, in features, calls per micro-batch)
        let v = 151936;
        for (name, m, nout, nin, calls) in
            [("qkv", n, q, c, layers), ("out", n, c, c, layers), ("up_gate", n, 2 * d, c, layers), ("down", n, c, d, layers), ("lm_head", 16384, v, c, n / 16384)]
        {
            let x = rand_tensor(g, &mut rng, bf, &[m, nin], 1.0);
            let w = rand_tensor(g, &mut rng, bf, &[nout, nin], 0.05);
            let y = rand_tensor(g, &mut rng, bf, &[m, nout], 0.05);
            let dx = g.alloc(MemCategory::Other, Mem::Device, bf, &[m, nin]).unwrap();
            let dw = rand_tensor(g, &mut rng, f32, &[nout, nin], 0.01);
            let fwd_rows = if name == "lm_head" { 1024 } else { m };
            let (xs, ys) = (x.rows(0, fwd_rows), y.rows(0, fwd_rows));
            let runs: [(&str, Matmul, usize); 3] = [
                ("fwd", Matmul::linear(&ys, &xs, &w), m / fwd_rows),
                ("dgrad", Matmul::linear_dgrad(&dx, &y, &w), 1),
                ("wgrad", Matmul::linear_wgrad(&dw, &y, &x), 1),
            ];
            for (kind, mm, reps) in runs {
                let t = median_time(g, || ok(g.matmul(&mm)));
                let flops = 2.0 * (m * nout * nin) as f64 / reps as f64;
                let per16k = t * reps as f64 * calls as f64 * 16384.0 / n as f64 * 1e3;
                total += per16k;
                let rows = if kind == "fwd" { fwd_rows } else { m };
                println!("| {name} {kind} | {rows}x{nout}x{nin} x{reps} | {:.3} | {:.0} | {per16k:.2} |", t * 1e3, flops / t / 1e12);
            }
        }
        println!("| total | | | | {total:.2} |");
    }
}

/// Forward and backward (median ms, TFLOP/s with the backward counted as 2.5 x the forward) of
/// each attention kernel family on this GPU, T1024, Qwen2.5-0.5B (Hd 64) and -1.5B-like (Hd 128)
/// head shapes at B16; the backward also with the dK/dV work in 1, 2, 3, 4, 6 and 8 parts. Then
/// the default kernels alone at the micro-batches of the benchmarks' reference setting (0.5B and
/// 1.5B at B64, 3B at B32, 7B at B16).
fn attention_timings(g: &mut CudaBackend) {
    let mut rng = common::Rng::new(33);
    let (bf, f32) = (DType::BF16, DType::F32);
    let shapes = [(16, 14, 2, 64, true), (16, 12, 2, 128, true), (64, 14, 2, 64, false), (64, 12, 2, 128, false), (32, 16, 2, 128, false), (16, 28, 4, 128, false)];
    for (b, hq, hkv, hd, families) in shapes {
        let s = AttnShape { b, t: 1024, hq, hkv, hd };
        let (n, q) = (s.n(), s.qkv_width());
        let qkv = rand_tensor(g, &mut rng, bf, &[n, q], 1.0);
        let dout = rand_tensor(g, &mut rng, bf, &[n, s.out_width()], 1.0);
        let out = g.alloc(MemCategory::Other, Mem::Device, bf, &[n, s.out_width()]).unwrap();
        let lse = g.alloc(MemCategory::Other, Mem::Device, f32, &[s.b * hq * s.t]).unwrap();
        let dqkv = g.alloc(MemCategory::Other, Mem::Device, bf, &[n, q]).unwrap();
        let flops = 4.0 * (s.b * hq * hd) as f64 * (s.t * s.t) as f64 / 2.0; // causal
        println!("## B{b} T1024 Hq{hq} Hkv{hkv} Hd{hd}: fwd / bwd ms (TFLOP/s)");
        println!("mma.sync (fwd, dq, dkv): {:?}", llmq_cuda::attn3_configs(hd));
        if g.has_wgmma() {
            println!("Hopper (fwd, dq, dkv): {:?}", llmq_cuda::hopper_kernels(hd));
        }
        let kinds = match (g.has_wgmma(), families) {
            (true, true) => vec![AttentionKernels::Auto, AttentionKernels::Mma],
            (true, false) => vec![AttentionKernels::Auto],
            (false, _) => vec![AttentionKernels::Mma],
        };
        for k in kinds {
            g.set_attention_kernels(k);
            let tf = median_time(g, || ok(g.attention_fwd(&out, &lse, &qkv, s, None)));
            let tb = median_time(g, || ok(g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None)));
            println!("| {k:?} | {:.3} ({:.0}) | {:.3} ({:.0}) |", tf * 1e3, flops / tf / 1e12, tb * 1e3, 2.5 * flops / tb / 1e12);
            let mut row = format!("{k:?} bwd ms with dK/dV parts 1, 2, 3, 4, 6, 8:");
            for split in [1, 2, 3, 4, 6, 8] {
                g.set_attention_dkv_split(split);
                let tb = median_time(g, || ok(g.attention_bwd(&dqkv, &dout, &qkv, &out, &lse, s, None, None)));
                row.push_str(&format!(" {:.3}", tb * 1e3));
            }
            g.set_attention_dkv_split(0);
            println!("{row}");
        }
        g.set_attention_kernels(AttentionKernels::Auto);
    }
}
