//! Parameter storage: one flat buffer per group (embed, block.l, head) for each of working
//! weights, master weights, gradients, Adam m and Adam v, all with the `ParamLayout` layout.
//!
//! The model reaches block weights and gradients only through `block(l)` / `release(l)` and
//! `grad_block(l)` / `release_grad(l)`. Resident buffers return views; with weight streaming or
//! gradient offloading (`crate::stream`) the block groups live in pinned host memory and these
//! move them through two device slots.

use crate::init;
use crate::memory::MemoryOptions;
use crate::precision::Precision;
use crate::opt_stage::OptStage;
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
    /// Device slots the optimizer stages host-resident block state through (none: zero-copy or
    /// nothing offloaded).
    opt_stage: Option<OptStage>,
    /// The staging of `--all-to-all-reduce` reduce-scatters.
    a2a: Option<AllToAllReduce>,
}

/// The rank's shard of one group's optimizer state and the tensors the update reads and writes
/// (whole groups with one rank).
#[derive(Clone, Copy, Debug)]
pub struct OptShard {
    pub shard: Shard,
    pub params: Tensor,
    pub master: Tensor,
    pub grads: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

impl Params {
    /// Allocates every buffer; master weights and Adam moments go to pinned host memory
    /// (write-combined with `mem.write_combined`) where `mem` offloads them, and so do block
    /// weights and gradients where it streams them (an emulated separate memory space on the
    /// CPU backend). The optimizer stages block state through device slots (`crate::opt_stage`).
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
        let master = if precision.master == precision.weights {
            weights.clone()
        } else {
            GroupBuffers::alloc(be, &layout, MemCategory::Master, precision.master, |gi| (shard(gi).size, place(mem.offload_master)))?
        };
        let grads = GroupBuffers::alloc(be, &layout, MemCategory::Gradients, precision.grads, |gi| sized(gi, shard_g, mem.offload_gradients))?;
        let m = GroupBuffers::alloc(be, &layout, MemCategory::AdamM, precision.opt_m, |gi| (shard(gi).size, place(mem.offload_opt_m)))?;
        let v = GroupBuffers::alloc(be, &layout, MemCategory::AdamV, precision.opt_v, |gi| (shard(gi).size, place(mem.offload_opt_v)))?;
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
        let mut p = Params {
            cfg: cfg.clone(),
            layout,
            precision,
            weights,
            master,
            grads,
            m,
            v,
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
            opt_stage: None,
        };
        if !mem.zero_copy && cfg.num_layers > 0 {
            let sample = p.opt_shard(p.layout.block_group(0));
            p.opt_stage = OptStage::alloc(be, &sample, block_numel)?;
        }
        Ok(p)
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

    /// The tensors the optimizer reads and writes for this rank's shard of group `gi`.
    pub fn opt_shard(&self, gi: usize) -> OptShard {
        let sh = self.shard(gi);
        let len = [sh.len];
        let own = |t: &Tensor, sharded: bool| if sharded { t.slice(0, &len) } else { t.slice(sh.start, &len) };
        let params = own(&self.weights.groups[gi], self.weights_sharded(gi));
        let master = if self.master_is_weights() { params } else { self.master.groups[gi].slice(0, &len) };
        OptShard {
            shard: sh,
            params,
            master,
            grads: own(&self.grads.groups[gi], self.grads_sharded(gi)),
            m: self.m.groups[gi].slice(0, &len),
            v: self.v.groups[gi].slice(0, &len),
        }
    }

    /// The tensors the update of group gi reads and writes: `opt_shard(gi)`, with a block's
    /// host-resident ones replaced by device slots where they are staged (`crate::opt_stage`);
    /// starts bringing the next block's. Pair with `opt_issued(gi)`, and end the update with
    /// `opt_finish`.
    pub fn opt_begin(&self, be: &dyn Backend, gi: usize) -> Result<OptShard> {
        let host = self.opt_shard(gi);
        let (Some(st), Some(l)) = (&self.opt_stage, self.block_of(gi)) else { return Ok(host) };
        let t = st.acquire(be, l, &host)?;
        if l + 1 < self.cfg.num_layers {
            st.prefetch(be, l + 1, &self.opt_shard(gi + 1))?;
        }
        Ok(t)
    }
    /// Group gi's update is issued: staged state goes back to the host.
    pub fn opt_issued(&self, be: &dyn Backend, gi: usize) -> Result<()> {
        match (&self.opt_stage, self.block_of(gi)) {
            (Some(st), Some(l)) => st.write_back(be, l, &self.opt_shard(gi)),
            _ => Ok(()),
        }
    }
    /// Every group's update is issued: later work sees the host state complete.
    pub fn opt_finish(&self, be: &dyn Backend) -> Result<()> {
        self.opt_stage.as_ref().map_or(Ok(()), |st| st.finish(be))
    }
    /// The optimizer copies block state through device slots (copies a graph of the update would
    /// have to hold, on the copy streams).
    pub fn stages_optimizer(&self) -> bool {
        self.opt_stage.is_some()
    }
    /// The block whose group is gi.
    fn block_of(&self, gi: usize) -> Option<usize> {
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

    pub fn master_is_weights(&self) -> bool {
        self.master.groups[0].addr == self.weights.groups[0].addr
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

    /// Group `gi`'s master (and working) weights from f32 host values of the whole group: each
    /// buffer takes its part (the rank's shard, or the whole group).
    fn set_group_f32(&self, be: &dyn Backend, gi: usize, vals: &[f32]) -> Result<()> {
        let sh = self.shard(gi);
        let mine = &vals[sh.start..sh.start + sh.len];
        let w = &self.weights.groups[gi];
        if self.weights_sharded(gi) {
            upload_f32(be, &w.slice(0, &[sh.len]), mine)?;
        } else {
            upload_f32(be, &w.slice(0, &[vals.len()]), vals)?;
        }
        if !self.master_is_weights() {
            upload_f32(be, &self.master.groups[gi].slice(0, &[sh.len]), mine)?;
        }
        Ok(())
    }

    /// Master weights as f32 host values, one vector per group (gathered from every rank: the
    /// whole model on every rank).
    pub fn master_f32(&self, be: &dyn Backend) -> Result<Vec<Vec<f32>>> {
        (0..self.layout.groups.len()).map(|gi| self.gather_f32(be, &self.opt_shard(gi).master, gi)).collect()
    }

    /// The whole group gi from every rank's shard `mine` (this rank's part of a sharded buffer).
    fn gather_f32(&self, be: &dyn Backend, mine: &Tensor, gi: usize) -> Result<Vec<f32>> {
        let Some(d) = &self.dist else { return download_f32(be, mine) };
        let parts = d.comm.all_gather_bytes(&be.download(mine)?, &format!("{} of {}", "master weights", self.layout.groups[gi].name))?;
        let bytes: Vec<u8> = parts.concat();
        let mut v = vec![0f32; bytes.len() / mine.dtype.size()];
        llmq_core::dtype::decode_into(mine.dtype, &bytes, &mut v);
        Ok(v)
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
