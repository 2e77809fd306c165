//! Checks made before the first step, so that a run does not fail after hours of training: the
//! output paths are creatable and writable, and every token id is inside the vocabulary.

use crate::train_args::TrainArgs;
use llmq_core::{Error, Result};
use llmq_io::TokenLoader;
use std::path::Path;

/// `--ckpt-dir` and `--export` (directories) and `--log-file` can be created and written.
pub fn check_outputs(args: &TrainArgs) -> Result<()> {
    for (flag, dir) in [("--ckpt-dir", &args.opts.ckpt_dir), ("--export", &args.opts.export)] {
        if let Some(d) = dir {
            writable_dir(flag, d)?;
        }
    }
    if let Some(log) = &args.opts.log_file {
        if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("--log-file: cannot create the directory: {e}")))?;
        }
        // opening for append writes nothing: an existing log is continued, as the run will do
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::file(log, format!("--log-file: cannot open for writing: {e}")))?;
    }
    Ok(())
}

fn writable_dir(flag: &str, d: &Path) -> Result<()> {
    std::fs::create_dir_all(d).map_err(|e| Error::file(d, format!("{flag}: cannot create the directory: {e}")))?;
    let probe = d.join(format!(".llmq_write_check_{}", std::process::id()));
    std::fs::write(&probe, b"llmq").map_err(|e| Error::file(d, format!("{flag}: the directory is not writable: {e}")))?;
    std::fs::remove_file(&probe).map_err(|e| Error::file(&probe, format!("{flag}: cannot remove the write check: {e}")))
}

/// Every token of the loader's files against the vocabulary, with a progress bar (shown on a
/// terminal) for large datasets.
pub fn check_tokens(loader: &TokenLoader, what: &str) -> Result<()> {
    let total = loader.total_tokens();
    let bar = indicatif::ProgressBar::new(total);
    if total < 1 << 28 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message(format!("checking {what} token ids"));
    let r = loader.check_all_tokens(&mut |done, _| bar.set_position(done));
    bar.finish_and_clear();
    r
}
