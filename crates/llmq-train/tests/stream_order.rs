//! Multi-stream orchestration is ordered by events: training runs under `StreamChecked`, which
//! fails any op that touches memory another stream touched with no event (or host
//! synchronisation) between. It covers the gradient zeroing on the copy stream and, in fp8, the
//! weight gradients on the side stream with their two dyᵀ slots, under every recompute option,
//! with gradient accumulation, persistent quants and both gradient formats. Each of the three
//! orderings the model makes is needed: without the dyᵀ slot wait, the end-of-backward join
//! or the wait for the gradient zeroing, one of these tests fails, naming the two ops.

mod common;
use common::*;
use llmq_core::cpu::CpuBackend;
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Arch, DType};
use llmq_train::{MemoryOptions, Precision, Recompute};

#[test]
fn training_orders_its_streams_under_every_option() {
    let fp8 = Precision::fp8();
    let (plain, overlap) = (MemoryOptions::default(), MemoryOptions { wgrad_overlap: true, ..Default::default() });
    let precisions = [
        ("bf16", Precision::bf16(), plain),
        ("fp8 without overlap", fp8, plain),
        ("fp8", fp8, overlap),
        ("fp8 persistent quants", fp8, MemoryOptions { persistent_quants: true, ..overlap }),
        ("fp8 e5m2 gradients", Precision { act_grads: DType::E5M2, ..fp8 }, overlap),
        ("bf16 offloaded optimizer state", Precision::bf16(), MemoryOptions { offload_master: true, offload_opt_m: true, offload_opt_v: true, ..plain }),
        ("bf16 streamed weights, offloaded gradients", Precision::bf16(), MemoryOptions { stream_weights: true, offload_gradients: true, ..plain }),
        ("bf16 offloaded residuals", Precision::bf16(), MemoryOptions { offload_residual: true, ..plain }),
        ("bf16 graphs", Precision::bf16(), MemoryOptions { cuda_graphs: true, offload_opt_m: true, ..plain }),
        ("fp8 graphs", fp8, MemoryOptions { cuda_graphs: true, persistent_quants: true, ..plain }),
        ("fp8 offloaded residuals", fp8, MemoryOptions { offload_residual: true, ..overlap }),
        ("fp8 streamed weights", fp8, MemoryOptions { stream_weights: true, ..overlap }),
        ("fp8 everything offloaded", fp8, MemoryOptions { stream_weights: true, offload_gradients: true, offload_residual: true, offload_opt_m: true, offload_opt_v: true, offload_master: true, ..plain }),
    ];
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let mut cfg = tiny(arch, arch == Arch::Qwen3);
        cfg.vocab_size = 160; // the backward temporaries live in the logits buffer
        // five layers: streamed and offloaded buffers pass through two device slots, so each
        // slot is reused within a pass (and an odd count ends the forward pass on slot 0)
        cfg.num_layers = 5;
        for (pname, precision, mem) in precisions {
            for (rname, recompute) in Recompute::all_variants() {
                let mut tc = train_config(2, 16, 2, 2);
                tc.precision = precision;
                tc.memory = MemoryOptions { recompute, ..mem };
                let mut tr = trainer_on(Box::new(StreamChecked::new(Box::new(CpuBackend::new()))), &cfg, tc);
                for step in 1..=2 {
                    if let Err(e) = tr.train_step() {
                        panic!("{arch:?} {pname}, recompute {rname}, step {step}: {e}");
                    }
                }
            }
        }
    }
}

/// The model alone, with no host synchronisation between micro-steps (the trainer's batch upload
/// and loss download order everything, which would hide a missing event): gradient zeroing on the
/// copy stream, then two forward+backward passes on one uploaded batch, then the gradient norm.
/// This is where the LM head's first gradient write must wait for the zeroing, and where the
/// next forward pass (its logits buffer holds the backward's temporaries) must wait for the side
/// stream's weight gradients (`SideWgrads::join`).
#[test]
fn micro_steps_without_host_syncs_order_their_streams() {
    let cfg = {
        let mut c = tiny(Arch::Qwen3, false);
        c.vocab_size = 160;
        c
    };
    let (b, t) = (2, 16);
    let overlap = MemoryOptions { wgrad_overlap: true, ..Default::default() };
    for (precision, mem) in [(Precision::bf16(), MemoryOptions::default()), (Precision::fp8(), overlap)] {
        let mut be = StreamChecked::new(Box::new(CpuBackend::new()));
        let model = llmq_train::Model::new(&mut be, &cfg, precision, llmq_train::RunShape { b, t }, &mem).unwrap();
        model.params.init_from_scratch(&be, 7).unwrap();
        model.weights_changed(&be).unwrap();
        let ids: Vec<i32> = (0..b * t).map(|i| (i * 37 % cfg.vocab_size) as i32).collect();
        let batch = llmq_io::Batch { inputs: ids.clone(), targets: ids.iter().map(|&x| (x + 1) % cfg.vocab_size as i32).collect() };
        model.set_batch(&be, &batch).unwrap();
        let before = be.ops_checked();
        let run = || -> llmq_core::Result<()> {
            model.zero_grads(&be)?;
            for _ in 0..2 {
                model.forward(&be, Some(1.0 / (b * t) as f32))?;
                model.backward(&be)?;
            }
            model.grad_norm_squares(&be).map(|_| ())
        };
        run().unwrap_or_else(|e| panic!("{:?}: {e}", precision.matmul));
        assert!(be.ops_checked() > before + 50, "the passes ran through the checker");
    }
}
