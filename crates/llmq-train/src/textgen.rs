//! Text in, text out: `llmq generate` and `llmq.generate` load a model (`generate::load_source`)
//! and its tokenizer, encode the prompt, sample a continuation with the cached decoder and
//! decode it, handing text to the caller as tokens arrive.

use crate::generate::{generate, load_source, Decoder, Stop, PROMPT_CHUNK};
use crate::sampling::SamplingOptions;
use llmq_core::{Backend, DType, Error, Result};
use llmq_io::tokenize::{find_eos, load_tokenizer, tokenizer_dir, tokenizer_json_path};
use std::path::PathBuf;
use std::time::Instant;

/// `--dtype` of generation: bf16 or fp32.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match DType::parse(s) {
        Some(d @ (DType::BF16 | DType::F32)) => Ok(d),
        _ => Err(Error::Config(format!("--dtype: expected bf16 or fp32, got {s:?}"))),
    }
}

pub struct TextRequest {
    /// Model directory, Hugging Face cache name or llmq checkpoint directory.
    pub model: String,
    /// tokenizer.json or a directory holding one (default: the model's).
    pub tokenizer: Option<PathBuf>,
    pub prompt: String,
    /// Weights and activations: bf16 or fp32.
    pub dtype: DType,
    pub sampling: SamplingOptions,
}

pub struct TextResult {
    /// What was loaded, from where.
    pub describe: String,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    /// The continuation (the prompt not included).
    pub text: String,
    pub stop: Stop,
    /// Seconds to read the prompt (to the first sampled token) and to generate the rest.
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
}

/// Generates a continuation of `req.prompt`; `on_text` receives each new piece of text (the
/// decoded continuation grows by whole characters: a token that ends inside a multi-byte
/// character waits for the next).
pub fn generate_text(be: &mut dyn Backend, req: &TextRequest, on_text: &mut dyn FnMut(&str)) -> Result<TextResult> {
    req.sampling.validate()?;
    let src = load_source(&req.model)?;
    let tok_path = match (&req.tokenizer, &src.tokenizer_dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => return Err(Error::Config(format!("--model {}: the {} has no tokenizer.json: pass --tokenizer PATH", req.model, src.describe))),
    };
    let tok = load_tokenizer(&tok_path)?;
    let json = tokenizer_json_path(&tok_path)?;
    let mut eos: Vec<u32> = find_eos(&tok, tokenizer_dir(&json)).ok().map(|c| c.id).into_iter().chain(src.cfg.eos_token_id).collect();
    eos.dedup();

    let enc = llmq_io::guarded(|| tok.encode(req.prompt.as_str(), true)).map_err(|e| Error::file(&json, format!("cannot encode the prompt: {e}")))?;
    let mut prompt: Vec<u32> = enc.get_ids().to_vec();
    if prompt.is_empty() {
        prompt.extend(src.cfg.bos_token_id);
    }
    if prompt.is_empty() {
        return Err(Error::Config("--prompt: empty, and the model has no BOS token to start from".into()));
    }
    let (v, limit) = (src.cfg.vocab_size, src.cfg.max_position_embeddings);
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= v) {
        return Err(Error::Config(format!("tokenizer {}: prompt token {bad} is outside the model's vocabulary 0..{v} (tokenizer and model do not match)", json.display())));
    }
    let max_len = prompt.len() + req.sampling.max_tokens;
    if max_len > limit {
        return Err(Error::Config(format!(
            "--max-tokens {} + a prompt of {} tokens = {max_len} positions, more than the model's max_position_embeddings {limit}",
            req.sampling.max_tokens,
            prompt.len()
        )));
    }
    let mut dec = Decoder::new(be, &src.cfg, &src.groups, req.dtype, max_len, PROMPT_CHUNK.min(prompt.len()))?;
    drop(src.groups);

    let decode = |ids: &[u32]| tok.decode(ids, true).map_err(|e| Error::file(&json, format!("cannot decode tokens: {e}")));
    let base = decode(&prompt)?;
    let mut all = prompt.clone();
    let (mut shown, mut text) = (base.len(), String::new());
    let start = Instant::now();
    let mut first_at = None;
    let mut err = None;
    let (tokens, stop) = generate(&*be, &mut dec, &prompt, &req.sampling, &eos, &mut |t| {
        first_at.get_or_insert_with(|| start.elapsed().as_secs_f64());
        all.push(t);
        match decode(&all) {
            // the prompt's text is a prefix of the whole text for the usual decoders; where not,
            // the continuation is what follows the prompt's length
            Ok(s) if s.len() > shown && s.is_char_boundary(shown) && !s.ends_with('\u{FFFD}') => {
                on_text(&s[shown..]);
                text.push_str(&s[shown..]);
                shown = s.len();
                true
            }
            Ok(_) => true,
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    // what the last tokens left pending (an incomplete character decodes as U+FFFD)
    let s = decode(&all)?;
    if s.len() > shown && s.is_char_boundary(shown) {
        on_text(&s[shown..]);
        text.push_str(&s[shown..]);
    }
    let total = start.elapsed().as_secs_f64();
    let prompt_seconds = first_at.unwrap_or(total);
    Ok(TextResult { describe: src.describe, prompt_tokens: prompt.len(), tokens, text, stop, prompt_seconds, decode_seconds: total - prompt_seconds })
}
