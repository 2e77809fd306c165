//! Text generation: a forward-only decoder with a key/value cache, written against the op
//! interface like `model.rs` (the same block, the same ops, any backend), and the loop that feeds
//! it sampled tokens (`crate::sampling`).
//!
//! `Decoder::feed` runs tokens at positions pos.. through every block: RMSNorm, the QKV matmul
//! (+ qk-norm), RoPE at the rows' positions (the table sliced at pos: `rope_fwd` gives row i of a
//! one-sequence tensor of n rows the table's row i), `attention_decode` (which appends the rows'
//! keys and values to the layer's cache and attends over the cache), the output projection, the
//! fused residual + RMSNorm and the MLP. A prompt goes through in pieces of up to `chunk` rows,
//! then one row per generated token. Weights and activations share one dtype (bf16, as training
//! stores them on a GPU, or f32); logits are f32 and computed only for the rows asked for. There
//! are no gradients, optimizer state or fp8 copies: only the working weights are allocated.

use crate::params::{download_f32, upload_f32, upload_i32, GroupBuffers};
use crate::sampling::{Sampler, SamplingOptions};
use llmq_core::{AttnShape, Backend, DType, Error, Matmul, Mem, MemCategory, ModelConfig, ParamLayout, Result, Tensor};
use std::path::{Path, PathBuf};

/// Rows per forward piece while reading a prompt (bounds the activation and logits buffers).
pub const PROMPT_CHUNK: usize = 256;

/// Where a model for generation comes from.
pub struct GenSource {
    pub cfg: ModelConfig,
    /// Master weights, one f32 vector per group of `ParamLayout::new(&cfg)`.
    pub groups: Vec<Vec<f32>>,
    /// What was loaded, for the user.
    pub describe: String,
    /// The directory whose tokenizer.json goes with the model, if it has one (for a checkpoint:
    /// its directory's, or the one its run recorded).
    pub tokenizer_dir: Option<PathBuf>,
}

/// Loads `spec`: an llmq checkpoint directory (manifest.json), a model directory (config.json and
/// safetensors) or an `Org/Name` in the local Hugging Face cache.
pub fn load_source(spec: &str) -> Result<GenSource> {
    let p = Path::new(spec);
    let has_tokenizer = |d: &Path| d.join("tokenizer.json").is_file().then(|| d.to_path_buf());
    if p.join(llmq_io::ckpt::MANIFEST).is_file() {
        let (cfg, groups) = crate::checkpoint::model_config(p)?;
        // the checkpoint's own directory, else the tokenizer its run recorded
        let recorded = crate::setup::recorded_source(p)?.and_then(|s| s.tokenizer).and_then(|d| has_tokenizer(&d));
        return Ok(GenSource { cfg, groups, describe: format!("checkpoint {}", p.display()), tokenizer_dir: has_tokenizer(p).or(recorded) });
    }
    let dir = llmq_io::hf::resolve_model_dir(spec).map_err(|e| Error::Config(format!("--model {spec}: not a checkpoint (no {}) and {e}", llmq_io::ckpt::MANIFEST)))?;
    let cfg = llmq_io::hf::load_config(&dir)?;
    let groups = llmq_io::hf::load_weights(&dir, &cfg)?;
    Ok(GenSource { cfg, groups, describe: format!("model directory {}", dir.display()), tokenizer_dir: has_tokenizer(&dir) })
}

/// Per-row work buffers for up to `chunk` rows.
struct Scratch {
    ids: Tensor,
    res: [Tensor; 2],
    ln: Tensor,
    rstd: Tensor,
    qkv: Tensor,
    /// qk-norm output (Qwen3 only).
    qkv_n: Option<Tensor>,
    qk_rstd: Tensor,
    qkv_r: Tensor,
    att: Tensor,
    proj: Tensor,
    up_gate: Tensor,
    sw: Tensor,
    logits: Tensor,
}

pub struct Decoder {
    cfg: ModelConfig,
    layout: ParamLayout,
    weights: GroupBuffers,
    /// Per layer, [1, max_len, Hkv*Hd].
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    /// RoPE table, f32 [max_len, Hd/2, 2].
    freqs: Tensor,
    s: Scratch,
    chunk: usize,
    max_len: usize,
    /// Positions filled in the caches.
    pos: usize,
}

impl Decoder {
    /// A decoder for one sequence of up to `max_len` positions, weights and activations in
    /// `dtype` (bf16 or f32), reading up to `chunk` rows per forward piece.
    pub fn new(be: &mut dyn Backend, cfg: &ModelConfig, groups: &[Vec<f32>], dtype: DType, max_len: usize, chunk: usize) -> Result<Decoder> {
        cfg.validate()?;
        if !matches!(dtype, DType::BF16 | DType::F32) {
            return Err(Error::Config(format!("generation dtype must be bf16 or fp32, got {dtype}")));
        }
        if max_len == 0 || chunk == 0 {
            return Err(Error::Config(format!("generation needs at least one position and one row per piece (max_len {max_len}, chunk {chunk})")));
        }
        let layout = ParamLayout::new(cfg);
        if groups.len() != layout.groups.len() || groups.iter().zip(&layout.groups).any(|(g, l)| g.len() != l.numel) {
            return Err(Error::Config(format!("generation: the weights have {} groups, the model config's layout {}, or their sizes differ", groups.len(), layout.groups.len())));
        }
        let weights = GroupBuffers::alloc(be, &layout, MemCategory::Weights, dtype, |gi| (layout.groups[gi].numel, Mem::Device))?;
        for (t, g) in weights.groups.iter().zip(groups) {
            upload_f32(be, t, g)?;
        }
        let (c, q, v) = (cfg.hidden_size, cfg.qkv_width(), cfg.vocab_size);
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let cache = |be: &mut dyn Backend| be.alloc(MemCategory::Activations, Mem::Device, dtype, &[1, max_len, kv]);
        let k_cache = (0..cfg.num_layers).map(|_| cache(be)).collect::<Result<Vec<_>>>()?;
        let v_cache = (0..cfg.num_layers).map(|_| cache(be)).collect::<Result<Vec<_>>>()?;
        let freqs = be.alloc(MemCategory::Activations, Mem::Device, DType::F32, &[max_len, cfg.head_dim / 2, 2])?;
        upload_f32(be, &freqs, &cfg.rope_table(max_len))?;
        let mut a = |dt: DType, dims: &[usize]| be.alloc(MemCategory::Temporaries, Mem::Device, dt, dims);
        let s = Scratch {
            ids: a(DType::I32, &[chunk])?,
            res: [a(dtype, &[chunk, c])?, a(dtype, &[chunk, c])?],
            ln: a(dtype, &[chunk, c])?,
            rstd: a(DType::F32, &[chunk])?,
            qkv: a(dtype, &[chunk, q])?,
            qkv_n: if cfg.qk_norm { Some(a(dtype, &[chunk, q])?) } else { None },
            qk_rstd: a(DType::F32, &[chunk, cfg.num_heads + cfg.num_kv_heads])?,
            qkv_r: a(dtype, &[chunk, q])?,
            att: a(dtype, &[chunk, cfg.attn_width()])?,
            proj: a(dtype, &[chunk, c])?,
            up_gate: a(dtype, &[chunk, 2 * cfg.intermediate_size])?,
            sw: a(dtype, &[chunk, cfg.intermediate_size])?,
            logits: a(DType::F32, &[chunk, v])?,
        };
        Ok(Decoder { cfg: cfg.clone(), layout, weights, k_cache, v_cache, freqs, s, chunk, max_len, pos: 0 })
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }
    /// Positions filled so far.
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// Starts a new sequence (the caches are overwritten as it fills them).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Feeds `tokens` at the next positions; returns the f32 logits of the last row [V], or with
    /// `all_rows` those of every row [tokens.len() * V].
    pub fn feed(&mut self, be: &dyn Backend, tokens: &[u32], all_rows: bool) -> Result<Vec<f32>> {
        let v = self.cfg.vocab_size;
        if tokens.is_empty() {
            return Err(Error::Config("generation: nothing to feed (an empty prompt needs a BOS token)".into()));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Config(format!("token {bad} is outside the model's vocabulary 0..{v}")));
        }
        if self.pos + tokens.len() > self.max_len {
            return Err(Error::Config(format!("generation: {} positions used + {} new exceed the {} the decoder was built for", self.pos, tokens.len(), self.max_len)));
        }
        let mut out = Vec::with_capacity(if all_rows { tokens.len() * v } else { v });
        for (i, piece) in tokens.chunks(self.chunk).enumerate() {
            let last = (i + 1) * self.chunk >= tokens.len();
            let rows = if all_rows { 0..piece.len() } else if last { piece.len() - 1..piece.len() } else { 0..0 };
            self.piece(be, piece)?;
            if !rows.is_empty() {
                let n = rows.len();
                let head = self.weights.head(&self.layout);
                let lg = self.s.logits.rows(0, n);
                be.matmul(&Matmul::linear(&lg, &self.s.ln.rows(rows.start, n), &head.lm_head))?;
                out.extend(download_f32(be, &lg)?);
            }
        }
        Ok(out)
    }

    /// One forward piece of n <= chunk rows; leaves the final norm's output in `s.ln`.
    fn piece(&mut self, be: &dyn Backend, tokens: &[u32]) -> Result<()> {
        let (n, s, eps) = (tokens.len(), &self.s, self.cfg.rms_norm_eps as f32);
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        upload_i32(be, &s.ids.slice(0, &[n]), &ids)?;
        let shape = AttnShape { b: 1, t: n, hq: self.cfg.num_heads, hkv: self.cfg.num_kv_heads, hd: self.cfg.head_dim };
        let hd = self.cfg.head_dim;
        let freqs = self.freqs.slice(self.pos * hd, &[n, hd / 2, 2]);
        let r = |t: &Tensor| t.rows(0, n);
        let (ln, rstd, proj) = (r(&s.ln), s.rstd.slice(0, &[n]), r(&s.proj));
        let (x, h) = (r(&s.res[0]), r(&s.res[1]));
        let head = self.weights.head(&self.layout);
        be.embedding_fwd(&x, &s.ids.slice(0, &[n]), &head.embedding)?;
        let layers = self.cfg.num_layers;
        be.rmsnorm_fwd(&ln, &rstd, &x, &self.weights.block(&self.layout, 0).ln1, eps, None)?;
        for l in 0..layers {
            let w = self.weights.block(&self.layout, l);
            let (qkv, qkv_r, att) = (r(&s.qkv), r(&s.qkv_r), r(&s.att));
            match (&w.q_norm, &w.k_norm, &s.qkv_n) {
                (Some(qn), Some(kn), Some(qkv_n)) => {
                    be.matmul(&Matmul::linear(&qkv, &ln, &w.qkv_w).with_bias(w.qkv_b.as_ref()))?;
                    be.qk_norm_fwd(&r(qkv_n), &s.qk_rstd.rows(0, n), &qkv, qn, kn, shape, eps)?;
                    be.rope_fwd(&qkv_r, &r(qkv_n), &freqs, shape, None)?;
                }
                _ => {
                    be.matmul(&Matmul::linear(&qkv, &ln, &w.qkv_w))?;
                    be.rope_fwd(&qkv_r, &qkv, &freqs, shape, w.qkv_b.as_ref())?;
                }
            }
            be.attention_decode(&att, &qkv_r, &self.k_cache[l], &self.v_cache[l], self.pos, shape)?;
            be.matmul(&Matmul::linear(&proj, &att, &w.o_w))?;
            be.residual_rmsnorm_fwd(&h, &ln, &rstd, &x, &proj, &w.ln2, eps, None)?;
            be.matmul(&Matmul::linear(&r(&s.up_gate), &ln, &w.up_gate_w))?;
            be.swiglu_fwd(&r(&s.sw), &r(&s.up_gate), None)?;
            be.matmul(&Matmul::linear(&proj, &r(&s.sw), &w.down_w))?;
            let next_norm = if l + 1 < layers { self.weights.block(&self.layout, l + 1).ln1 } else { head.final_norm };
            be.residual_rmsnorm_fwd(&x, &ln, &rstd, &h, &proj, &next_norm, eps, None)?;
        }
        self.pos += n;
        Ok(())
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    MaxTokens,
    /// The end-of-sequence token was sampled (it is not part of the output).
    Eos,
    /// The decoder's positions ran out.
    Length,
    /// `on_token` asked to stop.
    Caller,
}

/// Samples up to `opts.max_tokens` tokens after `prompt` (from the start of a new sequence),
/// calling `on_token` with each as it comes (return false to stop). Stops at any of the
/// end-of-sequence tokens `eos`.
pub fn generate(be: &dyn Backend, dec: &mut Decoder, prompt: &[u32], opts: &SamplingOptions, eos: &[u32], on_token: &mut dyn FnMut(u32) -> bool) -> Result<(Vec<u32>, Stop)> {
    opts.validate()?;
    dec.reset();
    let mut sampler = Sampler::new(opts);
    let mut logits = dec.feed(be, prompt, false)?;
    let mut out = Vec::new();
    loop {
        if out.len() >= opts.max_tokens {
            return Ok((out, Stop::MaxTokens));
        }
        let tok = sampler.sample(&logits)?;
        if eos.contains(&tok) {
            return Ok((out, Stop::Eos));
        }
        out.push(tok);
        if !on_token(tok) {
            return Ok((out, Stop::Caller));
        }
        if out.len() >= opts.max_tokens {
            return Ok((out, Stop::MaxTokens));
        }
        if dec.position() >= dec.max_len() {
            return Ok((out, Stop::Length));
        }
        logits = dec.feed(be, &[tok], false)?;
    }
}
