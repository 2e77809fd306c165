//! Reduce-scatter from all-to-all copies plus a local reduction (`--all-to-all-reduce`): rank r
//! receives shard r of every rank's buffer into a staging buffer of its own (`Comm::all_to_all`:
//! copies between the thread ranks on the CPU, copy-engine peer copies on CUDA, no kernels on
//! the SMs), then sums the `world` received shards with one `Backend::reduce_shards` op in the
//! reduction order every `Comm` defines (f32, rank order, one rounding), so the result is
//! bitwise the one of `Comm::reduce_scatter`.
//!
//! The staging buffer is allocated once at setup (so the memory plan counts it) and is shared by
//! every call: a call on another stream than the previous one first waits for the previous
//! call's reduction, which read the buffer.

use crate::backend::{Backend, Event, MemCategory, Stream};
use crate::comm::{check_shards, Comm};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Mem, Tensor};
use std::sync::Mutex;

/// `dst` [S] and `staged` [world*S] of `Backend::reduce_shards` agree (same float dtype, a
/// whole number of shards, no overlap); returns `world`.
pub fn check_reduce_shards(dst: &Tensor, staged: &Tensor) -> Result<usize> {
    let op = "reduce_shards";
    if dst.dtype != staged.dtype || !matches!(dst.dtype, DType::F32 | DType::BF16) {
        return Err(Error::Op(format!("{op}: dst is {}, staged {}: expected both f32 or both bf16", dst.dtype, staged.dtype)));
    }
    let (s, n) = (dst.numel(), staged.numel());
    if s == 0 || n % s != 0 || n == 0 {
        return Err(Error::Op(format!("{op}: staged ({n} elements) must be a whole number (>= 1) of dst's shards ({s} elements)")));
    }
    let overlap = dst.mem == staged.mem && dst.addr < staged.addr + staged.bytes() as u64 && staged.addr < dst.addr + dst.bytes() as u64;
    if overlap {
        return Err(Error::Op(format!("{op}: dst overlaps staged")));
    }
    Ok(n / s)
}

/// The staging buffer of one rank and the ordering of its reuse (see the module doc).
pub struct AllToAllReduce {
    staging: Tensor,
    done: Event,
    /// The stream of the previous call (whose reduction `done` follows).
    last: Mutex<Option<Stream>>,
}

impl AllToAllReduce {
    /// Staging for reduce-scatters of up to `elems` elements of `dtype` (the padded size of the
    /// largest buffer), in device memory, accounted as gradients.
    pub fn alloc(be: &mut dyn Backend, dtype: DType, elems: usize) -> Result<AllToAllReduce> {
        let staging = be.alloc(MemCategory::Gradients, Mem::Device, dtype, &[elems])?;
        Ok(AllToAllReduce { staging, done: be.create_event()?, last: Mutex::new(None) })
    }

    /// `comm.reduce_scatter(be, dst, src, accumulate, stream, what)`, by an all-to-all into the
    /// staging buffer and a local reduction; the same bits.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_scatter(&self, comm: &dyn Comm, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()> {
        check_shards("reduce-scatter", what, dst, src, comm.world())?;
        if src.dtype != self.staging.dtype || src.numel() > self.staging.numel() {
            return Err(Error::Op(format!(
                "reduce-scatter '{what}' ({} x {}): the all-to-all staging buffer holds {} x {}",
                src.dtype,
                src.numel(),
                self.staging.dtype,
                self.staging.numel()
            )));
        }
        let staged = self.staging.slice(0, &[src.numel()]);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|s| s != stream) {
            be.wait(stream, self.done)?;
        }
        comm.all_to_all(be, &staged, src, stream, what)?;
        be.reduce_shards(dst, &staged, accumulate, stream)?;
        be.record(self.done, stream)?;
        *last = Some(stream);
        Ok(())
    }
}
