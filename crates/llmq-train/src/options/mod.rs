//! The options of a training run, defined once for `llmq train` (clap flags, in kebab case) and
//! for the Python package (`llmq.Trainer(**options)`, the same names in snake case).
//!
//! The clap attributes are the only defaults: `Default` parses an empty command line, and serde
//! fills absent keys from it. Validation into a `TrainConfig` is in `config.rs`; its messages name
//! the CLI flag (the Python option is the flag in snake case). A new option of the run is one
//! field here, in the group of its help heading. Options only one front end has stay there: the
//! CLI's `--config`, `--continue`, `--gpus` and collectives, `--fit-batch`, `--profile`, ...
//! (`llmq-cli/src/train_args.rs`, listed after these under the same headings); the package's
//! token arrays and Python-only spellings (`llmq-py/src/options.rs`).

mod config;

pub use config::{export_dtype, DataParallel};

use clap::{Args, FromArgMatches};
use serde::Deserialize;
use std::path::PathBuf;

/// The values of `--device` ("gpu" is a synonym of "cuda").
pub const DEVICES: [&str; 4] = ["auto", "cpu", "cuda", "gpu"];

/// `T` from command-line flags (the program name left out); absent ones get the clap attributes'
/// defaults.
fn parse_flags<T: Args + FromArgMatches>(flags: &[&str]) -> Result<T, clap::Error> {
    let command = T::augment_args(clap::Command::new("llmq"));
    command.try_get_matches_from(std::iter::once("llmq").chain(flags.iter().copied())).and_then(|m| T::from_arg_matches(&m))
}

/// A size given as a byte count (Python) or as text such as "16GiB" (both).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl std::str::FromStr for Size {
    type Err = std::convert::Infallible;
    /// Kept as text: `--memory-limit` parses it in validation, with a message naming the flag.
    fn from_str(s: &str) -> Result<Size, Self::Err> {
        Ok(Size::Text(s.to_string()))
    }
}

#[derive(Args, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
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
    #[serde(alias = "train_files")]
    pub train_file: Option<String>,
    /// Held-out token file for evaluation.
    #[arg(long, help_heading = "Data")]
    #[serde(alias = "eval_files")]
    pub eval_file: Option<String>,
    /// Vocabulary of the synthetic corpus (when no --train-file is given).
    #[arg(long, default_value_t = 256, help_heading = "Data")]
    pub synthetic_vocab: usize,
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
    /// With --matmul-dtype e4m3: the fp8 matmuls skip the promotion of their partial sums to
    /// full f32 (cuBLASLt's fast accumulation). Faster on some shapes, less accurate; changes
    /// the numbers.
    #[arg(long, help_heading = "Precision")]
    pub fp8_fast_accumulation: bool,
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
    /// With --persistent-quants: keep the fp8 block weights in pinned host memory (one byte per
    /// parameter, re-quantised there once per optimizer step) and bring each block's to one of
    /// two device slots for its forward, recompute and backward, prefetching the next block
    /// (the transposes are made on the device; same numbers).
    #[arg(long, help_heading = "Memory")]
    pub offload_quants: bool,
    /// fp8: run every weight-gradient matmul on the main stream, not on a second stream beside
    /// the input-gradient chain (the default for e4m3: same numbers, +1.4% at 1.5B on an H200).
    #[arg(long, help_heading = "Memory")]
    pub no_wgrad_overlap: bool,
    /// The optimizer reads and writes host-resident state (offloaded master weights and Adam
    /// moments, streamed weights, offloaded gradients) in place over mapped host memory instead
    /// of staging each block's through two device slots per tensor: less device memory, every
    /// byte over the host link inside the update. Same numbers.
    #[arg(long, help_heading = "Memory")]
    pub zero_copy: bool,
    /// Allocate the host side of offloaded master weights, Adam moments, streamed weights and
    /// offloaded gradients write-combined: faster for the GPU to read over PCIe, very slow for
    /// the CPU to read (checkpoints read it through the GPU). Same numbers.
    #[arg(long, help_heading = "Memory")]
    pub write_combined: bool,
    /// Run each block's forward and recompute+backward and the optimizer update as CUDA graphs,
    /// captured on their second call and replayed after (same numbers; fewer host launches).
    /// Not with streamed, offloaded or sharded block state; turns off the fp8 second-stream
    /// weight gradients. Without this flag or --no-cuda-graphs, on for small micro-batches on
    /// one GPU, where graphs measured faster.
    #[arg(long, alias = "use-cuda-graphs", help_heading = "Memory")]
    pub cuda_graphs: bool,
    /// Never run blocks as CUDA graphs (not even for the small micro-batches where they are on
    /// by default).
    #[arg(long, conflicts_with = "cuda_graphs", help_heading = "Memory")]
    pub no_cuda_graphs: bool,
    /// Choose the micro-batch (keeping the tokens per step), recomputation, persistent fp8
    /// weights and offloading that fit --memory-limit (else the GPU's free memory) and the
    /// host's RAM with the best estimated throughput; prints the choice as flags that repeat it
    /// bit for bit.
    #[arg(long, help_heading = "Memory")]
    pub auto_memory: bool,
    /// Cap on the device memory the run may allocate, e.g. 16GiB (emulates a smaller card). A
    /// plan over it is refused before anything is allocated, naming options that would fit.
    #[arg(long, value_name = "SIZE", help_heading = "Memory")]
    pub memory_limit: Option<Size>,
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
    /// Keep the fp32 master weights in pinned host memory; the optimizer brings each block's to
    /// the device and back (or updates them in place with --zero-copy) (needs --model-dtype fp32
    /// with bf16 or e4m3 matmuls).
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
    /// Seed for initialisation, data order and stochastic rounding.
    #[arg(long, default_value_t = 42, help_heading = "Evaluation and logging")]
    pub seed: u64,
    /// Abort after this many consecutive non-finite steps.
    #[arg(long, default_value_t = 5, help_heading = "Evaluation and logging")]
    pub max_bad_steps: u32,

    #[command(flatten)]
    #[serde(flatten)]
    pub backend: BackendFlags,

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
    /// Also keep every checkpoint whose step is a multiple of M ("major").
    #[arg(long, help_heading = "Checkpoints")]
    pub keep_major: Option<u64>,
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
    #[arg(long, default_value = "auto", value_parser = DEVICES, help_heading = "Device")]
    pub device: String,
}

/// The GPU backend's kernel and algorithm choices that change the last bits of the results
/// (`llmq_core::BackendOptions`, part of the run configuration); also options of `llmq eval`.
#[derive(Args, Deserialize, Debug, Clone, PartialEq)]
#[serde(default)]
pub struct BackendFlags {
    /// Attention kernels: auto (the tensor-core kernels of the GPU's family), mma (the mma.sync
    /// kernels, also on Hopper: their cross-check) or simple (the slow reference kernels).
    #[arg(long, default_value = "auto", help_heading = "GPU backend")]
    pub attention: String,
    /// SMs the weight-gradient matmuls on the side stream are limited to (default: 3/4 of the
    /// GPU's; 0 = no limit). Their algorithms are chosen for this target.
    #[arg(long, help_heading = "GPU backend")]
    pub side_sms: Option<u32>,
    /// Give the side-stream matmuls the algorithms chosen without an SM target (for measurements).
    #[arg(long, help_heading = "GPU backend")]
    pub no_side_algo: bool,
    /// Which cuBLASLt algorithm each matmul shape runs: embedded (the measured table built in),
    /// off (the heuristic's first answer) or a table file (its entries override the built-in ones).
    #[arg(long, default_value = "embedded", help_heading = "GPU backend")]
    pub matmul_tuning: String,
    /// Make a tuning table: time the candidate algorithms of each shape the table does not list
    /// and append the choices to this file (results then depend on the timings).
    #[arg(long, help_heading = "GPU backend")]
    pub matmul_autotune: Option<String>,
}

/// The defaults of `llmq train`.
impl Default for TrainOptions {
    fn default() -> Self {
        // no option is required, so no flags always parse (tested below)
        parse_flags(&[]).expect("every option has a default")
    }
}

impl Default for BackendFlags {
    fn default() -> Self {
        parse_flags(&[]).expect("every option has a default")
    }
}

impl TrainOptions {
    /// Options given as a JSON object (the Python keyword arguments), one key at a time first so
    /// that a bad value's error names its option.
    pub fn from_json(map: serde_json::Map<String, serde_json::Value>) -> llmq_core::Result<TrainOptions> {
        use llmq_core::Error;
        for (k, v) in &map {
            let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
            serde_json::from_value::<TrainOptions>(one).map_err(|e| Error::Config(format!("option {k}: {e}")))?;
        }
        serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| Error::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> TrainOptions {
        parse_flags(args).unwrap()
    }

    fn json(text: &str) -> llmq_core::Result<TrainOptions> {
        TrainOptions::from_json(serde_json::from_str(text).unwrap())
    }

    #[test]
    fn defaults_are_the_clap_defaults_and_serde_fills_absent_keys_with_them() {
        let d = TrainOptions::default();
        assert_eq!((d.batch_size, d.seq_len, d.steps, d.learning_rate, d.keep_last), (16, 128, 250, 3e-3, 3));
        assert_eq!((d.backend.attention.as_str(), d.backend.matmul_tuning.as_str(), d.device.as_str()), ("auto", "embedded", "auto"));
        assert_eq!(json("{}").unwrap(), d);
        assert_eq!(flags(&[]), d);
        assert_eq!(BackendFlags::default(), d.backend);
    }

    #[test]
    fn json_keys_are_the_flags_in_snake_case() {
        let o = json(r#"{"batch_size": 4, "train_files": "a*.bin", "attention": "mma", "memory_limit": 1024, "learning_rate": 1}"#).unwrap();
        let cli = flags(&["--batch-size", "4", "--train-file", "a*.bin", "--attention", "mma", "--learning-rate", "1"]);
        assert_eq!(o, TrainOptions { memory_limit: Some(Size::Bytes(1024)), ..cli });
        assert_eq!(json(r#"{"memory_limit": "16GiB"}"#).unwrap().memory_limit, Some(Size::Text("16GiB".into())));
        let e = json(r#"{"batchsize": 4}"#).unwrap_err().to_string();
        assert!(e.contains("option batchsize: unknown field `batchsize`"), "{e}");
        let e = json(r#"{"side_sms": "x"}"#).unwrap_err().to_string();
        assert!(e.contains("option side_sms: invalid type: string \"x\""), "{e}");
        let e = json(r#"{"batch_size": 1.5}"#).unwrap_err().to_string();
        assert!(e.contains("option batch_size: invalid type: floating point `1.5`"), "{e}");
    }

    #[test]
    fn fp8_fast_accumulation_is_a_precision_of_fp8_runs_only() {
        let precision = |args: &[&str]| {
            let tc = flags(args).train_config(true, DataParallel::ONE)?;
            tc.precision.validate().map(|_| tc.precision.fp8_fast_accumulation)
        };
        assert!(!precision(&["--matmul-dtype", "e4m3"]).unwrap());
        assert!(precision(&["--matmul-dtype", "e4m3", "--fp8-fast-accumulation"]).unwrap());
        let e = precision(&["--fp8-fast-accumulation"]).unwrap_err().to_string();
        assert!(e.contains("--fp8-fast-accumulation needs --matmul-dtype e4m3, got bf16"), "{e}");
        assert!(json(r#"{"fp8_fast_accumulation": true}"#).unwrap().fp8_fast_accumulation);
    }

    #[test]
    fn graphs_are_asked_for_refused_or_left_to_the_default() {
        let memory = |o: TrainOptions| o.memory(false, DataParallel::ONE).map(|m| (m.cuda_graphs, m.graphs_by_default));
        assert_eq!(memory(flags(&[])).unwrap(), (false, true));
        assert_eq!(memory(flags(&["--cuda-graphs"])).unwrap(), (true, false));
        assert_eq!(memory(flags(&["--no-cuda-graphs"])).unwrap(), (false, false));
        assert!(parse_flags::<TrainOptions>(&["--cuda-graphs", "--no-cuda-graphs"]).is_err());
        let e = memory(json(r#"{"cuda_graphs": true, "no_cuda_graphs": true}"#).unwrap()).unwrap_err().to_string();
        assert!(e.contains("--cuda-graphs and --no-cuda-graphs"), "{e}");
    }
}
