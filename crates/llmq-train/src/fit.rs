//! The micro-batch that fits: the largest micro-batch the device holds, at the same tokens per
//! optimizer step (`--fit-batch`).
//!
//! Larger micro-batches amortise what every micro-batch pays once: the read-modify-write of the
//! accumulated weight gradients, the last wave of every kernel, the host round trips. On one
//! H200, Qwen2.5-0.5B at 64 x 8 runs 2-3% faster than at 16 x 32 (docs/BENCHMARKS.md, seventh
//! round). The candidates keep batch_size x grad_accumulation: the micro-batch doubles while the
//! accumulation halves evenly. Each candidate's buffers (model, optimizer and the step's token
//! buffers: `crate::trainer::RunBuffers`) are allocated for real on a fresh backend,
//! largest first, so the allocation itself is the estimate and cannot drift from it; the first
//! that fits with `headroom` bytes still free wins. A backend that does not know its free memory
//! (the CPU backend without a limit) keeps the configured micro-batch. Another micro-batch
//! changes summation orders, not the maths: losses agree with the configured setting to
//! rounding, not bit for bit.

use crate::trainer::{RunBuffers, TrainConfig};
use llmq_core::{Backend, Error, ModelConfig, Result};

/// The chosen micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fit {
    pub batch_size: usize,
    pub grad_accumulation: usize,
    /// Free device memory with the chosen micro-batch's model allocated (None: not probed).
    pub free_after: Option<usize>,
}

/// Probes the candidates on backends from `make` (each dropped after its probe).
pub fn fit_micro_batch(make: &mut dyn FnMut() -> Result<Box<dyn Backend>>, cfg: &ModelConfig, tc: &TrainConfig, headroom: usize) -> Result<Fit> {
    let configured = Fit { batch_size: tc.batch_size, grad_accumulation: tc.grad_accumulation, free_after: None };
    let mut doublings = 0;
    while tc.grad_accumulation.is_multiple_of(2 << doublings) {
        doublings += 1;
    }
    for j in (0..=doublings).rev() {
        let (b, accumulation) = (tc.batch_size << j, tc.grad_accumulation >> j);
        let mut be = make()?;
        if be.free_memory().is_none() {
            return Ok(configured);
        }
        let trial = TrainConfig { batch_size: b, grad_accumulation: accumulation, ..tc.clone() };
        match RunBuffers::alloc(be.as_mut(), cfg, &trial, None) {
            Ok(_) => {
                let free = be.free_memory().unwrap_or(0);
                if free >= headroom {
                    return Ok(Fit { batch_size: b, grad_accumulation: accumulation, free_after: Some(free) });
                }
            }
            Err(Error::OutOfMemory(_)) => {}
            Err(e) => return Err(e),
        }
    }
    // not even the configured micro-batch fits with the headroom: keep it, and let the real
    // allocation report what is missing
    Ok(configured)
}
