//! Parameter storage: one flat buffer per group (embed, block.l, head) for each of working
//! weights, master weights, gradients, Adam m and Adam v, all with the `ParamLayout` layout.
//!
//! The model reaches weights only through `block(l)` / `release(l)` and `embed()` / `head()`.
//! Today every group is resident, so these return views; with ZeRO-3 or weight offload, `block(l)`
//! becomes "wait for the gather of l, start prefetching l+1" and `release(l)` frees its slot.

use crate::init;
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
}

impl Params {
    /// Allocates every buffer; master weights and Adam moments go to pinned host memory where
    /// `mem` offloads them (the optimizer reads and writes them there directly: mapped host
    /// memory on a GPU, an emulated separate memory space on the CPU backend).
    pub fn alloc(be: &mut dyn Backend, cfg: &ModelConfig, precision: Precision, mem: &MemoryOptions) -> Result<Params> {
        let layout = ParamLayout::new(cfg);
        let place = |off: bool| if off { Mem::Host } else { Mem::Device };
        let weights = GroupBuffers::alloc(be, &layout, MemCategory::Weights, Mem::Device, precision.weights)?;
        let master = if precision.master == precision.weights {
            weights.clone()
        } else {
            GroupBuffers::alloc(be, &layout, MemCategory::Master, place(mem.offload_master), precision.master)?
        };
        let grads = GroupBuffers::alloc(be, &layout, MemCategory::Gradients, Mem::Device, precision.grads)?;
        let m = GroupBuffers::alloc(be, &layout, MemCategory::AdamM, place(mem.offload_opt_m), precision.opt_m)?;
        let v = GroupBuffers::alloc(be, &layout, MemCategory::AdamV, place(mem.offload_opt_v), precision.opt_v)?;
        Ok(Params { cfg: cfg.clone(), layout, precision, weights, master, grads, m, v })
    }

    pub fn master_is_weights(&self) -> bool {
        self.master.groups[0].addr == self.weights.groups[0].addr
    }

    /// Weights of block l. Pair with `release(l)`.
    pub fn block(&self, l: usize) -> BlockTensors {
        self.weights.block(&self.layout, l)
    }
    /// Done with block l's weights for this pass (a no-op while all weights are resident).
    pub fn release(&self, _l: usize) {}
    pub fn head(&self) -> HeadTensors {
        self.weights.head(&self.layout)
    }
    pub fn grad_block(&self, l: usize) -> BlockTensors {
        self.grads.block(&self.layout, l)
    }
    pub fn grad_head(&self) -> HeadTensors {
        self.grads.head(&self.layout)
    }

    /// Initialises from scratch (REFERENCE.md: N(0, 0.02), out and down projections scaled by
    /// 1/sqrt(2L), norms 1, biases 0), seeded; identical on every backend.
    pub fn init_from_scratch(&self, be: &dyn Backend, seed: u64) -> Result<()> {
        let host = init::init_groups(&self.cfg, &self.layout, seed);
        self.set_master_f32(be, &host)
    }

    /// Sets master (and working) weights from f32 host values, one vector per group.
    pub fn set_master_f32(&self, be: &dyn Backend, groups: &[Vec<f32>]) -> Result<()> {
        for (gi, vals) in groups.iter().enumerate() {
            upload_f32(be, &self.master.groups[gi], vals)?;
            if !self.master_is_weights() {
                upload_f32(be, &self.weights.groups[gi], vals)?;
            }
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
