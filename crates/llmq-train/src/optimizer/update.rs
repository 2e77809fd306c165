//! The AdamW update of every parameter group: the step's scalars written to device memory
//! first (so that a captured update replays with them), then one AdamW op per group over this
//! rank's shard, with host-resident block state staged through device slots (`super::stage`).
//!
//! With fp8 matmuls the update also writes each weight matrix's abs-max (read by the next
//! quantisation); a rank updating only its shard writes the abs-max of its part, and the max over
//! ranks follows.

use super::{OptShard, Optimizer};
use crate::model::Model;
use crate::params::Params;
use crate::trainer::OptimConfig;
use llmq_core::{AdamStep, AdamW, Backend, GraphKey, ReduceOp, Result, Stream, ADAM_SCALARS};

impl Optimizer {
    /// One AdamW update of `model`'s weights from its accumulated gradients, scaled by
    /// `grad_scale` (clipping), at learning rate `lr`; `seed` is the run's (each step, group and
    /// rank rounds stochastically with its own stream). Counts as an applied update.
    pub fn update(&mut self, be: &dyn Backend, model: &Model, o: &OptimConfig, seed: u64, lr: f64, grad_scale: f32) -> Result<()> {
        self.updates += 1;
        let p = &model.params;
        let (b1, b2) = (o.beta1 as f32, o.beta2 as f32);
        // this step's scalars, one slot per group, in device memory before the update runs
        let mut words = Vec::with_capacity(p.layout.groups.len() * ADAM_SCALARS * 4);
        for gi in 0..p.layout.groups.len() {
            // distinct stochastic-rounding streams per step and group (and shard: the hash is of
            // the index within the buffer)
            let seed = seed ^ (self.updates << 20) ^ gi as u64;
            let seed = p.dist.as_ref().map_or(seed, |d| llmq_io::loader::mix_seed(seed, d.rank() as u64));
            words.extend(AdamStep { lr: lr as f32, step: self.updates, grad_scale, seed }.bytes(b1, b2)?);
        }
        be.upload(&self.scalars, &words)?;
        let this = &*self;
        let mut all = |be: &dyn Backend| (0..p.layout.groups.len()).try_for_each(|gi| this.update_group(be, model, o, gi));
        // one device and no staging copies: the whole update is one graph with --cuda-graphs
        if p.dist.is_none() && self.stage.is_none() {
            model.graph(be, GraphKey::new("optimizer", 0), &mut all)?;
        } else {
            all(be)?;
        }
        if let Some(st) = &self.stage {
            st.finish(be)?;
        }
        p.gather_weights(be)?;
        model.weights_updated(be)
    }

    /// The update of group gi (this rank's shard of it).
    fn update_group(&self, be: &dyn Backend, model: &Model, o: &OptimConfig, gi: usize) -> Result<()> {
        let p = &model.params;
        let g = &p.layout.groups[gi];
        let amax = model.fp8.as_ref().map(|f| &f.weight_amax[gi]);
        let t = self.begin(be, p, gi)?;
        let scalars = self.scalars.slice(gi * ADAM_SCALARS, &[ADAM_SCALARS]);
        let base = AdamW {
            params: &t.params,
            master: &t.master,
            grads: &t.grads,
            m: &t.m,
            v: &t.v,
            scalars: &scalars,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            absmax: None,
        };
        let Some(d) = &p.dist else {
            be.adamw(&AdamW { absmax: amax, ..base }, &g.segments())?;
            return self.issued(be, p, gi);
        };
        // one rank's shard: each matrix's abs-max is that of its part, then the max over ranks
        if let Some(am) = amax {
            be.zero(am, Stream::Compute)?;
        }
        let segs = t.shard.segments(&g.segments());
        match amax {
            Some(am) => {
                for (si, s) in &segs {
                    let slot = am.slice(*si, &[1]);
                    be.adamw(&AdamW { absmax: Some(&slot), ..base }, std::slice::from_ref(s))?;
                }
            }
            None if !segs.is_empty() => be.adamw(&base, &segs.iter().map(|(_, s)| *s).collect::<Vec<_>>())?,
            None => {}
        }
        if let Some(am) = amax {
            d.comm.all_reduce(be, am, ReduceOp::Max, Stream::Compute, &format!("weight abs-maxes of {}", g.name))?;
        }
        self.issued(be, p, gi)
    }

    /// The tensors the update of group gi reads and writes: `shard_tensors(gi)`, with a block's
    /// host-resident ones replaced by device slots where they are staged; starts bringing the
    /// next block's. Pair with `issued(gi)`.
    fn begin(&self, be: &dyn Backend, p: &Params, gi: usize) -> Result<OptShard> {
        let host = self.shard_tensors(p, gi);
        let (Some(st), Some(l)) = (&self.stage, p.block_of(gi)) else { return Ok(host) };
        let t = st.acquire(be, l, &host)?;
        if l + 1 < p.cfg.num_layers {
            st.prefetch(be, l + 1, &self.shard_tensors(p, gi + 1))?;
        }
        Ok(t)
    }

    /// Group gi's update is issued: staged state goes back to the host.
    fn issued(&self, be: &dyn Backend, p: &Params, gi: usize) -> Result<()> {
        match (&self.stage, p.block_of(gi)) {
            (Some(st), Some(l)) => st.write_back(be, l, &self.shard_tensors(p, gi)),
            _ => Ok(()),
        }
    }
}
