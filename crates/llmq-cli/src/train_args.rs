//! `llmq train` options: the run's options (`llmq_train::options::TrainOptions`, shared with the
//! Python package) and those of the command line alone, grouped under the same help headings.

use clap::Args;
use llmq_core::{Error, Result};
use llmq_train::options::{DataParallel, TrainOptions};
use llmq_train::TrainConfig;
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

    #[command(flatten)]
    pub opts: TrainOptions,

    // ---- data ----
    /// With --continue: resume although a token file's content fingerprint or size differs from
    /// the one the checkpoint recorded (a deliberate change of data under the same names).
    #[arg(long, help_heading = "Data")]
    pub allow_data_change: bool,

    // ---- batch ----
    /// Keep the tokens per optimizer step and use the largest micro-batch that fits the GPU:
    /// doubles --batch-size while --grad-accumulation halves evenly (larger micro-batches run
    /// faster). The choice is printed; pass it explicitly to repeat a run bit for bit. The CPU
    /// backend keeps the configured micro-batch.
    #[arg(long, help_heading = "Batch")]
    pub fit_batch: bool,

    // ---- evaluation and logging ----
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

    // ---- checkpoints ----
    /// Delete the checkpoints that are not on the resumed line (an abandoned branch, newer ones
    /// that fail verification, or all for a run without --continue) instead of moving them
    /// into <ckpt-dir>/abandoned/.
    #[arg(long, help_heading = "Checkpoints")]
    pub drop_abandoned: bool,
    /// Resume: the newest complete checkpoint (no value), a step number, or a checkpoint path.
    #[arg(long = "continue", num_args = 0..=1, default_missing_value = "latest", value_name = "STEP|PATH", help_heading = "Checkpoints")]
    pub continue_from: Option<String>,

    // ---- device ----
    /// Data-parallel ranks, one thread per GPU in this process (GPUs 0..N); with --device cpu,
    /// N ranks on the CPU. Each rank runs --batch-size x --grad-accumulation per step.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=llmq_train::ranks::MAX_RANKS as u64), help_heading = "Device")]
    pub gpus: usize,
    /// With several GPUs: 1 shards the optimizer state, 2 also the gradients, 3 also the block
    /// weights. The numbers are the same at every level.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3), help_heading = "Device")]
    pub zero_level: u8,
    /// Seconds a collective waits for the other ranks before every rank stops with an error
    /// naming it and the ranks that did not arrive (across processes: from the roll call at rank 0).
    #[arg(long, default_value_t = 300, help_heading = "Device")]
    pub collective_timeout: u64,
    /// Collectives between GPUs: auto (NCCL where libnccl is present, else through host memory),
    /// nccl, or host. Ranks on the CPU always use the thread collectives.
    #[arg(long, default_value = "auto", value_parser = ["auto", "nccl", "host"], help_heading = "Device")]
    pub collectives: String,
    /// All-gathers (ZeRO-3 weights, the weights after each update) by peer copies on the copy
    /// engines, no kernels on the SMs (GPUs of one process: --gpus N).
    #[arg(long, help_heading = "Device")]
    pub memcpy_all_gather: bool,
    /// Sends and receives by peer copies on the copy engines (GPUs of one process).
    #[arg(long, help_heading = "Device")]
    pub memcpy_send_recv: bool,
    /// Gradient reduce-scatters as all-to-all copies (copy engines on GPUs of one process,
    /// plain copies between CPU ranks) into a device staging buffer plus one local reduction
    /// kernel; the same numbers as the default reduce-scatter.
    #[arg(long, help_heading = "Device")]
    pub all_to_all_reduce: bool,
}

impl TrainArgs {
    /// Validates the options that do not depend on the model and builds the run config.
    pub fn train_config(&self, on_gpu: bool) -> Result<TrainConfig> {
        if self.continue_from.is_some() && self.opts.ckpt_dir.is_none() {
            return Err(Error::Config("--continue needs --ckpt-dir (where to look for checkpoints)".into()));
        }
        self.opts.train_config(on_gpu, DataParallel { world: self.gpus, zero_level: self.zero_level, all_to_all_reduce: self.all_to_all_reduce })
    }

    /// `TrainConfig::default_graphs`, except with `--log-amax`, which reads the fp8 abs-maxes on
    /// the host inside the blocks and so rules graphs out.
    pub fn default_graphs(&self, tc: &mut TrainConfig, cfg: &llmq_core::ModelConfig, on_gpu: bool) {
        if self.log_amax == 0 {
            tc.default_graphs(cfg, on_gpu);
        }
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
}
