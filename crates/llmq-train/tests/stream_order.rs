//! Multi-stream orchestration is ordered by events: training runs under `StreamChecked`, which
//! fails any op that touches memory another stream touched with no event (or host
//! synchronisation) between. It covers the gradient zeroing on the copy stream and, in fp8, the
//! weight gradients on the side stream with their two dyᵀ slots, under every recompute option,
//! with gradient accumulation, persistent quants and both gradient formats.

mod common;
use common::*;
use llmq_core::cpu::CpuBackend;
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Arch, DType};
use llmq_train::{Precision, Recompute};

#[test]
fn training_orders_its_streams_under_every_option() {
    let fp8 = Precision { wgrad_overlap: true, ..Precision::fp8() };
    let precisions = [
        ("bf16", Precision::bf16()),
        ("fp8 without overlap", Precision::fp8()),
        ("fp8", fp8),
        ("fp8 persistent quants", Precision { persistent_quants: true, ..fp8 }),
        ("fp8 e5m2 gradients", Precision { act_grads: DType::E5M2, ..fp8 }),
    ];
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let mut cfg = tiny(arch, arch == Arch::Qwen3);
        cfg.vocab_size = 160; // the backward temporaries live in the logits buffer
        for (pname, precision) in precisions {
            for (rname, recompute) in Recompute::all_variants() {
                let mut tc = train_config(2, 16, 2, 2);
                tc.precision = precision;
                tc.recompute = recompute;
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
