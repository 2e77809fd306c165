//! What a run trains and on what, resolved from the user's names the same way for the CLI and
//! the Python package: the model (a directory or local Hugging Face cache entry first, then a
//! built-in shape) and the data (token files, random tokens or the embedded synthetic corpus).

use crate::synthetic::{MarkovSource, RandomTokens};
use crate::trainer::TrainConfig;
use llmq_core::{Arch, Error, ModelConfig, Result};
use llmq_io::data::BatchSource;
use llmq_io::loader::{self, LoaderOptions, TokenLoader};
use llmq_io::hf;
use std::path::PathBuf;

/// The model shape and where its weights come from.
pub struct ModelChoice {
    pub cfg: ModelConfig,
    /// How it was found, for the printed configuration.
    pub describe: String,
    /// A model directory to load weights (and tokenizer files for export) from.
    pub dir: Option<PathBuf>,
}

impl ModelChoice {
    /// Where the model and its tokenizer come from, as a checkpoint records it.
    pub fn source(&self) -> ModelSource {
        let has_tokenizer = |d: &&PathBuf| hf::TOKENIZER_FILES.iter().any(|f| d.join(f).is_file());
        ModelSource { model: self.describe.clone(), dir: self.dir.clone(), tokenizer: self.dir.as_ref().filter(has_tokenizer).cloned() }
    }
}

/// Where a run's model and tokenizer came from: recorded in its checkpoints (state field
/// `source`), so that `llmq export` can copy the tokenizer files without being told where.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSource {
    /// How the model was found (as printed in the configuration).
    pub model: String,
    /// The model directory (or Hugging Face cache snapshot) weights and config came from.
    pub dir: Option<PathBuf>,
    /// A directory holding the tokenizer files; None where unknown (a shape from scratch).
    pub tokenizer: Option<PathBuf>,
}

/// The source recorded in the checkpoint in `dir` (None for checkpoints written before it was
/// recorded, or by a run that did not know it).
pub fn recorded_source(dir: &std::path::Path) -> Result<Option<ModelSource>> {
    match llmq_io::ckpt::checkpoint_state(dir)?.get("source") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| Error::file(dir, format!("state field `source`: {e}"))),
    }
}

/// `name`: a model directory, an `Org/Name` in the local Hugging Face cache, or a built-in shape
/// (which has no weights: `from_scratch` only). None: the embedded default model.
pub fn resolve_model(name: Option<&str>, from_scratch: bool, synthetic_vocab: usize) -> Result<ModelChoice> {
    let Some(name) = name else {
        return Ok(ModelChoice { cfg: ModelConfig::tiny(Arch::Qwen2, synthetic_vocab), describe: "embedded default (tiny qwen2-style, from scratch)".into(), dir: None });
    };
    // a directory or cache entry comes first: `Qwen/Qwen2.5-0.5B` in the cache loads it; built-in
    // shapes are for names found nowhere else
    let found = hf::resolve_model_dir(name);
    if let (Err(e), Some(cfg)) = (&found, ModelConfig::builtin(name)) {
        if !from_scratch {
            return Err(Error::Config(format!(
                "--model {name}: no model directory or local Hugging Face cache entry ({e}); it names a built-in shape, which has no weights: add --from-scratch to train that shape from scratch"
            )));
        }
        let cfg = if name == "tiny" { ModelConfig::tiny(Arch::Qwen2, synthetic_vocab) } else { cfg };
        return Ok(ModelChoice { cfg, describe: format!("built-in shape {name}, from scratch"), dir: None });
    }
    let dir = found.map_err(|e| Error::Config(format!("--model {name}: not a built-in shape ({}) and {e}", ModelConfig::BUILTIN_NAMES.join(", "))))?;
    let cfg = hf::load_config(&dir)?;
    let how = if from_scratch { "config only, from scratch" } else { "pretrained weights" };
    Ok(ModelChoice { cfg, describe: format!("{} ({how})", dir.display()), dir: Some(dir) })
}

/// Where the data comes from.
#[derive(Clone, Debug, Default)]
pub struct DataChoice {
    /// Training token files (glob).
    pub train_file: Option<String>,
    pub eval_file: Option<String>,
    /// Uniformly random tokens (benchmarks).
    pub random_data: bool,
    /// Vocabulary of the synthetic corpus (without token files).
    pub synthetic_vocab: usize,
    /// Resume even where a token file's content fingerprint changed.
    pub allow_data_change: bool,
    /// This rank of `world` data-parallel ranks (0 of 1 for one device; 0 counts as 1): token
    /// files are read rank-strided, the synthetic and random sources get a stream per rank.
    pub rank: usize,
    pub world: usize,
}

/// Training data, evaluation data, and the synthetic corpus's entropy floor where it is used.
pub type Sources = (Box<dyn BatchSource>, Option<Box<dyn BatchSource>>, Option<f64>);

/// The sources of `d` for a model of `cfg` trained with `tc`; `check` runs over each token
/// loader when it is opened (every id against the vocabulary, before the first step).
pub fn resolve_data(d: &DataChoice, cfg: &ModelConfig, tc: &TrainConfig, check: &dyn Fn(&TokenLoader, &str) -> Result<()>) -> Result<Sources> {
    let (rank, world) = (d.rank, d.world.max(1));
    let eval: Option<Box<dyn BatchSource>> = match &d.eval_file {
        None => None,
        Some(p) => {
            let ev = TokenLoader::eval(&loader::expand_glob(p)?, tc.seq_len, rank, world, Some(cfg.vocab_size))?;
            check(&ev, "eval")?;
            Some(Box::new(ev))
        }
    };
    if let Some(pattern) = &d.train_file {
        let opts = LoaderOptions { vocab_limit: Some(cfg.vocab_size), allow_data_change: d.allow_data_change, rank, world_size: world, ..LoaderOptions::train(tc.seq_len, tc.seed) };
        let train = TokenLoader::from_glob(pattern, opts)?;
        check(&train, "training")?;
        return Ok((Box::new(train), eval, None));
    }
    if d.random_data {
        let seed = if world > 1 { loader::mix_seed(tc.seed, rank as u64) } else { tc.seed };
        return Ok((Box::new(RandomTokens::new(cfg.vocab_size, seed)), eval, None));
    }
    if d.synthetic_vocab > cfg.vocab_size || d.synthetic_vocab < 2 {
        return Err(Error::Config(format!("--synthetic-vocab must be in 2..={} (the model's vocab_size), got {}", cfg.vocab_size, d.synthetic_vocab)));
    }
    let src = MarkovSource::new(d.synthetic_vocab, tc.seed);
    let floor = src.entropy_rate();
    let eval = eval.unwrap_or_else(|| Box::new(src.stream(u64::MAX - rank as u64).mark_start()));
    Ok((Box::new(src.stream(rank as u64)), Some(eval), Some(floor)))
}

/// Fits the model's vocabulary to the token files of `d` (train and eval), reading only their
/// headers (and, for version-1 files, their ids), before anything is allocated. A model built
/// from a shape (no model directory) takes its vocabulary from the files, so that their ids fit
/// it; a model directory keeps its own and is refused where a file's header says the tokenizer
/// had more ids than the model has rows, naming both.
pub fn fit_vocab_to_data(model: &mut ModelChoice, d: &DataChoice) -> Result<()> {
    let mut infos = Vec::new();
    for pattern in [&d.train_file, &d.eval_file].into_iter().flatten() {
        for f in loader::expand_glob(pattern)? {
            infos.push(llmq_io::tokfile::read_header(&f)?);
        }
    }
    if infos.is_empty() {
        return Ok(());
    }
    if let Some(dir) = &model.dir {
        let v = model.cfg.vocab_size;
        if let Some(bad) = infos.iter().find(|i| i.vocab_size.is_some_and(|h| h as usize > v)) {
            return Err(Error::file(
                &bad.path,
                format!(
                    "field `vocab_size` (bytes 20..24) is {}, more than the model's vocab_size {v} ({}): the files were tokenized for another model",
                    bad.vocab_size.unwrap_or(0),
                    dir.join("config.json").display()
                ),
            ));
        }
        return Ok(());
    }
    let from_headers = infos.iter().filter_map(|i| i.vocab_size).max().map(|v| v as usize);
    let v1: Vec<_> = infos.iter().filter(|i| i.vocab_size.is_none()).collect();
    let (vocab, how) = if v1.is_empty() {
        (from_headers, "from the token files' headers (field vocab_size)".to_string())
    } else {
        let mut max_id = None;
        for i in &v1 {
            max_id = max_id.max(llmq_io::tokfile::max_token(&i.path)?);
        }
        let from_ids = max_id.map(|m| m as usize + 1);
        let also = if from_headers.is_some() { ", or the version-2 headers' vocab_size where larger" } else { "" };
        (
            from_ids.max(from_headers),
            format!("{} is a version-1 token file, whose header records no vocabulary: the largest token id of the version-1 files + 1{also}", v1[0].path.display()),
        )
    };
    if let Some(vocab) = vocab {
        model.cfg.vocab_size = vocab;
        model.describe += &format!("; vocabulary {vocab} {how}");
    }
    Ok(())
}
