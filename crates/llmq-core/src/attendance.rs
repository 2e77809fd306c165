//! Naming the ranks that did not arrive when the collectives cannot say (NCCL across
//! processes): every rank reports each collective it enters (a sequence number and its
//! signature) to a roll call kept beside the collectives (`llmq_train::roll_call`, on the
//! rendezvous connection to rank 0), and a collective that times out asks the roll call which
//! ranks have not entered it and adds their names, and where each one last was, to its error.

use crate::backend::{Backend, Stream};
use crate::comm::{signature, Comm, ReduceOp};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where every rank of a group is in its sequence of collectives.
pub trait Attendance: Send + Sync {
    /// This rank enters its collective number `seq` (1, 2, ...), called `what`.
    fn enter(&self, seq: u64, what: &str);
    /// The ranks that have not entered collective `seq`, e.g. "rank(s) 1 did not arrive (rank 1
    /// last entered #6 all-reduce 'loss' ...)"; empty when every rank has; an error when the
    /// roll call cannot be reached.
    fn absent(&self, seq: u64) -> Result<String>;
    /// Called after a timeout of collective `seq` on this rank, before its error ends the
    /// process: the roll call may wait (bounded) for the other ranks that reached `seq` to ask
    /// it in turn.
    fn linger(&self, seq: u64) {
        let _ = seq;
    }
}

/// `inner`'s collectives, each reported to `roll` before it starts; a timeout's error names the
/// ranks the roll call says are missing.
pub struct AttendedComm {
    pub inner: Arc<dyn Comm>,
    pub roll: Arc<dyn Attendance>,
    seq: AtomicU64,
}

/// An error from a collective that waited for ranks that did not come.
fn is_timeout(e: &Error) -> bool {
    let m = e.to_string();
    m.contains("timed out") || m.contains("within the timeout")
}

impl AttendedComm {
    pub fn new(inner: Arc<dyn Comm>, roll: Arc<dyn Attendance>) -> AttendedComm {
        AttendedComm { inner, roll, seq: AtomicU64::new(0) }
    }

    fn attend<T>(&self, sig: String, call: impl FnOnce() -> Result<T>) -> Result<T> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.roll.enter(seq, &sig);
        call().map_err(|e| {
            if !is_timeout(&e) {
                return e;
            }
            let who = match self.roll.absent(seq) {
                Ok(s) if s.is_empty() => "every rank entered it (one failed inside it)".to_string(),
                Ok(s) => s,
                Err(why) => format!("the roll call cannot say who is missing: {why}"),
            };
            self.roll.linger(seq);
            let msg = match &e {
                Error::Backend(m) => m.clone(),
                other => other.to_string(),
            };
            Error::Backend(format!("{msg}; rank {}'s collective #{seq} ({sig}): {who}", self.inner.rank()))
        })
    }
}

impl Comm for AttendedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn describe(&self) -> String {
        format!("{} (missing ranks named by the roll call at rank 0)", self.inner.describe())
    }
    fn all_reduce(&self, be: &dyn Backend, t: &Tensor, op: ReduceOp, stream: Stream, what: &str) -> Result<()> {
        self.attend(signature(&format!("all-reduce {op:?}"), what, t), || self.inner.all_reduce(be, t, op, stream, what))
    }
    fn reduce_scatter(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()> {
        self.attend(signature("reduce-scatter", what, src), || self.inner.reduce_scatter(be, dst, src, accumulate, stream, what))
    }
    fn all_gather(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        self.attend(signature("all-gather", what, dst), || self.inner.all_gather(be, dst, src, stream, what))
    }
    fn all_to_all(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        self.attend(signature("all-to-all", what, src), || self.inner.all_to_all(be, dst, src, stream, what))
    }
    fn broadcast(&self, be: &dyn Backend, t: &Tensor, root: usize, stream: Stream, what: &str) -> Result<()> {
        self.attend(signature(&format!("broadcast from {root}"), what, t), || self.inner.broadcast(be, t, root, stream, what))
    }
    // point-to-point calls involve two ranks, not the group's sequence
    fn send(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        self.inner.send(be, t, peer, stream, what)
    }
    fn recv(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        self.inner.recv(be, t, peer, stream, what)
    }
    fn all_reduce_host(&self, vals: &mut [f64], op: ReduceOp, what: &str) -> Result<()> {
        self.attend(format!("host all-reduce {op:?} '{what}' ({} values)", vals.len()), || self.inner.all_reduce_host(vals, op, what))
    }
    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        self.attend(format!("gather '{what}'"), || self.inner.all_gather_bytes(bytes, what))
    }
    fn gather_bytes(&self, bytes: &[u8], root: usize, what: &str) -> Result<Option<Vec<Vec<u8>>>> {
        self.attend(format!("gather '{what}'"), || self.inner.gather_bytes(bytes, root, what))
    }
    fn barrier(&self, what: &str) -> Result<()> {
        self.attend(format!("barrier '{what}'"), || self.inner.barrier(what))
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
}
