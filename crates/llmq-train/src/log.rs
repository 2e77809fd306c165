//! The JSON-lines run log: one object per line with a "type" field (options, dataset, memory,
//! step, eval, skip, checkpoint).

use llmq_core::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct JsonLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// A failed write was reported: a full disk fails every later line too, and one warning says it.
    warned: bool,
}

impl JsonLog {
    /// Appends to `path` (created with its directory if missing), so resumed runs continue one log.
    pub fn open(path: &Path) -> Result<JsonLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create log directory: {e}")))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, format!("cannot open log: {e}")))?;
        Ok(JsonLog { path: path.to_owned(), file: std::io::BufWriter::new(file), warned: false })
    }

    /// Writes one record and flushes it (a crash loses at most the line being written). A failure
    /// (a full disk) is reported once and does not stop the run.
    pub fn write(&mut self, record: &serde_json::Value) {
        let ok = serde_json::to_writer(&mut self.file, record).is_ok()
            && self.file.write_all(b"\n").is_ok()
            && self.file.flush().is_ok();
        if !ok && !self.warned {
            self.warned = true;
            eprintln!("warning: could not write to log {} (further failures are not reported)", self.path.display());
        }
    }
}
