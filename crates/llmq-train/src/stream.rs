//! Weight streaming and gradient offloading on one device: block weights (and gradients) live in
//! pinned host memory and pass through two device slots, so that block l computes in one slot
//! while the copy streams move block l±1 through the other (host to device on `Stream::Copy`,
//! gradients back on `Stream::CopyBack`). ZeRO-3 and ZeRO-2 use the same slots with collectives
//! in place of the copies: block weights gathered from every rank's shard on the copy stream,
//! block gradients reduce-scattered into the ranks' shards on the copy-back stream.
//!
//! Block l always uses slot l % 2, so consecutive blocks alternate and a prefetch never evicts the
//! block being computed. Every hand-over between the compute and copy streams is an event:
//! - weights: `ready[s]` (copy -> compute: block is in slot s), `free[s]` (compute -> copy: the
//!   last op reading slot s was issued; the next fetch into s waits for it);
//! - gradients: `loaded[s]` (copy -> compute: the host accumulator of the block is in slot s),
//!   `done[s]` (compute -> copy: the block's backward finished writing slot s), `saved[s]` (copy
//!   -> compute: slot s was copied back to the host and may be reused).
//!
//! The first micro-batch of a step zeroes the gradient slot on the device instead of loading the
//! host accumulator, and its copy back overwrites the host buffer: the host buffer is never
//! zeroed and the host CPU never touches the gradients. Later micro-batches load, accumulate on
//! the device and store: the same additions in the same order as a resident gradient, so the
//! numbers are bitwise those of the plain run.

use llmq_core::{Backend, DType, Event, Mem, MemCategory, Result, Stream, Tensor};
use std::cell::Cell;

/// Two device slots of one block's worth of a parameter-shaped buffer.
pub struct Slots {
    slots: [Tensor; 2],
    /// Which block each slot holds (or is being filled with).
    owner: Cell<[Option<usize>; 2]>,
    /// copy -> compute: the slot's contents are in place.
    ready: [Event; 2],
    /// compute -> copy: the compute stream's use of the slot was issued.
    free: [Event; 2],
    /// copy -> compute: the slot's copy back to the host was issued (gradients).
    saved: [Event; 2],
}

impl Slots {
    pub fn alloc(be: &mut dyn Backend, cat: MemCategory, dtype: DType, numel: usize) -> Result<Slots> {
        let slots = [be.alloc(cat, Mem::Device, dtype, &[numel])?, be.alloc(cat, Mem::Device, dtype, &[numel])?];
        let mut ev = || be.create_event();
        Ok(Slots { slots, owner: Cell::new([None, None]), ready: [ev()?, ev()?], free: [ev()?, ev()?], saved: [ev()?, ev()?] })
    }

    /// Slot of block l.
    fn slot(l: usize) -> usize {
        l % 2
    }

    /// The device slot holding block l (call `fetch` or `prepare_grad` first).
    pub fn view(&self, l: usize, numel: usize) -> Tensor {
        self.slots[Self::slot(l)].slice(0, &[numel])
    }

    /// `dims` elements of block l's slot from element `offset` (a part of what it holds).
    pub fn view_at(&self, l: usize, offset: usize, dims: &[usize]) -> Tensor {
        self.slots[Self::slot(l)].slice(offset, dims)
    }

    /// Whether block l's slot holds (or is being filled with) block l.
    pub fn holds(&self, l: usize) -> bool {
        self.owner.get()[Self::slot(l)] == Some(l)
    }

    /// Makes the compute stream wait for every fill issued so far (before what they read is
    /// rewritten).
    pub fn fills_done(&self, be: &dyn Backend) -> Result<()> {
        be.wait(Stream::Compute, self.ready[0])?;
        be.wait(Stream::Compute, self.ready[1])
    }

    /// Starts copying `host` (block l's weights) into its slot on the copy stream, unless the
    /// slot holds block l already.
    pub fn fetch(&self, be: &dyn Backend, l: usize, host: &Tensor) -> Result<()> {
        self.fetch_with(be, l, host.numel(), |dst| be.copy(dst, host, Stream::Copy))
    }

    /// Fills block l's slot (its first `numel` elements) on the copy stream with `fill` (a copy,
    /// or a gather from every rank's shard), unless the slot holds block l already.
    pub fn fetch_with(&self, be: &dyn Backend, l: usize, numel: usize, fill: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        let s = Self::slot(l);
        let mut owner = self.owner.get();
        if owner[s] == Some(l) {
            return Ok(());
        }
        be.wait(Stream::Copy, self.free[s])?;
        be.wait(Stream::Copy, self.saved[s])?; // gradients: after the slot's copy back
        fill(&self.slots[s].slice(0, &[numel]))?;
        be.record(self.ready[s], Stream::Copy)?;
        owner[s] = Some(l);
        self.owner.set(owner);
        Ok(())
    }

    /// Makes the compute stream wait until block l's weights are in their slot.
    pub fn acquire(&self, be: &dyn Backend, l: usize, host: &Tensor) -> Result<Tensor> {
        self.fetch(be, l, host)?;
        self.ready_for_compute(be, l, host.numel())
    }

    /// Makes the compute stream wait for block l's slot (filled by `fetch_with`).
    pub fn ready_for_compute(&self, be: &dyn Backend, l: usize, numel: usize) -> Result<Tensor> {
        be.wait(Stream::Compute, self.ready[Self::slot(l)])?;
        Ok(self.view(l, numel))
    }

    /// The compute stream is done with block l's slot (for now).
    pub fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        be.record(self.free[Self::slot(l)], Stream::Compute)
    }

    /// Gradients: readies block l's slot for accumulation — zeroed on the first micro-batch of a
    /// step, else loaded from the host accumulator (started early by `prefetch_grad`) — after the
    /// slot's previous copy back.
    pub fn prepare_grad(&self, be: &dyn Backend, l: usize, host: &Tensor, first: bool) -> Result<Tensor> {
        let s = Self::slot(l);
        let view = self.view(l, host.numel());
        if first {
            be.wait(Stream::Compute, self.saved[s])?;
            be.zero(&view, Stream::Compute)?;
            let mut owner = self.owner.get();
            owner[s] = Some(l);
            self.owner.set(owner);
        } else {
            self.prefetch_grad(be, l, host)?;
            be.wait(Stream::Compute, self.ready[s])?;
        }
        Ok(view)
    }

    /// Gradients, after the first micro-batch: starts loading block l's host accumulator into
    /// its slot on the copy stream, after the slot's copy back on the copy-back stream.
    pub fn prefetch_grad(&self, be: &dyn Backend, l: usize, host: &Tensor) -> Result<()> {
        self.fetch(be, l, host)
    }

    /// Gradients: block l's backward is issued; copies its slot back to the host accumulator.
    pub fn store_grad(&self, be: &dyn Backend, l: usize, host: &Tensor) -> Result<()> {
        self.store(be, l, host)?;
        let mut owner = self.owner.get();
        owner[Self::slot(l)] = None;
        self.owner.set(owner);
        Ok(())
    }

    /// The compute stream is about to write block l's slot: waits for the slot's last copy back.
    pub fn begin_write(&self, be: &dyn Backend, l: usize, numel: usize) -> Result<Tensor> {
        let s = Self::slot(l);
        be.wait(Stream::Compute, self.saved[s])?;
        let mut owner = self.owner.get();
        owner[s] = Some(l);
        self.owner.set(owner);
        Ok(self.view(l, numel))
    }

    /// Copies block l's slot back to `host` on the copy-back stream once the compute stream's
    /// work so far is done; the slot keeps its contents (and owner) until rewritten.
    pub fn store(&self, be: &dyn Backend, l: usize, host: &Tensor) -> Result<()> {
        self.store_with(be, l, host.numel(), |src| be.copy(host, src, Stream::CopyBack))
    }

    /// Like `store`, with `drain` (a copy back, or a reduce-scatter into every rank's shard)
    /// reading the slot's first `numel` elements on the copy-back stream.
    pub fn store_with(&self, be: &dyn Backend, l: usize, numel: usize, drain: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        let s = Self::slot(l);
        be.record(self.free[s], Stream::Compute)?;
        be.wait(Stream::CopyBack, self.free[s])?;
        drain(&self.view(l, numel))?;
        be.record(self.saved[s], Stream::CopyBack)
    }

    /// Makes the compute stream wait for every copy back (before the host accumulators are read).
    pub fn join(&self, be: &dyn Backend) -> Result<()> {
        be.wait(Stream::Compute, self.saved[0])?;
        be.wait(Stream::Compute, self.saved[1])
    }

    /// Forget what the slots hold (the host copies changed: after an optimizer step).
    pub fn invalidate(&self) {
        self.owner.set([None, None]);
    }
}
