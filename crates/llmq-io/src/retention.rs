//! Which checkpoints stay: one line of runs in the checkpoint root, and the newest few of it.
//!
//! At the start of a run, [`set_aside`] moves every `step_*` directory that is not on the line
//! of the checkpoint being resumed (all of them for a fresh run) into `root/abandoned/<run>/`,
//! or deletes them when asked to: a branch abandoned by resuming from an older step, newer
//! checkpoints that failed verification, another run's checkpoints. The root then holds one
//! lineage, so "latest" and retention need not guess between branches.
//!
//! [`Retention`] keeps the newest `keep_last` (at least two) checkpoints that passed the full
//! check, every "major" one, the one just written and the one resumed from; a checkpoint that
//! fails its check is never counted as kept, and is left in place with a note.

use crate::ckpt::{checkpoint_info, step_dirs, verify_checkpoint, Lineage};
use llmq_core::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const ABANDONED: &str = "abandoned";

/// Moves (or with `delete`, removes) the `step_*` directories of `root` that are not on the
/// line of `head` (the resumed checkpoint's lineage and step; `None` for a fresh run). Returns a
/// line for each, saying why.
pub fn set_aside(root: &Path, head: Option<(&Lineage, u64)>, delete: bool) -> Result<Vec<String>> {
    let mut notes = vec![];
    for (s, d) in step_dirs(root)? {
        let (why, run) = match (checkpoint_info(&d), head) {
            (Err(e), _) => (format!("unusable ({e})"), "unreadable".to_string()),
            (Ok((_, l)), None) => ("this run starts afresh (no --continue)".to_string(), l.run),
            (Ok((_, l)), Some((hl, hs))) => {
                if hl.contains(hs, &l.run, s) {
                    continue;
                }
                let why = if l.run == hl.run || hl.ancestry.iter().any(|(r, _)| *r == l.run) {
                    format!("newer than the resumed step {hs} of its run (an abandoned branch)")
                } else {
                    "written by a run that is not on the resumed checkpoint's line".to_string()
                };
                (why, l.run)
            }
        };
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if delete {
            std::fs::remove_dir_all(&d).map_err(|e| Error::file(&d, format!("cannot delete: {e}")))?;
            notes.push(format!("deleted {name}: {why}"));
            continue;
        }
        let parent = root.join(ABANDONED).join(sanitize_run(&run));
        std::fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, format!("cannot create: {e}")))?;
        let mut to = parent.join(&name);
        let mut n = 1;
        while to.exists() {
            to = parent.join(format!("{name}.{n}"));
            n += 1;
        }
        std::fs::rename(&d, &to).map_err(|e| Error::file(&d, format!("cannot move to {}: {e}", to.display())))?;
        notes.push(format!("set aside {name} -> {}: {why}", to.display()));
    }
    Ok(notes)
}

/// A run id as a directory name (ids are written by llmq, but the manifest is input).
fn sanitize_run(run: &str) -> String {
    let s: String = run.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(64).collect();
    if s.is_empty() {
        "unnamed".into()
    } else {
        s
    }
}

/// The retention policy of one run, with what this process knows about each step.
#[derive(Clone, Debug)]
pub struct Retention {
    keep_last: usize,
    keep_major: Option<u64>,
    resumed: Option<u64>,
    last_written: Option<u64>,
    /// Steps whose full check (every checksum) passed (true) or failed (false).
    checked: BTreeMap<u64, bool>,
}

/// What one [`Retention::prune`] did.
#[derive(Debug, Default)]
pub struct Pruned {
    pub removed: Vec<PathBuf>,
    /// Checkpoints not counted as kept, and why (each said once per run).
    pub notes: Vec<String>,
}

impl Retention {
    /// `keep_last` 0 keeps every checkpoint; 1 is refused: the newest checkpoint could be the
    /// one a crash damages, so at least two are kept.
    pub fn new(keep_last: usize, keep_major: Option<u64>) -> Result<Retention> {
        if keep_last == 1 {
            return Err(Error::Config(
                "--keep-last 1: at least two checkpoints are kept (the newest may be the one a crash or a full disk damages); use 2 or more, or 0 to keep all".into(),
            ));
        }
        Ok(Retention { keep_last, keep_major, resumed: None, last_written: None, checked: BTreeMap::new() })
    }

    /// The checkpoint this run resumed from (fully verified when loaded): never deleted by
    /// this run.
    pub fn resumed(&mut self, step: u64) {
        self.checked.insert(step, true);
        self.resumed = Some(step);
    }

    /// The checkpoint just written: counted without a re-check and never deleted (until a
    /// newer one is written).
    pub fn written(&mut self, step: u64) {
        self.checked.insert(step, true);
        self.last_written = Some(step);
    }

    /// Deletes complete checkpoints past the newest `keep_last` good ones (except majors and
    /// protected ones) and temporaries of writers that are gone.
    pub fn prune(&mut self, root: &Path) -> Result<Pruned> {
        let mut out = Pruned { removed: remove_stale_temporaries(root)?, notes: vec![] };
        if self.keep_last == 0 {
            return Ok(out);
        }
        let mut kept = 0;
        for (s, d) in step_dirs(root)?.into_iter().rev() {
            if checkpoint_info(&d).is_err() {
                continue; // incomplete: never chosen for loading, left for inspection
            }
            if kept < self.keep_last {
                let good = *self.checked.entry(s).or_insert_with(|| match verify_checkpoint(&d) {
                    Ok(_) => true,
                    Err(e) => {
                        out.notes.push(format!("{} fails verification, not counted as kept: {e}", d.display()));
                        false
                    }
                });
                kept += usize::from(good);
                continue;
            }
            if self.resumed == Some(s) || self.last_written == Some(s) || self.keep_major.is_some_and(|m| m > 0 && s % m == 0) {
                continue;
            }
            std::fs::remove_dir_all(&d).map_err(|e| Error::file(&d, format!("cannot delete old checkpoint: {e}")))?;
            self.checked.remove(&s);
            out.removed.push(d);
        }
        Ok(out)
    }
}

fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if Path::new("/proc/self").exists() {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        false
    }
}

/// `.tmp_*` directories whose writer process is gone.
fn remove_stale_temporaries(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = vec![];
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(".tmp_") || !e.path().is_dir() {
                continue;
            }
            let pid = name.rsplit('_').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(pid_alive) {
                continue;
            }
            std::fs::remove_dir_all(e.path()).map_err(|x| Error::file(e.path(), format!("cannot delete stale directory: {x}")))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}
