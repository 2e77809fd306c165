//! Naming the missing ranks across processes: three rank processes (this test binary started
//! again, one per rank) rendezvous, keep the roll call open, and run host all-reduces on a
//! collective that cannot say who is missing (a barrier through files, like NCCL across
//! processes). Rank 1 stalls before the fourth; ranks 0 and 2 time out and exit non-zero
//! naming the collective, its block and rank 1 (where it last was); rank 1, arriving late,
//! fails too (once the others are gone, saying that the roll call cannot be reached).

use llmq_core::attendance::AttendedComm;
use llmq_core::{Backend, Comm, Error, ReduceOp, Result, Stream, Tensor};
use llmq_train::rendezvous::{rendezvous_kept, Hello, Launch};
use llmq_train::roll_call::RollCall;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The test's child role (set only by this test for the processes it starts).
const CHILD: &str = "LLMQ_TEST_ROLL_CALL_CHILD";
const WORLD: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(2);

/// Host all-reduces of ranks in separate processes through files in `dir`: rank r writes
/// `<seq>.<r>` and waits for every rank's file of that call; after the timeout it fails without
/// knowing who is missing.
struct FileComm {
    dir: PathBuf,
    rank: usize,
    calls: std::sync::atomic::AtomicU64,
}

fn unused<T>(what: &str) -> Result<T> {
    Err(Error::Op(format!("{what}: not used by this test")))
}

impl Comm for FileComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        WORLD
    }
    fn describe(&self) -> String {
        "files".into()
    }
    fn all_reduce(&self, _: &dyn Backend, _: &Tensor, _: ReduceOp, _: Stream, what: &str) -> Result<()> {
        unused(what)
    }
    fn reduce_scatter(&self, _: &dyn Backend, _: &Tensor, _: &Tensor, _: bool, _: Stream, what: &str) -> Result<()> {
        unused(what)
    }
    fn all_gather(&self, _: &dyn Backend, _: &Tensor, _: &Tensor, _: Stream, what: &str) -> Result<()> {
        unused(what)
    }
    fn broadcast(&self, _: &dyn Backend, _: &Tensor, _: usize, _: Stream, what: &str) -> Result<()> {
        unused(what)
    }
    fn send(&self, _: &dyn Backend, _: &Tensor, _: usize, _: Stream, what: &str) -> Result<()> {
        unused(what)
    }
    fn recv(&self, _: &dyn Backend, _: &Tensor, _: usize, _: Stream, what: &str) -> Result<()> {
        unused(what)
    }
    fn all_reduce_host(&self, vals: &mut [f64], _: ReduceOp, what: &str) -> Result<()> {
        let seq = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let file = |r: usize| self.dir.join(format!("{seq}.{r}"));
        std::fs::write(file(self.rank), vals.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")).unwrap();
        let until = Instant::now() + TIMEOUT;
        while !(0..WORLD).all(|r| file(r).exists()) {
            if Instant::now() > until {
                return Err(Error::Backend(format!("host all-reduce '{what}' did not finish within the timeout (this collective cannot say who is missing)")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
    fn all_gather_bytes(&self, _: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        unused(what)
    }
    fn abort(&self, _: &str) {}
}

/// One rank process: rendezvous, then one host all-reduce per block; rank 1 stalls before
/// block 3.
fn rank_main(rank: usize, port: u16, dir: &Path) -> Result<()> {
    let launch = Launch { rank, world: WORLD, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port };
    let hello = Hello { config_hash: 1, version: "test".into() };
    let payload: &[u8] = b"id";
    let (_, conns) = rendezvous_kept(&launch, &hello, (rank == 0).then_some(payload), Duration::from_secs(20))?;
    let roll = Arc::new(RollCall::of_rendezvous(rank, conns)?);
    let comm = AttendedComm::new(Arc::new(FileComm { dir: dir.to_path_buf(), rank, calls: Default::default() }), roll);
    for block in 0..5 {
        if rank == 1 && block == 3 {
            std::thread::sleep(3 * TIMEOUT);
        }
        comm.all_reduce_host(&mut [1.0], ReduceOp::Sum, &format!("gradients of block {block}"))?;
    }
    Ok(())
}

#[test]
fn child_rank() {
    // a rank process when started by the test below; a no-op otherwise
    let Ok(spec) = std::env::var(CHILD) else { return };
    let parts: Vec<&str> = spec.split(',').collect();
    let (rank, port, dir) = (parts[0].parse().unwrap(), parts[1].parse().unwrap(), Path::new(parts[2]));
    if let Err(e) = rank_main(rank, port, dir) {
        eprintln!("rank {rank} error: {e}");
        std::process::exit(1);
    }
}

#[test]
fn a_timed_out_collective_names_the_rank_that_did_not_arrive_on_every_rank() {
    let dir = std::env::temp_dir().join(format!("llmq_roll_call_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let children: Vec<_> = (0..WORLD)
        .map(|r| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_rank", "--nocapture", "--test-threads", "1"])
                .env(CHILD, format!("{r},{port},{}", dir.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<(bool, String)> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    for (r, (ok, err)) in outs.iter().enumerate() {
        assert!(!ok, "rank {r} should have failed: {err}");
    }
    for r in [0, 2] {
        let e = &outs[r].1;
        assert!(e.contains(&format!("rank {r} error")) && e.contains("'gradients of block 3'"), "rank {r}: {e}");
        assert!(e.contains("rank(s) 1 did not arrive (rank 1 last entered #3 host all-reduce Sum 'gradients of block 2'"), "rank {r}: {e}");
    }
    // rank 1 comes late: the others have gone; it fails too, naming its collective
    let e = &outs[1].1;
    assert!(e.contains("rank 1 error") && e.contains("'gradients of block") && e.contains("the roll call cannot say who is missing"), "{e}");
    assert!(!e.contains("backend error: backend error"), "{e}");
}
