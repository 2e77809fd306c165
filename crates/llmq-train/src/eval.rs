//! Loss and perplexity of a model's weights on token files, with no training step: the forward
//! pass and loss of `Trainer::evaluate` over the first batches of the files, in file order.
//! Shared by `llmq eval` and the Python package's `llmq.evaluate`.

use crate::acts::RunShape;
use crate::memory::MemoryOptions;
use crate::model::Model;
use crate::precision::Precision;
use llmq_core::{Backend, DType, Error, ModelConfig, Result};
use llmq_io::data::BatchSource;
use llmq_io::loader::{self, TokenLoader};
use llmq_io::{ckpt, hf};
use std::path::{Path, PathBuf};

/// Where the weights come from.
enum Weights {
    /// A checkpoint's master weights, read with its model config.
    Loaded(Vec<Vec<f32>>),
    /// A model directory (config.json + safetensors), read when the model is built.
    Dir(PathBuf),
}

/// A model to evaluate: its shape, a line saying where it was found, and its weights.
pub struct EvalModel {
    pub cfg: ModelConfig,
    pub describe: String,
    /// The matmul dtype of the run a checkpoint comes from.
    pub run_matmul: Option<DType>,
    /// Its `--fp8-fast-accumulation`.
    pub run_fast_accumulation: Option<bool>,
    weights: Weights,
}

/// `name`: a checkpoint directory (`step_N`), a checkpoint root (its newest complete checkpoint),
/// a model directory or a name in the local Hugging Face cache.
pub fn resolve_model(name: &str) -> Result<EvalModel> {
    let p = Path::new(name);
    let ckpt_dir = if p.join(ckpt::MANIFEST).is_file() {
        Some(p.to_path_buf())
    } else if p.is_dir() && !p.join("config.json").exists() {
        // a --ckpt-dir root: its newest checkpoint that passes verification
        match ckpt::latest_complete(p)? {
            Some((_, d)) => Some(d),
            None => return Err(Error::file(p, "neither a model directory (no config.json) nor a checkpoint (no manifest.json), and it holds no complete checkpoint")),
        }
    } else {
        None
    };
    if let Some(d) = ckpt_dir {
        let state = ckpt::open_checkpoint(&d)?.state;
        let run_matmul = state.pointer("/train/precision/matmul").and_then(|v| serde_json::from_value(v.clone()).ok());
        let run_fast_accumulation = state.pointer("/train/precision/fp8_fast_accumulation").and_then(|v| serde_json::from_value(v.clone()).ok());
        let (cfg, groups) = crate::checkpoint::model_config(&d)?;
        return Ok(EvalModel { cfg, describe: format!("checkpoint {}", d.display()), run_matmul, run_fast_accumulation, weights: Weights::Loaded(groups) });
    }
    let dir = hf::resolve_model_dir(name).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("{m}; nor is it a checkpoint")),
        e => e,
    })?;
    let cfg = hf::load_config(&dir)?;
    Ok(EvalModel { cfg, describe: format!("{} (pretrained weights)", dir.display()), run_matmul: None, run_fast_accumulation: None, weights: Weights::Dir(dir) })
}

/// The batches an evaluation reads.
#[derive(Clone, Copy, Debug)]
pub struct EvalShape {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Batches from the start of the files; `None`: every whole batch they hold.
    pub batches: Option<usize>,
}

/// The token files of an evaluation, opened and checked against the model (header vocabulary
/// and every token id) before any weight is read or device memory allocated.
pub struct EvalData {
    loader: TokenLoader,
    pub batches: usize,
    shape: EvalShape,
}

impl EvalData {
    pub fn open(pattern: &str, cfg: &ModelConfig, shape: EvalShape, check: &dyn Fn(&TokenLoader) -> Result<()>) -> Result<EvalData> {
        let (b, t) = (shape.batch_size, shape.seq_len);
        if b == 0 || t == 0 {
            return Err(Error::Config(format!("batch size and sequence length must be positive, got {b} x {t}")));
        }
        let loader = TokenLoader::eval(&loader::expand_glob(pattern)?, t, 0, 1, Some(cfg.vocab_size))?;
        for f in loader.files() {
            if let Some(v) = f.vocab_size.filter(|&v| v as usize > cfg.vocab_size) {
                return Err(Error::file(
                    &f.path,
                    format!("the header's vocab_size {v} is larger than the model's vocab_size {} (token files of another tokenizer?)", cfg.vocab_size),
                ));
            }
        }
        check(&loader)?;
        let whole = (loader.chunks_per_epoch() / b as u64) as usize;
        let n = shape.batches.unwrap_or(whole);
        if n == 0 || n > whole {
            return Err(Error::Config(format!(
                "{pattern} holds {whole} whole batches of batch_size={b} sequences of seq_len={t}, asked for {n}"
            )));
        }
        Ok(EvalData { loader, batches: n, shape })
    }

    pub fn describe(&self) -> String {
        self.loader.describe()
    }
}

/// What an evaluation measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean loss (nats) over the targets that count.
    pub loss: f64,
    /// Targets the loss is the mean over (masked ones excluded).
    pub tokens: usize,
    pub batches: usize,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// The precision of an evaluation of `model`, so that a checkpoint gives its run's eval loss bit
/// for bit:
/// - matmuls in `asked_matmul`, else those of the run a checkpoint comes from, else what training
///   defaults to (bf16 on a GPU, fp32 on the CPU);
/// - fp8 fast accumulation when `asked_fast`, or when the checkpoint's run had it with the same
///   matmuls;
/// - the working weights of a training run with those matmuls; gradients and optimizer state,
///   which the forward pass never reads, in the smallest dtypes.
pub fn precision(asked_matmul: Option<DType>, asked_fast: bool, model: &EvalModel, on_gpu: bool) -> Precision {
    let matmul = asked_matmul.or(model.run_matmul).unwrap_or(if on_gpu { DType::BF16 } else { DType::F32 });
    let fast = matmul.is_fp8() && (asked_fast || (model.run_matmul == Some(matmul) && model.run_fast_accumulation == Some(true)));
    Precision {
        weights: if matmul == DType::F32 { DType::F32 } else { DType::BF16 },
        matmul,
        master: DType::F32,
        grads: DType::BF16,
        opt_m: DType::BF16,
        opt_v: DType::BF16,
        act_grads: DType::E4M3,
        fp8_fast_accumulation: fast,
    }
}

/// Builds `model` on `be` with `precision`, loads its weights and evaluates it on `data`;
/// `progress(done)` after each batch.
pub fn evaluate(be: &mut dyn Backend, model: EvalModel, precision: Precision, data: &mut EvalData, progress: &mut dyn FnMut(usize)) -> Result<EvalResult> {
    let cfg = &model.cfg;
    let groups = match model.weights {
        Weights::Loaded(g) => g,
        Weights::Dir(dir) => hf::load_weights(&dir, cfg)?,
    };
    let shape = RunShape { b: data.shape.batch_size, t: data.shape.seq_len };
    let m = Model::new(be, cfg, precision, shape, &MemoryOptions::default())?;
    let be: &dyn Backend = be;
    m.params.set_weights_f32(be, &groups)?;
    drop(groups);
    m.weights_changed(be)?;
    // the sum and count of `Trainer::evaluate`, in the same order
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..data.batches {
        let batch = data.loader.next_batch(shape.b, shape.t)?;
        m.set_batch(be, &batch)?;
        m.forward(be, None)?;
        sum += m.loss_sum(be)?;
        count += batch.valid_targets();
        progress(i + 1);
    }
    let loss = if count > 0 { sum / count as f64 } else { f64::NAN };
    Ok(EvalResult { loss, tokens: count, batches: data.batches })
}
