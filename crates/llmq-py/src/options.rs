//! The options of `llmq.Trainer(...)` and `llmq.plan(...)`: the `llmq train` flags in snake_case,
//! with the CLI's defaults, validated into a `TrainConfig` with the CLI's messages (they name the
//! flag, e.g. `--batch-size`, which is the option `batch_size` here).

use llmq_core::{AttentionKernels, BackendOptions, DType, Error, ModelConfig, Result};
use llmq_io::data::BatchSource;
use llmq_io::loader::TokenLoader;
use llmq_train::ckpt_session::CkptSession;
use llmq_train::memory::parse_size;
use llmq_train::setup::{self, DataChoice, ModelChoice};
use llmq_train::spike::SpikeGuard;
use llmq_train::run::{Export, RunOptions};
use llmq_train::{Decay, MemoryOptions, OptimConfig, Precision, Recompute, Schedule, TrainConfig};
use serde::Deserialize;
use std::path::PathBuf;

/// A size given as a byte count or as text such as "16GiB".
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    pub model: Option<String>,
    pub from_scratch: bool,
    pub device: String,
    #[serde(alias = "train_files")]
    pub train_file: Option<String>,
    #[serde(alias = "eval_files")]
    pub eval_file: Option<String>,
    pub synthetic_vocab: usize,
    pub random_data: bool,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accumulation: usize,
    pub steps: u64,
    pub learning_rate: f64,
    pub warmup: Option<u64>,
    pub lr_schedule: String,
    pub final_lr_fraction: f64,
    pub cooldown: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub z_loss: f64,
    pub model_dtype: String,
    pub matmul_dtype: Option<String>,
    pub gradient_dtype: Option<String>,
    pub grad_dtype: String,
    pub opt_m_dtype: String,
    pub opt_v_dtype: String,
    pub persistent_quants: bool,
    pub no_wgrad_overlap: bool,
    /// Capture each block's passes as CUDA graphs (same numbers; `MemoryOptions::cuda_graphs`).
    pub cuda_graphs: bool,
    pub memory_limit: Option<Size>,
    pub recompute_fp8_inputs: bool,
    pub recompute_swiglu: bool,
    pub recompute_norm: bool,
    pub recompute_ffn: bool,
    pub recompute_qkv: bool,
    pub recompute_att: bool,
    pub recompute_block: bool,
    pub offload_master: bool,
    pub offload_opt_m: bool,
    pub offload_opt_v: bool,
    pub shard_weights: bool,
    pub offload_gradients: bool,
    pub offload_residual: bool,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub log_file: Option<PathBuf>,
    pub seed: u64,
    pub max_bad_steps: u32,
    pub spike_z: f64,
    pub spike_window: usize,
    pub spike_max_skips: u32,
    pub attention: String,
    pub side_sms: Option<u32>,
    pub no_side_algo: bool,
    pub matmul_tuning: String,
    pub matmul_autotune: Option<String>,
    pub ckpt_dir: Option<PathBuf>,
    pub ckpt_interval: u64,
    pub keep_last: usize,
    pub keep_major: Option<u64>,
    pub stop_at: Option<u64>,
    pub export: Option<PathBuf>,
    pub export_dtype: String,
}

/// The defaults of `llmq train`.
impl Default for Options {
    fn default() -> Self {
        Options {
            model: None,
            from_scratch: false,
            device: "auto".into(),
            train_file: None,
            eval_file: None,
            synthetic_vocab: 256,
            random_data: false,
            batch_size: 16,
            seq_len: 128,
            grad_accumulation: 1,
            steps: 250,
            learning_rate: 3e-3,
            warmup: None,
            lr_schedule: "cosine".into(),
            final_lr_fraction: 0.1,
            cooldown: 0,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            z_loss: 0.0,
            model_dtype: "fp32".into(),
            matmul_dtype: None,
            gradient_dtype: None,
            grad_dtype: "fp32".into(),
            opt_m_dtype: "fp32".into(),
            opt_v_dtype: "fp32".into(),
            persistent_quants: false,
            no_wgrad_overlap: false,
            cuda_graphs: false,
            memory_limit: None,
            recompute_fp8_inputs: false,
            recompute_swiglu: false,
            recompute_norm: false,
            recompute_ffn: false,
            recompute_qkv: false,
            recompute_att: false,
            recompute_block: false,
            offload_master: false,
            offload_opt_m: false,
            offload_opt_v: false,
            shard_weights: false,
            offload_gradients: false,
            offload_residual: false,
            eval_every: 50,
            eval_batches: 4,
            log_file: None,
            seed: 42,
            max_bad_steps: 5,
            spike_z: 0.0,
            spike_window: 100,
            spike_max_skips: 5,
            attention: "auto".into(),
            side_sms: None,
            no_side_algo: false,
            matmul_tuning: "embedded".into(),
            matmul_autotune: None,
            ckpt_dir: None,
            ckpt_interval: 0,
            keep_last: 3,
            keep_major: None,
            stop_at: None,
            export: None,
            export_dtype: "bf16".into(),
        }
    }
}

fn dtype(opt: &str, s: &str) -> Result<DType> {
    DType::parse(s).ok_or_else(|| Error::Config(format!("{opt}: unknown dtype {s:?} (fp32, bf16, e4m3, e5m2)")))
}

impl Options {
    /// Parses keyword options given as a JSON object, one key at a time first so that a bad
    /// value's error names its option.
    pub fn from_json(map: serde_json::Map<String, serde_json::Value>) -> Result<Options> {
        for (k, v) in &map {
            let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
            serde_json::from_value::<Options>(one).map_err(|e| Error::Config(format!("option {k}: {e}")))?;
        }
        let o: Options = serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| Error::Config(e.to_string()))?;
        if !["auto", "cpu", "cuda", "gpu"].contains(&o.device.as_str()) {
            return Err(Error::Config(format!("--device: expected auto, cpu or cuda, got {:?}", o.device)));
        }
        Ok(o)
    }

    fn memory(&self, fp8: bool) -> Result<MemoryOptions> {
        if self.no_wgrad_overlap && !fp8 {
            return Err(Error::Config("--no-wgrad-overlap only applies with --matmul-dtype e4m3".into()));
        }
        let memory_limit = match &self.memory_limit {
            None => None,
            Some(Size::Bytes(b)) => Some(*b),
            Some(Size::Text(s)) => Some(parse_size(s).map_err(|e| Error::Config(format!("--memory-limit: {e}")))?),
        };
        Ok(MemoryOptions {
            recompute: Recompute {
                swiglu: self.recompute_swiglu,
                norm: self.recompute_norm,
                ffn: self.recompute_ffn,
                qkv: self.recompute_qkv,
                att: self.recompute_att,
                block: self.recompute_block,
                fp8_inputs: self.recompute_fp8_inputs,
                own_backward_temporaries: false,
            },
            persistent_quants: self.persistent_quants,
            wgrad_overlap: fp8 && !self.no_wgrad_overlap && !self.offload_gradients && !self.cuda_graphs,
            offload_master: self.offload_master,
            offload_opt_m: self.offload_opt_m,
            offload_opt_v: self.offload_opt_v,
            stream_weights: self.shard_weights,
            offload_gradients: self.offload_gradients,
            offload_residual: self.offload_residual,
            memory_limit,
            // one rank: nothing to shard across
            shard_gradients: false,
            shard_weights: false,
            cuda_graphs: self.cuda_graphs,
        })
    }

    /// The run configuration, as `llmq train` builds it from the same flags.
    pub fn train_config(&self, on_gpu: bool) -> Result<TrainConfig> {
        if self.ckpt_interval > 0 && self.ckpt_dir.is_none() {
            return Err(Error::Config("--ckpt-interval needs --ckpt-dir".into()));
        }
        if self.stop_at == Some(0) || self.stop_at.is_some_and(|s| s > self.steps) {
            return Err(Error::Config(format!("--stop-at must be in 1..={} (--steps), got {:?}", self.steps, self.stop_at)));
        }
        if self.train_file.is_some() && self.random_data {
            return Err(Error::Config("--random-data and --train-file exclude each other".into()));
        }
        let matmul = match &self.matmul_dtype {
            Some(s) => dtype("--matmul-dtype", s)?,
            None if on_gpu => DType::BF16,
            None => DType::F32,
        };
        if self.gradient_dtype.is_some() && !matmul.is_fp8() {
            return Err(Error::Config("--gradient-dtype only applies with --matmul-dtype e4m3".into()));
        }
        let weights = if matmul == DType::F32 { DType::F32 } else { DType::BF16 };
        let precision = Precision {
            weights,
            matmul,
            master: dtype("--model-dtype", &self.model_dtype)?,
            grads: dtype("--grad-dtype", &self.grad_dtype)?,
            opt_m: dtype("--opt-m-dtype", &self.opt_m_dtype)?,
            opt_v: dtype("--opt-v-dtype", &self.opt_v_dtype)?,
            act_grads: match &self.gradient_dtype {
                Some(s) => dtype("--gradient-dtype", s)?,
                None => DType::E4M3,
            },
        };
        if precision.master == DType::BF16 && weights == DType::F32 {
            return Err(Error::Config("--model-dtype bf16 needs bf16 matmuls (--matmul-dtype bf16)".into()));
        }
        Ok(TrainConfig {
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            grad_accumulation: self.grad_accumulation,
            steps: self.steps,
            schedule: Schedule {
                lr: self.learning_rate,
                warmup: self.warmup.unwrap_or((self.steps / 10).min(if self.steps <= 1000 { 25 } else { 1000 })),
                total: self.steps,
                decay: Decay::parse(&self.lr_schedule)?,
                final_fraction: self.final_lr_fraction,
                cooldown: self.cooldown,
            },
            optim: OptimConfig {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.adam_eps,
                weight_decay: self.weight_decay,
                grad_clip: self.grad_clip,
            },
            precision,
            memory: self.memory(matmul.is_fp8())?,
            seed: self.seed,
            eval_every: self.eval_every,
            eval_batches: self.eval_batches,
            max_bad_steps: self.max_bad_steps,
            backend: self.backend()?,
            world_size: 1,
            z_loss: self.z_loss,
            spike: SpikeGuard { z: self.spike_z, window: self.spike_window, max_skips: self.spike_max_skips },
        })
    }

    /// The GPU backend's kernel and algorithm choices (as `llmq train`'s "GPU backend" flags).
    pub fn backend(&self) -> Result<BackendOptions> {
        let o = BackendOptions {
            attention: AttentionKernels::parse(&self.attention)?,
            side_sms: self.side_sms,
            side_algo: !self.no_side_algo,
            matmul_tuning: self.matmul_tuning.clone(),
            matmul_autotune: self.matmul_autotune.clone(),
        };
        o.validate()?;
        Ok(o)
    }

    pub fn run_options(&self, source: Option<PathBuf>) -> Result<RunOptions> {
        let export = match &self.export {
            None => None,
            Some(dir) => Some(Export { dir: dir.clone(), dtype: export_dtype("--export-dtype", &self.export_dtype)?, source }),
        };
        Ok(RunOptions {
            checkpoints: self.ckpt_dir.clone().map(|root| CkptSession::new(root, self.keep_last, self.keep_major, false)).transpose()?,
            ckpt_interval: self.ckpt_interval,
            stop_at: self.stop_at,
            skip_eval: false,
            export,
        })
    }
}

pub fn export_dtype(what: &str, s: &str) -> Result<DType> {
    DType::parse(s)
        .filter(|d| matches!(d, DType::F32 | DType::BF16))
        .ok_or_else(|| Error::Config(format!("{what}: expected bf16 or fp32, got {s:?}")))
}

/// Training and (optional) evaluation data.
pub type Sources = (Box<dyn BatchSource>, Option<Box<dyn BatchSource>>);

/// The model, resolved as `llmq train` resolves `--model` (vocabulary fitted to the token files).
pub fn resolve_model(o: &Options) -> Result<ModelChoice> {
    let mut m = setup::resolve_model(o.model.as_deref(), o.from_scratch, o.synthetic_vocab)?;
    setup::fit_vocab_to_data(&mut m, &data_choice(o))?;
    Ok(m)
}

fn data_choice(o: &Options) -> DataChoice {
    DataChoice { train_file: o.train_file.clone(), eval_file: o.eval_file.clone(), random_data: o.random_data, synthetic_vocab: o.synthetic_vocab, allow_data_change: false, ..Default::default() }
}

/// Training and evaluation data when no arrays are passed, as `llmq train` chooses them (token
/// ids checked against the vocabulary when the files are opened).
pub fn resolve_data(o: &Options, cfg: &ModelConfig, tc: &TrainConfig) -> Result<Sources> {
    let d = data_choice(o);
    let (train, eval, _) = setup::resolve_data(&d, cfg, tc, &|l: &TokenLoader, _| l.check_all_tokens(&mut |_, _| {}))?;
    Ok((train, eval))
}
