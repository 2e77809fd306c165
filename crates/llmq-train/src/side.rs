//! Weight gradients on the side stream (`MemoryOptions::wgrad_overlap`).
//!
//! A block matmul's backward is an input gradient (dx = dy·W), which the rest of the backward
//! pass waits for, and a weight gradient (dW += dyᵀ·x), which nothing in the pass reads. With
//! the overlap, the weight gradient waits for its input gradient (not beside it: it should run
//! beside the memory-bound ops that follow, not compete with a matmul of its own kind) and then
//! runs on the side stream.
//!
//! Hazards, each ordered by an event:
//! - The wgrad reads its dy operand after the compute stream has moved on. dy lives in one of
//!   `SLOTS` slots (which tensor is a slot is the caller's: `fp8::Fp8` uses its two quantised dyᵀ
//!   buffers), and the compute stream calls `reuse(slot)` before every rewrite of a slot.
//! - Its x operand must not be rewritten during the backward pass at all: callers send only
//!   wgrads whose x is kept per layer (not a recomputation buffer).
//! - `join` at the end of each backward pass orders the side stream's work before whatever
//!   comes next (the optimizer, the next forward pass, whose logits buffer holds backward
//!   temporaries).
//!
//! `StreamChecked` (llmq-core) checks all of this on the CPU (tests/stream_order.rs).
//!
//! Only fp8 runs use it. bf16 runs did too for a while (their wgrads read the bf16 gradient
//! buffers as slots, with two residual-gradient buffers): on the H200 that measured +0.6% at
//! Qwen2.5-1.5B and -0.5% at 0.5B with the side stream's algorithms, and, with the algorithms
//! bf16 runs use now, +0.1% and -0.5% (docs/BENCHMARKS.md, twelfth round), so it was removed.

use llmq_core::{Backend, Event, Matmul, Result, Stream};

/// dy slots.
pub const SLOTS: usize = 2;

pub struct SideWgrads {
    /// Recorded on the compute stream after the dgrad: the side stream's wgrad waits for it.
    dy_ready: Event,
    /// Recorded on the side stream after the wgrad that reads slot i.
    slot_free: [Event; SLOTS],
    side_idle: Event,
}

impl SideWgrads {
    pub fn new(be: &mut dyn Backend) -> Result<SideWgrads> {
        let mut ev = || be.create_event();
        Ok(SideWgrads { dy_ready: ev()?, slot_free: [ev()?, ev()?], side_idle: ev()? })
    }

    /// Before the compute stream rewrites `slot`: waits for the side stream's last read of it.
    pub fn reuse(&self, be: &dyn Backend, slot: usize) -> Result<()> {
        be.wait(Stream::Compute, self.slot_free[slot])
    }

    /// Queues `wgrad`, whose dy operand is in `slot`, on the side stream after everything queued
    /// so far on the compute stream.
    pub fn run(&self, be: &dyn Backend, slot: usize, wgrad: &Matmul) -> Result<()> {
        be.record(self.dy_ready, Stream::Compute)?;
        be.wait(Stream::Side, self.dy_ready)?;
        be.set_stream(Stream::Side)?;
        let r = be.matmul(wgrad);
        be.set_stream(Stream::Compute)?; // also on error
        r?;
        be.record(self.slot_free[slot], Stream::Side)
    }

    /// Orders everything queued on the side stream before what comes next on the compute stream.
    pub fn join(&self, be: &dyn Backend) -> Result<()> {
        be.record(self.side_idle, Stream::Side)?;
        be.wait(Stream::Compute, self.side_idle)
    }
}
