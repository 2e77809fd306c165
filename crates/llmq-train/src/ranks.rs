//! Ranks as threads: runs one closure per rank of a `ThreadComm` group, each on its own thread
//! (with its own backend, built inside the closure). A rank that fails or panics aborts the
//! group, so the others stop at their next collective instead of waiting for the timeout.

use llmq_core::{Comm, Error, Result, ThreadComm};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

/// The most ranks a run may have (`--gpus`, `WORLD_SIZE`): a bound far above any real group, so
/// that a mistyped count is refused instead of allocating per-rank state for billions of ranks.
pub const MAX_RANKS: usize = 4096;

/// Runs `f(comm)` for every rank of a new group of `world` threads; returns the results in rank
/// order.
pub fn run_ranks<T: Send>(world: usize, timeout: Duration, f: impl Fn(Arc<dyn Comm>) -> Result<T> + Sync) -> Vec<Result<T>> {
    let comms: Vec<Arc<dyn Comm>> = ThreadComm::group(world, timeout).into_iter().map(|c| Arc::new(c) as Arc<dyn Comm>).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|comm| {
                let (comm, f) = (comm.clone(), &f);
                std::thread::Builder::new()
                    .name(format!("rank {}", comm.rank()))
                    .spawn_scoped(s, move || {
                        let r = catch_unwind(AssertUnwindSafe(|| f(comm.clone()))).unwrap_or_else(|p| {
                            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                            Err(Error::Backend(format!("rank {} panicked: {msg}", comm.rank())))
                        });
                        if let Err(e) = &r {
                            comm.abort(&e.to_string());
                        }
                        r
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::Backend("a rank thread panicked".into())))).collect()
    })
}

/// The first error of a set of rank results (the rank that failed first names the cause; the
/// others report the abort), or every rank's value.
pub fn all_ok<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut out = vec![];
    let mut first: Option<Error> = None;
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                // an abort message names the failing rank's own error: prefer the original
                let is_echo = e.to_string().contains("failed: ");
                if first.is_none() || (!is_echo && first.as_ref().is_some_and(|f| f.to_string().contains("failed: "))) {
                    first = Some(e);
                }
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
