//! Multi-stream orchestration is ordered by events: training runs under `StreamChecked`, which
//! fails any op that touches memory another stream touched with no event (or host
//! synchronisation) between. It covers the gradient zeroing on the copy stream and, in fp8, the
//! weight gradients on the side stream with their two dyᵀ slots, under every recompute option,
//! with gradient accumulation, persistent quants and both gradient formats. Each of the three
//! orderings the model makes is needed: without the dyᵀ slot wait, the end-of-backward join
//! or the wait for the gradient zeroing, one of these tests fails, naming the two ops. A step
//! makes no host synchronisation inside its micro-batches (the token upload and loss read-back
//! are once per step), so the checker sees the micro-batches' orderings unhidden.

mod common;
use common::*;
use llmq_core::cpu::CpuBackend;
use llmq_core::observe::{Call, Observed, Observer};
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Arch, Backend, DType, Mem};
use std::cell::RefCell;
use std::rc::Rc;
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
        ("bf16 zero-copy optimizer state", Precision::bf16(), MemoryOptions { offload_master: true, offload_opt_m: true, offload_opt_v: true, zero_copy: true, ..plain }),
        ("bf16 streamed weights, offloaded gradients", Precision::bf16(), MemoryOptions { stream_weights: true, offload_gradients: true, ..plain }),
        ("bf16 offloaded residuals", Precision::bf16(), MemoryOptions { offload_residual: true, ..plain }),
        ("bf16 graphs", Precision::bf16(), MemoryOptions { cuda_graphs: true, offload_opt_m: true, ..plain }),
        ("fp8 graphs", fp8, MemoryOptions { cuda_graphs: true, persistent_quants: true, ..plain }),
        ("fp8 offloaded residuals", fp8, MemoryOptions { offload_residual: true, ..overlap }),
        ("fp8 streamed weights", fp8, MemoryOptions { stream_weights: true, ..overlap }),
        ("fp8 offloaded persistent quants", fp8, MemoryOptions { persistent_quants: true, offload_quants: true, ..overlap }),
        ("fp8 offloaded quants, streamed weights", fp8, MemoryOptions { persistent_quants: true, offload_quants: true, stream_weights: true, offload_gradients: true, ..plain }),
        ("fp8 everything offloaded", fp8, MemoryOptions { stream_weights: true, offload_gradients: true, offload_residual: true, offload_opt_m: true, offload_opt_v: true, offload_master: true, ..plain }),
        ("fp8 everything offloaded, zero-copy", fp8, MemoryOptions { stream_weights: true, offload_gradients: true, offload_opt_m: true, offload_opt_v: true, offload_master: true, zero_copy: true, ..plain }),
        ("bf16 offloaded state write-combined", Precision::bf16(), MemoryOptions { stream_weights: true, offload_gradients: true, offload_opt_m: true, offload_master: true, write_combined: true, ..plain }),
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
/// stream's weight gradients (`SideWgrads::join`), and where the copy stream's next fill of
/// offloaded fp8 weights must wait for their re-quantisation on the compute stream.
#[test]
fn micro_steps_without_host_syncs_order_their_streams() {
    let cfg = {
        let mut c = tiny(Arch::Qwen3, false);
        c.vocab_size = 160;
        c
    };
    let (b, t) = (2, 16);
    let overlap = MemoryOptions { wgrad_overlap: true, ..Default::default() };
    let offloaded = MemoryOptions { persistent_quants: true, offload_quants: true, ..overlap };
    for (precision, mem) in [(Precision::bf16(), MemoryOptions::default()), (Precision::fp8(), overlap), (Precision::fp8(), offloaded)] {
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
            model.grad_norm_squares(&be)?;
            // re-quantised kept fp8 weights (after an update) before the next pass reads them
            model.weights_updated(&be)?;
            model.forward(&be, None)
        };
        run().unwrap_or_else(|e| panic!("{:?}: {e}", precision.matmul));
        assert!(be.ops_checked() > before + 50, "the passes ran through the checker");
    }
}

/// A call's op, whether it blocks the host, and whether the host reads write-combined memory in it.
type Logged = (&'static str, bool, bool);

struct Syncs(Rc<RefCell<Vec<Logged>>>);

impl Observer for Syncs {
    fn name(&self) -> &'static str {
        "host syncs"
    }
    fn before(&self, _inner: &dyn Backend, call: &Call) -> llmq_core::Result<()> {
        let host_read = matches!(call.op, "download" | "collective read");
        let wc = host_read && call.reads.iter().flatten().any(|t| t.mem == Mem::HostWriteCombined);
        self.0.borrow_mut().push((call.op, call.host_sync, wc));
        Ok(())
    }
}

/// A training step blocks the host only before its first micro-batch (the token upload) and
/// after its last (the loss, the gradient norm, the end of the step): none between the first
/// micro-batch's embedding and the last one's embedding gradient, and as many per step with
/// four micro-batches as with one. The host never reads write-combined memory in a step.
#[test]
fn no_host_synchronisation_inside_a_micro_batch() {
    let cfg = tiny(Arch::Qwen3, false);
    let per_step = |accum: usize, mem: MemoryOptions| {
        let log = Rc::new(RefCell::new(vec![]));
        let be = Observed::wrap(Box::new(CpuBackend::new()), Syncs(log.clone()));
        let mut tc = train_config(2, 8, accum, 2);
        tc.memory = mem;
        let mut tr = trainer_on(Box::new(be), &cfg, tc);
        tr.train_step().unwrap();
        log.borrow_mut().clear();
        tr.train_step().unwrap();
        let log = log.borrow();
        let first = log.iter().position(|(op, ..)| *op == "embedding_fwd").unwrap();
        let last = log.iter().rposition(|(op, ..)| *op == "embedding_bwd").unwrap();
        assert_eq!(log.iter().filter(|(op, ..)| *op == "embedding_fwd").count(), accum);
        if let Some((op, ..)) = log[first..=last].iter().find(|(_, sync, _)| *sync) {
            panic!("{accum} micro-batches, {}: the host waits for the device ({op}) inside the micro-batches", mem.describe());
        }
        assert!(!log.iter().any(|(.., wc)| *wc), "{}: the host read write-combined memory", mem.describe());
        log.iter().filter(|(_, sync, _)| *sync).count()
    };
    let offloaded = MemoryOptions { offload_opt_m: true, stream_weights: true, offload_gradients: true, offload_residual: true, ..Default::default() };
    let write_combined = MemoryOptions { offload_opt_v: true, write_combined: true, ..offloaded };
    for mem in [MemoryOptions::default(), offloaded, write_combined, MemoryOptions { zero_copy: true, ..write_combined }] {
        assert_eq!(per_step(4, mem), per_step(1, mem), "{}: host synchronisations grow with the micro-batches", mem.describe());
    }
}
