//! The optimizer: master weights, Adam m and v, where they live, and the AdamW update.
//!
//! Master weights are the working weights themselves when the dtypes agree (`master_is_weights`),
//! else a buffer of their own. With several ranks the optimizer state holds only the rank's shard
//! of each group (ZeRO-1, `crate::zero`). Placement (`MemoryOptions`): each role on the device or
//! in pinned host memory (`--offload-master`, `--offload-opt-m`, `--offload-opt-v`, write-combined
//! with `--write-combined`); the update stages host-resident block state through device slots
//! (`stage`), or with `--zero-copy` reads and writes it in place. The update itself, with the
//! per-step scalars that CUDA graphs replay, is in `update`.
//!
//! `Params` keeps the working weights and gradients; the optimizer reads them through it.

mod stage;
mod update;

use crate::memory::MemoryOptions;
use crate::params::{download_f32, upload_f32, GroupBuffers, Params};
use crate::zero::Shard;
use llmq_core::{Backend, DType, Mem, MemCategory, Result, Tensor, ADAM_SCALARS};
use stage::OptStage;

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

/// Master weights, Adam moments and the update's device-side scalars and staging slots.
pub struct Optimizer {
    /// Master weights; the same tensors as the working weights when the dtypes agree.
    master: GroupBuffers,
    m: GroupBuffers,
    v: GroupBuffers,
    /// Device slots the update stages host-resident block state through (none: zero-copy or
    /// nothing offloaded).
    stage: Option<OptStage>,
    /// i32 [parameter groups, ADAM_SCALARS]: each group's AdamW step scalars, written by the
    /// host before every update (`llmq_core::AdamStep`), so that a captured update replays
    /// with them.
    scalars: Tensor,
    /// Updates applied (the Adam bias-correction counter).
    updates: u64,
}

impl Optimizer {
    /// Allocates the optimizer state of `p`'s parameters (this rank's shards), placed as `mem`
    /// says, and the staging slots of the host-resident block state.
    pub fn alloc(be: &mut dyn Backend, p: &Params, mem: &MemoryOptions) -> Result<Optimizer> {
        let host = if mem.write_combined { Mem::HostWriteCombined } else { Mem::Host };
        let place = |off: bool| if off { host } else { Mem::Device };
        let pr = &p.precision;
        let sized = |off: bool| move |gi: usize| (p.shard(gi).size, place(off));
        let master = if pr.master == pr.weights {
            p.weights.clone()
        } else {
            GroupBuffers::alloc(be, &p.layout, MemCategory::Master, pr.master, sized(mem.offload_master))?
        };
        let m = GroupBuffers::alloc(be, &p.layout, MemCategory::AdamM, pr.opt_m, sized(mem.offload_opt_m))?;
        let v = GroupBuffers::alloc(be, &p.layout, MemCategory::AdamV, pr.opt_v, sized(mem.offload_opt_v))?;
        let scalars = be.alloc(MemCategory::Other, Mem::Device, DType::I32, &[p.layout.groups.len(), ADAM_SCALARS])?;
        let mut opt = Optimizer { master, m, v, stage: None, scalars, updates: 0 };
        if !mem.zero_copy && p.cfg.num_layers > 0 {
            let sample = opt.shard_tensors(p, p.layout.block_group(0));
            opt.stage = OptStage::alloc(be, &sample, p.block_slot_numel())?;
        }
        Ok(opt)
    }

    /// The master weights are the working weights (no buffer of their own).
    pub fn master_is_weights(&self, p: &Params) -> bool {
        self.master.groups[0].addr == p.weights.groups[0].addr
    }

    /// Updates applied so far (the Adam bias-correction counter).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The tensors the update reads and writes for this rank's shard of group `gi`.
    pub fn shard_tensors(&self, p: &Params, gi: usize) -> OptShard {
        let sh = p.shard(gi);
        let len = [sh.len];
        let params = p.own_weights(gi);
        let master = if self.master_is_weights(p) { params } else { self.master.groups[gi].slice(0, &len) };
        OptShard { shard: sh, params, master, grads: p.own_grads(gi), m: self.m.groups[gi].slice(0, &len), v: self.v.groups[gi].slice(0, &len) }
    }

    /// Group `gi`'s master weights from f32 host values of the whole group (the rank's shard
    /// of them); the working weights are `Params::set_group_f32`'s. No-op when they are the
    /// same tensors.
    pub fn set_group_master_f32(&self, be: &dyn Backend, p: &Params, gi: usize, vals: &[f32]) -> Result<()> {
        if self.master_is_weights(p) {
            return Ok(());
        }
        let sh = p.shard(gi);
        upload_f32(be, &self.master.groups[gi].slice(0, &[sh.len]), &vals[sh.start..sh.start + sh.len])
    }

    /// Master weights as f32 host values, one vector per group (gathered from every rank: the
    /// whole model on every rank).
    pub fn master_f32(&self, be: &dyn Backend, p: &Params) -> Result<Vec<Vec<f32>>> {
        (0..p.layout.groups.len()).map(|gi| self.gather_f32(be, p, &self.shard_tensors(p, gi).master, gi, "master weights")).collect()
    }

    /// The whole group gi from every rank's shard `mine` (this rank's part of a sharded buffer).
    fn gather_f32(&self, be: &dyn Backend, p: &Params, mine: &Tensor, gi: usize, what: &str) -> Result<Vec<f32>> {
        let Some(d) = &p.dist else { return download_f32(be, mine) };
        let parts = d.comm.all_gather_bytes(&be.download(mine)?, &format!("{what} of {}", p.layout.groups[gi].name))?;
        let bytes: Vec<u8> = parts.concat();
        let mut v = vec![0f32; bytes.len() / mine.dtype.size()];
        llmq_core::dtype::decode_into(mine.dtype, &bytes, &mut v);
        Ok(v)
    }

    /// The checkpointed state of group gi: (name, this rank's part of it), in the dtypes of the
    /// run. Loading writes these tensors and then calls `state_loaded`.
    pub fn state_tensors(&self, p: &Params, gi: usize) -> [(String, Tensor); 3] {
        let name = &p.layout.groups[gi].name;
        let t = self.shard_tensors(p, gi);
        [(format!("master.{name}"), t.master), (format!("adam_m.{name}"), t.m), (format!("adam_v.{name}"), t.v)]
    }

    /// Group gi's state was loaded: the rank's shard of the working weights is re-derived from
    /// the master weights (gather them with `Params::gather_weights` after the last group).
    pub fn state_loaded(&self, be: &dyn Backend, p: &Params, gi: usize) -> Result<()> {
        if self.master_is_weights(p) {
            return Ok(());
        }
        let t = self.shard_tensors(p, gi);
        be.convert(&t.params, &t.master)
    }

    /// A checkpoint's update counter (checked against its step by the loader).
    pub(crate) fn restore_updates(&mut self, updates: u64) {
        self.updates = updates;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::MemoryPlan;
    use crate::trainer::RunBuffers;
    use crate::zero::Shard;
    use llmq_core::cpu::CpuBackend;
    use llmq_core::layout::ParamLayout;
    use llmq_core::{Arch, ModelConfig};

    /// Every role of the optimizer state is where the options put it, and the plan counts, for
    /// each role and rank count, the whole shard where it lives plus, on the device, the two
    /// staging slots of the largest block a host-resident role passes through (none with
    /// zero-copy), computed here from the layout alone.
    #[test]
    fn state_is_placed_as_the_options_say_and_the_plan_counts_it() {
        let cfg = ModelConfig::tiny(Arch::Qwen3, 64);
        let layout = ParamLayout::new(&cfg);
        for bits in 0..32u32 {
            let [master, m, v, zero_copy, write_combined] = std::array::from_fn(|i| bits >> i & 1 == 1);
            if (zero_copy || write_combined) && !(master || m || v) {
                continue; // refused: they name how offloaded state is accessed
            }
            let mut tc = crate::plan::tests::tc(2, 32);
            tc.precision.opt_v = DType::BF16;
            tc.memory = MemoryOptions { offload_master: master, offload_opt_m: m, offload_opt_v: v, zero_copy, write_combined, ..Default::default() };
            let host = if write_combined { Mem::HostWriteCombined } else { Mem::Host };
            let roles = [(MemCategory::Master, master, tc.precision.master), (MemCategory::AdamM, m, tc.precision.opt_m), (MemCategory::AdamV, v, tc.precision.opt_v)];

            let mut be = CpuBackend::new();
            let run = RunBuffers::alloc(&mut be, &cfg, &tc, None).unwrap();
            let p = &run.model.params;
            assert!(!run.opt.master_is_weights(p), "bf16 weights, f32 master");
            for gi in 0..layout.groups.len() {
                let t = run.opt.shard_tensors(p, gi);
                for ((_, off, dtype), x) in roles.iter().zip([t.master, t.m, t.v]) {
                    assert_eq!((x.mem, x.dtype, x.numel()), (if *off { host } else { Mem::Device }, *dtype, layout.groups[gi].numel), "options {bits:05b}, group {gi}");
                }
            }

            for world in [1, 2] {
                tc.world_size = world;
                let plan = MemoryPlan::new(&cfg, &tc, 0).unwrap();
                let shard = |gi: usize| Shard::of(layout.groups[gi].numel, 0, world);
                let whole: usize = (0..layout.groups.len()).map(|gi| shard(gi).size).sum();
                let largest_block = (0..cfg.num_layers).map(|l| shard(layout.block_group(l)).padded).max().unwrap();
                for (cat, off, dtype) in roles {
                    let bytes = |mem: Mem| plan.by_category().iter().filter(|(c, m, _)| *c == cat && *m == mem).map(|x| x.2).sum::<usize>();
                    let slots = if off && !zero_copy { 2 * largest_block } else { 0 };
                    let (device, hosted) = if off { (slots, whole) } else { (whole, 0) };
                    assert_eq!((bytes(Mem::Device), bytes(host)), (device * dtype.size(), hosted * dtype.size()), "{cat:?}, options {bits:05b}, {world} ranks");
                }
            }
        }
    }
}
