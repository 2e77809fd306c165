//! The checkpoints of one run: resuming (saying what was skipped and why), setting aside what is
//! not on the resumed line, writing checkpoints with this run's lineage, and retention. Methods
//! return the lines to show; the caller prints or logs them. The run's first rank holds the
//! root's lock (`llmq_io::root_lock`) for the whole run.

use crate::checkpoint;
use crate::trainer::Trainer;
use llmq_core::{Error, Result};
use llmq_io::ckpt::{self, Lineage};
use llmq_io::retention::{self, Retention};
use llmq_io::root_lock::RootLock;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct CkptSession {
    root: PathBuf,
    lineage: Lineage,
    retention: Retention,
    /// The checkpoint resumed from, when it lies in the root (it is not written again).
    resumed: Option<(u64, PathBuf)>,
    /// The resumed checkpoint's lineage and step: what stays in the root.
    head: Option<(Lineage, u64)>,
    drop_abandoned: bool,
    /// The root's lock, held by the run's first rank (`lock`).
    lock: Option<std::sync::Arc<RootLock>>,
}

/// A checkpoint written by [`CkptSession::save`].
pub struct Saved {
    pub path: PathBuf,
    pub removed: usize,
    /// Checkpoints retention did not count as kept, and why.
    pub notes: Vec<String>,
}

impl CkptSession {
    /// Checks the retention options (`keep_last` 1 is refused) before anything is built.
    pub fn new(root: PathBuf, keep_last: usize, keep_major: Option<u64>, drop_abandoned: bool) -> Result<CkptSession> {
        Ok(CkptSession {
            root,
            lineage: Lineage::fresh(),
            retention: Retention::new(keep_last, keep_major)?,
            resumed: None,
            head: None,
            drop_abandoned,
            lock: None,
        })
    }

    /// Takes the root's lock for this run (its first rank: the one that resumes, sets aside and
    /// writes), or refuses naming the run that holds it.
    pub fn lock(&mut self) -> Result<()> {
        self.lock = Some(std::sync::Arc::new(RootLock::acquire(&self.root)?));
        Ok(())
    }

    pub fn run_id(&self) -> &str {
        &self.lineage.run
    }

    /// This run's lineage (fresh, or descending from the checkpoint resumed).
    pub fn lineage(&self) -> &Lineage {
        &self.lineage
    }

    /// `--continue [which]` ("latest", a step or a path): loads the checkpoint into `tr` and makes
    /// this run its descendant. A checkpoint beyond `last_step` is refused. Returns the lines to
    /// show (newer checkpoints skipped and why, the resume point).
    pub fn resume(&mut self, tr: &mut Trainer, which: &str, last_step: u64) -> Result<Vec<String>> {
        let mut lines = vec![];
        let dir = if which == "latest" {
            let latest = ckpt::latest_verified(&self.root)?;
            lines.extend(latest.skipped.iter().map(|s| format!("--continue: {s}")));
            latest.found.map(|(_, d)| d).ok_or_else(|| {
                Error::file(&self.root, "no complete checkpoint to continue from (none found, or all failed verification)")
            })?
        } else {
            ckpt::resolve_continue(&self.root, Some(which))?
        };
        let parent = checkpoint::load(tr, &dir)?;
        lines.push(format!("resumed from {} at step {} (run {})", dir.display(), tr.steps_done(), parent.run));
        if tr.steps_done() > last_step {
            return Err(Error::Config(format!(
                "{} is at step {}, beyond the last step of this run ({last_step}, from --steps/--stop-at): nothing to train; raise --steps to continue",
                dir.display(),
                tr.steps_done()
            )));
        }
        if tr.steps_done() == last_step {
            lines.push(format!("nothing to train: the checkpoint is at step {last_step}, the last step of this run"));
        }
        self.lineage = Lineage::resumed_from(&parent, tr.steps_done());
        self.head = Some((parent, tr.steps_done()));
        self.retention.resumed(tr.steps_done());
        if dir.parent() == Some(self.root.as_path()) {
            self.resumed = Some((tr.steps_done(), dir));
        }
        Ok(lines)
    }

    /// Before the first step: moves (or deletes, with `drop_abandoned`) every checkpoint in the
    /// root that is not on this run's line; returns a line for each, saying why.
    pub fn set_aside(&self) -> Result<Vec<String>> {
        let head = self.head.as_ref().map(|(l, s)| (l, *s));
        Ok(retention::set_aside(&self.root, head, self.drop_abandoned)?.into_iter().map(|n| format!("checkpoints: {n}")).collect())
    }

    /// Writes a checkpoint of `tr` (not the unchanged resumed one) and applies retention.
    pub fn save(&mut self, tr: &mut Trainer) -> Result<Option<Saved>> {
        if self.resumed.as_ref().is_some_and(|(s, _)| *s == tr.steps_done()) {
            return Ok(None);
        }
        // with several ranks, rank 0 writes (the others hand it their shards)
        let Some(path) = checkpoint::save(tr, &self.root, &self.lineage)? else { return Ok(None) };
        self.retention.written(tr.steps_done());
        let pruned = self.retention.prune(&self.root)?;
        let notes = pruned.notes.iter().map(|n| format!("checkpoints: {n}")).collect();
        Ok(Some(Saved { path, removed: pruned.removed.len(), notes }))
    }
}
