//! `NcclComm`: the collectives of one rank (one GPU) on NCCL, for ranks that are threads of one
//! process or processes on one host or several (the id travels through `llmq_train::rendezvous`).
//!
//! Semantics are those of `llmq_core::Comm` with these differences, all inherent to NCCL:
//! - Reductions run in NCCL's order and precision: exact against the CPU collectives for one rank;
//!   for several ranks bf16 sums may round differently. `Max` follows fmax: a NaN loses to a
//!   number, so non-finite checks must reduce a flag (as `all_reduce_host` does for `Max`).
//! - `reduce_scatter` with `accumulate` is refused: NCCL has no accumulating reduction, and the
//!   add would need a kernel on the collective's stream (which may be a copy stream). Reduce into
//!   a separate buffer and add with an op.
//! - `send` completes only once the peer receives (no buffering), so two ranks that both send
//!   first wait on each other for large messages.
//! - Mismatched calls across ranks are not detected (NCCL matches them by order only): they hang
//!   until the timeout or exchange wrong data.
//! - Device collectives do not pass through `Backend::stream_read/stream_write`, so the
//!   stream-order checker does not see them; the CPU collectives check the same call sequence.
//!
//! Collectives are queued on the backend's stream named by their `Stream` argument (the handles
//! are taken from the backend at construction; each call checks that the backend handed in is
//! the same device). Tensors may be device memory or mapped pinned host memory; fp8 and every
//! other dtype move as bytes. Host collectives (`all_reduce_host`, `all_gather_bytes`,
//! `gather_bytes`, which only root receives) go through a small device buffer of this
//! communicator on a stream of its own and wait for completion.
//!
//! Timeouts: the communicator is non-blocking. Every device collective records an event after
//! itself; a watchdog thread polls the events and NCCL's asynchronous error, and a collective
//! that has not finished by its deadline (or an NCCL error) aborts the communicator with
//! ncclCommAbort: the kernels stop, and this and every later call fails naming the collective.
//! Memory NCCL allocates for itself (buffers per peer) is not counted by the backend's accounting.

use crate::device::{check, error_string};
use crate::CudaBackend;
use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nc;
use llmq_core::comm::check_shards;
use llmq_core::{Backend, Comm, DType, Error, ReduceOp, Result, Stream, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of the device buffer host collectives go through.
const HOST_BUF: usize = 1 << 20;
/// How often the watchdog looks at the pending collectives.
const POLL: Duration = Duration::from_millis(20);

/// Ok when the CUDA driver library and libnccl load (under a name cudarc looks for), so that
/// NCCL calls cannot panic in cudarc's loader; otherwise what is missing. Devices are checked
/// by `CudaBackend::new`.
pub fn nccl_available() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the libraries.
    if !unsafe { cu::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) cannot be loaded".into());
    }
    // SAFETY: as above.
    if !unsafe { nc::is_culib_present() } {
        return Err("the NCCL library cannot be loaded: it is looked up as libnccl.so (also libnccl.so.1, .9 to .13), which the \
                    runtime package alone (libnccl.so.2) does not provide; install the development package (e.g. apt install libnccl2 libnccl-dev) \
                    or link libnccl.so -> libnccl.so.2 in a directory on LD_LIBRARY_PATH. `--gpus N` in one process can use the thread \
                    collectives instead"
            .into());
    }
    Ok(())
}

fn nccl_available_err() -> Result<()> {
    nccl_available().map_err(|e| Error::Backend(format!("NCCL is missing: {e}")))
}

/// The id all ranks of one communicator share: made by one rank (`NcclComm::unique_id`) and
/// handed to the others (through the rendezvous for processes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl NcclId {
    /// The id from bytes received from rank 0 (the rendezvous payload).
    pub fn from_bytes(b: &[u8]) -> Result<NcclId> {
        let id: [u8; 128] = b.try_into().map_err(|_| Error::Backend(format!("an NCCL id of {} bytes received, expected 128", b.len())))?;
        Ok(NcclId(id))
    }
}

fn nccl_msg(r: nc::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string (or null).
    let p = unsafe { nc::ncclGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: as above.
        format!("{r:?} ({})", unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy())
    }
}

fn is_ok(r: nc::ncclResult_t) -> bool {
    r == nc::ncclResult_t::ncclSuccess
}

fn in_progress(r: nc::ncclResult_t) -> bool {
    r == nc::ncclResult_t::ncclInProgress
}

/// A device collective that was queued and has not been seen finished.
struct Pending {
    event: cu::CUevent,
    deadline: Instant,
    what: String,
}

struct State {
    /// Null once aborted.
    comm: nc::ncclComm_t,
    failed: Option<String>,
    pending: Vec<Pending>,
    free_events: Vec<cu::CUevent>,
}

struct Shared {
    state: Mutex<State>,
    ctx: cu::CUcontext,
    rank: usize,
    stop: AtomicBool,
}

// SAFETY: the raw handles (context, communicator, events) are used only under the state mutex
// or by the thread that owns the communicator's teardown, with the context made current first.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the device's primary context, retained by the communicator.
        check(unsafe { cu::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    /// Records the failure (the first one wins) and aborts the communicator.
    fn fail(&self, st: &mut State, msg: String) {
        if st.failed.is_none() {
            st.failed = Some(msg);
        }
        if !st.comm.is_null() {
            // SAFETY: comm is live (non-null) and is not used after this.
            unsafe { nc::ncclCommAbort(st.comm) };
            st.comm = std::ptr::null_mut();
        }
    }

    fn check_failed(&self, st: &State) -> Result<()> {
        match &st.failed {
            Some(f) => Err(Error::Backend(format!("rank {}: {f}", self.rank))),
            None => Ok(()),
        }
    }

    /// Waits until a non-blocking NCCL call `r` has taken effect; errors name `what`.
    fn settle(&self, st: &mut State, r: nc::ncclResult_t, what: &str, deadline: Instant) -> Result<()> {
        let mut r = r;
        while in_progress(r) {
            if Instant::now() >= deadline {
                self.fail(st, format!("{what} did not finish within the timeout while NCCL queued it: a rank did not arrive (communicator aborted)"));
                return self.check_failed(st);
            }
            std::thread::yield_now();
            let mut a = nc::ncclResult_t::ncclSuccess;
            // SAFETY: comm is live while the state holds it; out-pointer to a local.
            let q = unsafe { nc::ncclCommGetAsyncError(st.comm, &mut a) };
            r = if is_ok(q) { a } else { q };
        }
        if !is_ok(r) {
            self.fail(st, format!("{what}: {}", nccl_msg(r)));
            return self.check_failed(st);
        }
        Ok(())
    }

    /// One pass of the watchdog: finished collectives release their events; an overdue one or
    /// an asynchronous NCCL error aborts the communicator.
    fn poll(&self) {
        let mut st = self.lock();
        if st.comm.is_null() {
            return;
        }
        let now = Instant::now();
        let mut overdue = None;
        let mut i = 0;
        while i < st.pending.len() {
            // SAFETY: the event is live (owned by this communicator) and the context is current.
            let q = unsafe { cu::cuEventQuery(st.pending[i].event) };
            if q == cu::CUresult::CUDA_ERROR_NOT_READY {
                if now >= st.pending[i].deadline && overdue.is_none() {
                    overdue = Some(st.pending[i].what.clone());
                }
                i += 1;
            } else {
                let p = st.pending.swap_remove(i);
                st.free_events.push(p.event);
            }
        }
        let mut a = nc::ncclResult_t::ncclSuccess;
        // SAFETY: comm is live; out-pointer to a local.
        let q = unsafe { nc::ncclCommGetAsyncError(st.comm, &mut a) };
        if let Some(what) = overdue {
            self.fail(&mut st, format!("{what} did not finish within the timeout: a rank did not arrive or the link failed (NCCL does not say which; communicator aborted)"));
        } else if !is_ok(q) || !(is_ok(a) || in_progress(a)) {
            let r = if is_ok(q) { a } else { q };
            self.fail(&mut st, format!("NCCL reported an asynchronous error: {} (communicator aborted)", nccl_msg(r)));
        }
    }
}

/// One rank of an NCCL communicator, bound to one `CudaBackend`.
pub struct NcclComm {
    shared: Arc<Shared>,
    rank: usize,
    world: usize,
    /// "cuda:N (" : the name prefix of the backend this communicator belongs to.
    backend_prefix: String,
    dev: cu::CUdevice,
    /// The backend's streams, in `Stream::ALL` order.
    streams: [cu::CUstream; 4],
    /// Host collectives' own stream, device buffer and pinned staging buffer (HOST_BUF bytes
    /// each; pinned so that the copies never block the calling thread behind a stuck
    /// collective), used by one host collective at a time.
    host_stream: cu::CUstream,
    buf: u64,
    staging: *mut u8,
    host_lock: Mutex<()>,
    timeout: Duration,
    version: i32,
    watchdog: Option<JoinHandle<()>>,
}

// SAFETY: see Shared; the stream and buffer handles are plain values of the retained context.
unsafe impl Send for NcclComm {}
// SAFETY: every use of the communicator goes through the state mutex.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// A new communicator id (one rank makes it, every rank uses it).
    pub fn unique_id() -> Result<NcclId> {
        nccl_available_err()?;
        let mut id = nc::ncclUniqueId { internal: [0; 128] };
        // SAFETY: out-pointer to a local of the right type; the library is present.
        let r = unsafe { nc::ncclGetUniqueId(&mut id) };
        if !is_ok(r) {
            return Err(Error::Backend(format!("ncclGetUniqueId: {}", nccl_msg(r))));
        }
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    /// Joins communicator `id` as `rank` of `world` on `be`'s device. Blocks until every rank
    /// has joined, at most `timeout` (which also bounds every collective later).
    pub fn new(be: &CudaBackend, id: &NcclId, rank: usize, world: usize, timeout: Duration) -> Result<NcclComm> {
        nccl_available_err()?;
        if world == 0 || rank >= world || world > i32::MAX as usize {
            return Err(Error::Config(format!("NCCL communicator: rank {rank} of {world} ranks")));
        }
        let mut version = 0;
        // SAFETY: out-pointer to a local.
        let r = unsafe { nc::ncclGetVersion(&mut version) };
        if !is_ok(r) {
            return Err(Error::Backend(format!("ncclGetVersion: {}", nccl_msg(r))));
        }
        be.dev.bind()?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: retains the primary context the backend uses, so that this communicator's
        // handles outlive the backend if it is dropped first; released in Drop.
        check(unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, be.dev.dev) }, "cuDevicePrimaryCtxRetain")?;
        let mut host_stream = std::ptr::null_mut();
        let mut buf = 0;
        let mut staging: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: the context is current; out-pointers to locals.
        let made = unsafe {
            check(cu::cuStreamCreate(&mut host_stream, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32), "cuStreamCreate")
                .and_then(|_| check(cu::cuMemAlloc_v2(&mut buf, HOST_BUF), "cuMemAlloc (NCCL host-collective buffer)"))
                .and_then(|_| check(cu::cuMemHostAlloc(&mut staging, HOST_BUF, 0), "cuMemHostAlloc (NCCL host-collective staging)"))
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { comm: std::ptr::null_mut(), failed: None, pending: Vec::new(), free_events: Vec::new() }),
            ctx,
            rank,
            stop: AtomicBool::new(false),
        });
        let mut comm = NcclComm {
            shared,
            rank,
            world,
            backend_prefix: format!("cuda:{} (", be.dev.ordinal),
            dev: be.dev.dev,
            streams: Stream::ALL.map(|s| be.dev.stream(s)),
            host_stream,
            buf,
            staging: staging as *mut u8,
            host_lock: Mutex::new(()),
            timeout,
            version,
            watchdog: None,
        };
        made?;
        comm.init(id)?;
        let sh = comm.shared.clone();
        let watchdog = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || {
                if sh.bind().is_err() {
                    return;
                }
                while !sh.stop.load(Ordering::Acquire) {
                    std::thread::sleep(POLL);
                    sh.poll();
                }
            })
            .map_err(|e| Error::Backend(format!("cannot start the NCCL watchdog thread: {e}")))?;
        comm.watchdog = Some(watchdog);
        Ok(comm)
    }

    fn init(&mut self, id: &NcclId) -> Result<()> {
        // NCCL_CONFIG_INITIALIZER: every field undefined (NCCL's defaults) except non-blocking
        // mode, which lets a missing rank time out instead of hanging
        // SAFETY: an all-zero bit pattern is valid for this plain C struct (ints and pointers).
        let mut cfg: nc::ncclConfig_t = unsafe { std::mem::zeroed() };
        cfg.size = std::mem::size_of::<nc::ncclConfig_t>();
        cfg.magic = 0xcafe_beef;
        // the version of the struct layout we pass: the library's, at most the bindings' 2.30
        cfg.version = self.version.min(23000) as u32;
        let undef = i32::MIN;
        cfg.cgaClusterSize = undef;
        cfg.minCTAs = undef;
        cfg.maxCTAs = undef;
        cfg.splitShare = undef;
        cfg.trafficClass = undef;
        cfg.collnetEnable = undef;
        cfg.CTAPolicy = undef;
        cfg.shrinkShare = undef;
        cfg.nvlsCTAs = undef;
        cfg.nChannelsPerNetPeer = undef;
        cfg.nvlinkCentricSched = undef;
        cfg.graphUsageMode = undef;
        cfg.numRmaCtx = undef;
        cfg.maxP2pPeers = undef;
        cfg.blocking = 0;
        let uid = nc::ncclUniqueId { internal: id.0.map(|b| b as std::ffi::c_char) };
        let what = format!("joining the NCCL communicator as rank {} of {}", self.rank, self.world);
        let deadline = Instant::now() + self.timeout;
        self.shared.bind()?;
        let mut st = self.shared.lock();
        let mut comm = std::ptr::null_mut();
        // SAFETY: out-pointer to a local, a valid config; the device's context is current.
        let r = unsafe { nc::ncclCommInitRankConfig(&mut comm, self.world as i32, uid, self.rank as i32, &mut cfg) };
        if !is_ok(r) && !in_progress(r) {
            return Err(Error::Backend(format!("{what}: {}", nccl_msg(r))));
        }
        st.comm = comm;
        self.shared.settle(&mut st, r, &what, deadline).map_err(|e| {
            Error::Backend(format!("{e}; the other ranks must join with the same id within {:.0} s", self.timeout.as_secs_f64()))
        })
    }

    /// NCCL's version number (e.g. 22703).
    pub fn nccl_version(&self) -> i32 {
        self.version
    }

    fn check_backend(&self, be: &dyn Backend, kind: &str, what: &str) -> Result<()> {
        let name = be.name();
        if !name.starts_with(&self.backend_prefix) {
            return Err(Error::Op(format!(
                "{kind} '{what}': rank {}'s NCCL communicator belongs to the backend {}..), not {name}",
                self.rank, self.backend_prefix
            )));
        }
        Ok(())
    }

    /// Queues a device collective on `stream` (`f` gets the communicator and the stream) and
    /// hands its completion to the watchdog.
    fn device_call(&self, be: &dyn Backend, stream: Stream, kind: &str, what: &str, f: impl FnOnce(nc::ncclComm_t, nc::cudaStream_t) -> nc::ncclResult_t) -> Result<()> {
        self.check_backend(be, kind, what)?;
        self.shared.bind()?;
        let desc = format!("{kind} '{what}'");
        let deadline = Instant::now() + self.timeout;
        let mut st = self.shared.lock();
        self.shared.check_failed(&st)?;
        let s = self.streams[stream.index()];
        let r = f(st.comm, s as nc::cudaStream_t);
        self.shared.settle(&mut st, r, &desc, deadline)?;
        let ev = match st.free_events.pop() {
            Some(e) => e,
            None => {
                let mut e = std::ptr::null_mut();
                // SAFETY: out-pointer to a local; the context is current.
                check(unsafe { cu::cuEventCreate(&mut e, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }, "cuEventCreate")?;
                e
            }
        };
        // SAFETY: ev and s are live handles of this context.
        if let Err(e) = check(unsafe { cu::cuEventRecord(ev, s) }, "cuEventRecord") {
            st.free_events.push(ev);
            return Err(e);
        }
        st.pending.push(Pending { event: ev, deadline, what: desc });
        Ok(())
    }

    /// Runs `f` (queueing NCCL work on the host stream over the buffer) between copying `send`
    /// to the buffer at `send_at` and `recv.len()` bytes back from offset 0, and waits for it.
    fn host_call(&self, what: &str, send: &[u8], send_at: usize, recv: &mut [u8], f: impl FnOnce(nc::ncclComm_t, nc::cudaStream_t) -> nc::ncclResult_t) -> Result<()> {
        assert!(send_at + send.len() <= HOST_BUF && recv.len() <= HOST_BUF, "host collective chunk over the buffer");
        let _one = self.host_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.bind()?;
        let deadline = Instant::now() + self.timeout;
        let mut st = self.shared.lock();
        self.shared.check_failed(&st)?;
        let s = self.host_stream;
        // SAFETY: staging and buf hold HOST_BUF bytes (asserted above); the previous host
        // collective finished with both (each waits for its stream before returning).
        unsafe {
            if !send.is_empty() {
                std::ptr::copy_nonoverlapping(send.as_ptr(), self.staging.add(send_at), send.len());
                check(cu::cuMemcpyHtoDAsync_v2(self.buf + send_at as u64, self.staging.add(send_at) as *const _, send.len(), s), "cuMemcpyHtoDAsync")?;
            }
        }
        let r = f(st.comm, s as nc::cudaStream_t);
        self.shared.settle(&mut st, r, what, deadline)?;
        if !recv.is_empty() {
            // SAFETY: as above; the staging buffer is read only after the stream finished.
            check(unsafe { cu::cuMemcpyDtoHAsync_v2(self.staging as *mut _, self.buf, recv.len(), s) }, "cuMemcpyDtoHAsync")?;
        }
        // wait without the lock, so that the watchdog can abort a device collective this call
        // is queued behind (NCCL runs a communicator's calls in order)
        drop(st);
        loop {
            // SAFETY: s is a live stream of the current context.
            let q = unsafe { cu::cuStreamQuery(s) };
            if q == cu::CUresult::CUDA_SUCCESS {
                self.shared.check_failed(&self.shared.lock())?;
                // SAFETY: the stream finished writing recv.len() <= HOST_BUF staging bytes.
                unsafe { std::ptr::copy_nonoverlapping(self.staging, recv.as_mut_ptr(), recv.len()) };
                return Ok(());
            }
            let mut st = self.shared.lock();
            if st.failed.is_some() {
                break;
            }
            if q != cu::CUresult::CUDA_ERROR_NOT_READY {
                self.shared.fail(&mut st, format!("{what}: {}", error_string(q)));
                break;
            }
            if Instant::now() >= deadline {
                self.shared.fail(&mut st, format!("{what} did not finish within the timeout: a rank did not arrive (NCCL does not say which; communicator aborted)"));
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_micros(50));
        }
        // the aborted communicator's kernels stop; the next host collective (refused while the
        // communicator is failed) or Drop must not find the buffers in use
        // SAFETY: as above.
        unsafe { cu::cuStreamSynchronize(s) };
        self.shared.check_failed(&self.shared.lock())
    }

    /// Every rank's `mine` (the same length on every rank), concatenated in rank order, through
    /// the buffer in chunks.
    fn host_all_gather(&self, what: &str, mine: &[u8]) -> Result<Vec<u8>> {
        let n = mine.len();
        let mut out = vec![0u8; n * self.world];
        // a chunk of every rank (the received part) plus this rank's (sent from the end)
        let chunk = (HOST_BUF / (self.world + 1)) & !15;
        let mut tmp = vec![0u8; chunk * self.world];
        let mut off = 0;
        while off < n || (n == 0 && off == 0) {
            let c = chunk.min(n - off);
            let send_at = chunk * self.world;
            let buf = self.buf;
            self.host_call(what, &mine[off..off + c], send_at, &mut tmp[..c * self.world], |comm, s| {
                // SAFETY: both ranges lie in the buffer (c <= chunk); comm is live.
                unsafe { nc::ncclAllGather((buf + send_at as u64) as *const _, buf as *mut _, c, nc::ncclDataType_t::ncclUint8, comm, s) }
            })?;
            for r in 0..self.world {
                out[r * n + off..r * n + off + c].copy_from_slice(&tmp[r * c..(r + 1) * c]);
            }
            off += c;
            if n == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Every rank's bytes (of lengths `lens`) on `root`, through the buffer in chunks: the other
    /// ranks send their chunk (zero-padded to the longest), root receives all in one NCCL group.
    fn host_gather(&self, what: &str, root: usize, lens: &[usize], mine: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        let (world, me, buf) = (self.world, self.rank, self.buf);
        let most = lens.iter().copied().max().unwrap_or(0);
        let chunk = (HOST_BUF / (world + 1)) & !15;
        let send_at = chunk * world;
        let mut out: Vec<Vec<u8>> = if me == root { lens.iter().map(|&l| Vec::with_capacity(l)).collect() } else { Vec::new() };
        let mut tmp = vec![0u8; if me == root { chunk * world } else { 0 }];
        let mut off = 0;
        while off < most {
            let c = chunk.min(most - off);
            if me == root {
                self.host_call(what, &[], 0, &mut tmp[..c * world], |comm, s| {
                    // SAFETY: world ranges of c <= chunk bytes lie in the buffer; comm is live.
                    unsafe {
                        nc::ncclGroupStart();
                        for r in (0..world).filter(|&r| r != root) {
                            let q = nc::ncclRecv((buf + (r * c) as u64) as *mut _, c, nc::ncclDataType_t::ncclUint8, r as i32, comm, s);
                            if !is_ok(q) && !in_progress(q) {
                                nc::ncclGroupEnd();
                                return q;
                            }
                        }
                        nc::ncclGroupEnd()
                    }
                })?;
                for (r, o) in out.iter_mut().enumerate() {
                    let take = lens[r].saturating_sub(off).min(c);
                    o.extend_from_slice(if r == root { &mine[off..off + take] } else { &tmp[r * c..r * c + take] });
                }
            } else {
                let mut send = vec![0u8; c];
                let have = mine.len().saturating_sub(off).min(c);
                send[..have].copy_from_slice(&mine[off..off + have]);
                self.host_call(what, &send, send_at, &mut [], |comm, s| {
                    // SAFETY: c <= chunk bytes at send_at lie in the buffer; comm is live.
                    unsafe { nc::ncclSend((buf + send_at as u64) as *const _, c, nc::ncclDataType_t::ncclUint8, root as i32, comm, s) }
                })?;
            }
            off += c;
        }
        Ok((me == root).then_some(out))
    }

    /// Every rank's byte count, in rank order.
    fn host_lengths(&self, what: &str, n: usize) -> Result<Vec<usize>> {
        let lens = self.host_all_gather(what, &(n as u64).to_le_bytes())?;
        Ok(lens.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize).collect())
    }

    /// Element-wise reduction of f64 host values over ranks, through the buffer in chunks.
    fn host_reduce_f64(&self, what: &str, vals: &mut [f64], op: nc::ncclRedOp_t) -> Result<()> {
        let per = HOST_BUF / 8;
        for part in vals.chunks_mut(per) {
            let bytes: Vec<u8> = part.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut back = vec![0u8; bytes.len()];
            let (buf, n) = (self.buf, part.len());
            self.host_call(what, &bytes, 0, &mut back, |comm, s| {
                // SAFETY: n f64 values lie in the buffer (in place); comm is live.
                unsafe { nc::ncclAllReduce(buf as *const _, buf as *mut _, n, nc::ncclDataType_t::ncclFloat64, op, comm, s) }
            })?;
            for (v, b) in part.iter_mut().zip(back.chunks_exact(8)) {
                *v = f64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
        }
        Ok(())
    }
}

fn reduce_type(kind: &str, what: &str, t: &Tensor) -> Result<nc::ncclDataType_t> {
    match t.dtype {
        DType::F32 => Ok(nc::ncclDataType_t::ncclFloat32),
        DType::BF16 => Ok(nc::ncclDataType_t::ncclBfloat16),
        d => Err(Error::Op(format!("{kind} '{what}' over {d} values: only f32 and bf16 are reduced"))),
    }
}


fn nccl_op(op: ReduceOp) -> nc::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nc::ncclRedOp_t::ncclSum,
        ReduceOp::Max => nc::ncclRedOp_t::ncclMax,
    }
}

fn ptr(t: &Tensor) -> *mut std::ffi::c_void {
    t.addr as *mut _
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn describe(&self) -> String {
        format!("nccl {}.{}.{} ({} ranks)", self.version / 10000, self.version / 100 % 100, self.version % 100, self.world)
    }

    fn all_reduce(&self, be: &dyn Backend, t: &Tensor, op: ReduceOp, stream: Stream, what: &str) -> Result<()> {
        let kind = format!("all-reduce {op:?}");
        let dt = reduce_type(&kind, what, t)?;
        let (p, n) = (ptr(t), t.numel());
        // SAFETY: t addresses n elements of device-accessible memory; in place is allowed.
        self.device_call(be, stream, &kind, what, |c, s| unsafe { nc::ncclAllReduce(p, p, n, dt, nccl_op(op), c, s) })
    }

    fn reduce_scatter(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, accumulate: bool, stream: Stream, what: &str) -> Result<()> {
        check_shards("reduce-scatter", what, dst, src, self.world)?;
        let dt = reduce_type("reduce-scatter", what, dst)?;
        if accumulate {
            return Err(Error::Op(format!(
                "reduce-scatter '{what}' with accumulate: NCCL has no accumulating reduction; reduce into a separate buffer and add it with an op"
            )));
        }
        let (d, sp, n) = (ptr(dst), ptr(src), dst.numel());
        // SAFETY: src holds world*n and dst n elements (checked); dst may be rank's range of src.
        self.device_call(be, stream, "reduce-scatter", what, |c, s| unsafe { nc::ncclReduceScatter(sp, d, n, dt, nc::ncclRedOp_t::ncclSum, c, s) })
    }

    fn all_gather(&self, be: &dyn Backend, dst: &Tensor, src: &Tensor, stream: Stream, what: &str) -> Result<()> {
        check_shards("all-gather", what, src, dst, self.world)?;
        let (d, sp, n) = (ptr(dst), ptr(src), src.bytes());
        // SAFETY: dst holds world*n bytes, src n (checked); src may be rank's range of dst.
        self.device_call(be, stream, "all-gather", what, |c, s| unsafe { nc::ncclAllGather(sp, d, n, nc::ncclDataType_t::ncclUint8, c, s) })
    }

    fn broadcast(&self, be: &dyn Backend, t: &Tensor, root: usize, stream: Stream, what: &str) -> Result<()> {
        if root >= self.world {
            return Err(Error::Op(format!("broadcast '{what}': root {root} is not a rank of {}", self.world)));
        }
        let (p, n) = (ptr(t), t.bytes());
        // SAFETY: t addresses n bytes; in place.
        self.device_call(be, stream, &format!("broadcast from {root}"), what, |c, s| unsafe {
            nc::ncclBroadcast(p, p, n, nc::ncclDataType_t::ncclUint8, root as i32, c, s)
        })
    }

    fn send(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(Error::Op(format!("send '{what}': peer {peer} is not another rank of {}", self.world)));
        }
        let (p, n) = (ptr(t), t.bytes());
        // SAFETY: t addresses n bytes.
        self.device_call(be, stream, &format!("send to {peer}"), what, |c, s| unsafe { nc::ncclSend(p, n, nc::ncclDataType_t::ncclUint8, peer as i32, c, s) })
    }

    fn recv(&self, be: &dyn Backend, t: &Tensor, peer: usize, stream: Stream, what: &str) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(Error::Op(format!("recv '{what}': peer {peer} is not another rank of {}", self.world)));
        }
        let (p, n) = (ptr(t), t.bytes());
        // SAFETY: t addresses n bytes.
        self.device_call(be, stream, &format!("recv from {peer}"), what, |c, s| unsafe { nc::ncclRecv(p, n, nc::ncclDataType_t::ncclUint8, peer as i32, c, s) })
    }

    fn all_reduce_host(&self, vals: &mut [f64], op: ReduceOp, what: &str) -> Result<()> {
        let desc = format!("host all-reduce {op:?} '{what}' ({} values)", vals.len());
        if vals.is_empty() {
            // a barrier: one byte from every rank
            self.host_all_gather(&desc, &[0])?;
            return Ok(());
        }
        match op {
            ReduceOp::Sum => self.host_reduce_f64(&desc, vals, nc::ncclRedOp_t::ncclSum),
            ReduceOp::Max => {
                // NCCL's max drops NaNs: reduce the values without them and count them apart
                let mut nans: Vec<f64> = vals.iter().map(|v| if v.is_nan() { 1.0 } else { 0.0 }).collect();
                for v in vals.iter_mut().filter(|v| v.is_nan()) {
                    *v = f64::NEG_INFINITY;
                }
                self.host_reduce_f64(&desc, vals, nc::ncclRedOp_t::ncclMax)?;
                self.host_reduce_f64(&desc, &mut nans, nc::ncclRedOp_t::ncclSum)?;
                for (v, n) in vals.iter_mut().zip(nans) {
                    if n > 0.0 {
                        *v = f64::NAN;
                    }
                }
                Ok(())
            }
        }
    }

    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        let desc = format!("gather '{what}'");
        let lens = self.host_lengths(&desc, bytes.len())?;
        let most = lens.iter().copied().max().unwrap_or(0);
        let mut padded = bytes.to_vec();
        padded.resize(most, 0);
        let all = self.host_all_gather(&desc, &padded)?;
        Ok(lens.iter().enumerate().map(|(r, &l)| all[r * most..r * most + l].to_vec()).collect())
    }

    fn gather_bytes(&self, bytes: &[u8], root: usize, what: &str) -> Result<Option<Vec<Vec<u8>>>> {
        if root >= self.world {
            return Err(Error::Op(format!("gather '{what}': root {root} is not a rank of {}", self.world)));
        }
        let desc = format!("gather to {root} '{what}'");
        let lens = self.host_lengths(&desc, bytes.len())?;
        self.host_gather(&desc, root, &lens, bytes)
    }

    fn abort(&self, why: &str) {
        let mut st = self.shared.lock();
        self.shared.fail(&mut st, format!("rank {} failed: {why}", self.rank));
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        // SAFETY: every handle below was created by this communicator in the retained context and
        // is released once; errors are ignored because nothing can be done about them in Drop.
        unsafe {
            cu::cuCtxSetCurrent(self.shared.ctx);
            let deadline = Instant::now() + self.timeout;
            let mut st = self.shared.lock();
            // queued collectives finish (or time out) before the communicator goes
            while !st.comm.is_null() && st.pending.iter().any(|p| cu::cuEventQuery(p.event) == cu::CUresult::CUDA_ERROR_NOT_READY) {
                if Instant::now() >= deadline {
                    self.shared.fail(&mut st, "the communicator was dropped with collectives still running".into());
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if !st.comm.is_null() {
                let r = nc::ncclCommFinalize(st.comm);
                if self.shared.settle(&mut st, r, "ncclCommFinalize", deadline).is_ok() {
                    nc::ncclCommDestroy(st.comm);
                    st.comm = std::ptr::null_mut();
                }
            }
            cu::cuStreamSynchronize(self.host_stream);
            for p in st.pending.drain(..) {
                cu::cuEventSynchronize(p.event);
                cu::cuEventDestroy_v2(p.event);
            }
            for e in st.free_events.drain(..) {
                cu::cuEventDestroy_v2(e);
            }
            cu::cuStreamDestroy_v2(self.host_stream);
            cu::cuMemFree_v2(self.buf);
            if !self.staging.is_null() {
                cu::cuMemFreeHost(self.staging as *mut _);
            }
            cu::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}
