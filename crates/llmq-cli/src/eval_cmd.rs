//! `llmq eval`: loss and perplexity of a model directory, Hugging Face cache name or checkpoint
//! on token files, on either backend, with no training step (`llmq_train::eval`).

use llmq_train::options::BackendFlags;
use crate::device;
use clap::Args;
use llmq_core::{DType, Error, Result};
use llmq_train::eval::{self, EvalData, EvalShape};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint directory (step_N, or a --ckpt-dir: its newest complete checkpoint), a model
    /// directory with config.json + safetensors, or a name in the local Hugging Face cache.
    pub model: String,
    /// Token files to evaluate on (glob), read in order from the start.
    #[arg(long)]
    pub eval_file: String,
    /// Batches to evaluate (default: every whole batch the files hold).
    #[arg(long)]
    pub batches: Option<usize>,
    /// Sequences per batch (B).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// auto (a GPU when present, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = llmq_train::options::DEVICES)]
    pub device: String,
    /// Matmul operands: fp32, bf16 or e4m3 (as the training run's --matmul-dtype, for its eval
    /// loss bit for bit). Default: a checkpoint's run's; else bf16 on a GPU, fp32 on the CPU.
    #[arg(long)]
    pub matmul_dtype: Option<String>,
    /// With e4m3 matmuls: skip the promotion of the partial sums (as the training run's
    /// --fp8-fast-accumulation, for its eval loss bit for bit). A checkpoint's run's setting
    /// applies without the flag when the matmul dtype is its.
    #[arg(long)]
    pub fp8_fast_accumulation: bool,
    /// Print the result as one JSON object (loss, perplexity, tokens, batches).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub backend: BackendFlags,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let model = eval::resolve_model(&a.model)?;
    let shape = EvalShape { batch_size: a.batch_size, seq_len: a.seq_len, batches: a.batches };
    let mut data = EvalData::open(&a.eval_file, &model.cfg, shape, &|l| crate::preflight::check_tokens(l, "eval"))?;
    let (mut be, gpu) = device::select(&a.device, &a.backend.options()?)?;
    let asked = a.matmul_dtype.as_deref().map(|s| DType::parse(s).ok_or_else(|| Error::Config(format!("--matmul-dtype: unknown dtype {s:?} (fp32, bf16, e4m3)")))).transpose()?;
    let precision = eval::precision(asked, a.fp8_fast_accumulation, &model, gpu.is_some());
    precision.validate()?;
    if !a.json {
        println!("llmq eval");
        println!("  model      {} | V={} | {:.2}M parameters", model.describe, model.cfg.vocab_size, model.cfg.num_params() as f64 / 1e6);
        println!("  data       {}", data.describe());
        let fast = if precision.fp8_fast_accumulation { " | fp8 fast accumulation" } else { "" };
        println!("  device     {} | matmul {}{fast}", be.name(), precision.matmul);
        println!("  batches    {} x B={} T={}", data.batches, a.batch_size, a.seq_len);
    }
    let bar = indicatif::ProgressBar::new(data.batches as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} batches, {elapsed} (ETA {eta})").expect("a valid template"));
    bar.set_message("evaluating");
    let r = eval::evaluate(be.as_mut(), model, precision, &mut data, &mut |done| bar.set_position(done as u64));
    bar.finish_and_clear();
    let r = r?;
    if a.json {
        println!("{}", serde_json::json!({"loss": r.loss, "perplexity": r.perplexity(), "tokens": r.tokens, "batches": r.batches}));
    } else {
        println!("eval: {} tokens in {} batches | loss {:.4} | perplexity {:.3}", r.tokens, r.batches, r.loss, r.perplexity());
    }
    Ok(())
}
