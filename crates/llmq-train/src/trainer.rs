//! The training loop: micro-batches with gradient accumulation, global-norm clipping, the
//! optimizer update (`crate::optimizer`), the learning-rate schedule, evaluation, non-finite step
//! handling and logging.

use crate::acts::RunShape;
use crate::log::JsonLog;
use crate::model::Model;
use crate::spike::SpikeState;
use crate::token_stage::TokenStage;
use crate::zero::Dist;
use crate::optimizer::Optimizer;
pub use crate::train_config::{OptimConfig, TrainConfig};
use llmq_core::{Backend, Comm, Error, ModelConfig, ReduceOp, Result};
use std::sync::Arc;
use llmq_io::data::BatchSource;
use serde::Serialize;
use std::time::Instant;

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

/// The buffers of a run: the model, its optimizer and the step's token buffers. The trainer, the
/// memory plan and the micro-batch fit allocate them through `RunBuffers::alloc` alone.
pub struct RunBuffers {
    pub model: Model,
    pub opt: Optimizer,
    /// The step's tokens on their way to the device and its losses on their way back.
    pub tokens: TokenStage,
}

impl RunBuffers {
    /// Allocates everything a run of `tc` on `cfg` holds (one rank's part, with `dist`).
    pub fn alloc(be: &mut dyn Backend, cfg: &ModelConfig, tc: &TrainConfig, dist: Option<Dist>) -> Result<RunBuffers> {
        let shape = RunShape { b: tc.batch_size, t: tc.seq_len };
        let model = Model::new_dist(be, cfg, tc.precision, shape, &tc.memory, dist)?;
        let opt = Optimizer::alloc(be, &model.params, &tc.memory)?;
        let tokens = TokenStage::alloc(be, shape.b * shape.t, tc.grad_accumulation)?;
        Ok(RunBuffers { model, opt, tokens })
    }
}

pub struct Trainer {
    be: Box<dyn Backend>,
    model: Model,
    opt: Optimizer,
    tokens: TokenStage,
    tc: TrainConfig,
    data: Box<dyn BatchSource>,
    eval_data: Option<Box<dyn BatchSource>>,
    /// Optimizer steps done so far (updates applied or skipped).
    step: u64,
    bad_in_a_row: u32,
    spikes: SpikeState,
    issue_seconds: f64,
    log: Option<JsonLog>,
    /// Where the model and tokenizer came from, recorded in checkpoints.
    source: Option<crate::setup::ModelSource>,
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
        let RunBuffers { mut model, opt, tokens } = RunBuffers::alloc(be.as_mut(), cfg, &tc, dist).map_err(|e| match e {
            Error::OutOfMemory(msg) => Error::OutOfMemory(oom_report(be.as_ref(), &msg, &tc)),
            e => e,
        })?;
        model.z_loss = tc.z_loss as f32;
        Ok(Trainer { be, model, opt, tokens, tc, data, eval_data, step: 0, bad_in_a_row: 0, spikes: SpikeState::default(), issue_seconds: 0.0, log: None, source: None })
    }

    /// This rank's communicator, with more than one rank.
    pub fn comm(&self) -> Option<&dyn Comm> {
        self.model.params.dist.as_ref().map(|d| d.comm.as_ref())
    }

    /// Rank of this trainer in its group (0 with one rank).
    pub fn rank(&self) -> usize {
        self.comm().map_or(0, |c| c.rank())
    }

    pub fn backend(&self) -> &dyn Backend {
        self.be.as_ref()
    }
    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn optimizer(&self) -> &Optimizer {
        &self.opt
    }
    pub fn config(&self) -> &TrainConfig {
        &self.tc
    }
    /// Optimizer steps done so far (updates applied or skipped).
    pub fn steps_done(&self) -> u64 {
        self.step
    }
    /// Consecutive steps, up to the last, whose update was skipped for a non-finite loss or
    /// gradient norm (their state is not worth a checkpoint).
    pub fn bad_steps_in_a_row(&self) -> u32 {
        self.bad_in_a_row
    }
    /// The JSON log that steps, skips and fp8 health records go to.
    pub fn set_log(&mut self, log: JsonLog) {
        self.log = Some(log);
    }
    /// Records from here on carry `lineage`'s run and series (after a checkpoint is loaded).
    pub fn set_log_lineage(&mut self, lineage: &llmq_io::ckpt::Lineage) {
        if let Some(log) = &mut self.log {
            log.set_run(lineage);
        }
    }
    /// Appends `rec` to the JSON log, if the run has one.
    pub fn log_record(&mut self, rec: &serde_json::Value) {
        if let Some(log) = &mut self.log {
            log.write(rec);
        }
    }
    /// Where the model and tokenizer came from (recorded in checkpoints).
    pub fn source(&self) -> Option<&crate::setup::ModelSource> {
        self.source.as_ref()
    }
    pub fn set_source(&mut self, source: crate::setup::ModelSource) {
        self.source = Some(source);
    }
    /// The training data source (its position is checkpointed).
    pub fn data(&self) -> &dyn BatchSource {
        self.data.as_ref()
    }
    pub(crate) fn data_mut(&mut self) -> &mut dyn BatchSource {
        self.data.as_mut()
    }
    /// The loss-spike guard's state (skips in a row, recent losses).
    pub fn spikes(&self) -> &SpikeState {
        &self.spikes
    }
    /// A checkpoint's counters: steps done, updates applied, bad steps in a row, spike state.
    pub(crate) fn restore_counters(&mut self, step: u64, updates: u64, bad_in_a_row: u32, spikes: SpikeState) {
        self.step = step;
        self.opt.restore_updates(updates);
        self.bad_in_a_row = bad_in_a_row;
        self.spikes = spikes;
    }

    /// Host values summed over ranks (rank order); unchanged with one rank.
    fn sum_over_ranks(&self, vals: &mut [f64], what: &str) -> Result<()> {
        match self.comm() {
            Some(c) => c.all_reduce_host(vals, ReduceOp::Sum, what),
            None => Ok(()),
        }
    }

    /// Initialises master and working weights from scratch (`crate::init`), seeded.
    pub fn init_from_scratch(&mut self) -> Result<()> {
        let p = &self.model.params;
        // one group at a time: the host holds one group's f32 values, not the whole model's
        for gi in 0..p.layout.groups.len() {
            self.set_group(gi, &crate::init::init_group(&p.cfg, &p.layout, self.tc.seed, gi))?;
        }
        self.model.weights_changed(self.be.as_ref())
    }

    /// Sets master and working weights from f32 host values (one vector per layout group),
    /// e.g. HF weights.
    pub fn set_weights(&mut self, groups: &[Vec<f32>]) -> Result<()> {
        groups.iter().enumerate().try_for_each(|(gi, vals)| self.set_group(gi, vals))?;
        self.model.weights_changed(self.be.as_ref())
    }

    /// Group gi's master and working weights from f32 host values of the whole group.
    fn set_group(&self, gi: usize, vals: &[f32]) -> Result<()> {
        let (be, p) = (self.be.as_ref(), &self.model.params);
        p.set_group_f32(be, gi, vals)?;
        self.opt.set_group_master_f32(be, p, gi, vals)
    }

    /// The master weights as f32 host values, one vector per layout group (gathered from every
    /// rank: the whole model on every rank).
    pub fn master_weights(&self) -> Result<Vec<Vec<f32>>> {
        self.opt.master_f32(self.be.as_ref(), &self.model.params)
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
            self.opt.update(self.be.as_ref(), &self.model, &self.tc.optim, self.tc.seed, lr, scale as f32)?;
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
