//! The residual stream of a micro-batch: `att(l)` enters block l (l = 0..=L, `att(L)` feeds the
//! final norm), `ffn(l)` follows block l's attention. Resident, every one is a device buffer.
//! Offloaded (`--offload-residual`), layers 0..L live in pinned host memory: the forward pass
//! writes block l's two residuals into device slots l % 2 and copies them back once block l is
//! issued; the backward pass brings them in again (prefetching block l-1 while l computes). The
//! last two blocks' residuals are still in their slots when the backward pass starts, and
//! `att(L)` stays on the device. The same bytes reach the same ops, so the numbers do not change.

use crate::stream::Slots;
use llmq_core::{Backend, DType, Mem, MemCategory, Result, Tensor};

pub struct Residuals {
    /// Resident: att [L+1] and ffn [L] on the device.
    att: Vec<Tensor>,
    ffn: Vec<Tensor>,
    offloaded: Option<Offloaded>,
}

struct Offloaded {
    att: Slots,
    ffn: Slots,
    /// att(L), on the device.
    last: Tensor,
    numel: usize,
}

impl Residuals {
    pub fn alloc(be: &mut dyn Backend, layers: usize, dtype: DType, dims: &[usize], offload: bool) -> Result<Residuals> {
        let place = if offload { Mem::Host } else { Mem::Device };
        let att = (0..layers).map(|_| be.alloc(MemCategory::Activations, place, dtype, dims)).collect::<Result<Vec<_>>>()?;
        let ffn = (0..layers).map(|_| be.alloc(MemCategory::Activations, place, dtype, dims)).collect::<Result<Vec<_>>>()?;
        let last = be.alloc(MemCategory::Activations, Mem::Device, dtype, dims)?;
        let numel = dims.iter().product();
        let offloaded = if offload {
            Some(Offloaded { att: Slots::alloc(be, MemCategory::Activations, dtype, numel)?, ffn: Slots::alloc(be, MemCategory::Activations, dtype, numel)?, last, numel })
        } else {
            None
        };
        let mut att = att;
        if offloaded.is_none() {
            att.push(last);
        }
        Ok(Residuals { att, ffn, offloaded })
    }

    /// The device buffer of the residual entering block l (valid between `write_att`/`acquire`
    /// and the slot's reuse two blocks later).
    pub fn att(&self, l: usize) -> Tensor {
        match &self.offloaded {
            Some(o) if l == self.att.len() => o.last,
            Some(o) => o.att.view(l, o.numel),
            None => self.att[l],
        }
    }
    /// The device buffer of the residual after block l's attention.
    pub fn ffn(&self, l: usize) -> Tensor {
        match &self.offloaded {
            Some(o) => o.ffn.view(l, o.numel),
            None => self.ffn[l],
        }
    }

    /// Forward: `att(l)` is about to be written (waits for its slot's copy back).
    pub fn write_att(&self, be: &dyn Backend, l: usize) -> Result<Tensor> {
        match &self.offloaded {
            Some(o) if l < self.att.len() => o.att.begin_write(be, l, o.numel),
            _ => Ok(self.att(l)),
        }
    }
    /// Forward: `ffn(l)` is about to be written.
    pub fn write_ffn(&self, be: &dyn Backend, l: usize) -> Result<Tensor> {
        match &self.offloaded {
            Some(o) => o.ffn.begin_write(be, l, o.numel),
            None => Ok(self.ffn(l)),
        }
    }
    /// Forward: block l no longer reads its residuals; they go to the host.
    pub fn stored(&self, be: &dyn Backend, l: usize) -> Result<()> {
        match &self.offloaded {
            Some(o) => {
                o.att.store(be, l, &self.att[l])?;
                o.ffn.store(be, l, &self.ffn[l])
            }
            None => Ok(()),
        }
    }
    /// Backward: block l's residuals on the device (the compute stream waits for their copies).
    pub fn acquire(&self, be: &dyn Backend, l: usize) -> Result<()> {
        if let Some(o) = &self.offloaded {
            o.att.acquire(be, l, &self.att[l])?;
            o.ffn.acquire(be, l, &self.ffn[l])?;
        }
        Ok(())
    }
    /// Backward: starts bringing block l's residuals in.
    pub fn prefetch(&self, be: &dyn Backend, l: usize) -> Result<()> {
        if let Some(o) = &self.offloaded {
            o.att.fetch(be, l, &self.att[l])?;
            o.ffn.fetch(be, l, &self.ffn[l])?;
        }
        Ok(())
    }
    /// Backward: block l is done with its residuals.
    pub fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        if let Some(o) = &self.offloaded {
            o.att.release(be, l)?;
            o.ffn.release(be, l)?;
        }
        Ok(())
    }
}
