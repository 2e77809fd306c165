//! How the ranks of a data-parallel run start and get their collectives: `--gpus N` (one thread
//! per GPU in this process, or N ranks on the CPU) and one process per GPU under a launcher's
//! environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: torchrun, a cluster
//! scheduler), where rank 0 hands out the NCCL id over `llmq_train::rendezvous` after checking
//! that every rank runs the same configuration and code, and keeps the connections as the roll
//! call (`llmq_train::roll_call`) that names the ranks missing from a collective that times out.
//!
//! Collectives: NCCL on GPUs where libnccl is present (`--collectives auto`, the default, or
//! `nccl`), else the thread collectives through host memory (`host`; the only choice on the CPU
//! and what `auto` falls back to, with a message). `--memcpy-all-gather` / `--memcpy-send-recv`
//! take those calls from the copy-engine collectives (peer copies, no kernels on the SMs) for
//! ranks that are threads of this process, and so does `--all-to-all-reduce` for the all-to-all
//! of its reduce-scatters (on the CPU, the thread collectives move those shards).

use crate::train_args::TrainArgs;
use llmq_core::attendance::{Attendance, AttendedComm};
use llmq_core::comm::RoutedComm;
use llmq_core::{Comm, Error, Result};
use llmq_cuda::{CopyComm, CudaBackend, NcclComm, NcclId};
use llmq_train::rendezvous::{self, Hello, Launch};
use llmq_train::roll_call::RollCall;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// What a rank needs to make its communicator once its backend exists.
#[derive(Clone)]
pub struct RankStart {
    pub rank: usize,
    pub world: usize,
    /// The GPU on this host.
    pub ordinal: usize,
    /// The rank's thread collectives (ranks as threads of this process).
    pub threads: Option<Arc<dyn Comm>>,
    /// The NCCL communicator to join.
    pub nccl: Option<NcclId>,
    pub memcpy_all_gather: bool,
    pub memcpy_send_recv: bool,
    /// `--all-to-all-reduce`: all-to-alls on the copy engines (on CUDA).
    pub all_to_all: bool,
    pub timeout: Duration,
    /// One process per rank: the roll call at rank 0 that names missing ranks on a timeout.
    pub roll: Option<Arc<dyn Attendance>>,
}

impl RankStart {
    /// The rank's communicator on its backend (`None`: the CPU backend).
    pub fn comm(&self, cuda: Option<&CudaBackend>) -> Result<Arc<dyn Comm>> {
        let base: Arc<dyn Comm> = match (&self.nccl, cuda, &self.threads) {
            (Some(id), Some(be), _) => {
                let nccl: Arc<dyn Comm> = Arc::new(NcclComm::new(be, id, self.rank, self.world, self.timeout)?);
                match &self.roll {
                    Some(roll) => Arc::new(AttendedComm::new(nccl, roll.clone())),
                    None => nccl,
                }
            }
            (Some(_), None, _) => return Err(Error::Config("NCCL collectives need the CUDA backend".into())),
            (None, _, Some(t)) => t.clone(),
            (None, _, None) => return Err(Error::Config("a rank without collectives (no thread group, no NCCL id)".into())),
        };
        let a2a_copies = self.all_to_all && cuda.is_some();
        if !(self.memcpy_all_gather || self.memcpy_send_recv || a2a_copies) {
            return Ok(base);
        }
        let be = cuda.ok_or_else(|| Error::Config("--memcpy-all-gather / --memcpy-send-recv are copy-engine collectives between GPUs: they need --device cuda".into()))?;
        let threads = self.threads.clone().ok_or_else(|| {
            Error::Config("--memcpy-all-gather / --memcpy-send-recv / --all-to-all-reduce copy between the GPUs of one process: use --gpus N (not one process per GPU)".into())
        })?;
        let copy: Arc<dyn Comm> = Arc::new(CopyComm::new(threads, be)?);
        Ok(Arc::new(RoutedComm {
            base,
            gathers: self.memcpy_all_gather.then(|| copy.clone()),
            p2p: self.memcpy_send_recv.then(|| copy.clone()),
            a2a: a2a_copies.then_some(copy),
        }))
    }
}

/// The NCCL id for ranks on CUDA, per `--collectives` (None: thread collectives).
fn nccl_id(args: &TrainArgs, device: &str) -> Result<Option<NcclId>> {
    match (args.collectives.as_str(), device) {
        ("host", _) | ("auto", "cpu") => Ok(None),
        ("nccl", "cpu") => Err(Error::Config("--collectives nccl needs --device cuda (CPU ranks use the thread collectives)".into())),
        (c @ ("auto" | "nccl"), _) => match llmq_cuda::nccl_available() {
            Ok(()) => NcclComm::unique_id().map(Some),
            Err(why) if c == "auto" => {
                println!("NCCL unavailable ({why}): collectives go through host memory (slower; --collectives host says so explicitly)");
                Ok(None)
            }
            Err(why) => Err(Error::Config(format!("--collectives nccl: {why}"))),
        },
        (other, _) => Err(Error::Config(format!("--collectives: expected auto, nccl or host, got {other:?}"))),
    }
}

/// `--gpus N` (N > 1): N rank threads of this process.
pub fn run_threads(args: TrainArgs, stop: Arc<AtomicBool>, run_rank: impl Fn(&TrainArgs, Option<RankStart>, Arc<AtomicBool>) -> Result<()> + Sync) -> Result<()> {
    if args.fit_batch {
        return Err(Error::Config("--fit-batch probes one device; with --gpus, give --batch-size (or --auto-memory with --memory-limit)".into()));
    }
    let device = crate::device::resolve(&args.opts.device)?;
    if device == "cuda" && llmq_cuda::device_count() < args.gpus {
        return Err(Error::Config(format!(
            "--gpus {}: only {} GPU(s) are visible (CUDA_VISIBLE_DEVICES={})",
            args.gpus,
            llmq_cuda::device_count(),
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
        )));
    }
    let nccl = nccl_id(&args, device)?;
    let mut args = args;
    args.opts.device = device.to_string();
    let timeout = Duration::from_secs(args.collective_timeout.max(1));
    let world = args.gpus;
    let results = llmq_train::ranks::run_ranks(world, timeout, |threads| {
        let rank = threads.rank();
        let start = RankStart {
            rank,
            world,
            ordinal: rank,
            threads: Some(threads),
            nccl,
            memcpy_all_gather: args.memcpy_all_gather,
            memcpy_send_recv: args.memcpy_send_recv,
            all_to_all: args.all_to_all_reduce,
            timeout,
            roll: None,
        };
        run_rank(&args, Some(start), stop.clone())
    });
    llmq_train::ranks::all_ok(results).map(|_| ())
}

/// This process is rank `l.rank` of a launch of one process per GPU: the rendezvous, then the run.
pub fn run_launched(args: TrainArgs, l: Launch, stop: Arc<AtomicBool>, run_rank: impl Fn(&TrainArgs, Option<RankStart>, Arc<AtomicBool>) -> Result<()>) -> Result<()> {
    if args.gpus > 1 {
        return Err(Error::Config(format!("--gpus {}: under a launcher (RANK/WORLD_SIZE set) each process drives one GPU; leave out --gpus", args.gpus)));
    }
    if args.memcpy_all_gather || args.memcpy_send_recv || args.all_to_all_reduce {
        return Err(Error::Config("the copy-engine collectives copy between the GPUs of one process: use --gpus N instead of one process per GPU".into()));
    }
    if crate::device::resolve(&args.opts.device)? != "cuda" {
        return Err(Error::Config("one process per GPU runs on NCCL and needs CUDA; to simulate ranks on the CPU use --device cpu --gpus N".into()));
    }
    llmq_cuda::nccl_available().map_err(|why| Error::Config(format!("one process per GPU runs on NCCL: {why}")))?;
    let mut args = TrainArgs { gpus: l.world, ..args };
    args.opts.device = "cuda".into();
    let timeout = Duration::from_secs(args.collective_timeout.max(1));
    let hello = Hello { config_hash: config_hash(&args)?, version: code_version() };
    let (payload, conns) = if l.rank == 0 {
        let id = NcclComm::unique_id()?;
        rendezvous::rendezvous_kept(&l, &hello, Some(&id.0), timeout)?
    } else {
        rendezvous::rendezvous_kept(&l, &hello, None, timeout)?
    };
    let roll: Arc<dyn Attendance> = Arc::new(RollCall::of_rendezvous(l.rank, conns)?);
    let start = RankStart {
        rank: l.rank,
        world: l.world,
        ordinal: l.local_rank,
        threads: None,
        nccl: Some(NcclId::from_bytes(&payload)?),
        memcpy_all_gather: false,
        memcpy_send_recv: false,
        all_to_all: false,
        timeout,
        roll: Some(roll),
    };
    run_rank(&args, Some(start), stop)
}

/// A hash of the resolved model and run configuration every rank must share.
fn config_hash(args: &TrainArgs) -> Result<u64> {
    let model = args.opts.resolve_model()?;
    let tc = args.train_config(true)?;
    let text = serde_json::to_string(&(&model.cfg, &tc)).map_err(|e| Error::Op(e.to_string()))?;
    Ok(llmq_io::ckpt::xxh64(text.as_bytes()))
}

/// The crate version and a hash of this executable, so that two builds of one version differ.
fn code_version() -> String {
    let exe = std::env::current_exe().ok().and_then(|p| std::fs::read(p).ok());
    format!("llmq {} ({})", env!("CARGO_PKG_VERSION"), exe.map_or("unknown build".into(), |b| format!("build {:016x}", llmq_io::ckpt::xxh64(&b))))
}
