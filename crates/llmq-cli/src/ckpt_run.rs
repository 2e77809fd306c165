//! The checkpoints of one `llmq train` run: resolving `--continue` (saying what was skipped and
//! why), setting aside what is not on the resumed line, writing checkpoints with this run's
//! lineage, and retention.

use crate::train_args::TrainArgs;
use llmq_core::{Error, Result};
use llmq_io::ckpt::{self, Lineage};
use llmq_io::retention::{self, Retention};
use llmq_train::{checkpoint, Trainer};
use std::path::PathBuf;

pub struct CkptRun {
    root: PathBuf,
    lineage: Lineage,
    retention: Retention,
    /// The checkpoint resumed from, when it lies in the root (it is not written again).
    resumed: Option<(u64, PathBuf)>,
    /// The resumed checkpoint's lineage and step: what stays in the root.
    head: Option<(Lineage, u64)>,
    drop_abandoned: bool,
}

impl CkptRun {
    /// The run's checkpoint settings, checked before anything is built; `None` without `--ckpt-dir`.
    pub fn new(args: &TrainArgs) -> Result<Option<CkptRun>> {
        let Some(root) = &args.ckpt_dir else {
            return Ok(None);
        };
        Ok(Some(CkptRun {
            root: root.clone(),
            lineage: Lineage::fresh(),
            retention: Retention::new(args.keep_last, args.keep_major)?,
            resumed: None,
            head: None,
            drop_abandoned: args.drop_abandoned,
        }))
    }

    /// `--continue [which]`: loads the checkpoint into `tr` and makes this run its descendant.
    /// A checkpoint beyond the last step to train is refused.
    pub fn resume(&mut self, tr: &mut Trainer, which: &str, stop_at: u64) -> Result<()> {
        let dir = if which == "latest" {
            let latest = ckpt::latest_verified(&self.root)?;
            for s in &latest.skipped {
                println!("--continue: {s}");
            }
            latest.found.map(|(_, d)| d).ok_or_else(|| {
                Error::file(&self.root, "no complete checkpoint to continue from (none found, or all failed verification)")
            })?
        } else {
            ckpt::resolve_continue(&self.root, Some(which))?
        };
        let parent = checkpoint::load(tr, &dir)?;
        println!("resumed from {} at step {} (run {})", dir.display(), tr.step, parent.run);
        if tr.step > stop_at {
            return Err(Error::Config(format!(
                "{} is at step {}, beyond the last step of this run ({stop_at}, from --steps/--stop-at): nothing to train; raise --steps to continue",
                dir.display(),
                tr.step
            )));
        }
        if tr.step == stop_at {
            println!("nothing to train: the checkpoint is at step {stop_at}, the last step of this run");
        }
        self.lineage = Lineage::resumed_from(&parent, tr.step);
        self.head = Some((parent, tr.step));
        self.retention.resumed(tr.step);
        if dir.parent() == Some(self.root.as_path()) {
            self.resumed = Some((tr.step, dir));
        }
        Ok(())
    }

    /// Before the first step: moves (or deletes, with --drop-abandoned) every checkpoint in the
    /// root that is not on this run's line, saying which and why.
    pub fn set_aside(&self) -> Result<()> {
        for note in retention::set_aside(&self.root, self.head.as_ref().map(|(l, s)| (l, *s)), self.drop_abandoned)? {
            println!("checkpoints: {note}");
        }
        Ok(())
    }

    /// Writes a checkpoint of the current state (skipping a poisoned state and the unchanged
    /// resumed one) and applies retention.
    pub fn save(&mut self, tr: &mut Trainer) -> Result<()> {
        if tr.bad_in_a_row > 0 {
            println!("not writing a checkpoint at step {}: the last step was not finite", tr.step);
            return Ok(());
        }
        if self.resumed.as_ref().is_some_and(|(s, _)| *s == tr.step) {
            return Ok(());
        }
        let dir = checkpoint::save(tr, &self.root, &self.lineage)?;
        self.retention.written(tr.step);
        let pruned = self.retention.prune(&self.root)?;
        for note in &pruned.notes {
            println!("checkpoints: {note}");
        }
        let removed = if pruned.removed.is_empty() { String::new() } else { format!(" ({} old removed)", pruned.removed.len()) };
        println!("checkpoint {} written{removed}", dir.display());
        if let Some(log) = &mut tr.log {
            log.write(&serde_json::json!({"type": "checkpoint", "step": tr.step, "path": dir, "run": self.lineage.run}));
        }
        Ok(())
    }
}
