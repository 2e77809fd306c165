//! Collectives between ranks (data-parallel training): the `Comm` interface and its CPU
//! implementation, ranks as threads of one process exchanging through shared memory.
//!
//! Every collective is stream-ordered like an op: it reads and writes its tensors at its place in
//! `stream`'s order (through `Backend::stream_read` / `stream_write`, which the stream-order
//! checker sees as ops on that stream). Every rank must call the same collectives in the same
//! order; a mismatch (another kind, another name, other sizes) is an error on every rank, naming
//! both calls.
//!
//! Reductions are deterministic and the same on every rank: element-wise in f32, ranks added in
//! rank order, starting from the destination's own value when accumulating
//! (`dst = ((dst + src_0) + src_1) + ...`), rounded once to the destination dtype. `Max`
//! propagates NaN. Host reductions (`all_reduce_host`) run in f64 in rank order.
//!
//! Faults: a collective that does not complete within the timeout fails on every rank that
//! waits for it, naming the collective and the ranks that did not arrive; a rank that fails
//! elsewhere calls `abort`, and every pending or later collective of the group fails with its
//! message instead of waiting for the timeout.

use crate::backend::{Backend, Stream};
use crate::dtype::{decode_into, encode_into};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// Elements of each rank's shard of a buffer of `n` elements over `world` ranks: the whole
/// buffer for one rank, else ceil(n / world) rounded up to a multiple of 128 elements (aligned
/// shard starts for every dtype). Buffers that are reduce-scattered or gathered are padded to
/// `world * shard_len`.
pub fn shard_len(n: usize, world: usize) -> usize {
    if world <= 1 {
        n
    } else {
        n.div_ceil(world).div_ceil(128) * 128
    }
}

/// The collectives of one rank of a group. `what` names the call in errors (e.g. "gradients of
/// block 3").
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// "threads", "nccl", ...
    fn describe(&self) -> String;
    /// t = reduce(t over ranks), in place.
    fn all_reduce(&self, be: &dyn Backend, t: &Tensor, op: ReduceOp, stream: Stream, what: &str) -> Result<()>;
    /// dst [S] (+)= elements [rank*S, (rank+1)*S) of the sum over ranks of src [world*S]. dst may
    /// be that range of src itself.
    fn reduce_scatter(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()>;
    /// dst [world*S] = every rank's src [S], in rank order. src may be rank's range of dst.
    fn all_gather(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()>;
    /// dst [world*S] = shard `rank` (elements [rank*S, (rank+1)*S)) of every rank's src
    /// [world*S], in rank order: the data movement of a reduce-scatter without the reduction
    /// (`crate::all_to_all`). dst must not overlap src. Implementations that do not move data
    /// this way say so.
    fn all_to_all(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        let _ = (be, dst, src, stream);
        Err(Error::Config(format!("all-to-all '{what}': {} do not provide it (--all-to-all-reduce runs on the thread or copy-engine collectives)", self.describe())))
    }
    /// t = root's t.
    fn broadcast(&self, be: &dyn Backend, t: &Tensor, root: usize, stream: Stream, what: &str) -> Result<()>;
    fn send(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()>;
    fn recv(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()>;
    /// Host values reduced over ranks (f64, rank order), in place; returns once every rank has
    /// contributed (so it is also a barrier).
    fn all_reduce_host(&self, vals: &mut [f64], op: ReduceOp, what: &str) -> Result<()>;
    /// Every rank's bytes, in rank order (checkpoint gathering, configuration checks).
    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>>;
    /// Every rank's bytes on `root` (in rank order), `None` on the other ranks.
    fn gather_bytes(&self, bytes: &[u8], root: usize, what: &str) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.all_gather_bytes(bytes, what)?;
        Ok((self.rank() == root).then_some(all))
    }
    fn barrier(&self, what: &str) -> Result<()> {
        self.all_reduce_host(&mut [], ReduceOp::Sum, what)
    }
    /// This rank failed (`why`): the group's pending and later collectives fail with that reason.
    fn abort(&self, why: &str);
}

/// Element-wise reduction of `srcs` (each `dst.numel()` elements of dst's dtype, rank order)
/// into dst's bytes, starting from `init` when accumulating.
pub(crate) fn reduce_bytes(dtype: crate::DType, init: Option<&[u8]>, srcs: &[&[u8]], op: ReduceOp, out: &mut [u8]) -> Result<()> {
    if !dtype.is_float() || dtype.is_fp8() {
        return Err(Error::Op(format!("collective reduction over {dtype} values: only f32 and bf16 are reduced")));
    }
    // chunks of elements in parallel: each element's reduction runs in rank order whatever the
    // thread count
    const CH: usize = 1 << 14;
    let sz = dtype.size();
    out.par_chunks_mut(CH * sz).enumerate().for_each(|(c, dst)| {
        let (lo, len) = (c * CH * sz, dst.len() / sz);
        fn part(b: &[u8], lo: usize, n: usize) -> &[u8] {
            &b[lo..lo + n]
        }
        let nb = len * sz;
        let mut acc = vec![0f32; len];
        let mut x = vec![0f32; len];
        let mut first = true;
        if let Some(i) = init {
            decode_into(dtype, part(i, lo, nb), &mut acc);
            first = false;
        }
        for s in srcs {
            if first {
                decode_into(dtype, part(s, lo, nb), &mut acc);
                first = false;
                continue;
            }
            decode_into(dtype, part(s, lo, nb), &mut x);
            for (a, &v) in acc.iter_mut().zip(x.iter()) {
                *a = match op {
                    ReduceOp::Sum => *a + v,
                    ReduceOp::Max if a.is_nan() || v.is_nan() => f32::NAN,
                    ReduceOp::Max => a.max(v),
                };
            }
        }
        encode_into(dtype, &acc, dst);
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ranks as threads
// ---------------------------------------------------------------------------------------------

/// The collective every rank is in (or entering).
#[derive(Default)]
struct Round {
    /// "all-reduce gradients of block 3 (bf16 x 4096)": must agree across ranks.
    signature: String,
    deposits: Vec<Option<Arc<Vec<u8>>>>,
    arrived: usize,
    left: usize,
}

/// A sent tensor's bytes and the call's signature (checked by the receiver).
type Message = (String, Vec<u8>);

struct HubState {
    /// Index of the open round: a rank's k-th collective is round k.
    generation: u64,
    round: Round,
    failed: Option<String>,
    /// (from, to) -> messages for send/recv.
    mail: HashMap<(usize, usize), VecDeque<Message>>,
}

struct Hub {
    world: usize,
    timeout: Duration,
    state: Mutex<HubState>,
    cv: Condvar,
}

/// One rank of a group of threads (`ThreadComm::group`).
pub struct ThreadComm {
    hub: Arc<Hub>,
    rank: usize,
    calls: AtomicU64,
}

impl ThreadComm {
    /// The `world` ranks of a new group, for one thread each; a collective waits at most
    /// `timeout` for the other ranks.
    pub fn group(world: usize, timeout: Duration) -> Vec<ThreadComm> {
        let round = Round { deposits: vec![None; world], ..Round::default() };
        let hub = Arc::new(Hub {
            world,
            timeout,
            state: Mutex::new(HubState { generation: 0, round, failed: None, mail: HashMap::new() }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| ThreadComm { hub: hub.clone(), rank, calls: AtomicU64::new(0) }).collect()
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // a rank that panicked while holding the lock leaves consistent state (every update is
        // a few assignments): go on, the panic is reported by its thread
        self.hub.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition variable until `done` or the deadline; errors name `what`.
    fn wait_until<'a>(
        &'a self,
        mut st: MutexGuard<'a, HubState>,
        deadline: Instant,
        mut done: impl FnMut(&HubState) -> bool,
        on_timeout: impl Fn(&HubState) -> String,
    ) -> Result<MutexGuard<'a, HubState>> {
        loop {
            if let Some(f) = &st.failed {
                return Err(Error::Backend(format!("rank {}: {f}", self.rank)));
            }
            if done(&st) {
                return Ok(st);
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = on_timeout(&st);
                st.failed = Some(msg.clone());
                self.hub.cv.notify_all();
                return Err(Error::Backend(format!("rank {}: {msg}", self.rank)));
            }
            st = self.hub.cv.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Deposits this rank's bytes for its next collective and returns every rank's, once all
    /// have arrived.
    fn exchange(&self, signature: String, data: Vec<u8>) -> Result<Vec<Arc<Vec<u8>>>> {
        let gen = self.calls.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + self.hub.timeout;
        let secs = self.hub.timeout.as_secs_f64();
        let st = self.lock();
        let mut st = self.wait_until(st, deadline, |s| s.generation >= gen, |_| {
            format!("{signature} timed out after {secs:.0} s: the previous collective did not finish on every rank")
        })?;
        if st.round.arrived == 0 {
            st.round.signature = signature.clone();
        } else if st.round.signature != signature {
            let msg = format!("ranks called different collectives: rank {} called {signature}, another rank {}", self.rank, st.round.signature);
            st.failed = Some(msg.clone());
            self.hub.cv.notify_all();
            return Err(Error::Backend(msg));
        }
        st.round.deposits[self.rank] = Some(Arc::new(data));
        st.round.arrived += 1;
        self.hub.cv.notify_all();
        let world = self.hub.world;
        let mut st = self.wait_until(st, deadline, |s| s.round.arrived == world, |s| {
            let missing: Vec<String> = s.round.deposits.iter().enumerate().filter(|(_, d)| d.is_none()).map(|(r, _)| r.to_string()).collect();
            format!("{signature} timed out after {secs:.0} s: rank(s) {} did not arrive", missing.join(", "))
        })?;
        let all: Vec<Arc<Vec<u8>>> = st.round.deposits.iter().map(|d| d.clone().expect("every rank arrived")).collect();
        st.round.left += 1;
        if st.round.left == world {
            st.round = Round { deposits: vec![None; world], ..Round::default() };
            st.generation += 1;
            self.hub.cv.notify_all();
        }
        Ok(all)
    }

}

/// How a collective names itself in errors and in the check that every rank called the same one.
pub fn signature(kind: &str, what: &str, t: &Tensor) -> String {
    format!("{kind} '{what}' ({} x {})", t.dtype, t.numel())
}

/// The shard and whole buffers of a reduce-scatter or all-gather agree: same dtype, `world`
/// shards making the whole.
pub fn check_shards(kind: &str, what: &str, shard: &Tensor, full: &Tensor, world: usize) -> Result<()> {
    if shard.dtype != full.dtype || shard.numel() * world != full.numel() {
        return Err(Error::Op(format!(
            "{kind} '{what}': the full buffer ({} x {}) must be {world} shards ({} x {})",
            full.dtype,
            full.numel(),
            shard.dtype,
            shard.numel()
        )));
    }
    Ok(())
}

/// The buffers of an all-to-all agree: same dtype and size, `world` shards, not overlapping.
pub fn check_all_to_all(what: &str, dst: &Tensor, src: &Tensor, world: usize) -> Result<()> {
    if dst.dtype != src.dtype || dst.numel() != src.numel() || !src.numel().is_multiple_of(world.max(1)) {
        return Err(Error::Op(format!(
            "all-to-all '{what}': dst ({} x {}) and src ({} x {}) must match and be {world} shards",
            dst.dtype,
            dst.numel(),
            src.dtype,
            src.numel()
        )));
    }
    if dst.addr < src.addr + src.bytes() as u64 && src.addr < dst.addr + dst.bytes() as u64 && dst.bytes() > 0 {
        return Err(Error::Op(format!("all-to-all '{what}': dst overlaps src")));
    }
    Ok(())
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.hub.world
    }
    fn describe(&self) -> String {
        format!("{} ranks as threads (shared memory)", self.hub.world)
    }

    fn all_reduce(&self, be: &dyn Backend, t: &Tensor, op: ReduceOp, stream: Stream, what: &str) -> Result<()> {
        let all = self.exchange(signature(&format!("all-reduce {op:?}"), what, t), be.stream_read(t, stream)?)?;
        let srcs: Vec<&[u8]> = all.iter().map(|a| a.as_slice()).collect();
        let mut out = vec![0u8; t.bytes()];
        reduce_bytes(t.dtype, None, &srcs, op, &mut out)?;
        be.stream_write(t, &out, stream)
    }

    fn reduce_scatter(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()> {
        check_shards("reduce-scatter", what, dst, src, self.hub.world)?;
        let all = self.exchange(signature("reduce-scatter", what, src), be.stream_read(src, stream)?)?;
        let b = dst.bytes();
        let srcs: Vec<&[u8]> = all.iter().map(|a| &a[self.rank * b..(self.rank + 1) * b]).collect();
        let init = if accumulate { Some(be.stream_read(dst, stream)?) } else { None };
        let mut out = vec![0u8; b];
        reduce_bytes(dst.dtype, init.as_deref(), &srcs, ReduceOp::Sum, &mut out)?;
        be.stream_write(dst, &out, stream)
    }

    fn all_gather(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        check_shards("all-gather", what, src, dst, self.hub.world)?;
        let all = self.exchange(signature("all-gather", what, dst), be.stream_read(src, stream)?)?;
        let joined: Vec<u8> = all.iter().flat_map(|a| a.iter().copied()).collect();
        be.stream_write(dst, &joined, stream)
    }

    fn all_to_all(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        check_all_to_all(what, dst, src, self.hub.world)?;
        let all = self.exchange(signature("all-to-all", what, src), be.stream_read(src, stream)?)?;
        let b = src.bytes() / self.hub.world;
        let mine: Vec<u8> = all.iter().flat_map(|a| a[self.rank * b..(self.rank + 1) * b].iter().copied()).collect();
        be.stream_write(dst, &mine, stream)
    }

    fn broadcast(&self, be: &dyn Backend, t: &Tensor, root: usize, stream: Stream, what: &str) -> Result<()> {
        let mine = if self.rank == root { be.stream_read(t, stream)? } else { vec![] };
        let all = self.exchange(signature(&format!("broadcast from {root}"), what, t), mine)?;
        if self.rank != root {
            be.stream_write(t, &all[root], stream)?;
        }
        Ok(())
    }

    fn send(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        if peer >= self.hub.world || peer == self.rank {
            return Err(Error::Op(format!("send '{what}': peer {peer} is not another rank of {}", self.hub.world)));
        }
        let bytes = be.stream_read(t, stream)?;
        let mut st = self.lock();
        st.mail.entry((self.rank, peer)).or_default().push_back((signature("send/recv", what, t), bytes));
        self.hub.cv.notify_all();
        Ok(())
    }

    fn recv(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        if peer >= self.hub.world || peer == self.rank {
            return Err(Error::Op(format!("recv '{what}': peer {peer} is not another rank of {}", self.hub.world)));
        }
        let sig = signature("send/recv", what, t);
        let deadline = Instant::now() + self.hub.timeout;
        let secs = self.hub.timeout.as_secs_f64();
        let key = (peer, self.rank);
        let st = self.lock();
        let mut st = self.wait_until(st, deadline, |s| s.mail.get(&key).is_some_and(|q| !q.is_empty()), |_| {
            format!("recv {sig} timed out after {secs:.0} s: rank {peer} did not send")
        })?;
        let (got, bytes) = st.mail.get_mut(&key).and_then(|q| q.pop_front()).expect("a message is queued");
        drop(st);
        if got != sig {
            return Err(Error::Backend(format!("rank {}: expected {sig} from rank {peer}, it sent {got}", self.rank)));
        }
        be.stream_write(t, &bytes, stream)
    }

    fn all_reduce_host(&self, vals: &mut [f64], op: ReduceOp, what: &str) -> Result<()> {
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.exchange(format!("host all-reduce {op:?} '{what}' ({} values)", vals.len()), bytes)?;
        for (i, v) in vals.iter_mut().enumerate() {
            let mut acc: Option<f64> = None;
            for a in &all {
                let x = f64::from_le_bytes(a[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                acc = Some(match (acc, op) {
                    (None, _) => x,
                    (Some(s), ReduceOp::Sum) => s + x,
                    (Some(s), ReduceOp::Max) if s.is_nan() || x.is_nan() => f64::NAN,
                    (Some(s), ReduceOp::Max) => s.max(x),
                });
            }
            *v = acc.unwrap_or(*v);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        // the sizes may differ between ranks: the signature names only the call
        let all = self.exchange(format!("gather '{what}'"), bytes.to_vec())?;
        Ok(all.iter().map(|a| a.as_ref().clone()).collect())
    }

    fn gather_bytes(&self, bytes: &[u8], root: usize, what: &str) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.exchange(format!("gather '{what}'"), bytes.to_vec())?;
        Ok((self.rank == root).then(|| all.iter().map(|a| a.as_ref().clone()).collect()))
    }

    fn abort(&self, why: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(format!("rank {} failed: {why}", self.rank));
        }
        self.hub.cv.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// Routing collectives to implementations
// ---------------------------------------------------------------------------------------------

/// One rank's collectives from several implementations: all-gathers and broadcasts from
/// `gathers`, sends and receives from `p2p`, all-to-alls from `a2a` where given (the
/// copy-engine versions), everything else (reductions, host collectives, aborts) from `base`.
pub struct RoutedComm {
    pub base: Arc<dyn Comm>,
    pub gathers: Option<Arc<dyn Comm>>,
    pub p2p: Option<Arc<dyn Comm>>,
    pub a2a: Option<Arc<dyn Comm>>,
}

impl RoutedComm {
    fn gathers(&self) -> &dyn Comm {
        self.gathers.as_deref().unwrap_or(self.base.as_ref())
    }
    fn p2p(&self) -> &dyn Comm {
        self.p2p.as_deref().unwrap_or(self.base.as_ref())
    }
}

impl Comm for RoutedComm {
    fn rank(&self) -> usize {
        self.base.rank()
    }
    fn world(&self) -> usize {
        self.base.world()
    }
    fn describe(&self) -> String {
        let mut s = self.base.describe();
        if let Some(g) = &self.gathers {
            s += &format!("; all-gather and broadcast: {}", g.describe());
        }
        if let Some(p) = &self.p2p {
            s += &format!("; send/recv: {}", p.describe());
        }
        if let Some(a) = &self.a2a {
            s += &format!("; all-to-all: {}", a.describe());
        }
        s
    }
    fn all_reduce(&self, be: &dyn Backend, t: &Tensor, op: ReduceOp, stream: Stream, what: &str) -> Result<()> {
        self.base.all_reduce(be, t, op, stream, what)
    }
    fn reduce_scatter(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()> {
        self.base.reduce_scatter(be, dst, src, accumulate, stream, what)
    }
    fn all_gather(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        self.gathers().all_gather(be, dst, src, stream, what)
    }
    fn all_to_all(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        self.a2a.as_deref().unwrap_or(self.base.as_ref()).all_to_all(be, dst, src, stream, what)
    }
    fn broadcast(&self, be: &dyn Backend, t: &Tensor, root: usize, stream: Stream, what: &str) -> Result<()> {
        self.gathers().broadcast(be, t, root, stream, what)
    }
    fn send(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        self.p2p().send(be, t, peer, stream, what)
    }
    fn recv(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        self.p2p().recv(be, t, peer, stream, what)
    }
    fn all_reduce_host(&self, vals: &mut [f64], op: ReduceOp, what: &str) -> Result<()> {
        self.base.all_reduce_host(vals, op, what)
    }
    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        self.base.all_gather_bytes(bytes, what)
    }
    fn gather_bytes(&self, bytes: &[u8], root: usize, what: &str) -> Result<Option<Vec<Vec<u8>>>> {
        self.base.gather_bytes(bytes, root, what)
    }
    fn abort(&self, why: &str) {
        self.base.abort(why);
        for c in [&self.gathers, &self.p2p, &self.a2a].into_iter().flatten() {
            c.abort(why);
        }
    }
}
