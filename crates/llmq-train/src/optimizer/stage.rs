//! The optimizer update of block state that lives in pinned host memory (offloaded master
//! weights and Adam moments, streamed weights, offloaded gradients).
//!
//! Staged (the default): each block's host tensors pass through two device slots per role, like
//! weight streaming (`crate::stream`): block l's are copied in on the copy stream while block
//! l-1 updates, the AdamW op runs over the device slots, and what it wrote goes back on the
//! copy-back stream. The same op on the same bytes at the same element indices (the stochastic
//! rounding hashes the index within the buffer), so the numbers are those of a resident update.
//!
//! Zero-copy (`MemoryOptions::zero_copy`): no slots; the AdamW op reads and writes the mapped
//! host memory in place (less device memory, every byte over the host link inside the kernel).
//!
//! The embedding and head groups are always updated in place: a slot the size of the embedding
//! would cost more device memory than offloading it saves.

use super::OptShard;
use crate::stream::Slots;
use llmq_core::{Backend, Event, MemCategory, Result, Stream, Tensor};

/// The roles of an update, in `OptShard` order, with the category their slots are counted in.
const ROLES: [MemCategory; 5] = [MemCategory::Weights, MemCategory::Master, MemCategory::Gradients, MemCategory::AdamM, MemCategory::AdamV];

fn roles(t: &OptShard) -> [Tensor; 5] {
    [t.params, t.master, t.grads, t.m, t.v]
}

/// Device slots for the host-resident roles of the block updates.
pub struct OptStage {
    /// Per role: slots when block groups keep that role on the host (master: not when it is
    /// the working weights, which are staged as params).
    slots: [Option<Slots>; 5],
    /// compute -> copy: every copy back of the update is done.
    written: Event,
}

impl OptStage {
    /// Slots of `numel` elements for each role of `sample` (any block's shard) that lives on the
    /// host; `None` when nothing does.
    pub fn alloc(be: &mut dyn Backend, sample: &OptShard, numel: usize) -> Result<Option<OptStage>> {
        let shared_master = sample.master.addr == sample.params.addr;
        let mut slots: [Option<Slots>; 5] = Default::default();
        for (i, t) in roles(sample).iter().enumerate() {
            if t.mem.is_host() && !(i == 1 && shared_master) {
                slots[i] = Some(Slots::alloc(be, ROLES[i], t.dtype, numel)?);
            }
        }
        if slots.iter().all(Option::is_none) {
            return Ok(None);
        }
        Ok(Some(OptStage { slots, written: be.create_event()? }))
    }

    /// Starts copying block l's host tensors into their slots on the copy stream.
    pub fn prefetch(&self, be: &dyn Backend, l: usize, host: &OptShard) -> Result<()> {
        for (s, t) in self.slots.iter().zip(roles(host)) {
            if let Some(s) = s {
                s.fetch(be, l, &t)?;
            }
        }
        Ok(())
    }

    /// Block l's update tensors on the device: the host ones replaced by their slots, which the
    /// compute stream waits for.
    pub fn acquire(&self, be: &dyn Backend, l: usize, host: &OptShard) -> Result<OptShard> {
        let mut out = roles(host);
        for ((s, t), o) in self.slots.iter().zip(roles(host)).zip(out.iter_mut()) {
            if let Some(s) = s {
                *o = s.acquire(be, l, &t)?;
            }
        }
        let [params, mut master, grads, m, v] = out;
        if host.master.addr == host.params.addr {
            master = params;
        }
        Ok(OptShard { shard: host.shard, params, master, grads, m, v })
    }

    /// Block l's update is issued: what it wrote goes back to the host on the copy-back stream;
    /// the gradient slot is free for the next fetch.
    pub fn write_back(&self, be: &dyn Backend, l: usize, host: &OptShard) -> Result<()> {
        for (i, (s, t)) in self.slots.iter().zip(roles(host)).enumerate() {
            match s {
                Some(s) if ROLES[i] == MemCategory::Gradients => s.release(be, l)?,
                Some(s) => s.store(be, l, &t)?,
                None => {}
            }
        }
        Ok(())
    }

    /// After the last block: the compute and copy streams wait for every copy back (the host
    /// copies are the state from here on: the copy stream streams weights from them), and the
    /// slots are forgotten (the next step brings new gradients).
    pub fn finish(&self, be: &dyn Backend) -> Result<()> {
        for s in self.slots.iter().flatten() {
            s.join(be)?;
            s.invalidate();
        }
        be.record(self.written, Stream::Compute)?;
        be.wait(Stream::Copy, self.written)
    }
}
