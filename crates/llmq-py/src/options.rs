//! The options of `llmq.Trainer(...)`, `llmq.plan(...)` and `llmq.evaluate(...)`: the `llmq train`
//! options (`llmq_train::options::TrainOptions`, one definition with the CLI's defaults and
//! validation) as keyword arguments in snake_case, on one rank. Python-only details: `device`
//! also takes "gpu", `memory_limit` a byte count, `train_file`/`eval_file` the aliases
//! `train_files`/`eval_files`.

use llmq_core::{Error, ModelConfig, Result};
use llmq_io::data::BatchSource;
use llmq_io::loader::TokenLoader;
use llmq_train::options::DataParallel;
use llmq_train::run::RunOptions;
use llmq_train::setup;
use llmq_train::TrainConfig;
use std::path::PathBuf;

pub use llmq_train::options::{export_dtype, TrainOptions as Options};

/// Keyword options given as a JSON object, checked by name and type (errors name the option).
pub fn from_json(map: serde_json::Map<String, serde_json::Value>) -> Result<Options> {
    let o = Options::from_json(map)?;
    if !llmq_train::options::DEVICES.contains(&o.device.as_str()) {
        return Err(Error::Config(format!("--device: expected auto, cpu or cuda, got {:?}", o.device)));
    }
    Ok(o)
}

/// The run configuration, as `llmq train` builds it from the same flags.
pub fn train_config(o: &Options, on_gpu: bool) -> Result<TrainConfig> {
    o.train_config(on_gpu, DataParallel::ONE)
}

/// Checkpoints and export of the options; `source`: the model directory (for the tokenizer).
pub fn run_options(o: &Options, source: Option<PathBuf>) -> Result<RunOptions> {
    Ok(RunOptions { checkpoints: o.checkpoints(false, true)?, ckpt_interval: o.ckpt_interval, stop_at: o.stop_at, skip_eval: false, export: o.export(|_| source)? })
}

/// Training and (optional) evaluation data.
pub type Sources = (Box<dyn BatchSource>, Option<Box<dyn BatchSource>>);

/// Training and evaluation data when no arrays are passed, as `llmq train` chooses them (token
/// ids checked against the vocabulary when the files are opened).
pub fn resolve_data(o: &Options, cfg: &ModelConfig, tc: &TrainConfig) -> Result<Sources> {
    let (train, eval, _) = setup::resolve_data(&o.data_choice(), cfg, tc, &|l: &TokenLoader, _| l.check_all_tokens(&mut |_, _| {}))?;
    Ok((train, eval))
}
