//! `llmq train` options, grouped by topic, and their validation into a `TrainConfig`.

use clap::Args;
use llmq_core::{DType, Error, Result};
use llmq_train::memory::parse_size;
use llmq_train::spike::SpikeGuard;
use llmq_train::{Decay, MemoryOptions, OptimConfig, Precision, Recompute, Schedule, TrainConfig};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    // ---- config file ----
    /// Read options from a TOML file: keys are the flags' names (kebab or snake case), values
    /// TOML strings, numbers and booleans; flags on the command line override the file.
    #[arg(long, value_name = "FILE", help_heading = "Config file")]
    pub config: Option<PathBuf>,
    /// Write the effective options (given and default) as a config file that repeats the run.
    #[arg(long, value_name = "FILE", help_heading = "Config file")]
    pub save_config: Option<PathBuf>,
    /// The effective options as config-file text (`crate::config_file::effective`).
    #[arg(skip)]
    pub effective_config: String,

    // ---- model ----
    /// Model: a built-in shape (tiny, qwen2.5-0.5b, ..., llama-3.1-8b), a directory with
    /// config.json (+ safetensors), or a name in the local Hugging Face cache. Default: the
    /// embedded ~1M-parameter model.
    #[arg(long, help_heading = "Model")]
    pub model: Option<String>,
    /// Initialise weights randomly instead of loading them (required for built-in shapes).
    #[arg(long, help_heading = "Model")]
    pub from_scratch: bool,

    // ---- data ----
    /// Training token files (glob). Default: the embedded synthetic Markov corpus.
    #[arg(long, help_heading = "Data")]
    pub train_file: Option<String>,
    /// Held-out token file for evaluation.
    #[arg(long, help_heading = "Data")]
    pub eval_file: Option<String>,
    /// Vocabulary of the synthetic corpus (when no --train-file is given).
    #[arg(long, default_value_t = 256, help_heading = "Data")]
    pub synthetic_vocab: usize,
    /// With --continue: resume although a token file's content fingerprint or size differs from
    /// the one the checkpoint recorded (a deliberate change of data under the same names).
    #[arg(long, help_heading = "Data")]
    pub allow_data_change: bool,
    /// Train on uniformly random tokens (throughput benchmarks only: nothing to learn).
    #[arg(long, help_heading = "Data")]
    pub random_data: bool,

    // ---- batch ----
    /// Sequences per micro-batch (B).
    #[arg(long, default_value_t = 16, help_heading = "Batch")]
    pub batch_size: usize,
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = 128, help_heading = "Batch")]
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, help_heading = "Batch")]
    pub grad_accumulation: usize,
    /// Keep the tokens per optimizer step and use the largest micro-batch that fits the GPU:
    /// doubles --batch-size while --grad-accumulation halves evenly (larger micro-batches run
    /// faster). The choice is printed; pass it explicitly to repeat a run bit for bit. The CPU
    /// backend keeps the configured micro-batch.
    #[arg(long, help_heading = "Batch")]
    pub fit_batch: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 250, help_heading = "Batch")]
    pub steps: u64,

    // ---- optimizer ----
    #[arg(long, default_value_t = 3e-3, help_heading = "Optimizer")]
    pub learning_rate: f64,
    /// Linear warmup steps (default: 10% of --steps, capped at 25 for runs up to 1000 steps, else 1000).
    #[arg(long, help_heading = "Optimizer")]
    pub warmup: Option<u64>,
    /// cosine, linear, wsd or constant.
    #[arg(long, default_value = "cosine", help_heading = "Optimizer")]
    pub lr_schedule: String,
    /// The schedule ends at learning_rate * this.
    #[arg(long, default_value_t = 0.1, help_heading = "Optimizer")]
    pub final_lr_fraction: f64,
    /// Final steps of 1-sqrt cooldown (0: none; wsd defaults to 20% of the steps).
    #[arg(long, default_value_t = 0, help_heading = "Optimizer")]
    pub cooldown: u64,
    #[arg(long, default_value_t = 0.9, help_heading = "Optimizer")]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95, help_heading = "Optimizer")]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8, help_heading = "Optimizer")]
    pub adam_eps: f64,
    /// Decoupled weight decay (matrices and embeddings only).
    #[arg(long, default_value_t = 0.1, help_heading = "Optimizer")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0: off).
    #[arg(long, default_value_t = 1.0, help_heading = "Optimizer")]
    pub grad_clip: f64,
    /// z-loss coefficient: the training loss adds COEF·logsumexp² per token, keeping the logits'
    /// normaliser near 1 (e.g. 1e-4; 0: off). Evaluation reports the plain cross-entropy.
    #[arg(long, default_value_t = 0.0, help_heading = "Optimizer")]
    pub z_loss: f64,

    /// Loss-spike guard: skip an update whose loss or gradient norm is more than this many
    /// standard deviations above the mean of the recent steps (0: off).
    #[arg(long, default_value_t = 0.0, help_heading = "Optimizer")]
    pub spike_z: f64,
    /// Accepted steps the spike guard's mean and deviation are taken over.
    #[arg(long, default_value_t = 100, help_heading = "Optimizer")]
    pub spike_window: usize,
    /// Stop (with a checkpoint of the last good state) after this many spikes in a row.
    #[arg(long, default_value_t = 5, help_heading = "Optimizer")]
    pub spike_max_skips: u32,

    // ---- precision ----
    /// Master weights: fp32 or bf16 (bf16 is updated with stochastic rounding).
    #[arg(long, default_value = "fp32", help_heading = "Precision")]
    pub model_dtype: String,
    /// Matmul operands: fp32, bf16 or e4m3. Default: bf16 on a GPU, fp32 on the CPU.
    #[arg(long, help_heading = "Precision")]
    pub matmul_dtype: Option<String>,
    /// Activation-gradient fp8 format with --matmul-dtype e4m3: e4m3 or e5m2.
    #[arg(long, help_heading = "Precision")]
    pub gradient_dtype: Option<String>,
    /// Parameter gradients: fp32 or bf16.
    #[arg(long, default_value = "fp32", help_heading = "Precision")]
    pub grad_dtype: String,
    #[arg(long, default_value = "fp32", help_heading = "Precision")]
    pub opt_m_dtype: String,
    #[arg(long, default_value = "fp32", help_heading = "Precision")]
    pub opt_v_dtype: String,

    // ---- memory ----
    /// Keep fp8 weights between micro-batches, re-quantised once per optimizer step (more
    /// memory, faster; same numbers).
    #[arg(long, help_heading = "Memory")]
    pub persistent_quants: bool,
    /// fp8: run every weight-gradient matmul on the main stream, not on a second stream beside
    /// the input-gradient chain (the default for e4m3: same numbers, +1.4% at 1.5B on an H200).
    #[arg(long, help_heading = "Memory")]
    pub no_wgrad_overlap: bool,
    /// Run each block's forward and recompute+backward and the optimizer update as CUDA graphs,
    /// captured on their second call and replayed after (same numbers; fewer host launches).
    /// Not with streamed, offloaded or sharded block state; turns off the fp8 second-stream
    /// weight gradients.
    #[arg(long, alias = "use-cuda-graphs", help_heading = "Memory")]
    pub cuda_graphs: bool,
    /// Cap on the device memory the run may allocate, e.g. 16GiB (emulates a smaller card). A
    /// plan over it is refused before anything is allocated, naming options that would fit.
    #[arg(long, value_name = "SIZE", help_heading = "Memory")]
    pub memory_limit: Option<String>,
    /// Choose the micro-batch (keeping the tokens per step), recomputation, persistent fp8
    /// weights and offloading that fit --memory-limit (else the GPU's free memory) with the best
    /// estimated throughput; prints the choice as flags that repeat it bit for bit.
    #[arg(long, help_heading = "Memory")]
    pub auto_memory: bool,
    /// fp8: re-quantise transposed in the backward pass the matmul inputs whose bf16 form is kept
    /// anyway (the attention output; ln1/ln2 when QKV/up+gate are recomputed) instead of keeping
    /// the forward's fp8 transpose (less activation memory, slightly slower; same numbers).
    #[arg(long, help_heading = "Memory")]
    pub recompute_fp8_inputs: bool,
    #[arg(long, help_heading = "Memory")]
    pub recompute_swiglu: bool,
    #[arg(long, help_heading = "Memory")]
    pub recompute_norm: bool,
    /// Recompute the up/gate matmul and SwiGLU.
    #[arg(long, help_heading = "Memory")]
    pub recompute_ffn: bool,
    /// Recompute the QKV matmul, qk-norm and RoPE.
    #[arg(long, help_heading = "Memory")]
    pub recompute_qkv: bool,
    /// Recompute ln1, QKV, RoPE and attention.
    #[arg(long, help_heading = "Memory")]
    pub recompute_att: bool,
    /// Recompute everything but the residual stream.
    #[arg(long, help_heading = "Memory")]
    pub recompute_block: bool,
    /// Keep each layer's residuals in pinned host memory between the forward and the backward
    /// pass (copied back as each block's forward is issued, prefetched a block ahead).
    #[arg(long, help_heading = "Memory")]
    pub offload_residual: bool,
    /// Keep the fp32 master weights in pinned host memory; the optimizer reads and writes them
    /// there (needs --model-dtype fp32 with bf16 or e4m3 matmuls).
    #[arg(long, help_heading = "Memory")]
    pub offload_master: bool,
    /// Keep Adam's first moment in pinned host memory.
    #[arg(long, help_heading = "Memory")]
    pub offload_opt_m: bool,
    /// Keep Adam's second moment in pinned host memory.
    #[arg(long, help_heading = "Memory")]
    pub offload_opt_v: bool,
    /// With several GPUs: block weights sharded across them (ZeRO-3, as --zero-level 3). On one
    /// GPU: weight streaming (as --stream-weights).
    #[arg(long, help_heading = "Memory")]
    pub shard_weights: bool,
    /// Weight streaming: block weights (with ZeRO-3, each GPU's shards of them) live in pinned
    /// host memory and are brought to two device slots ahead of each block's forward, recompute
    /// and backward.
    #[arg(long, help_heading = "Memory")]
    pub stream_weights: bool,
    /// With several GPUs: gradients sharded across them (ZeRO-2, as --zero-level 2). No effect
    /// on one GPU.
    #[arg(long, help_heading = "Memory")]
    pub shard_gradients: bool,
    /// Block gradients live in pinned host memory: each block's gradient is accumulated in a
    /// device slot (loaded from the host after the first micro-batch) and copied back when its
    /// backward is issued. Runs the fp8 weight gradients on the main stream.
    #[arg(long, help_heading = "Memory")]
    pub offload_gradients: bool,

    // ---- evaluation and logging ----
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 50, help_heading = "Evaluation and logging")]
    pub eval_every: u64,
    #[arg(long, default_value_t = 4, help_heading = "Evaluation and logging")]
    pub eval_batches: usize,
    /// JSON-lines log file.
    #[arg(long, help_heading = "Evaluation and logging")]
    pub log_file: Option<PathBuf>,
    /// FP8 health every N steps (0: off): per block matmul and layer, the abs-max, scale and the
    /// fractions of values that saturate or flush to zero, for weights, activations and
    /// activation gradients, into the JSON log (needs --matmul-dtype e4m3 and --log-file).
    #[arg(long, default_value_t = 0, help_heading = "Evaluation and logging")]
    pub log_amax: u64,
    /// Print a line every N steps.
    #[arg(long, default_value_t = 10, help_heading = "Evaluation and logging")]
    pub print_every: u64,
    /// Time every op (synchronising around each) and print a per-op breakdown of the steps.
    #[arg(long, help_heading = "Evaluation and logging")]
    pub profile: bool,
    /// Check that every op is ordered after the other streams' accesses to its memory (events or
    /// host synchronisation), failing with both ops named where not: a debugging aid for the
    /// multi-stream schedule (host-side bookkeeping per op; the numbers do not change).
    #[arg(long, help_heading = "Evaluation and logging")]
    pub check_streams: bool,
    /// Seed for initialisation, data order and stochastic rounding.
    #[arg(long, default_value_t = 42, help_heading = "Evaluation and logging")]
    pub seed: u64,
    /// Abort after this many consecutive non-finite steps.
    #[arg(long, default_value_t = 5, help_heading = "Evaluation and logging")]
    pub max_bad_steps: u32,

    #[command(flatten)]
    pub backend: crate::backend_args::BackendArgs,

    // ---- checkpoints ----
    /// Directory of checkpoints (step_NNNNNNNN/). Setting it enables the checkpoint at the end
    /// and on SIGINT/SIGTERM.
    #[arg(long, help_heading = "Checkpoints")]
    pub ckpt_dir: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: only at the end and on a signal).
    #[arg(long, default_value_t = 0, help_heading = "Checkpoints")]
    pub ckpt_interval: u64,
    /// Keep the newest N complete checkpoints of this run's line (0: keep all; 1 is refused:
    /// at least two are kept). The checkpoint just written and the one resumed from are never
    /// deleted.
    #[arg(long, default_value_t = 3, help_heading = "Checkpoints")]
    pub keep_last: usize,
    /// Delete the checkpoints that are not on the resumed line (an abandoned branch, newer ones
    /// that fail verification, or all for a run without --continue) instead of moving them
    /// into <ckpt-dir>/abandoned/.
    #[arg(long, help_heading = "Checkpoints")]
    pub drop_abandoned: bool,
    /// Also keep every checkpoint whose step is a multiple of M ("major").
    #[arg(long, help_heading = "Checkpoints")]
    pub keep_major: Option<u64>,
    /// Resume: the newest complete checkpoint (no value), a step number, or a checkpoint path.
    #[arg(long = "continue", num_args = 0..=1, default_missing_value = "latest", value_name = "STEP|PATH", help_heading = "Checkpoints")]
    pub continue_from: Option<String>,
    /// Stop after this step (writing a checkpoint), as if interrupted; the schedule still spans --steps.
    #[arg(long, help_heading = "Checkpoints")]
    pub stop_at: Option<u64>,
    /// Export the trained model (HF safetensors + config.json) into this directory at the end.
    #[arg(long, help_heading = "Checkpoints")]
    pub export: Option<PathBuf>,
    /// dtype of the exported weights: bf16 or fp32.
    #[arg(long, default_value = "bf16", help_heading = "Checkpoints")]
    pub export_dtype: String,

    // ---- device ----
    /// auto (a GPU when present, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto", help_heading = "Device")]
    pub device: String,
    /// Data-parallel ranks, one thread per GPU in this process (GPUs 0..N); with --device cpu,
    /// N ranks on the CPU. Each rank runs --batch-size x --grad-accumulation per step.
    #[arg(long, default_value_t = 1, help_heading = "Device")]
    pub gpus: usize,
    /// With several GPUs: 1 shards the optimizer state, 2 also the gradients, 3 also the block
    /// weights. The numbers are the same at every level.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3), help_heading = "Device")]
    pub zero_level: u8,
    /// Seconds a collective waits for the other ranks before every rank stops with an error
    /// naming it (and, between threads, the ranks that did not arrive).
    #[arg(long, default_value_t = 300, help_heading = "Device")]
    pub collective_timeout: u64,
    /// Collectives between GPUs: auto (NCCL where libnccl is present, else through host memory),
    /// nccl, or host. Ranks on the CPU always use the thread collectives.
    #[arg(long, default_value = "auto", help_heading = "Device")]
    pub collectives: String,
    /// All-gathers (ZeRO-3 weights, the weights after each update) by peer copies on the copy
    /// engines, no kernels on the SMs (GPUs of one process: --gpus N).
    #[arg(long, help_heading = "Device")]
    pub memcpy_all_gather: bool,
    /// Sends and receives by peer copies on the copy engines (GPUs of one process).
    #[arg(long, help_heading = "Device")]
    pub memcpy_send_recv: bool,
    /// Reduce-scatter from copy-engine all-to-all copies plus a local reduction: not built
    /// (refused with a message); reductions run on NCCL or through host memory.
    #[arg(long, help_heading = "Device")]
    pub all_to_all_reduce: bool,
}

fn dtype(opt: &str, s: &str) -> Result<DType> {
    DType::parse(s).ok_or_else(|| {
        Error::Config(format!(
            "{opt}: unknown dtype {s:?} (fp32, bf16, e4m3, e5m2)"
        ))
    })
}

impl TrainArgs {
    pub fn memory(&self, fp8: bool) -> Result<MemoryOptions> {
        if self.no_wgrad_overlap && !fp8 {
            return Err(Error::Config("--no-wgrad-overlap only applies with --matmul-dtype e4m3".into()));
        }
        let shard_gradients = self.gpus > 1 && (self.shard_gradients || self.shard_weights || self.zero_level >= 2);
        Ok(MemoryOptions {
            recompute: self.recompute(),
            persistent_quants: self.persistent_quants,
            wgrad_overlap: fp8 && !self.no_wgrad_overlap && !self.offload_gradients && !shard_gradients && !self.cuda_graphs,
            offload_master: self.offload_master,
            offload_opt_m: self.offload_opt_m,
            offload_opt_v: self.offload_opt_v,
            stream_weights: self.stream_weights || (self.shard_weights && self.gpus <= 1),
            offload_gradients: self.offload_gradients,
            shard_weights: self.gpus > 1 && (self.shard_weights || self.zero_level >= 3),
            shard_gradients,
            offload_residual: self.offload_residual,
            cuda_graphs: self.cuda_graphs,
            memory_limit: self.memory_limit.as_deref().map(|s| parse_size(s).map_err(|e| Error::Config(format!("--memory-limit: {e}")))).transpose()?,
        })
    }

    pub fn recompute(&self) -> Recompute {
        Recompute {
            swiglu: self.recompute_swiglu,
            norm: self.recompute_norm,
            ffn: self.recompute_ffn,
            qkv: self.recompute_qkv,
            att: self.recompute_att,
            block: self.recompute_block,
            fp8_inputs: self.recompute_fp8_inputs,
            own_backward_temporaries: false,
        }
    }

    /// Validates the options that do not depend on the model and builds the run config.
    pub fn train_config(&self, on_gpu: bool) -> Result<TrainConfig> {
        if self.continue_from.is_some() && self.ckpt_dir.is_none() {
            return Err(Error::Config(
                "--continue needs --ckpt-dir (where to look for checkpoints)".into(),
            ));
        }
        if self.ckpt_interval > 0 && self.ckpt_dir.is_none() {
            return Err(Error::Config("--ckpt-interval needs --ckpt-dir".into()));
        }
        if self.stop_at == Some(0) || self.stop_at.is_some_and(|s| s > self.steps) {
            return Err(Error::Config(format!(
                "--stop-at must be in 1..={} (--steps), got {:?}",
                self.steps, self.stop_at
            )));
        }
        if self.train_file.is_some() && self.random_data {
            return Err(Error::Config(
                "--random-data and --train-file exclude each other".into(),
            ));
        }
        let matmul = match &self.matmul_dtype {
            Some(s) => dtype("--matmul-dtype", s)?,
            None if on_gpu => DType::BF16,
            None => DType::F32,
        };
        if self.gradient_dtype.is_some() && !matmul.is_fp8() {
            return Err(Error::Config(
                "--gradient-dtype only applies with --matmul-dtype e4m3".into(),
            ));
        }
        let weights = if matmul == DType::F32 {
            DType::F32
        } else {
            DType::BF16
        };
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
            return Err(Error::Config(
                "--model-dtype bf16 needs bf16 matmuls (--matmul-dtype bf16)".into(),
            ));
        }
        Ok(TrainConfig {
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            grad_accumulation: self.grad_accumulation,
            steps: self.steps,
            schedule: Schedule {
                lr: self.learning_rate,
                warmup: self
                    .warmup
                    .unwrap_or((self.steps / 10).min(if self.steps <= 1000 { 25 } else { 1000 })),
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
            spike: SpikeGuard { z: self.spike_z, window: self.spike_window, max_skips: self.spike_max_skips },
            backend: self.backend.options()?,
            world_size: self.gpus,
            z_loss: self.z_loss,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn config(args: &[&str]) -> Result<TrainConfig> {
        let cli = Cli::try_parse_from(std::iter::once("llmq").chain(args.iter().copied())).unwrap();
        cli.args.train_config(true)
    }

    #[test]
    fn fp8_runs_overlap_weight_gradients_unless_told_not_to() {
        assert!(config(&["--matmul-dtype", "e4m3"]).unwrap().memory.wgrad_overlap);
        assert!(!config(&["--matmul-dtype", "e4m3", "--no-wgrad-overlap"]).unwrap().memory.wgrad_overlap);
        assert!(!config(&["--matmul-dtype", "bf16"]).unwrap().memory.wgrad_overlap);
        let e = config(&["--matmul-dtype", "bf16", "--no-wgrad-overlap"]).unwrap_err().to_string();
        assert!(e.contains("--no-wgrad-overlap only applies with --matmul-dtype e4m3"), "{e}");
    }

    #[test]
    fn cuda_graphs_take_the_reference_flag_and_leave_out_the_overlap() {
        for flag in ["--cuda-graphs", "--use-cuda-graphs"] {
            let m = config(&["--matmul-dtype", "e4m3", flag]).unwrap().memory;
            assert!(m.cuda_graphs && !m.wgrad_overlap, "{flag}: {m:?}");
            assert!(m.describe().contains("graphs per block"), "{}", m.describe());
        }
        assert!(!config(&["--matmul-dtype", "e4m3"]).unwrap().memory.cuda_graphs);
        // refused with the rest of the configuration, before the model is built
        let c = config(&["--cuda-graphs", "--offload-residual"]).unwrap();
        let e = c.memory.validate(&c.precision).unwrap_err().to_string();
        assert!(e.contains("--cuda-graphs") && e.contains("--offload-residual"), "{e}");
    }
}
