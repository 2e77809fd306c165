//! The JSON-lines run log: one object per line with a "type" field (options, dataset, memory,
//! step, eval, skip, checkpoint). Once [`JsonLog::set_run`] is called every record also carries
//! `run` (this process's run id) and `series` (the id of the first run of its checkpoint line, the
//! same for a run and the runs resuming it), so that a log several runs appended to can be told
//! apart: `llmq plot` draws one curve per series.

use llmq_core::{Error, Result};
use llmq_io::ckpt::Lineage;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct JsonLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// A failed write was reported: a full disk fails every later line too, and one warning says it.
    warned: bool,
    /// `run` and `series` of every record.
    ids: Option<(String, String)>,
}

impl JsonLog {
    /// Appends to `path` (created with its directory if missing), so resumed runs continue one log.
    /// A last line without its newline (a run killed mid-write) is ended first, so that this
    /// run's first record starts a line of its own.
    pub fn open(path: &Path) -> Result<JsonLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create log directory: {e}")))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, format!("cannot open log: {e}")))?;
        if ends_mid_line(&mut file).map_err(|e| Error::file(path, format!("cannot read the end of the log: {e}")))? {
            file.write_all(b"\n").map_err(|e| Error::file(path, format!("cannot write to log: {e}")))?;
        }
        Ok(JsonLog { path: path.to_owned(), file: std::io::BufWriter::new(file), warned: false, ids: None })
    }

    /// Marks every later record with the run id and series of `lineage`.
    pub fn set_run(&mut self, lineage: &Lineage) {
        self.ids = Some((lineage.run.clone(), lineage.series().to_string()));
    }

    /// Writes one record and flushes it (a crash loses at most the line being written). A failure
    /// (a full disk) is reported once and does not stop the run.
    pub fn write(&mut self, record: &serde_json::Value) {
        let mut record = record.clone();
        if let (Some((run, series)), Some(obj)) = (&self.ids, record.as_object_mut()) {
            obj.insert("run".into(), run.clone().into());
            obj.insert("series".into(), series.clone().into());
        }
        let ok = serde_json::to_writer(&mut self.file, &record).is_ok()
            && self.file.write_all(b"\n").is_ok()
            && self.file.flush().is_ok();
        if !ok && !self.warned {
            self.warned = true;
            eprintln!("warning: could not write to log {} (further failures are not reported)", self.path.display());
        }
    }
}

/// Whether a non-empty file's last byte is not a newline.
fn ends_mid_line(f: &mut std::fs::File) -> std::io::Result<bool> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}
