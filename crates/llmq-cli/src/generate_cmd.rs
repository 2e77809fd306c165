//! `llmq generate`: sample a continuation of a prompt from a model directory, Hugging Face cache
//! name or checkpoint, printing the text as it comes (stdout holds only the prompt and the text;
//! what was loaded and the speed go to stderr).

use crate::device;
use llmq_core::{BackendOptions, Result};
use llmq_train::generate::Stop;
use llmq_train::sampling::SamplingOptions;
use llmq_train::textgen::{generate_text, parse_dtype, TextRequest};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (config.json + safetensors), `Org/Name` in the local Hugging Face cache, or
    /// an llmq checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// The text to continue.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Tokens to generate at most (generation also stops at the end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 takes the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities add up to P, in (0, 1] (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampling (the same seed gives the same text for the same model and device).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json or a directory holding one (default: the model's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Weights and activations: bf16 or fp32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// auto (a GPU when present, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = llmq_train::options::DEVICES)]
    pub device: String,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let dtype = parse_dtype(&a.dtype)?;
    let sampling = SamplingOptions { max_tokens: a.max_tokens, temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    sampling.validate()?;
    let req = TextRequest { model: a.model, tokenizer: a.tokenizer, prompt: a.prompt, dtype, sampling };
    let (mut be, _) = device::select(&a.device, &BackendOptions::default())?;
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", req.prompt);
    let _ = out.flush();
    let r = generate_text(be.as_mut(), &req, &mut |piece| {
        let _ = write!(out, "{piece}");
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    let stop = match r.stop {
        Stop::MaxTokens => "--max-tokens reached",
        Stop::Eos => "end-of-sequence token",
        Stop::Length => "model length reached",
        Stop::Caller => "stopped",
    };
    let n = r.tokens.len();
    let rate = |tokens: usize, s: f64| if s > 0.0 { format!("{:.1} tokens/s", tokens as f64 / s) } else { "-".into() };
    eprintln!(
        "{} on {} ({}): prompt {} tokens in {:.2} s ({}); {n} tokens generated in {:.2} s ({}); {stop}",
        r.describe,
        be.name(),
        dtype,
        r.prompt_tokens,
        r.prompt_seconds,
        rate(r.prompt_tokens, r.prompt_seconds),
        r.decode_seconds,
        rate(n.saturating_sub(1), r.decode_seconds),
    );
    Ok(())
}
