//! The lock of a checkpoint root: held by the one run writing into it, from before it resumes or
//! sets other checkpoints aside until it exits. Two runs in one root would each move the other's
//! checkpoints into `abandoned/` as not on their line, and interleave their retention.
//!
//! An advisory `flock` on `<root>/.llmq-lock` (`File::try_lock`): the kernel releases it when the
//! holder exits, however it ends, so a crashed run leaves no stale lock to clean up. The file
//! stays, naming its last holder, which the refusal of a second run quotes.

use llmq_core::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

pub const LOCK_FILE: &str = ".llmq-lock";

/// Held while alive; dropping it (or the process ending) releases the root.
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

impl RootLock {
    /// Takes the lock of `root` (created if needed), or refuses naming the run holding it.
    pub fn acquire(root: &Path) -> Result<RootLock> {
        std::fs::create_dir_all(root).map_err(|e| Error::file(root, format!("cannot create checkpoint root: {e}")))?;
        let path = root.join(LOCK_FILE);
        let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| Error::file(&path, format!("cannot open the lock file: {e}")))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = if holder.trim().is_empty() { "a run that has not said which".to_string() } else { holder.trim().to_string() };
                return Err(Error::file(
                    root,
                    format!("checkpoint directory in use by another run ({holder}): two runs in one --ckpt-dir would set each other's checkpoints aside; wait for it to end or use another --ckpt-dir"),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(Error::file(&path, format!("cannot lock: {e}"))),
        }
        let me = format!("pid {} on {}", std::process::id(), hostname());
        let written = f.set_len(0).and_then(|_| f.rewind()).and_then(|_| f.write_all(me.as_bytes()));
        written.map_err(|e| Error::file(&path, format!("cannot write the lock file: {e}")))?;
        Ok(RootLock { _file: f })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "this host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let root = std::env::temp_dir().join(format!("llmq-root-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let first = RootLock::acquire(&root).unwrap();
        let e = RootLock::acquire(&root).unwrap_err().to_string();
        assert!(e.contains(&format!("in use by another run (pid {} on ", std::process::id())) && e.contains("another --ckpt-dir"), "{e}");
        drop(first);
        let again = RootLock::acquire(&root).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&root);
    }
}
