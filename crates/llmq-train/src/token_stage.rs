//! Token upload and loss read-back of a training step with no host synchronisation inside it
//! after the start.
//!
//! At the start of a step (the device is idle: the previous step ended with a synchronisation)
//! the host writes every micro-batch's inputs and targets into one pinned host buffer — the only
//! host write of the step. Micro-batch k's pair is copied to device slot k % 2 on the copy
//! stream (`crate::stream::Slots`): micro-batch k+1's copy is issued when k starts, so it
//! overlaps k's passes, and waits for the end of k-1's passes, the last reader of that slot.
//!
//! The cross-entropy of micro-batch k writes its per-row losses into row k of a device buffer
//! that is read back once, after the last micro-batch. The host sums each row in order and then
//! the rows in micro-batch order, the sums a read-back per micro-batch made: the same bits.

use crate::model::Model;
use crate::params::download_f32;
use crate::stream::Slots;
use llmq_core::{Backend, DType, Error, Mem, MemCategory, Result, Tensor};
use llmq_io::data::Batch;

pub struct TokenStage {
    /// Pinned host: per micro-batch, its inputs then its targets (i32 [acc, 2N]).
    host: Tensor,
    /// Device: two slots of one micro-batch's inputs and targets.
    slots: Slots,
    /// Device: per micro-batch, its per-row losses (f32 [acc, N]).
    losses: Tensor,
    /// Rows per micro-batch (B*T).
    n: usize,
    acc: usize,
}

impl TokenStage {
    /// The buffers of `acc` micro-batches of `n` rows.
    pub fn alloc(be: &mut dyn Backend, n: usize, acc: usize) -> Result<TokenStage> {
        let cat = MemCategory::Other;
        Ok(TokenStage {
            host: be.alloc(cat, Mem::Host, DType::I32, &[acc, 2 * n])?,
            slots: Slots::alloc(be, cat, DType::I32, 2 * n)?,
            losses: be.alloc(cat, Mem::Device, DType::F32, &[acc, n])?,
            n,
            acc,
        })
    }

    fn host_part(&self, k: usize) -> Tensor {
        self.host.slice(k * 2 * self.n, &[2 * self.n])
    }

    /// Checks the step's batches, writes them to pinned host memory and starts copying the first
    /// to the device. Call before any work of the step is queued.
    pub fn stage(&self, be: &dyn Backend, model: &Model, batches: &[Batch]) -> Result<()> {
        if batches.len() != self.acc {
            return Err(Error::Op(format!("{} micro-batches for a step of {} (--grad-accumulation)", batches.len(), self.acc)));
        }
        let mut bytes = Vec::with_capacity(self.host.bytes());
        for b in batches {
            model.check_batch(b)?;
            bytes.extend(b.inputs.iter().chain(&b.targets).flat_map(|v| v.to_le_bytes()));
        }
        be.upload(&self.host, &bytes)?;
        self.slots.invalidate();
        self.slots.fetch(be, 0, &self.host_part(0))
    }

    /// Micro-batch k's inputs, targets and loss rows on the device, the compute stream waiting
    /// for their copy; starts copying micro-batch k+1's. Pair with `end(k)`.
    pub fn begin(&self, be: &dyn Backend, k: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let n = self.n;
        let slot = self.slots.ready_for_compute(be, k, 2 * n)?;
        if k + 1 < self.acc {
            self.slots.fetch(be, k + 1, &self.host_part(k + 1))?;
        }
        Ok((slot.slice(0, &[n]), slot.slice(n, &[n]), self.losses.slice(k * n, &[n])))
    }

    /// Micro-batch k's passes are issued: its slot may be refilled.
    pub fn end(&self, be: &dyn Backend, k: usize) -> Result<()> {
        self.slots.release(be, k)
    }

    /// The sum of the step's losses (f64): the one read-back, after the last micro-batch.
    pub fn loss_sum(&self, be: &dyn Backend) -> Result<f64> {
        let v = download_f32(be, &self.losses)?;
        Ok(v.chunks(self.n).map(|rows| rows.iter().map(|&x| x as f64).sum::<f64>()).fold(0.0, |a, s| a + s))
    }
}
