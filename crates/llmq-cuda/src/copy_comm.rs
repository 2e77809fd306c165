//! `CopyComm`: ranks as threads of one process with one `CudaBackend` each, moving data with the
//! copy engines instead of kernels: all-gather, broadcast and send/recv are copies from the other
//! rank's memory into this rank's, on this rank's stream (cuMemcpyAsync with unified
//! addressing: a peer copy between devices, direct once peer access is enabled, else staged by
//! the driver; pinned host tensors take part too). Reductions and host
//! collectives go through the wrapped `ThreadComm` (host-staged through `stream_read` /
//! `stream_write`, rank order, exact). `all_to_all` (rank r pulls shard r of every peer's buffer)
//! is the data movement of `--all-to-all-reduce`, whose local reduction is the
//! `reduce_shards` kernel launched here (`llmq_core::all_to_all`).
//!
//! Ordering without blocking the host: a rank records a "ready" event on its stream where its
//! source is ready, the ranks swap (address, context, event) through the thread group, each
//! reader makes its stream wait for the writer's event and copies, records a "done" event, and
//! after a second swap every rank's stream waits for its readers' "done" events: later work on
//! that stream (and what is ordered after it) cannot overwrite the source while a peer reads it.
//! Events come from two-slot rings: a slot is recorded again only two calls later, when every
//! peer has passed the next swap and so has issued its waits on the slot's previous recording.
//! `send` returns once the receiver queued its copy (it is not buffered): two ranks that both
//! send first fail, each finding the other's data where it expects the answer.

use crate::device::check;
use crate::kernels::{self, Arg};
use crate::ops::dt;
use crate::CudaBackend;
use cudarc::driver::sys as cu;
use llmq_core::comm::{check_all_to_all, check_shards, signature};
use llmq_core::cpu::CpuBackend;
use llmq_core::{Backend, Comm, DType, Error, Mem, MemCategory, ReduceOp, Result, Stream, Tensor};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a rank tells its peers about one side of a copy: where the bytes are and the event
/// after which they may be read (ready) or overwritten (done).
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    ctx: u64,
    event: u64,
    bytes: u64,
}

impl Desc {
    const SIZE: usize = 32;
    fn encode(&self) -> [u8; Desc::SIZE] {
        let mut b = [0u8; Desc::SIZE];
        for (i, v) in [self.addr, self.ctx, self.event, self.bytes].iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
    fn decode(b: &[u8]) -> Desc {
        let u = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Desc { addr: u(0), ctx: u(1), event: u(2), bytes: u(3) }
    }
}

struct State {
    /// Collectives that moved data so far (selects the ring slot).
    calls: usize,
    /// [slot][ready, done] for collectives.
    coll: [[cu::CUevent; 2]; 2],
    /// Per peer: sends and receives so far, and their rings ([slot]).
    sends: Vec<usize>,
    recvs: Vec<usize>,
    send_ready: Vec<[cu::CUevent; 2]>,
    recv_done: Vec<[cu::CUevent; 2]>,
    /// Peer contexts for which peer access was tried.
    peers: HashSet<u64>,
    /// Descriptor messages of send/recv go through the thread group's mailbox as a small CPU
    /// tensor.
    cpu: CpuBackend,
    msg: Tensor,
}

/// One rank of a group of threads with one GPU each (see the module doc).
pub struct CopyComm {
    inner: Arc<dyn Comm>,
    ctx: cu::CUcontext,
    dev: cu::CUdevice,
    streams: [cu::CUstream; 4],
    backend_prefix: String,
    state: Mutex<State>,
}

// SAFETY: the raw context, stream and event handles are used under the state mutex with the
// context made current first; the context is retained until Drop.
unsafe impl Send for CopyComm {}
// SAFETY: as above.
unsafe impl Sync for CopyComm {}

impl CopyComm {
    /// This rank's copy collectives over `inner` (its rank of a `ThreadComm::group`, whose other
    /// ranks must be `CopyComm`s too; `inner` carries the descriptors, the reductions and the
    /// host collectives) on `be`'s device and streams.
    pub fn new(inner: Arc<dyn Comm>, be: &CudaBackend) -> Result<CopyComm> {
        be.dev.bind()?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: retains the primary context the backend uses, released in Drop, so that the
        // handles below stay valid whichever of the two is dropped first.
        check(unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, be.dev.dev) }, "cuDevicePrimaryCtxRetain")?;
        let world = inner.world();
        let event = || -> Result<cu::CUevent> {
            let mut e = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; the context is current.
            check(unsafe { cu::cuEventCreate(&mut e, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }, "cuEventCreate")?;
            Ok(e)
        };
        let pair = || -> Result<[cu::CUevent; 2]> { Ok([event()?, event()?]) };
        let coll = [pair()?, pair()?];
        let send_ready = (0..world).map(|_| pair()).collect::<Result<Vec<_>>>()?;
        let recv_done = (0..world).map(|_| pair()).collect::<Result<Vec<_>>>()?;
        let mut cpu = CpuBackend::new();
        let msg = cpu.alloc(MemCategory::Other, Mem::Device, DType::I32, &[Desc::SIZE / 4])?;
        let state = State { calls: 0, coll, sends: vec![0; world], recvs: vec![0; world], send_ready, recv_done, peers: HashSet::new(), cpu, msg };
        Ok(CopyComm {
            inner,
            ctx,
            dev: be.dev.dev,
            streams: Stream::ALL.map(|s| be.dev.stream(s)),
            backend_prefix: format!("cuda:{} (", be.dev.ordinal),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that `be` is this rank's backend (`call` names the call in the error).
    fn begin(&self, be: &dyn Backend, call: &str) -> Result<MutexGuard<'_, State>> {
        let name = be.name();
        if !name.starts_with(&self.backend_prefix) {
            return Err(Error::Op(format!("{call}: rank {}'s copy collectives belong to the backend {}..), not {name}", self.rank(), self.backend_prefix)));
        }
        // SAFETY: the retained context.
        check(unsafe { cu::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")?;
        Ok(self.lock())
    }

    /// Every rank's descriptor for the collective `sig`, checking that all ranks called it.
    fn swap(&self, sig: &str, mine: Desc) -> Result<Vec<Desc>> {
        let mut b = mine.encode().to_vec();
        b.extend_from_slice(sig.as_bytes());
        let all = self.inner.all_gather_bytes(&b, sig)?;
        for (r, a) in all.iter().enumerate() {
            if a.len() < Desc::SIZE || &a[Desc::SIZE..] != sig.as_bytes() {
                let theirs = String::from_utf8_lossy(a.get(Desc::SIZE..).unwrap_or_default());
                let msg = format!("ranks called different collectives: rank {} called {sig}, rank {r} {theirs}", self.rank());
                self.inner.abort(&msg);
                return Err(Error::Backend(msg));
            }
        }
        Ok(all.iter().map(|a| Desc::decode(a)).collect())
    }

    /// Enables direct access to a peer context's memory once (where the devices allow it);
    /// copies work without it, staged by the driver.
    fn reach(&self, st: &mut State, peer_ctx: u64) {
        if peer_ctx == self.ctx as u64 || !st.peers.insert(peer_ctx) {
            return;
        }
        // SAFETY: peer_ctx is a retained primary context of a rank of this group; errors (no
        // peer access between these devices, already enabled) leave the staged path.
        unsafe { cu::cuCtxEnablePeerAccess(peer_ctx as cu::CUcontext, 0) };
    }

    /// Queues on `s` a copy of `src.bytes` from a peer's `src` (readable after its event) to
    /// `dst` of this rank.
    fn pull(&self, st: &mut State, s: cu::CUstream, dst: u64, src: &Desc) -> Result<()> {
        if src.bytes == 0 {
            return Ok(());
        }
        self.reach(st, src.ctx);
        // SAFETY: the event and addresses come from a rank of this group, whose memory and
        // events live while the group runs (it waits for our done event before reusing them).
        unsafe {
            check(cu::cuStreamWaitEvent(s, src.event as cu::CUevent, 0), "cuStreamWaitEvent")?;
            check(cu::cuMemcpyAsync(dst, src.addr, src.bytes as usize, s), "cuMemcpyAsync (from a peer)")
        }
    }

    fn record(ev: cu::CUevent, s: cu::CUstream) -> Result<()> {
        // SAFETY: live event and stream of this context.
        check(unsafe { cu::cuEventRecord(ev, s) }, "cuEventRecord")
    }

    /// The copy collective `sig`: this rank offers `offer` (address, bytes), and `reads(descs)`
    /// lists (destination, source rank, byte offset in its offer, bytes) copies for this rank;
    /// then the done swap orders later writes of every offered buffer after its readers.
    fn collective(&self, be: &dyn Backend, stream: Stream, sig: String, offer: (u64, usize), reads: impl Fn(&[Desc]) -> Vec<(u64, usize, usize, usize)>) -> Result<()> {
        let mut st = self.begin(be, &sig)?;
        let s = self.streams[stream.index()];
        let [ready, done] = st.coll[st.calls % 2];
        st.calls += 1;
        Self::record(ready, s)?;
        let mine = Desc { addr: offer.0, ctx: self.ctx as u64, event: ready as u64, bytes: offer.1 as u64 };
        let descs = self.swap(&sig, mine)?;
        for (dst, r, off, len) in reads(&descs) {
            let src = Desc { addr: descs[r].addr + off as u64, bytes: len as u64, ..descs[r] };
            if r == self.rank() {
                if dst != src.addr && len > 0 {
                    // SAFETY: both ranges belong to this rank's tensors (checked by the caller).
                    check(unsafe { cu::cuMemcpyAsync(dst, src.addr, len, s) }, "cuMemcpyAsync")?;
                }
            } else {
                self.pull(&mut st, s, dst, &src)?;
            }
        }
        Self::record(done, s)?;
        let dones = self.swap(&format!("{sig}, done"), Desc { event: done as u64, ..mine })?;
        for (r, d) in dones.iter().enumerate() {
            if r != self.rank() {
                // SAFETY: a live event of a rank of this group (see the ring in the module doc).
                check(unsafe { cu::cuStreamWaitEvent(s, d.event as cu::CUevent, 0) }, "cuStreamWaitEvent")?;
            }
        }
        Ok(())
    }

    fn check_peer(&self, kind: &str, what: &str, peer: usize) -> Result<()> {
        if peer >= self.world() || peer == self.rank() {
            return Err(Error::Op(format!("{kind} '{what}': peer {peer} is not another rank of {}", self.world())));
        }
        Ok(())
    }

    /// Sends a descriptor to `peer` through the thread group's mailbox.
    fn post(&self, st: &mut State, peer: usize, sig: &str, d: Desc) -> Result<()> {
        st.cpu.upload(&st.msg, &d.encode())?;
        self.inner.send(&st.cpu, &st.msg, peer, Stream::Compute, sig)
    }

    fn take(&self, st: &mut State, peer: usize, sig: &str) -> Result<Desc> {
        self.inner.recv(&st.cpu, &st.msg, peer, Stream::Compute, sig)?;
        Ok(Desc::decode(&st.cpu.download(&st.msg)?))
    }
}



impl Comm for CopyComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn describe(&self) -> String {
        format!("{} ranks as threads, copy engines (peer copies; reductions host-staged or all-to-all)", self.world())
    }

    fn all_reduce(&self, be: &dyn Backend, t: &Tensor, op: ReduceOp, stream: Stream, what: &str) -> Result<()> {
        self.inner.all_reduce(be, t, op, stream, what)
    }

    fn reduce_scatter(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()> {
        self.inner.reduce_scatter(be, dst, src, accumulate, stream, what)
    }

    fn all_gather(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        check_shards("all-gather", what, src, dst, self.world())?;
        let b = src.bytes();
        let base = dst.addr;
        self.collective(be, stream, signature("all-gather", what, dst), (src.addr, b), |ds| {
            (0..ds.len()).map(|r| (base + (r * b) as u64, r, 0, b)).collect()
        })
    }

    fn all_to_all(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        check_all_to_all(what, dst, src, self.world())?;
        let b = src.bytes() / self.world();
        let (me, base) = (self.rank(), dst.addr);
        self.collective(be, stream, signature("all-to-all", what, src), (src.addr, src.bytes()), |ds| {
            (0..ds.len()).map(|r| (base + (r * b) as u64, r, me * b, b)).collect()
        })
    }

    fn broadcast(&self, be: &dyn Backend, t: &Tensor, root: usize, stream: Stream, what: &str) -> Result<()> {
        if root >= self.world() {
            return Err(Error::Op(format!("broadcast '{what}': root {root} is not a rank of {}", self.world())));
        }
        let me = self.rank();
        let sig = signature(&format!("broadcast from {root}"), what, t);
        self.collective(be, stream, sig, (t.addr, t.bytes()), |_| if me == root { vec![] } else { vec![(t.addr, root, 0, t.bytes())] })
    }

    fn send(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        self.check_peer("send", what, peer)?;
        let mut st = self.begin(be, &format!("send '{what}'"))?;
        let s = self.streams[stream.index()];
        let slot = st.sends[peer] % 2;
        st.sends[peer] += 1;
        let ready = st.send_ready[peer][slot];
        Self::record(ready, s)?;
        let sig = signature("send/recv", what, t);
        self.post(&mut st, peer, &sig, Desc { addr: t.addr, ctx: self.ctx as u64, event: ready as u64, bytes: t.bytes() as u64 })?;
        // the receiver's done event: later writes of t on this stream wait for its copy
        let done = self.take(&mut st, peer, &format!("{sig}, done"))?;
        // SAFETY: a live event of the receiving rank (its ring slot is reused two receives later).
        check(unsafe { cu::cuStreamWaitEvent(s, done.event as cu::CUevent, 0) }, "cuStreamWaitEvent")
    }

    fn recv(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        self.check_peer("recv", what, peer)?;
        let mut st = self.begin(be, &format!("recv '{what}'"))?;
        let s = self.streams[stream.index()];
        let sig = signature("send/recv", what, t);
        let src = self.take(&mut st, peer, &sig)?;
        if src.bytes != t.bytes() as u64 {
            return Err(Error::Backend(format!("rank {}: recv {sig} from rank {peer}: it sent {} bytes, expected {}", self.rank(), src.bytes, t.bytes())));
        }
        self.pull(&mut st, s, t.addr, &src)?;
        let slot = st.recvs[peer] % 2;
        st.recvs[peer] += 1;
        let done = st.recv_done[peer][slot];
        Self::record(done, s)?;
        self.post(&mut st, peer, &format!("{sig}, done"), Desc { event: done as u64, ..src })
    }

    fn all_reduce_host(&self, vals: &mut [f64], op: ReduceOp, what: &str) -> Result<()> {
        self.inner.all_reduce_host(vals, op, what)
    }

    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        self.inner.all_gather_bytes(bytes, what)
    }

    fn gather_bytes(&self, bytes: &[u8], root: usize, what: &str) -> Result<Option<Vec<Vec<u8>>>> {
        self.inner.gather_bytes(bytes, root, what)
    }

    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
}

impl CudaBackend {
    /// `Backend::reduce_shards`: the `reduce_shards` kernel (kernels/reduce.cu) on `stream`.
    pub(crate) fn op_reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, stream: Stream) -> Result<()> {
        let world = llmq_core::all_to_all::check_reduce_shards(dst, staged)?;
        let n = dst.numel();
        if world > i32::MAX as usize {
            return Err(Error::Op(format!("reduce_shards: {world} shards exceed the kernel's 32-bit count")));
        }
        self.dev.bind()?;
        let grid = (n.div_ceil(256).min(self.dev.sm_count as usize * 8) as u32, 1, 1);
        let args = [Arg::Ptr(dst.addr), Arg::I32(dt(dst.dtype)), Arg::Ptr(staged.addr), Arg::I64(n as i64), Arg::I32(world as i32), Arg::I32(accumulate as i32)];
        // SAFETY: dst holds n and staged world*n elements of the same f32/bf16 dtype, not
        // overlapping (checked above); the arguments follow the kernel's signature.
        unsafe { kernels::launch(self.k.reduce_shards, grid, (256, 1, 1), 0, self.dev.stream(stream), &args) }
    }
}

impl Drop for CopyComm {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the events were created in the retained context and are destroyed once after
        // the context's work finished with them (the backend's streams may be gone already);
        // errors cannot be handled in Drop.
        unsafe {
            cu::cuCtxSetCurrent(self.ctx);
            cu::cuCtxSynchronize();
            let rings = st.coll.iter().chain(st.send_ready.iter()).chain(st.recv_done.iter());
            for e in rings.flatten() {
                cu::cuEventDestroy_v2(*e);
            }
            cu::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}
