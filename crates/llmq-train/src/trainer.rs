//! The training loop: micro-batches with gradient accumulation, global-norm clipping, AdamW,
//! the learning-rate schedule, periodic evaluation, non-finite step handling and logging.

use crate::acts::RunShape;
use crate::log::JsonLog;
use crate::model::Model;
use crate::memory::MemoryOptions;
use crate::precision::Precision;
use crate::schedule::Schedule;
use crate::spike::{SpikeGuard, SpikeState};
use crate::token_stage::TokenStage;
use crate::zero::Dist;
use llmq_core::{AdamStep, AdamW, Backend, Comm, Error, GraphKey, ModelConfig, ReduceOp, Result, Stream, ADAM_SCALARS};
use std::sync::Arc;
use llmq_io::data::BatchSource;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this value (0 = no clipping).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::Config(format!("{name} must be in [0, 1), got {v}")));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(Error::Config(format!("--adam-eps must be positive, got {}", self.eps)));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 || self.grad_clip.is_nan() || self.grad_clip < 0.0 {
            return Err(Error::Config("--weight-decay and --grad-clip must be non-negative".into()));
        }
        Ok(())
    }
}

/// Everything that defines a run besides the model shape and the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accumulation: usize,
    pub steps: u64,
    pub schedule: Schedule,
    pub optim: OptimConfig,
    pub precision: Precision,
    /// Where state lives and what is recomputed: never changes the numbers.
    #[serde(default)]
    pub memory: MemoryOptions,
    pub seed: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Abort after this many consecutive steps with a non-finite loss or gradient norm.
    pub max_bad_steps: u32,
    #[serde(default)]
    pub spike: SpikeGuard,
    /// Kernel and algorithm choices of a GPU backend (they change the last bits of results).
    #[serde(default)]
    pub backend: llmq_core::BackendOptions,
    /// Data-parallel ranks: each runs `grad_accumulation` micro-batches of its own per step.
    #[serde(default = "one")]
    pub world_size: usize,
    /// z-loss coefficient: the training loss adds z·logsumexp² per token (0: none).
    #[serde(default)]
    pub z_loss: f64,
}

fn one() -> usize {
    1
}

impl TrainConfig {
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let pos = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Config(format!("{name} must be positive, got 0")))
            } else {
                Ok(())
            }
        };
        pos("--batch-size", self.batch_size)?;
        pos("--seq-len", self.seq_len)?;
        pos("--grad-accumulation", self.grad_accumulation)?;
        pos("--gpus", self.world_size)?;
        if self.steps == 0 {
            return Err(Error::Config("--steps must be positive, got 0".into()));
        }
        if self.seq_len > cfg.max_position_embeddings {
            return Err(Error::Config(format!(
                "--seq-len {} exceeds the model's max_position_embeddings {}",
                self.seq_len, cfg.max_position_embeddings
            )));
        }
        if self.eval_every > 0 && self.eval_batches == 0 {
            return Err(Error::Config("--eval-every needs --eval-batches > 0".into()));
        }
        if !self.z_loss.is_finite() || self.z_loss < 0.0 {
            return Err(Error::Config(format!("--z-loss must be a non-negative number, got {}", self.z_loss)));
        }
        self.schedule.validate()?;
        self.optim.validate()?;
        self.spike.validate()?;
        self.backend.validate()?;
        self.precision.validate()?;
        self.memory.validate(&self.precision)
    }
    /// Tokens per optimizer step over all ranks: B x T x accumulation x ranks.
    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.seq_len * self.grad_accumulation * self.world_size
    }
}

/// An out-of-memory message with the plan so far, the free memory and what would help.
fn oom_report(be: &dyn Backend, msg: &str, tc: &TrainConfig) -> String {
    let mut s = format!("{msg}\n  allocated before the failure:");
    for (cat, mem, bytes) in be.memory_by_category() {
        s += &format!("\n    {:<16} {:>12} ({mem:?})", cat.name(), llmq_core::fmt_bytes(bytes));
    }
    if let Some(free) = be.free_memory() {
        s += &format!("\n  free now: {}", llmq_core::fmt_bytes(free));
    }
    let mut hints = vec![];
    if !tc.memory.recompute.block {
        hints.push("--recompute-block (or --recompute-ffn / --recompute-att)".to_string());
    }
    if tc.batch_size > 1 {
        hints.push(format!("a smaller --batch-size with more --grad-accumulation (now {} x {})", tc.batch_size, tc.grad_accumulation));
    }
    if tc.precision.opt_m == llmq_core::DType::F32 || tc.precision.opt_v == llmq_core::DType::F32 {
        hints.push("--opt-m-dtype bf16 --opt-v-dtype bf16".into());
    }
    if tc.precision.master == llmq_core::DType::F32 && tc.precision.weights == llmq_core::DType::BF16 {
        hints.push("--model-dtype bf16".into());
    }
    s += &format!("\n  options that would help: {}", hints.join("; "));
    s
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepStats {
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
    pub seconds: f64,
    /// The update was skipped: the loss or gradient norm was not finite, or a spike.
    pub skipped: bool,
    /// Host seconds spent issuing the last micro-batch's forward and backward pass (nothing in
    /// it waits for the device): close to the micro-batch's time when the host, not the device,
    /// is the bottleneck.
    pub issue_seconds: f64,
    /// Why the run must stop now (the spike guard's limit), after a checkpoint of this state.
    pub stop: Option<String>,
}

pub struct Trainer {
    pub be: Box<dyn Backend>,
    pub model: Model,
    /// The step's tokens on their way to the device and its losses on their way back.
    tokens: TokenStage,
    pub tc: TrainConfig,
    pub data: Box<dyn BatchSource>,
    pub eval_data: Option<Box<dyn BatchSource>>,
    /// Optimizer steps done so far (updates applied or skipped).
    pub step: u64,
    /// Optimizer updates applied (the Adam bias-correction counter).
    pub updates: u64,
    pub bad_in_a_row: u32,
    pub spikes: SpikeState,
    issue_seconds: f64,
    pub log: Option<JsonLog>,
    /// Where the model and tokenizer came from, recorded in checkpoints.
    pub source: Option<crate::setup::ModelSource>,
}

impl Trainer {
    pub fn new(
        be: Box<dyn Backend>,
        cfg: &ModelConfig,
        tc: TrainConfig,
        data: Box<dyn BatchSource>,
        eval_data: Option<Box<dyn BatchSource>>,
    ) -> Result<Trainer> {
        Trainer::new_rank(be, cfg, tc, data, eval_data, None)
    }

    /// The trainer of one rank of a data-parallel group (`comm`; `None` or a group of one is the
    /// single-device trainer). Its data source must be the rank's (rank r of N reads chunks
    /// r, r + N, ...).
    pub fn new_rank(
        mut be: Box<dyn Backend>,
        cfg: &ModelConfig,
        tc: TrainConfig,
        data: Box<dyn BatchSource>,
        eval_data: Option<Box<dyn BatchSource>>,
        comm: Option<Arc<dyn Comm>>,
    ) -> Result<Trainer> {
        tc.validate(cfg)?;
        let world = comm.as_ref().map_or(1, |c| c.world());
        if world != tc.world_size {
            return Err(Error::Config(format!("the configuration is for {} ranks, the communicator has {world}", tc.world_size)));
        }
        let dist = comm.and_then(|c| Dist::for_run(c, &tc));
        let shape = RunShape { b: tc.batch_size, t: tc.seq_len };
        let oom = |be: &dyn Backend, e| match e {
            Error::OutOfMemory(msg) => Error::OutOfMemory(oom_report(be, &msg, &tc)),
            e => e,
        };
        let mut model = Model::new_dist(be.as_mut(), cfg, tc.precision, shape, &tc.memory, dist).map_err(|e| oom(be.as_ref(), e))?;
        let tokens = TokenStage::alloc(be.as_mut(), shape.b * shape.t, tc.grad_accumulation).map_err(|e| oom(be.as_ref(), e))?;
        model.z_loss = tc.z_loss as f32;
        Ok(Trainer { be, model, tokens, tc, data, eval_data, step: 0, updates: 0, bad_in_a_row: 0, spikes: SpikeState::default(), issue_seconds: 0.0, log: None, source: None })
    }

    /// This rank's communicator, with more than one rank.
    pub fn comm(&self) -> Option<&dyn Comm> {
        self.model.params.dist.as_ref().map(|d| d.comm.as_ref())
    }

    /// Rank of this trainer in its group (0 with one rank).
    pub fn rank(&self) -> usize {
        self.comm().map_or(0, |c| c.rank())
    }

    /// Host values summed over ranks (rank order); unchanged with one rank.
    fn sum_over_ranks(&self, vals: &mut [f64], what: &str) -> Result<()> {
        match self.comm() {
            Some(c) => c.all_reduce_host(vals, ReduceOp::Sum, what),
            None => Ok(()),
        }
    }

    pub fn init_from_scratch(&mut self) -> Result<()> {
        self.model.params.init_from_scratch(self.be.as_ref(), self.tc.seed)?;
        self.model.weights_changed(self.be.as_ref())
    }

    /// Sets the weights from f32 host values (one vector per layout group), e.g. HF weights.
    pub fn set_weights(&mut self, groups: &[Vec<f32>]) -> Result<()> {
        self.model.params.set_master_f32(self.be.as_ref(), groups)?;
        self.model.weights_changed(self.be.as_ref())
    }

    /// Forward + backward over `grad_accumulation` micro-batches; returns (mean loss, valid
    /// targets). Gradients are left in the gradient buffers.
    pub fn accumulate_gradients(&mut self) -> Result<(f64, usize)> {
        let (b, t) = (self.tc.batch_size, self.tc.seq_len);
        let batches = (0..self.tc.grad_accumulation).map(|_| self.data.next_batch(b, t)).collect::<Result<Vec<_>>>()?;
        // the loss is the mean over real targets of the whole step (the reference counts masked ones too)
        let mut valid = [batches.iter().map(|b| b.valid_targets()).sum::<usize>() as f64];
        self.sum_over_ranks(&mut valid, "target count")?;
        let valid = valid[0] as usize;
        let dloss = if valid > 0 { 1.0 / valid as f32 } else { 0.0 };
        let be = self.be.as_ref();
        // the step's one host write; from here to the loss read-back the host never waits
        self.tokens.stage(be, &self.model, &batches)?;
        self.model.zero_grads(be)?;
        for k in 0..batches.len() {
            let t0 = Instant::now();
            let (ids, targets, losses) = self.tokens.begin(be, k)?;
            self.model.use_staged(ids, targets, losses);
            self.model.forward(be, Some(dloss))?;
            self.model.backward(be)?;
            self.tokens.end(be, k)?;
            self.issue_seconds = t0.elapsed().as_secs_f64();
        }
        self.model.params.reduce_gradients(be)?;
        let mut loss_sum = [self.tokens.loss_sum(be)?];
        self.sum_over_ranks(&mut loss_sum, "loss")?;
        Ok((if valid > 0 { loss_sum[0] / valid as f64 } else { 0.0 }, valid))
    }

    /// The global L2 norm of the accumulated gradients.
    pub fn grad_norm(&self) -> Result<f64> {
        Ok(self.model.grad_norm_squares(self.be.as_ref())?.iter().sum::<f64>().sqrt())
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let t0 = Instant::now();
        let health = self.model.fp8.as_ref().and_then(|f| f.health.as_ref()).is_some_and(|h| h.begin_step(self.step + 1));
        self.model.params.gather_whole_blocks(health);
        let (loss, _) = self.accumulate_gradients()?;
        let st = self.finish_step(loss, t0)?;
        if health {
            let records = self.model.fp8.as_ref().and_then(|f| f.health.as_ref()).map(|h| h.take()).unwrap_or_default();
            if let Some(log) = &mut self.log {
                log.write(&serde_json::json!({"type": "fp8_health", "step": st.step, "tensors": records}));
            }
        }
        Ok(st)
    }

    /// `--log-amax N`: every N steps, the abs-max, scale and saturated and flushed fractions of
    /// every tensor the fp8 matmuls quantise, into the JSON log (`crate::fp8_health`).
    pub fn log_fp8_health(&mut self, every: u64) -> Result<()> {
        if every > 0 && self.tc.memory.cuda_graphs {
            return Err(Error::Config("--log-amax reads the fp8 abs-maxes on the host inside each block's passes, which --cuda-graphs replays without the host: leave one of them out".into()));
        }
        match &mut self.model.fp8 {
            Some(f) => {
                f.health = (every > 0).then(|| crate::fp8_health::Health::new(every));
                Ok(())
            }
            None => Err(Error::Config("--log-amax reports on fp8 matmuls: it needs --matmul-dtype e4m3".into())),
        }
    }

    /// The second half of a step, after `accumulate_gradients`: norm, non-finite check, clipping,
    /// update. (Separate so tests can inject faults into the gradients in between.)
    pub fn finish_step(&mut self, loss: f64, t0: Instant) -> Result<StepStats> {
        let norm = self.grad_norm()?;
        let lr = self.tc.schedule.lr_at(self.step);
        let bad = !loss.is_finite() || !norm.is_finite();
        let spike = if bad { None } else { self.spikes.check(&self.tc.spike, loss, norm) };
        let mut stop = None;
        if let Some(cause) = &spike {
            self.bad_in_a_row = 0;
            stop = self.skip_spike(cause);
        } else if bad {
            self.bad_in_a_row += 1;
            let cause = if !loss.is_finite() { format!("loss is {loss}") } else { format!("gradient norm is {norm}") };
            eprintln!("warning: step {}: {cause}; update skipped ({} in a row)", self.step + 1, self.bad_in_a_row);
            if let Some(log) = &mut self.log {
                log.write(&serde_json::json!({"type": "skip", "step": self.step + 1, "cause": cause}));
            }
            if self.bad_in_a_row >= self.tc.max_bad_steps {
                return Err(Error::Backend(format!(
                    "aborting: {} consecutive steps with a non-finite loss or gradient norm (last at step {})",
                    self.bad_in_a_row,
                    self.step + 1
                )));
            }
        } else {
            self.bad_in_a_row = 0;
            let clip = self.tc.optim.grad_clip;
            let scale = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
            self.apply_update(lr, scale as f32)?;
        }
        self.be.synchronize()?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm: norm,
            lr,
            tokens: self.tc.tokens_per_step(),
            seconds: t0.elapsed().as_secs_f64(),
            skipped: bad || spike.is_some(),
            issue_seconds: self.issue_seconds,
            stop,
        })
    }

    /// Reports a step the spike guard rejected; returns why the run must stop, at the limit.
    fn skip_spike(&mut self, cause: &str) -> Option<String> {
        let n = self.spikes.skips_in_a_row;
        eprintln!("warning: step {}: {cause}; update skipped ({n} in a row)", self.step + 1);
        if let Some(log) = &mut self.log {
            log.write(&serde_json::json!({"type": "skip", "step": self.step + 1, "cause": cause, "spike": true}));
        }
        (n >= self.tc.spike.max_skips).then(|| format!("{n} consecutive loss spikes (last at step {}): stopping", self.step + 1))
    }

    fn apply_update(&mut self, lr: f64, grad_scale: f32) -> Result<()> {
        self.updates += 1;
        let p = &self.model.params;
        let o = &self.tc.optim;
        let be = self.be.as_ref();
        let (b1, b2) = (o.beta1 as f32, o.beta2 as f32);
        // this step's scalars, one slot per group, in device memory before the update runs
        let mut words = Vec::with_capacity(p.layout.groups.len() * ADAM_SCALARS * 4);
        for gi in 0..p.layout.groups.len() {
            // distinct stochastic-rounding streams per step and group (and shard: the hash is of
            // the index within the buffer)
            let seed = self.tc.seed ^ (self.updates << 20) ^ gi as u64;
            let seed = p.dist.as_ref().map_or(seed, |d| llmq_io::loader::mix_seed(seed, d.rank() as u64));
            words.extend(AdamStep { lr: lr as f32, step: self.updates, grad_scale, seed }.bytes(b1, b2)?);
        }
        be.upload(&self.model.adam_scalars, &words)?;
        let update = |be: &dyn Backend, gi: usize| -> Result<()> {
            let g = &p.layout.groups[gi];
            let amax = self.model.fp8.as_ref().map(|f| &f.weight_amax[gi]);
            let t = p.opt_begin(be, gi)?;
            let scalars = self.model.adam_scalars.slice(gi * ADAM_SCALARS, &[ADAM_SCALARS]);
            let base = AdamW {
                params: &t.params,
                master: &t.master,
                grads: &t.grads,
                m: &t.m,
                v: &t.v,
                scalars: &scalars,
                beta1: b1,
                beta2: b2,
                eps: o.eps as f32,
                weight_decay: o.weight_decay as f32,
                absmax: None,
            };
            let Some(d) = &p.dist else {
                be.adamw(&AdamW { absmax: amax, ..base }, &g.segments())?;
                return p.opt_issued(be, gi);
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
            p.opt_issued(be, gi)
        };
        let mut all = |be: &dyn Backend| (0..p.layout.groups.len()).try_for_each(|gi| update(be, gi));
        // one device and no staging copies: the whole update is one graph with --cuda-graphs
        if p.dist.is_none() && !p.stages_optimizer() {
            self.model.graph(be, GraphKey::new("optimizer", 0), &mut all)?;
        } else {
            all(be)?;
        }
        p.opt_finish(be)?;
        p.gather_weights(be)?;
        self.model.weights_updated(be)
    }

    /// Mean loss over `eval_batches` batches of the eval source (restarted each time).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let Some(ev) = self.eval_data.as_mut() else { return Ok(None) };
        let (b, t) = (self.tc.batch_size, self.tc.seq_len);
        let be = self.be.as_ref();
        let state = ev.state();
        let (mut sum, mut count) = (0.0, 0usize);
        // eval_batches over all ranks (each takes every N-th chunk)
        for _ in 0..self.tc.eval_batches.div_ceil(self.tc.world_size) {
            let batch = ev.next_batch(b, t)?;
            self.model.set_batch(be, &batch)?;
            self.model.forward(be, None)?;
            sum += self.model.loss_sum(be)?;
            count += batch.valid_targets();
        }
        ev.restore(&state)?;
        let mut v = [sum, count as f64];
        self.sum_over_ranks(&mut v, "eval loss")?;
        Ok(Some(if v[1] > 0.0 { v[0] / v[1] } else { f64::NAN }))
    }
}
