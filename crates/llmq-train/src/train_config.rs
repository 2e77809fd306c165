//! The configuration of a training run besides the model shape and the data: run shape, steps,
//! schedule, optimizer hyper-parameters, numerics, memory options, and their validation.

use crate::memory::MemoryOptions;
use crate::precision::Precision;
use crate::schedule::Schedule;
use crate::spike::SpikeGuard;
use llmq_core::{Error, ModelConfig, Result};
use serde::{Deserialize, Serialize};

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
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(Error::Config(format!("--adam-eps must be a positive number, got {}", self.eps)));
        }
        // an infinite decay or clip would give NaN weights or mean "no clipping" (that is 0)
        for (name, v) in [("--weight-decay", self.weight_decay), ("--grad-clip", self.grad_clip)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Config(format!("{name} must be a non-negative number, got {v}")));
            }
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

    /// `MemoryOptions::default_graphs` for this run's micro-batch of model `cfg`, once its
    /// micro-batch and memory options are settled (after `--auto-memory` or `--fit-batch`).
    pub fn default_graphs(&mut self, cfg: &ModelConfig, on_gpu: bool) -> bool {
        let c = cfg.hidden_size as f64;
        let work = (self.batch_size * self.seq_len) as f64 * c * c;
        self.memory.default_graphs(on_gpu, self.world_size == 1, self.precision.matmul.is_fp8(), work)
    }
}
