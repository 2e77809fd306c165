//! Parameter storage: one flat buffer per group (embed, block.l, head) for each of working
//! weights, master weights, gradients, Adam m and Adam v, all with the `ParamLayout` layout.
//!
//! The model reaches block weights and gradients only through `block(l)` / `release(l)` and
//! `grad_block(l)` / `release_grad(l)`. Resident buffers return views; with weight streaming or
//! gradient offloading (`crate::stream`) the block groups live in pinned host memory and these
//! move them through two device slots.

use crate::init;
use crate::stream::Slots;
use std::cell::Cell;
use crate::memory::MemoryOptions;
use crate::precision::Precision;
use llmq_core::layout::{GroupLayout, ParamKind, ParamLayout};
use llmq_core::{Backend, DType, Mem, MemCategory, ModelConfig, Result, Stream, Tensor};

/// Typed views of one block's tensors inside a flat group buffer.
#[derive(Clone, Copy, Debug)]
pub struct BlockTensors {
    pub ln1: Tensor,
    pub qkv_w: Tensor,
    pub qkv_b: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub o_w: Tensor,
    pub ln2: Tensor,
    pub up_gate_w: Tensor,
    pub down_w: Tensor,
}

pub fn view(group: &Tensor, g: &GroupLayout, kind: ParamKind) -> Option<Tensor> {
    g.entry(kind).map(|e| group.slice(e.offset, &e.shape))
}

impl BlockTensors {
    pub fn of(group: &Tensor, g: &GroupLayout) -> BlockTensors {
        let v = |k| view(group, g, k).unwrap_or_else(|| panic!("layout of {} lacks {:?}", g.name, k));
        BlockTensors {
            ln1: v(ParamKind::Ln1),
            qkv_w: v(ParamKind::QkvW),
            qkv_b: view(group, g, ParamKind::QkvB),
            q_norm: view(group, g, ParamKind::QNorm),
            k_norm: view(group, g, ParamKind::KNorm),
            o_w: v(ParamKind::OutW),
            ln2: v(ParamKind::Ln2),
            up_gate_w: v(ParamKind::UpGateW),
            down_w: v(ParamKind::DownW),
        }
    }
}

/// Views of the non-block tensors.
#[derive(Clone, Copy, Debug)]
pub struct HeadTensors {
    pub embedding: Tensor,
    pub final_norm: Tensor,
    /// The embedding itself when tied.
    pub lm_head: Tensor,
}

/// A set of flat per-group buffers (one per group of the layout).
#[derive(Clone, Debug)]
pub struct GroupBuffers {
    pub groups: Vec<Tensor>,
}

impl GroupBuffers {
    pub fn alloc(be: &mut dyn Backend, layout: &ParamLayout, cat: MemCategory, mem: Mem, dtype: DType) -> Result<GroupBuffers> {
        let groups = layout
            .groups
            .iter()
            .map(|g| be.alloc(cat, mem, dtype, &[g.numel]))
            .collect::<Result<Vec<_>>>()?;
        Ok(GroupBuffers { groups })
    }
    /// Like `alloc`, with the block groups in `blocks` and the embedding and head on the device.
    pub fn alloc_blocks(be: &mut dyn Backend, layout: &ParamLayout, cat: MemCategory, blocks: Mem, dtype: DType) -> Result<GroupBuffers> {
        let head = layout.head_group();
        let groups = layout
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| be.alloc(cat, if gi == ParamLayout::EMBED || gi == head { Mem::Device } else { blocks }, dtype, &[g.numel]))
            .collect::<Result<Vec<_>>>()?;
        Ok(GroupBuffers { groups })
    }
    pub fn block(&self, layout: &ParamLayout, l: usize) -> BlockTensors {
        let gi = layout.block_group(l);
        BlockTensors::of(&self.groups[gi], &layout.groups[gi])
    }
    pub fn head(&self, layout: &ParamLayout) -> HeadTensors {
        let e = &layout.groups[ParamLayout::EMBED];
        let embedding = view(&self.groups[ParamLayout::EMBED], e, ParamKind::Embedding).unwrap();
        let hg = layout.head_group();
        let h = &layout.groups[hg];
        let final_norm = view(&self.groups[hg], h, ParamKind::FinalNorm).unwrap();
        let lm_head = view(&self.groups[hg], h, ParamKind::LmHead).unwrap_or(embedding);
        HeadTensors { embedding, final_norm, lm_head }
    }
    pub fn zero(&self, be: &dyn Backend) -> Result<()> {
        self.zero_on(be, Stream::Compute)
    }
    pub fn zero_on(&self, be: &dyn Backend, stream: Stream) -> Result<()> {
        self.groups.iter().try_for_each(|t| be.zero(t, stream))
    }
    /// Zeroes the device-resident groups (offloaded gradients are overwritten by the first
    /// micro-batch instead).
    pub fn zero_device_on(&self, be: &dyn Backend, stream: Stream) -> Result<()> {
        self.groups.iter().filter(|t| t.mem == Mem::Device).try_for_each(|t| be.zero(t, stream))
    }
}

/// All parameter-shaped state of a model.
pub struct Params {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub precision: Precision,
    /// Working weights (matmul inputs).
    pub weights: GroupBuffers,
    /// Master weights; the same tensors as `weights` when the dtypes agree.
    pub master: GroupBuffers,
    pub grads: GroupBuffers,
    pub m: GroupBuffers,
    pub v: GroupBuffers,
    /// Weight streaming: the device slots the host-resident block weights pass through.
    weight_slots: Option<Slots>,
    /// Gradient offloading: the device slots block gradients accumulate in.
    grad_slots: Option<Slots>,
    /// No micro-batch of the current step has run its backward yet.
    first_micro: Cell<bool>,
}

impl Params {
    /// Allocates every buffer; master weights and Adam moments go to pinned host memory where
    /// `mem` offloads them (the optimizer reads and writes them there directly: mapped host
    /// memory on a GPU, an emulated separate memory space on the CPU backend).
    pub fn alloc(be: &mut dyn Backend, cfg: &ModelConfig, precision: Precision, mem: &MemoryOptions) -> Result<Params> {
        let layout = ParamLayout::new(cfg);
        let place = |off: bool| if off { Mem::Host } else { Mem::Device };
        let weights = GroupBuffers::alloc_blocks(be, &layout, MemCategory::Weights, place(mem.stream_weights), precision.weights)?;
        let master = if precision.master == precision.weights {
            weights.clone()
        } else {
            GroupBuffers::alloc(be, &layout, MemCategory::Master, place(mem.offload_master), precision.master)?
        };
        let grads = GroupBuffers::alloc_blocks(be, &layout, MemCategory::Gradients, place(mem.offload_gradients), precision.grads)?;
        let m = GroupBuffers::alloc(be, &layout, MemCategory::AdamM, place(mem.offload_opt_m), precision.opt_m)?;
        let v = GroupBuffers::alloc(be, &layout, MemCategory::AdamV, place(mem.offload_opt_v), precision.opt_v)?;
        let block_numel = (0..cfg.num_layers).map(|l| layout.groups[layout.block_group(l)].numel).max().unwrap_or(0);
        let weight_slots = if mem.stream_weights { Some(Slots::alloc(be, MemCategory::Weights, precision.weights, block_numel)?) } else { None };
        let grad_slots = if mem.offload_gradients { Some(Slots::alloc(be, MemCategory::Gradients, precision.grads, block_numel)?) } else { None };
        Ok(Params { cfg: cfg.clone(), layout, precision, weights, master, grads, m, v, weight_slots, grad_slots, first_micro: Cell::new(true) })
    }

    pub fn master_is_weights(&self) -> bool {
        self.master.groups[0].addr == self.weights.groups[0].addr
    }

    /// Weights of block l, on the device (the compute stream waits for a streamed block's
    /// copy). Pair with `release(l)`.
    pub fn block(&self, be: &dyn Backend, l: usize) -> Result<BlockTensors> {
        let gi = self.layout.block_group(l);
        Ok(match &self.weight_slots {
            Some(s) => BlockTensors::of(&s.acquire(be, l, &self.weights.groups[gi])?, &self.layout.groups[gi]),
            None => self.weights.block(&self.layout, l),
        })
    }
    /// Starts bringing block l's weights to the device (streaming; no-op otherwise or past the
    /// last block).
    pub fn prefetch(&self, be: &dyn Backend, l: usize) -> Result<()> {
        match &self.weight_slots {
            Some(s) if l < self.cfg.num_layers => s.fetch(be, l, &self.weights.groups[self.layout.block_group(l)]),
            _ => Ok(()),
        }
    }
    /// Done with block l's weights for this pass: its slot may be refilled.
    pub fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        match &self.weight_slots {
            Some(s) => s.release(be, l),
            None => Ok(()),
        }
    }
    /// Block l's whole weight group where the compute stream reads it: its device slot while
    /// streamed (between `block(l)` and the next fetch into that slot), else the group itself.
    pub fn block_group_weights(&self, l: usize) -> Tensor {
        let gi = self.layout.block_group(l);
        let host = &self.weights.groups[gi];
        match &self.weight_slots {
            Some(s) => s.view(l, host.numel()),
            None => *host,
        }
    }
    /// The host copies of the weights changed (optimizer step, load): slots must be refetched.
    pub fn weights_changed(&self) {
        if let Some(s) = &self.weight_slots {
            s.invalidate();
        }
    }
    pub fn head(&self) -> HeadTensors {
        self.weights.head(&self.layout)
    }
    /// Gradients of block l to accumulate into (offloaded: a device slot, zeroed on the step's
    /// first micro-batch, else loaded from the host). Pair with `release_grad(l)`.
    pub fn grad_block(&self, be: &dyn Backend, l: usize) -> Result<BlockTensors> {
        let gi = self.layout.block_group(l);
        Ok(match &self.grad_slots {
            Some(s) => BlockTensors::of(&s.prepare_grad(be, l, &self.grads.groups[gi], self.first_micro.get())?, &self.layout.groups[gi]),
            None => self.grads.block(&self.layout, l),
        })
    }
    /// Starts loading block l's offloaded gradient accumulator (after the first micro-batch).
    pub fn prefetch_grad(&self, be: &dyn Backend, l: usize) -> Result<()> {
        match &self.grad_slots {
            Some(s) if l < self.cfg.num_layers && !self.first_micro.get() => s.prefetch_grad(be, l, &self.grads.groups[self.layout.block_group(l)]),
            _ => Ok(()),
        }
    }
    /// Block l's backward is issued: an offloaded gradient goes back to the host.
    pub fn release_grad(&self, be: &dyn Backend, l: usize) -> Result<()> {
        match &self.grad_slots {
            Some(s) => s.store_grad(be, l, &self.grads.groups[self.layout.block_group(l)]),
            None => Ok(()),
        }
    }
    /// A new optimizer step starts: the next backward is its first micro-batch.
    pub fn start_step(&self) {
        self.first_micro.set(true);
    }
    /// A micro-batch's backward is issued: the compute stream waits for the gradients' copies
    /// back, so that the host accumulators are complete for what follows.
    pub fn micro_batch_done(&self, be: &dyn Backend) -> Result<()> {
        self.first_micro.set(false);
        match &self.grad_slots {
            Some(s) => s.join(be),
            None => Ok(()),
        }
    }
    pub fn grad_head(&self) -> HeadTensors {
        self.grads.head(&self.layout)
    }

    /// Initialises from scratch (REFERENCE.md: N(0, 0.02), out and down projections scaled by
    /// 1/sqrt(2L), norms 1, biases 0), seeded; identical on every backend.
    pub fn init_from_scratch(&self, be: &dyn Backend, seed: u64) -> Result<()> {
        // one group at a time: the host holds one group's f32 values, not the whole model's
        (0..self.layout.groups.len()).try_for_each(|gi| self.set_group_f32(be, gi, &init::init_group(&self.cfg, &self.layout, seed, gi)))
    }

    /// Sets master (and working) weights from f32 host values, one vector per group.
    pub fn set_master_f32(&self, be: &dyn Backend, groups: &[Vec<f32>]) -> Result<()> {
        groups.iter().enumerate().try_for_each(|(gi, vals)| self.set_group_f32(be, gi, vals))
    }

    /// Group `gi`'s master (and working) weights from f32 host values.
    fn set_group_f32(&self, be: &dyn Backend, gi: usize, vals: &[f32]) -> Result<()> {
        upload_f32(be, &self.master.groups[gi], vals)?;
        if !self.master_is_weights() {
            upload_f32(be, &self.weights.groups[gi], vals)?;
        }
        Ok(())
    }

    /// Master weights as f32 host values, one vector per group.
    pub fn master_f32(&self, be: &dyn Backend) -> Result<Vec<Vec<f32>>> {
        self.master.groups.iter().map(|t| download_f32(be, t)).collect()
    }
    pub fn grads_f32(&self, be: &dyn Backend) -> Result<Vec<Vec<f32>>> {
        self.grads.groups.iter().map(|t| download_f32(be, t)).collect()
    }
}

pub fn upload_f32(be: &dyn Backend, t: &Tensor, vals: &[f32]) -> Result<()> {
    let mut bytes = vec![0u8; t.bytes()];
    llmq_core::dtype::encode_into(t.dtype, vals, &mut bytes);
    be.upload(t, &bytes)
}

pub fn download_f32(be: &dyn Backend, t: &Tensor) -> Result<Vec<f32>> {
    let bytes = be.download(t)?;
    let mut v = vec![0f32; t.numel()];
    llmq_core::dtype::decode_into(t.dtype, &bytes, &mut v);
    Ok(v)
}

pub fn upload_i32(be: &dyn Backend, t: &Tensor, vals: &[i32]) -> Result<()> {
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    be.upload(t, &bytes)
}
