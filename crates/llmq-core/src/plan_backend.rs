//! The planning backend: records every allocation (category, placement, dtype, shape) without
//! allocating, and runs no ops. Building a model on it gives the exact memory plan of a run (the
//! same allocation code as on a real backend) in microseconds, on any machine, for any model
//! size; `llmq_train::plan` builds on it.

use crate::backend::{AdamW, AttnShape, Backend, Event, Matmul, MemCategory, Segment, Stream};
use crate::capture::{CaptureFn, GraphKey};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Mem, Shape, Tensor};

/// Allocations of one kind: `count` buffers of the same category, placement, dtype and shape
/// (a model of a million layers is a few dozen of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub category: MemCategory,
    pub mem: Mem,
    pub dtype: DType,
    pub shape: Shape,
    pub count: usize,
    /// Bytes of one buffer.
    pub bytes: usize,
}

impl Allocation {
    pub fn total(&self) -> usize {
        self.bytes.saturating_mul(self.count)
    }
}

#[derive(Default)]
pub struct PlanBackend {
    /// In order of first allocation.
    pub allocations: Vec<Allocation>,
    index: std::collections::HashMap<(MemCategory, Mem, DType, Shape), usize>,
    next_addr: u64,
    events: u32,
}

impl PlanBackend {
    pub fn new() -> PlanBackend {
        PlanBackend { next_addr: 1 << 40, ..Default::default() }
    }
}

fn no_ops() -> Result<()> {
    Err(Error::Op("the planning backend records allocations and runs no ops".into()))
}

#[allow(unused_variables)]
impl Backend for PlanBackend {
    fn name(&self) -> String {
        "plan".into()
    }
    fn alloc(&mut self, cat: MemCategory, mem: Mem, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        let bytes = shape.numel().checked_mul(dtype.size()).ok_or_else(|| Error::OutOfMemory(format!("{dims:?} of {dtype}: size overflows")))?;
        let addr = self.next_addr;
        // 256-byte aligned fake addresses, never dereferenced
        self.next_addr = self.next_addr.saturating_add((bytes as u64).div_ceil(256).max(1) * 256);
        let i = *self.index.entry((cat, mem, dtype, shape)).or_insert_with(|| {
            self.allocations.push(Allocation { category: cat, mem, dtype, shape, count: 0, bytes });
            self.allocations.len() - 1
        });
        self.allocations[i].count += 1;
        Ok(Tensor { addr, dtype, shape, mem })
    }
    fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)> {
        let mut m = std::collections::BTreeMap::new();
        for a in &self.allocations {
            let e = m.entry((a.category, a.mem as u8)).or_insert(0usize);
            *e = e.saturating_add(a.total());
        }
        m.into_iter().map(|((c, mem), b)| (c, Mem::from_index(mem), b)).collect()
    }
    fn free_memory(&self) -> Option<usize> {
        None
    }
    fn limit_device_memory(&mut self, bytes: usize) {}
    fn records_only(&self) -> bool {
        true
    }
    /// Setup uploads are accepted and dropped.
    fn upload(&self, dst: &Tensor, bytes: &[u8]) -> Result<()> {
        Ok(())
    }
    fn download(&self, src: &Tensor) -> Result<Vec<u8>> {
        no_ops().map(|_| vec![])
    }
    fn create_event(&mut self) -> Result<Event> {
        self.events += 1;
        Ok(Event(self.events - 1))
    }
    fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        Ok(())
    }
    fn wait(&self, stream: Stream, ev: Event) -> Result<()> {
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn set_stream(&self, stream: Stream) -> Result<()> {
        Ok(())
    }
    fn capture(&self, key: GraphKey, f: &mut CaptureFn) -> Result<()> {
        no_ops()
    }
    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()> {
        no_ops()
    }
    fn zero(&self, t: &Tensor, stream: Stream) -> Result<()> {
        no_ops()
    }
    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        no_ops()
    }
    fn matmul(&self, args: &Matmul) -> Result<()> {
        no_ops()
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        no_ops()
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        no_ops()
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn residual_rmsnorm_fwd(&self, res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, shape: AttnShape, eps: f32) -> Result<()> {
        no_ops()
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, shape: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn attention_decode(&self, out: &Tensor, qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: usize, shape: AttnShape) -> Result<()> {
        no_ops()
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, shape: AttnShape, rope: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        no_ops()
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, _dloss: f32, _z: f32) -> Result<()> {
        no_ops()
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        no_ops()
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        no_ops()
    }
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        no_ops()
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        no_ops()
    }
    fn adamw(&self, args: &AdamW, segments: &[Segment]) -> Result<()> {
        no_ops()
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        no_ops()
    }
    fn reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, stream: Stream) -> Result<()> {
        no_ops()
    }
}
