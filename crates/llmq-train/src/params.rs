//! Parameter storage: one flat buffer per group (embed, block.l, head) for each of working
//! weights and gradients, with the `ParamLayout` layout (master weights and Adam moments are the
//! optimizer's: `crate::optimizer`).
//!
//! The model reaches block weights and gradients only through `block(l)` / `release(l)` and
//! `grad_block(l)` / `release_grad(l)`. Resident buffers return views; with weight streaming or
//! gradient offloading (`crate::stream`) the block groups live in pinned host memory and these
//! move them through two device slots.

use crate::init;
use crate::memory::MemoryOptions;
use crate::precision::Precision;
use crate::stream::Slots;
use crate::zero::{Dist, Shard};
use llmq_core::all_to_all::AllToAllReduce;
use llmq_core::layout::{GroupLayout, ParamKind, ParamLayout};
use llmq_core::{Backend, DType, Mem, MemCategory, ModelConfig, Result, Stream, Tensor};
use std::cell::Cell;

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
    /// One buffer per group, of `place(group index)` = (elements, memory space).
    pub fn alloc(be: &mut dyn Backend, layout: &ParamLayout, cat: MemCategory, dtype: DType, place: impl Fn(usize) -> (usize, Mem)) -> Result<GroupBuffers> {
        let groups = (0..layout.groups.len())
            .map(|gi| {
                let (numel, mem) = place(gi);
                be.alloc(cat, mem, dtype, &[numel])
            })
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

/// The working weights and gradients of a model, and how they move between memory spaces and
/// ranks.
pub struct Params {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub precision: Precision,
    /// Working weights (matmul inputs).
    pub weights: GroupBuffers,
    pub grads: GroupBuffers,
    /// Weight streaming: the device slots the host-resident block weights pass through.
    weight_slots: Option<Slots>,
    /// Weight streaming with persistent fp8 weights: the matmuls read the kept quants, so the
    /// slots receive only the norms and biases of a block (its bf16 matrices stay on the host).
    slots_skip_matrices: bool,
    /// Gradient offloading: the device slots block gradients accumulate in.
    grad_slots: Option<Slots>,
    /// No micro-batch of the current step has run its backward yet.
    first_micro: Cell<bool>,
    /// Data parallelism over more than one rank: how every buffer is sharded (`crate::zero`).
    pub dist: Option<Dist>,
    /// ZeRO-3: the device slots block weights are gathered into (on the copy stream).
    gathered: Option<Slots>,
    /// ZeRO-3 with persistent fp8 weights: the matmuls read the gathered e4m3 bytes
    /// (`crate::fp8_stream`), so a gather brings only the block's bf16 norms and biases — unless
    /// `whole_gathers` is set (a `--log-amax` step, which reads the bf16 matrices).
    gather_small_only: bool,
    whole_gathers: Cell<bool>,
    /// ZeRO-2: the device slots block gradients are computed in before their reduce-scatter
    /// (on the copy-back stream).
    grad_scratch: Option<Slots>,
    /// The staging of `--all-to-all-reduce` reduce-scatters.
    a2a: Option<AllToAllReduce>,
}

impl Params {
    /// Allocates every buffer; block weights and gradients go to pinned host memory
    /// (write-combined with `mem.write_combined`) where `mem` streams them (an emulated separate
    /// memory space on the CPU backend).
    pub fn alloc(be: &mut dyn Backend, cfg: &ModelConfig, precision: Precision, mem: &MemoryOptions, dist: Option<Dist>) -> Result<Params> {
        let layout = ParamLayout::new(cfg);
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world()));
        let shard = |gi: usize| Shard::of(layout.groups[gi].numel, rank, world);
        let head = layout.head_group();
        let is_block = |gi: usize| gi != ParamLayout::EMBED && gi != head;
        let host = if mem.write_combined { Mem::HostWriteCombined } else { Mem::Host };
        let place = |off: bool| if off { host } else { Mem::Device };
        let shard_w = dist.as_ref().is_some_and(|d| d.shard_weights);
        let shard_g = dist.as_ref().is_some_and(|d| d.shard_gradients);
        // whole groups (padded to world shards) or the rank's shard; block groups may live on the host
        let sized = |gi: usize, sharded: bool, off: bool| {
            let sh = shard(gi);
            (if sharded && is_block(gi) { sh.size } else { sh.padded }, if is_block(gi) { place(off) } else { Mem::Device })
        };
        let weights = GroupBuffers::alloc(be, &layout, MemCategory::Weights, precision.weights, |gi| sized(gi, shard_w, mem.stream_weights))?;
        let grads = GroupBuffers::alloc(be, &layout, MemCategory::Gradients, precision.grads, |gi| sized(gi, shard_g, mem.offload_gradients))?;
        let block_numel = (0..cfg.num_layers).map(|l| shard(layout.block_group(l)).padded).max().unwrap_or(0);
        let slots_skip_matrices = mem.stream_weights && mem.persistent_quants && precision.matmul.is_fp8() && !shard_w;
        let weight_slots = if mem.stream_weights && !shard_w { Some(Slots::alloc(be, MemCategory::Weights, precision.weights, block_numel)?) } else { None };
        let grad_slots = if mem.offload_gradients && !shard_g { Some(Slots::alloc(be, MemCategory::Gradients, precision.grads, block_numel)?) } else { None };
        let gathered = if shard_w { Some(Slots::alloc(be, MemCategory::Weights, precision.weights, block_numel)?) } else { None };
        let grad_scratch = if shard_g { Some(Slots::alloc(be, MemCategory::Gradients, precision.grads, block_numel)?) } else { None };
        let a2a = match &dist {
            Some(d) if d.all_to_all_reduce => {
                let largest = (0..layout.groups.len()).map(|gi| shard(gi).padded).max().unwrap_or(0);
                Some(AllToAllReduce::alloc(be, precision.grads, largest)?)
            }
            _ => None,
        };
        Ok(Params {
            cfg: cfg.clone(),
            layout,
            precision,
            weights,
            grads,
            weight_slots,
            slots_skip_matrices,
            grad_slots,
            first_micro: Cell::new(true),
            dist,
            gathered,
            gather_small_only: shard_w && mem.persistent_quants && precision.matmul.is_fp8(),
            whole_gathers: Cell::new(false),
            grad_scratch,
            a2a,
        })
    }

    /// This rank's shard of group `gi` (the whole group with one rank).
    pub fn shard(&self, gi: usize) -> Shard {
        let (rank, world) = self.dist.as_ref().map_or((0, 1), |d| (d.rank(), d.world()));
        Shard::of(self.layout.groups[gi].numel, rank, world)
    }

    fn is_block(&self, gi: usize) -> bool {
        gi != ParamLayout::EMBED && gi != self.layout.head_group()
    }
    /// Group gi's weights buffer holds only this rank's shard (ZeRO-3 block groups).
    pub fn weights_sharded(&self, gi: usize) -> bool {
        self.gathered.is_some() && self.is_block(gi)
    }
    /// Group gi's gradient buffer holds only this rank's shard (ZeRO-2 block groups).
    fn grads_sharded(&self, gi: usize) -> bool {
        self.grad_scratch.is_some() && self.is_block(gi)
    }

    /// Elements of a block slot: the largest (padded) block group.
    pub fn block_slot_numel(&self) -> usize {
        (0..self.cfg.num_layers).map(|l| self.shard(self.layout.block_group(l)).padded).max().unwrap_or(0)
    }
    /// This rank's part of group gi's working weights (the whole group with one rank).
    pub fn own_weights(&self, gi: usize) -> Tensor {
        let sh = self.shard(gi);
        let w = &self.weights.groups[gi];
        if self.weights_sharded(gi) { w.slice(0, &[sh.len]) } else { w.slice(sh.start, &[sh.len]) }
    }
    /// This rank's part of group gi's gradients (the whole group with one rank; after the
    /// reduce-scatter, the sum over ranks).
    pub fn own_grads(&self, gi: usize) -> Tensor {
        let sh = self.shard(gi);
        let g = &self.grads.groups[gi];
        if self.grads_sharded(gi) { g.slice(0, &[sh.len]) } else { g.slice(sh.start, &[sh.len]) }
    }
    /// The block whose group is gi.
    pub fn block_of(&self, gi: usize) -> Option<usize> {
        self.is_block(gi).then(|| gi - self.layout.block_group(0))
    }

    /// After the step's last micro-batch: every gradient not reduced yet is reduce-scattered in
    /// place (each rank keeps the sum over ranks of its shard). No-op with one rank.
    pub fn reduce_gradients(&self, be: &dyn Backend) -> Result<()> {
        let Some(d) = &self.dist else { return Ok(()) };
        for (gi, g) in self.layout.groups.iter().enumerate() {
            if self.grads_sharded(gi) {
                continue; // reduced block by block in the backward pass
            }
            let sh = self.shard(gi);
            let full = &self.grads.groups[gi];
            self.reduce_scatter(be, d, &full.slice(d.rank() * sh.size, &[sh.size]), full, Stream::Compute, &format!("gradients of {}", g.name))?;
        }
        Ok(())
    }

    /// dst = this rank's shard of the sum over ranks of src, by the group's reduce-scatter or
    /// through the all-to-all staging (`--all-to-all-reduce`): the same bits.
    fn reduce_scatter(&self, be: &dyn Backend, d: &Dist, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        match &self.a2a {
            Some(a) => a.reduce_scatter(d.comm.as_ref(), be, dst, src, false, stream, what),
            None => d.comm.reduce_scatter(be, dst, src, false, stream, what),
        }
    }

    /// After the optimizer updated this rank's shards: every rank gathers the whole working
    /// weights (ZeRO-3 block groups are gathered on use instead). No-op with one rank.
    pub fn gather_weights(&self, be: &dyn Backend) -> Result<()> {
        let Some(d) = &self.dist else { return Ok(()) };
        for (gi, g) in self.layout.groups.iter().enumerate() {
            if self.weights_sharded(gi) {
                continue;
            }
            let sh = self.shard(gi);
            let full = &self.weights.groups[gi];
            d.comm.all_gather(be, full, &full.slice(d.rank() * sh.size, &[sh.size]), Stream::Compute, &format!("weights of {}", g.name))?;
        }
        Ok(())
    }

    /// Weights of block l, on the device (the compute stream waits for a streamed block's
    /// copy). Pair with `release(l)`.
    pub fn block(&self, be: &dyn Backend, l: usize) -> Result<BlockTensors> {
        let gi = self.layout.block_group(l);
        if let Some(g) = &self.gathered {
            self.gather_block(be, g, l)?;
            let full = g.ready_for_compute(be, l, self.shard(gi).padded)?;
            return Ok(BlockTensors::of(&full, &self.layout.groups[gi]));
        }
        Ok(match &self.weight_slots {
            Some(s) => {
                self.fetch_streamed(be, s, l)?;
                BlockTensors::of(&s.ready_for_compute(be, l, self.weights.groups[gi].numel())?, &self.layout.groups[gi])
            }
            None => self.weights.block(&self.layout, l),
        })
    }
    /// Starts bringing block l's weights to the device (streaming; no-op otherwise or past the
    /// last block).
    pub fn prefetch(&self, be: &dyn Backend, l: usize) -> Result<()> {
        if let Some(g) = self.gathered.as_ref().filter(|_| l < self.cfg.num_layers) {
            return self.gather_block(be, g, l);
        }
        match &self.weight_slots {
            Some(s) if l < self.cfg.num_layers => self.fetch_streamed(be, s, l),
            _ => Ok(()),
        }
    }
    /// Weight streaming: starts copying block l's weights to its slot (only the norms and biases
    /// where the matmuls read kept fp8 weights).
    fn fetch_streamed(&self, be: &dyn Backend, s: &Slots, l: usize) -> Result<()> {
        let gi = self.layout.block_group(l);
        let host = &self.weights.groups[gi];
        if !self.slots_skip_matrices {
            return s.fetch(be, l, host);
        }
        s.fetch_with(be, l, host.numel(), |dst| {
            for e in self.layout.groups[gi].entries.iter().filter(|e| !crate::fp8::WEIGHTS.contains(&e.kind)) {
                be.copy(&dst.slice(e.offset, &[e.numel()]), &host.slice(e.offset, &[e.numel()]), Stream::Copy)?;
            }
            Ok(())
        })
    }
    /// ZeRO-3: starts gathering block l's weights from every rank's shard into its slot on the
    /// copy stream (unless the slot holds them).
    fn gather_block(&self, be: &dyn Backend, g: &Slots, l: usize) -> Result<()> {
        let (Some(d), gi) = (&self.dist, self.layout.block_group(l)) else { return Ok(()) };
        let shard = &self.weights.groups[gi];
        if self.gather_small_only && !self.whole_gathers.get() {
            return g.fetch_with(be, l, self.shard(gi).padded, |dst| self.gather_small(be, d, dst, gi, l));
        }
        g.fetch_with(be, l, self.shard(gi).padded, |dst| d.comm.all_gather(be, dst, shard, Stream::Copy, &format!("weights of block {l}")))
    }
    /// Brings block l's norms and biases (every entry the fp8 matmuls do not read) into `dst`,
    /// laid out like the whole group: each piece of an entry that lies in one rank's shard is
    /// broadcast from that rank, in the same order on every rank.
    fn gather_small(&self, be: &dyn Backend, d: &Dist, dst: &Tensor, gi: usize, l: usize) -> Result<()> {
        let (rank, per_rank) = (d.rank(), self.shard(gi).size);
        let shard = &self.weights.groups[gi];
        for e in self.layout.groups[gi].entries.iter().filter(|e| !crate::fp8::WEIGHTS.contains(&e.kind)) {
            let (start, end) = (e.offset, e.offset + e.numel());
            for owner in start / per_rank..end.div_ceil(per_rank) {
                let (lo, hi) = (start.max(owner * per_rank), end.min((owner + 1) * per_rank));
                let piece = dst.slice(lo, &[hi - lo]);
                if owner == rank {
                    be.copy(&piece, &shard.slice(lo - owner * per_rank, &[hi - lo]), Stream::Copy)?;
                }
                d.comm.broadcast(be, &piece, owner, Stream::Copy, &format!("{:?} of block {l}", e.kind))?;
            }
        }
        Ok(())
    }
    /// `--log-amax` steps read the bf16 matrices of gathered blocks: gather them whole while
    /// `on` (numbers are the same either way; only the bytes moved differ).
    pub fn gather_whole_blocks(&self, on: bool) {
        if self.gather_small_only && on != self.whole_gathers.replace(on) {
            if let Some(g) = &self.gathered {
                g.invalidate();
            }
        }
    }

    /// Done with block l's weights for this pass: its slot may be refilled.
    pub fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        if let Some(g) = &self.gathered {
            return g.release(be, l);
        }
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
        if let Some(g) = &self.gathered {
            return g.view(l, self.shard(gi).padded);
        }
        match &self.weight_slots {
            Some(s) => s.view(l, host.numel()),
            None => *host,
        }
    }
    /// Block l's bf16 matrices where a kernel can read them during a pass: in its device slot,
    /// except where the slots skip them (then on the host).
    pub fn block_matrices(&self, l: usize) -> Tensor {
        if self.slots_skip_matrices {
            return self.weights.groups[self.layout.block_group(l)];
        }
        self.block_group_weights(l)
    }
    /// The host copies (or shards) of the weights changed (optimizer step, load): slots must be
    /// refilled.
    pub fn weights_changed(&self) {
        if let Some(s) = &self.weight_slots {
            s.invalidate();
        }
        if let Some(g) = &self.gathered {
            g.invalidate();
        }
    }
    pub fn head(&self) -> HeadTensors {
        self.weights.head(&self.layout)
    }
    /// Gradients of block l to accumulate into (offloaded: a device slot, zeroed on the step's
    /// first micro-batch, else loaded from the host). Pair with `release_grad(l)`.
    pub fn grad_block(&self, be: &dyn Backend, l: usize) -> Result<BlockTensors> {
        let gi = self.layout.block_group(l);
        if let Some(g) = &self.grad_scratch {
            let slot = g.begin_write(be, l, self.shard(gi).padded)?;
            be.zero(&slot, Stream::Compute)?;
            return Ok(BlockTensors::of(&slot, &self.layout.groups[gi]));
        }
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
        if let (Some(g), Some(d)) = (&self.grad_scratch, &self.dist) {
            let gi = self.layout.block_group(l);
            let shard = &self.grads.groups[gi];
            return g.store_with(be, l, self.shard(gi).padded, |src| self.reduce_scatter(be, d, shard, src, Stream::CopyBack, &format!("gradients of block {l}")));
        }
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
        for s in [&self.grad_slots, &self.grad_scratch].into_iter().flatten() {
            s.join(be)?;
        }
        Ok(())
    }
    pub fn grad_head(&self) -> HeadTensors {
        self.grads.head(&self.layout)
    }

    /// Initialises the working weights from scratch (REFERENCE.md: N(0, 0.02), out and down
    /// projections scaled by 1/sqrt(2L), norms 1, biases 0), seeded; identical on every backend.
    /// (`Trainer::init_from_scratch` sets the optimizer's master weights too.)
    pub fn init_from_scratch(&self, be: &dyn Backend, seed: u64) -> Result<()> {
        // one group at a time: the host holds one group's f32 values, not the whole model's
        (0..self.layout.groups.len()).try_for_each(|gi| self.set_group_f32(be, gi, &init::init_group(&self.cfg, &self.layout, seed, gi)))
    }

    /// Sets the working weights from f32 host values, one vector per group (a trainer's master
    /// weights are the optimizer's: `Trainer::set_weights`).
    pub fn set_weights_f32(&self, be: &dyn Backend, groups: &[Vec<f32>]) -> Result<()> {
        groups.iter().enumerate().try_for_each(|(gi, vals)| self.set_group_f32(be, gi, vals))
    }

    /// Group `gi`'s working weights from f32 host values of the whole group (the rank's shard of
    /// them where the buffer holds one).
    pub fn set_group_f32(&self, be: &dyn Backend, gi: usize, vals: &[f32]) -> Result<()> {
        let w = &self.weights.groups[gi];
        if self.weights_sharded(gi) {
            let sh = self.shard(gi);
            return upload_f32(be, &w.slice(0, &[sh.len]), &vals[sh.start..sh.start + sh.len]);
        }
        upload_f32(be, &w.slice(0, &[vals.len()]), vals)
    }

    /// Gradients as f32 host values, one vector per group (one rank: after a reduce-scatter the
    /// gradients of a rank are meaningful only in its shard).
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
