//! `llmq tokenize` (text/JSONL/Parquet -> token files) and `llmq export` (checkpoint -> HF model).

use indicatif::{ProgressBar, ProgressStyle};
use llmq_core::{DType, Error, Result};
use llmq_io::tokenize::{tokenize, TokenizeOptions};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// Input .txt files (one document each), .jsonl files (one document per line) or .parquet
    /// files (one document per row).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// tokenizer.json, or a model directory holding one.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory for {prefix}_NNN.bin token files.
    #[arg(long, short)]
    pub output: PathBuf,
    /// JSON field (Parquet column) with the text [default: text; with --chat: messages].
    #[arg(long)]
    pub field: Option<String>,
    /// Inputs are conversations ([{"role": ..., "content": ...}, ...] in --field): render them
    /// with the chat template of the tokenizer's tokenizer_config.json and train only the
    /// assistant's replies (loss mask).
    #[arg(long)]
    pub chat: bool,
    /// Token appended after each document (default: the tokenizer's EOS).
    #[arg(long)]
    pub eos_id: Option<u32>,
    #[arg(long, default_value = "out")]
    pub prefix: String,
    /// Start a new file after this many tokens.
    #[arg(long, default_value_t = 100_000_000)]
    pub max_tokens_per_file: u64,
    /// Do not add the tokenizer's special tokens (e.g. BOS) around documents.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run_tokenize(a: TokenizeArgs) -> Result<()> {
    let mut opts = TokenizeOptions::new(a.inputs, a.tokenizer, a.output);
    opts.field = a.field.unwrap_or_else(|| if a.chat { "messages" } else { "text" }.into());
    opts.chat = a.chat;
    opts.eos_id = a.eos_id;
    opts.prefix = a.prefix;
    opts.max_tokens_per_file = a.max_tokens_per_file;
    opts.add_special_tokens = !a.no_special_tokens;
    opts.overwrite = a.overwrite;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}, {msg} ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // redrawn on a timer, so that elapsed time and rates move while a batch is encoded
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let start = std::time::Instant::now();
    let report = tokenize(&opts, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{:.0} tokens/s", p.tokens as f64 / start.elapsed().as_secs_f64().max(1e-3)));
    })?;
    bar.finish_and_clear();
    let eos = &report.eos;
    println!(
        "{} documents, {} tokens (vocab {}) in {:.1} s -> {} file(s); after each document: {} (id {}, {})",
        report.documents,
        report.tokens,
        report.vocab_size,
        start.elapsed().as_secs_f64(),
        report.files.len(),
        eos.token.as_deref().unwrap_or("<no string>"),
        eos.id,
        eos.source
    );
    if let Some((template, trained)) = &report.chat {
        println!(
            "chat template of {}: {trained} assistant tokens trained (loss mask 1), {} masked",
            template.display(),
            report.tokens - trained
        );
    }
    for f in &report.files {
        println!("  {} ({} tokens)", f.path.display(), f.n_tokens);
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint directory (ckpt/step_NNNNNNNN).
    pub checkpoint: PathBuf,
    /// Output directory (model.safetensors + config.json).
    #[arg(long, short)]
    pub output: PathBuf,
    /// bf16 or fp32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Copy tokenizer files from this model directory (default: the tokenizer the checkpoint
    /// records, that of the model the run started from).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    let dtype = DType::parse(&a.dtype)
        .filter(|d| matches!(d, DType::F32 | DType::BF16))
        .ok_or_else(|| {
            Error::Config(format!("--dtype: expected bf16 or fp32, got {:?}", a.dtype))
        })?;
    let (cfg, groups) = llmq_train::checkpoint::model_config(&a.checkpoint)?;
    let tokenizer = match a.tokenizer_from {
        Some(dir) if !dir.join("tokenizer.json").is_file() => {
            return Err(Error::file(&dir, "--tokenizer-from: expected a model directory holding tokenizer.json, found none"));
        }
        Some(dir) => Some((dir, "--tokenizer-from")),
        None => recorded_tokenizer(&a.checkpoint)?,
    };
    llmq_io::hf::export_model(&a.output, &cfg, &groups, dtype, tokenizer.as_ref().map(|t| t.0.as_path()))?;
    println!(
        "exported {} ({dtype}) to {}",
        cfg.arch.hf_name(),
        a.output.display()
    );
    match tokenizer {
        Some((dir, why)) => println!("tokenizer files from {} ({why})", dir.display()),
        None => eprintln!(
            "warning: exported without a tokenizer: the checkpoint records none (a model built from scratch, or a checkpoint from before tokenizers were recorded); pass --tokenizer-from DIR to copy one"
        ),
    }
    Ok(())
}

/// The tokenizer directory recorded in the checkpoint, where it still holds tokenizer files;
/// a recorded one that is gone is a warning, not an error (the weights still export).
fn recorded_tokenizer(ckpt: &std::path::Path) -> Result<Option<(PathBuf, &'static str)>> {
    let Some(dir) = llmq_train::setup::recorded_source(ckpt)?.and_then(|s| s.tokenizer) else { return Ok(None) };
    if llmq_io::hf::TOKENIZER_FILES.iter().any(|f| dir.join(f).is_file()) {
        return Ok(Some((dir, "recorded in the checkpoint")));
    }
    eprintln!("warning: the checkpoint's tokenizer directory {} holds no tokenizer files any more", dir.display());
    Ok(None)
}
