//! A training run: the trainer plus what happens around its steps — evaluation and checkpoint
//! cadence, stopping at a step or on a signal, the JSON log, throughput accounting and the
//! export at the end. The CLI and the Python bindings drive the same object: build it, call
//! `step` until `done`, then `finish`, and show the events it returns.

use crate::ckpt_session::CkptSession;
use crate::trainer::{StepStats, Trainer};
use llmq_core::{DType, Result};
use llmq_io::hf;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Cadence and outputs of a run (what `TrainConfig` leaves out because it never changes the
/// numbers).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Where checkpoints go, with the run's lineage and retention; with it, one is written at
    /// the end and on a stop request.
    pub checkpoints: Option<CkptSession>,
    /// Write a checkpoint every N steps (0: only at the end and on a stop request).
    pub ckpt_interval: u64,
    /// Stop after this step as if interrupted (the schedule still spans all steps).
    pub stop_at: Option<u64>,
    /// No evaluation (profiling: the breakdown is of training steps only).
    pub skip_eval: bool,
    /// Export the model (HF format) at the end.
    pub export: Option<Export>,
}

#[derive(Clone, Debug)]
pub struct Export {
    pub dir: PathBuf,
    /// bf16 or fp32.
    pub dtype: DType,
    /// The model directory the run started from (tokenizer files are copied from there).
    pub source: Option<PathBuf>,
}

/// What a call of `step` or `finish` did, for the caller to show.
#[derive(Clone, Debug)]
pub enum RunEvent {
    Step {
        stats: StepStats,
        tokens_per_s: f64,
        /// Wall-clock seconds since the run object was created.
        elapsed: f64,
        /// Estimated seconds to the last step, from the median time of the last `ETA_WINDOW` steps.
        eta: f64,
        /// The telemetry probe's sample after the step (GPU clock, power, ...), if there is one.
        telemetry: Option<serde_json::Value>,
    },
    Eval { step: u64, loss: f64 },
    Checkpoint { step: u64, path: PathBuf, removed: usize },
    /// Something about the checkpoints to show (one not counted by retention, and why).
    CheckpointNote(String),
    /// A checkpoint was due but the state is not finite.
    CheckpointSkipped { step: u64 },
    /// A stop was requested (signal); the run ends after this step.
    Stopped { step: u64 },
    /// The spike guard's limit: the run ends after this step with a checkpoint, and fails.
    SpikeStop { why: String },
    /// A stop was requested and there is nowhere to write a checkpoint.
    StoppedWithoutCheckpoint,
    Exported { dir: PathBuf, dtype: DType },
}

/// Steps whose median time gives the ETA.
pub const ETA_WINDOW: usize = 100;

/// Median step time after warm-up, the run's throughput figure.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    pub median_step_s: f64,
    pub steps: usize,
    pub warmup: usize,
    pub tokens_per_s: f64,
}

pub struct Run {
    trainer: Trainer,
    opts: RunOptions,
    stop: Arc<AtomicBool>,
    step_times: Vec<f64>,
    started: Instant,
    interrupted: bool,
    /// Why the run must fail after its checkpoint (the spike guard's limit).
    failed: Option<String>,
    last_eval: Option<f64>,
    probe: Option<Probe>,
}

/// Samples device telemetry once per step (e.g. NVML: clocks, power, temperature); the sample
/// goes into the step's log record and event.
pub type Probe = Box<dyn FnMut() -> serde_json::Value + Send>;

impl Run {
    /// `stop`: set (by a signal handler, a Python callback, ...) to end the run after the step
    /// in progress, with a checkpoint.
    pub fn new(trainer: Trainer, opts: RunOptions, stop: Arc<AtomicBool>) -> Run {
        Run { trainer, opts, stop, step_times: vec![], started: Instant::now(), interrupted: false, failed: None, last_eval: None, probe: None }
    }

    /// Samples `probe` after every step (see `Probe`).
    pub fn with_probe(mut self, probe: Probe) -> Run {
        self.probe = Some(probe);
        self
    }

    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }
    pub fn into_trainer(self) -> Trainer {
        self.trainer
    }

    /// The step the run ends after (`stop_at` or the configured steps).
    pub fn last_step(&self) -> u64 {
        self.opts.stop_at.unwrap_or(self.trainer.config().steps)
    }

    /// True once the last step ran or a stop was requested.
    pub fn done(&self) -> bool {
        self.interrupted || self.trainer.steps_done() >= self.last_step()
    }

    /// Why the run stopped short and must be reported as failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn last_eval(&self) -> Option<f64> {
        self.last_eval
    }

    /// One optimizer step, then the evaluation and checkpoint due after it.
    pub fn step(&mut self) -> Result<Vec<RunEvent>> {
        let mut events = vec![];
        let st = self.trainer.train_step()?;
        let tokens_per_s = st.tokens as f64 / st.seconds;
        self.step_times.push(st.seconds);
        let telemetry = self.probe.as_mut().map(|p| p());
        let mut rec = json!({"type": "step", "step": st.step, "loss": st.loss, "norm": st.grad_norm, "lr": st.lr, "tokens_per_s": tokens_per_s, "ms": st.seconds * 1e3, "issue_ms": st.issue_seconds * 1e3, "skipped": st.skipped});
        if let Some(t) = &telemetry {
            rec["gpu"] = t.clone();
        }
        self.trainer.log_record(&rec);
        let remaining = self.last_step().saturating_sub(st.step);
        // the median of the recent steps: follows a change of pace, costs the same at any step
        let recent = &self.step_times[self.step_times.len().saturating_sub(ETA_WINDOW)..];
        let eta = median(recent) * remaining as f64;
        let step = st.step;
        let spike_stop = st.stop.clone();
        events.push(RunEvent::Step { stats: st, tokens_per_s, elapsed: self.started.elapsed().as_secs_f64(), eta, telemetry });

        let tc = self.trainer.config();
        let eval_now = !self.opts.skip_eval && ((tc.eval_every > 0 && step.is_multiple_of(tc.eval_every)) || step == tc.steps);
        if eval_now {
            if let Some(loss) = self.trainer.evaluate()? {
                self.trainer.log_record(&json!({"type": "eval", "step": step, "loss": loss}));
                self.last_eval = Some(loss);
                events.push(RunEvent::Eval { step, loss });
            }
        }
        let periodic = self.opts.ckpt_interval > 0 && step.is_multiple_of(self.opts.ckpt_interval);
        if periodic && step < self.last_step() {
            events.extend(self.save_checkpoint()?);
        }
        // with several ranks, a stop request seen by any rank stops every rank after this step
        let mut stop = [if self.stop.load(Ordering::SeqCst) { 1.0 } else { 0.0 }];
        if let Some(c) = self.trainer.comm() {
            c.all_reduce_host(&mut stop, llmq_core::ReduceOp::Max, "stop request")?;
        }
        if let Some(why) = spike_stop {
            self.interrupted = true;
            self.failed = Some(why.clone());
            events.push(RunEvent::SpikeStop { why });
        } else if stop[0] > 0.0 {
            self.interrupted = true;
            events.push(RunEvent::Stopped { step });
        }
        Ok(events)
    }

    /// The end of the run: the final checkpoint (with a checkpoint directory) and the export
    /// (not after a failure).
    pub fn finish(&mut self) -> Result<Vec<RunEvent>> {
        let mut events = vec![];
        if self.opts.checkpoints.is_some() {
            events.extend(self.save_checkpoint()?);
        } else if self.interrupted {
            events.push(RunEvent::StoppedWithoutCheckpoint);
        }
        if let Some(ex) = self.opts.export.clone().filter(|_| self.failed.is_none()) {
            let tr = &self.trainer;
            // every rank hands in its shards; rank 0 writes
            let groups = tr.master_weights()?;
            if tr.rank() == 0 {
                hf::export_model(&ex.dir, tr.model().cfg(), &groups, ex.dtype, ex.source.as_deref())?;
                events.push(RunEvent::Exported { dir: ex.dir, dtype: ex.dtype });
            }
        }
        if let Some(t) = self.throughput() {
            self.trainer.log_record(&json!({"type": "throughput", "median_step_ms": t.median_step_s * 1e3, "tokens_per_s": t.tokens_per_s, "steps": t.steps}));
        }
        Ok(events)
    }

    /// The median step time over the steps after warm-up (the first steps include one-time
    /// work: up to a fifth of them, at most 5, at least 1 when there are two or more).
    pub fn throughput(&self) -> Option<Throughput> {
        let n = self.step_times.len();
        let warmup = (n / 5).clamp(usize::from(n > 1), 5);
        let t = &self.step_times[warmup.min(n)..];
        if t.is_empty() {
            return None;
        }
        let med = median(t);
        Some(Throughput { median_step_s: med, steps: t.len(), warmup, tokens_per_s: self.trainer.config().tokens_per_step() as f64 / med })
    }

    /// Writes a checkpoint of the current state (not of a poisoned one) and applies retention.
    fn save_checkpoint(&mut self) -> Result<Vec<RunEvent>> {
        let Some(ck) = self.opts.checkpoints.as_mut() else { return Ok(vec![]) };
        let tr = &mut self.trainer;
        let step = tr.steps_done();
        if tr.bad_steps_in_a_row() > 0 {
            return Ok(vec![RunEvent::CheckpointSkipped { step }]);
        }
        let Some(saved) = ck.save(tr)? else { return Ok(vec![]) };
        tr.log_record(&json!({"type": "checkpoint", "step": step, "path": saved.path, "run": ck.run_id()}));
        let mut events: Vec<RunEvent> = saved.notes.into_iter().map(RunEvent::CheckpointNote).collect();
        events.push(RunEvent::Checkpoint { step, path: saved.path, removed: saved.removed });
        Ok(events)
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
