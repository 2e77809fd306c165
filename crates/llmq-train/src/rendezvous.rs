//! One process per GPU under a torchrun-style launcher: the environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and the TCP rendezvous through which rank 0 checks
//! that every rank runs the same configuration and code, and hands out a payload (the NCCL
//! unique id). Multi-node collectives then run on NCCL; this only starts them.
//!
//! Protocol (one connection per rank > 0, to rank 0 at MASTER_ADDR:MASTER_PORT): the rank sends
//! `MAGIC`, then a framed hello (rank, world size, config hash, code version); rank 0 answers
//! every connection with one status byte (0: payload follows, 1: error message follows) and a
//! framed body. Every length a peer sends is checked against a cap before anything is allocated.
//! Rank 0 waits until every rank 1..WORLD_SIZE has arrived or the timeout passes, then answers
//! every connection it holds with the payload or with one message naming everything that is
//! wrong (mismatches, duplicate or out-of-range ranks, ranks that never arrived); every rank
//! returns that error.

use llmq_core::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Start of every hello: identifies llmq's rendezvous and its protocol version, so that a stray
/// connection or an llmq speaking another protocol is told apart from a rank.
const MAGIC: &[u8; 8] = b"LLMQRDV1";
/// Longest code version string a rank may send.
const MAX_VERSION: usize = 256;
/// Longest answer (payload or error message) a rank accepts from rank 0.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Between connection attempts while rank 0 is not listening yet.
const RETRY: Duration = Duration::from_millis(100);
/// How much longer than the timeout a rank waits for rank 0's answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);
/// Longest wait for the hello of a connection that was accepted.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// Where this process sits in a launch of one process per GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Rank on this host: the GPU this process uses.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// What every rank must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Hash of the resolved, validated configuration.
    pub config_hash: u64,
    /// Code version (e.g. the crate version and git revision).
    pub version: String,
}

pub const ENV_VARS: [&str; 5] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"];

impl Launch {
    /// The launch described by the environment; `None` when none of `ENV_VARS` is set.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As `from_env`, reading variables through `get` (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let vals: Vec<Option<String>> = ENV_VARS.iter().map(|k| get(k)).collect();
        if vals.iter().all(|v| v.is_none()) {
            return Ok(None);
        }
        let missing: Vec<&str> = ENV_VARS.iter().zip(&vals).filter(|(_, v)| v.is_none()).map(|(k, _)| *k).collect();
        if !missing.is_empty() {
            let set: Vec<&str> = ENV_VARS.iter().zip(&vals).filter(|(_, v)| v.is_some()).map(|(k, _)| *k).collect();
            return Err(Error::Config(format!(
                "launcher environment partly set: {} set but {} missing (a launch of one process per GPU needs all of {})",
                set.join(", "),
                missing.join(", "),
                ENV_VARS.join(", ")
            )));
        }
        let v = |i: usize| vals[i].as_deref().expect("checked above").trim();
        let num = |i: usize| -> Result<usize> {
            v(i).parse::<usize>().map_err(|_| Error::Config(format!("{}={:?}: expected a non-negative integer", ENV_VARS[i], v(i))))
        };
        let (rank, world, local_rank) = (num(0)?, num(1)?, num(2)?);
        if world == 0 || world > crate::ranks::MAX_RANKS {
            return Err(Error::Config(format!("WORLD_SIZE={world}: expected 1..={}", crate::ranks::MAX_RANKS)));
        }
        if rank >= world {
            return Err(Error::Config(format!("RANK={rank}: expected a rank below WORLD_SIZE={world}")));
        }
        if local_rank >= world {
            return Err(Error::Config(format!("LOCAL_RANK={local_rank}: expected a rank below WORLD_SIZE={world}")));
        }
        let master_addr = v(3).to_string();
        if master_addr.is_empty() {
            return Err(Error::Config("MASTER_ADDR is empty: expected the host name or address of rank 0".into()));
        }
        let master_port = match v(4).parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(Error::Config(format!("MASTER_PORT={:?}: expected a TCP port 1..65535", v(4)))),
        };
        Ok(Some(Launch { rank, world, local_rank, master_addr, master_port }))
    }

    fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

fn net_err(what: &str, e: std::io::Error) -> Error {
    Error::Backend(format!("rendezvous: {what}: {e}"))
}

pub(crate) fn write_frame(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    s.write_all(&(body.len() as u32).to_le_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// A frame of at most `cap` bytes; a longer announced length is refused before allocating.
pub(crate) fn read_frame(s: &mut TcpStream, cap: usize, what: &str) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > cap {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("{what} of {len} bytes announced, at most {cap} accepted")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(body)
}

#[derive(Debug)]
struct Arrival {
    rank: u64,
    world: u64,
    hello: Hello,
    from: SocketAddr,
}

fn encode_hello(rank: usize, world: usize, h: &Hello) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + h.version.len());
    b.extend_from_slice(&(rank as u64).to_le_bytes());
    b.extend_from_slice(&(world as u64).to_le_bytes());
    b.extend_from_slice(&h.config_hash.to_le_bytes());
    b.extend_from_slice(h.version.as_bytes());
    b
}

fn decode_hello(b: &[u8], from: SocketAddr) -> std::result::Result<Arrival, String> {
    if b.len() < 24 {
        return Err(format!("a hello of {} bytes from {from} (at least 24 expected)", b.len()));
    }
    let u = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let version = String::from_utf8(b[24..].to_vec()).map_err(|_| format!("a code version from {from} that is not UTF-8"))?;
    Ok(Arrival { rank: u(0), world: u(1), hello: Hello { config_hash: u(2), version }, from })
}

/// Reads one rank's hello from a fresh connection (bounded in size and time).
fn read_hello(s: &mut TcpStream, from: SocketAddr, deadline: Instant) -> std::result::Result<Arrival, String> {
    // a silent connection holds up the others for at most HELLO_WAIT
    let left = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), HELLO_WAIT);
    s.set_read_timeout(Some(left)).map_err(|e| format!("{from}: {e}"))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(|e| format!("a connection from {from} sent no hello: {e}"))?;
    if &magic != MAGIC {
        return Err(format!("a connection from {from} is not an llmq rank of this protocol version (it sent {magic:?})"));
    }
    let body = read_frame(s, 24 + MAX_VERSION, "hello").map_err(|e| format!("{from}: {e}"))?;
    decode_hello(&body, from)
}

/// Rank 0's verdict over everything that arrived: the problems found, in a stable order.
fn verdict(world: usize, me: &Hello, arrivals: &[Arrival], stray: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: Vec<Option<SocketAddr>> = vec![None; world];
    for a in arrivals {
        if a.world != world as u64 {
            problems.push(format!("rank {} (from {}): WORLD_SIZE {} differs from rank 0's {world}", a.rank, a.from, a.world));
        }
        if a.rank == 0 || a.rank >= world as u64 {
            problems.push(format!("a process from {} claims rank {}, expected one of 1..{}", a.from, a.rank, world - 1));
            continue;
        }
        let r = a.rank as usize;
        if let Some(first) = seen[r] {
            problems.push(format!("rank {r} arrived twice (from {first} and from {})", a.from));
        }
        seen[r] = Some(a.from);
        if a.hello.config_hash != me.config_hash {
            problems.push(format!(
                "rank {r}: config hash {:#018x} differs from rank 0's {:#018x}; differing fields unknown, compare the printed configs",
                a.hello.config_hash, me.config_hash
            ));
        }
        if a.hello.version != me.version {
            problems.push(format!("rank {r}: code version {:?} differs from rank 0's {:?}", a.hello.version, me.version));
        }
    }
    let missing: Vec<String> = (1..world).filter(|&r| seen[r].is_none()).map(|r| r.to_string()).collect();
    if !missing.is_empty() {
        problems.push(format!("rank(s) {} never arrived", missing.join(", ")));
    }
    problems.extend(stray.iter().cloned());
    problems
}

/// Rank 0's side on a bound listener (`rendezvous` binds MASTER_ADDR:MASTER_PORT; tests bind
/// port 0). Returns the payload, or the error every rank is sent.
pub fn serve(listener: TcpListener, launch: &Launch, hello: &Hello, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    serve_kept(listener, launch, hello, payload, timeout).map(|(p, _)| p)
}

/// `serve`, keeping the connection of every rank 1.. (in rank order) open after a successful
/// rendezvous (the roll call, `crate::roll_call`).
pub fn serve_kept(listener: TcpListener, launch: &Launch, hello: &Hello, payload: &[u8], timeout: Duration) -> Result<(Vec<u8>, Vec<TcpStream>)> {
    if launch.rank != 0 {
        return Err(Error::Config(format!("rendezvous: rank {} cannot serve, only rank 0 does", launch.rank)));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::Config(format!("rendezvous: a payload of {} bytes, at most {MAX_PAYLOAD}", payload.len())));
    }
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(|e| net_err("listener", e))?;
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut arrivals: Vec<Arrival> = Vec::new();
    let mut stray: Vec<String> = Vec::new();
    let present = |arr: &[Arrival]| (1..launch.world).all(|r| arr.iter().any(|a| a.rank == r as u64));
    // bounded too: a flood of connections cannot grow these lists without end
    let max_conns = 4 * launch.world + 16;
    while !present(&arrivals) && Instant::now() < deadline && conns.len() + stray.len() < max_conns {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| net_err("connection", e))?;
                match read_hello(&mut s, from, deadline) {
                    Ok(a) => {
                        arrivals.push(a);
                        conns.push(s);
                    }
                    Err(msg) => stray.push(msg),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(net_err(&format!("accepting on {}", launch.master()), e)),
        }
    }
    let problems = verdict(launch.world, hello, &arrivals, &stray);
    let (status, body, result) = if problems.is_empty() {
        (0u8, payload.to_vec(), Ok(payload.to_vec()))
    } else {
        let msg = format!("rendezvous at {} (WORLD_SIZE {}) failed: {}", launch.master(), launch.world, problems.join("; "));
        (1u8, msg.as_bytes().to_vec(), Err(Error::Config(msg)))
    };
    for s in &mut conns {
        // a rank that has gone away cannot be told; the others still are
        let _ = s.write_all(&[status]).and_then(|_| write_frame(s, &body));
    }
    let p = result?;
    // no problems: exactly one arrival per rank 1.., in any order
    let mut ranked: Vec<(u64, TcpStream)> = arrivals.iter().map(|a| a.rank).zip(conns).collect();
    ranked.sort_by_key(|(r, _)| *r);
    Ok((p, ranked.into_iter().map(|(_, s)| s).collect()))
}

/// The rendezvous of all ranks: rank 0 (which passes the payload) listens on
/// MASTER_ADDR:MASTER_PORT and returns the payload once every rank has arrived with the same
/// configuration and code; every other rank (payload `None`) connects, retrying until the
/// timeout, and returns rank 0's payload. A mismatch or a missing rank is an error on every rank.
pub fn rendezvous(launch: &Launch, hello: &Hello, payload_from_rank0: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
    rendezvous_kept(launch, hello, payload_from_rank0, timeout).map(|(p, _)| p)
}

/// `rendezvous`, keeping the connections open: on rank 0 those of ranks 1.. in rank order, on
/// the others the one to rank 0 (the roll call, `crate::roll_call`).
pub fn rendezvous_kept(launch: &Launch, hello: &Hello, payload_from_rank0: Option<&[u8]>, timeout: Duration) -> Result<(Vec<u8>, Vec<TcpStream>)> {
    if hello.version.len() > MAX_VERSION {
        return Err(Error::Config(format!("rendezvous: a code version of {} bytes, at most {MAX_VERSION}", hello.version.len())));
    }
    match (launch.rank, payload_from_rank0) {
        (0, Some(p)) => {
            let l = TcpListener::bind(launch.master()).map_err(|e| net_err(&format!("rank 0 cannot listen on {} (MASTER_ADDR:MASTER_PORT)", launch.master()), e))?;
            serve_kept(l, launch, hello, p, timeout)
        }
        (0, None) => Err(Error::Config("rendezvous: rank 0 hands out the payload and must be given one".into())),
        (r, Some(_)) => Err(Error::Config(format!("rendezvous: rank {r} was given a payload; only rank 0 hands one out"))),
        (_, None) => join(launch, hello, timeout),
    }
}

fn join(launch: &Launch, hello: &Hello, timeout: Duration) -> Result<(Vec<u8>, Vec<TcpStream>)> {
    let start = Instant::now();
    let deadline = start + timeout;
    let master = launch.master();
    let mut last_err = String::from("no address");
    let mut s = loop {
        let addrs: Vec<SocketAddr> = match master.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_err = e.to_string();
                Vec::new()
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(s) = addrs.iter().find_map(|a| match TcpStream::connect_timeout(a, left.clamp(Duration::from_millis(10), Duration::from_secs(5))) {
            Ok(s) => Some(s),
            Err(e) => {
                last_err = e.to_string();
                None
            }
        }) {
            break s;
        }
        if Instant::now() + RETRY >= deadline {
            return Err(Error::Backend(format!(
                "rendezvous: rank {} could not reach rank 0 at {master} (MASTER_ADDR:MASTER_PORT) within {:.0} s: {last_err}",
                launch.rank,
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(RETRY);
    };
    let io = |e: std::io::Error| net_err(&format!("rank {} talking to rank 0 at {master}", launch.rank), e);
    s.write_all(MAGIC).and_then(|_| write_frame(&mut s, &encode_hello(launch.rank, launch.world, hello))).map_err(io)?;
    // rank 0 answers once every rank arrived or its own timeout passed, which started before
    // this rank connected: wait as long again, plus a margin, so that its answer (a missing
    // rank's name) arrives before this rank gives up on its own
    let wait = timeout.max(Duration::from_millis(100)) + ANSWER_MARGIN;
    s.set_read_timeout(Some(wait)).map_err(io)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(|e| {
        Error::Backend(format!("rendezvous: rank {} got no answer from rank 0 at {master} within {:.0} s: {e}", launch.rank, wait.as_secs_f64()))
    })?;
    let body = read_frame(&mut s, MAX_PAYLOAD, "answer from rank 0").map_err(io)?;
    s.set_read_timeout(None).map_err(io)?;
    match status[0] {
        0 => Ok((body, vec![s])),
        1 => Err(Error::Config(String::from_utf8_lossy(&body).into_owned())),
        x => Err(Error::Backend(format!("rendezvous: rank 0 at {master} answered with status {x}, expected 0 or 1"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn launches(world: usize, port: u16) -> Vec<Launch> {
        (0..world).map(|rank| Launch { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }).collect()
    }

    fn hello(hash: u64, version: &str) -> Hello {
        Hello { config_hash: hash, version: version.into() }
    }

    /// Rank 0 serves on a fresh port; `others` are (launch, hello) of the ranks that join.
    /// Returns rank 0's result and the others', in order.
    fn run(world: usize, h0: Hello, others: Vec<(usize, Hello)>, timeout: Duration) -> (Result<Vec<u8>>, Vec<Result<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ls = launches(world, port);
        let l0 = ls[0].clone();
        let server = thread::spawn(move || serve(l, &l0, &h0, b"the nccl id", timeout));
        let joins: Vec<_> = others
            .into_iter()
            .map(|(r, h)| {
                let mut launch = ls[0].clone();
                launch.rank = r;
                thread::spawn(move || rendezvous(&launch, &h, None, timeout))
            })
            .collect();
        let rest = joins.into_iter().map(|j| j.join().unwrap()).collect();
        (server.join().unwrap(), rest)
    }

    fn err(r: &Result<Vec<u8>>) -> String {
        r.as_ref().expect_err("an error").to_string()
    }

    #[test]
    fn every_rank_gets_rank_0s_payload() {
        let h = hello(0xabc, "0.1.0 (abc)");
        let (r0, rest) = run(4, h.clone(), (1..4).map(|r| (r, h.clone())).collect(), Duration::from_secs(20));
        assert_eq!(r0.unwrap(), b"the nccl id");
        for r in rest {
            assert_eq!(r.unwrap(), b"the nccl id");
        }
    }

    #[test]
    fn a_rank_with_another_config_fails_every_rank_naming_both_hashes() {
        let h = hello(0x1111, "v1");
        let (r0, rest) = run(3, h.clone(), vec![(1, h.clone()), (2, hello(0x2222, "v1"))], Duration::from_secs(20));
        let e = err(&r0);
        assert!(e.contains("rank 2: config hash 0x0000000000002222 differs from rank 0's 0x0000000000001111"), "{e}");
        assert!(e.contains("compare the printed configs"), "{e}");
        assert!(!e.contains("rank 1:"), "{e}");
        for r in &rest {
            assert_eq!(err(r), e);
        }
    }

    #[test]
    fn a_rank_with_another_code_version_fails_every_rank() {
        let h = hello(7, "0.1.0 (aaa)");
        let (r0, rest) = run(2, h, vec![(1, hello(7, "0.1.0 (bbb)"))], Duration::from_secs(20));
        let e = err(&r0);
        assert!(e.contains(r#"rank 1: code version "0.1.0 (bbb)" differs from rank 0's "0.1.0 (aaa)""#), "{e}");
        assert_eq!(err(&rest[0]), e);
    }

    #[test]
    fn a_rank_that_never_arrives_is_named_after_the_timeout() {
        let h = hello(7, "v");
        let t = Instant::now();
        let (r0, rest) = run(4, h.clone(), vec![(1, h.clone()), (3, h)], Duration::from_millis(3000));
        assert!(t.elapsed() >= Duration::from_millis(3000));
        let e = err(&r0);
        assert!(e.contains("rank(s) 2 never arrived"), "{e}");
        for r in &rest {
            assert_eq!(err(r), e);
        }
    }

    #[test]
    fn a_duplicate_rank_is_refused() {
        let h = hello(7, "v");
        let (r0, rest) = run(3, h.clone(), vec![(1, h.clone()), (1, h)], Duration::from_millis(3000));
        let e = err(&r0);
        assert!(e.contains("rank 1 arrived twice"), "{e}");
        assert!(e.contains("rank(s) 2 never arrived"), "{e}");
        for r in &rest {
            assert_eq!(err(r), e);
        }
    }

    #[test]
    fn another_world_size_and_an_out_of_range_rank_are_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = hello(7, "v");
        let l0 = launches(3, port)[0].clone();
        let h0 = h.clone();
        let server = thread::spawn(move || serve(l, &l0, &h0, b"id", Duration::from_millis(3000)));
        // rank 1 of a launch with WORLD_SIZE 4, and one claiming rank 5; rank 2 never comes, so
        // rank 0 waits for the timeout and sees both
        let a = launches(4, port)[1].clone();
        let b = Launch { rank: 5, world: 6, ..launches(3, port)[1].clone() };
        let (ha, hb) = (h.clone(), h);
        let ja = thread::spawn(move || rendezvous(&a, &ha, None, Duration::from_millis(3000)));
        let jb = thread::spawn(move || rendezvous(&b, &hb, None, Duration::from_millis(3000)));
        let e = err(&server.join().unwrap());
        assert!(e.contains("WORLD_SIZE 4 differs from rank 0's 3"), "{e}");
        assert!(e.contains("claims rank 5, expected one of 1..2"), "{e}");
        assert!(e.contains("rank(s) 2 never arrived"), "{e}");
        assert_eq!(err(&ja.join().unwrap()), e);
        assert_eq!(err(&jb.join().unwrap()), e);
    }

    #[test]
    fn a_stray_connection_is_not_a_rank() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let l0 = launches(2, port)[0].clone();
        let server = thread::spawn(move || serve(l, &l0, &hello(1, "v"), b"id", Duration::from_millis(3000)));
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let e = err(&server.join().unwrap());
        assert!(e.contains("is not an llmq rank"), "{e}");
        assert!(e.contains("rank(s) 1 never arrived"), "{e}");
    }

    #[test]
    fn an_oversized_answer_is_refused_without_allocating_it() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let fake = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; 8 + 4 + 24 + 1];
            s.read_exact(&mut hello).unwrap();
            s.write_all(&[0]).unwrap();
            s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        });
        let e = err(&rendezvous(&launches(2, port)[1], &hello(1, "v"), None, Duration::from_secs(5)));
        fake.join().unwrap();
        assert!(e.contains("4294967295 bytes announced, at most 1048576"), "{e}");
    }

    #[test]
    fn no_rank_0_is_a_timeout_naming_the_address() {
        // a port that was free a moment ago: nobody listens on it
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = err(&rendezvous(&launches(2, port)[1], &hello(1, "v"), None, Duration::from_millis(300)));
        assert!(e.contains(&format!("rank 1 could not reach rank 0 at 127.0.0.1:{port}")), "{e}");
    }

    #[test]
    fn payload_only_from_rank_0() {
        let ls = launches(2, 1);
        assert!(err(&rendezvous(&ls[0], &hello(1, "v"), None, Duration::from_millis(10))).contains("rank 0 hands out the payload"));
        assert!(err(&rendezvous(&ls[1], &hello(1, "v"), Some(b"x"), Duration::from_millis(10))).contains("rank 1 was given a payload"));
    }

    fn env(pairs: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m: std::collections::HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    const FULL: [(&str, &str); 5] = [("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")];

    fn with(k: &str, v: &str) -> Vec<(&'static str, String)> {
        FULL.iter().map(|(a, b)| (*a, if *a == k { v.to_string() } else { b.to_string() })).collect()
    }

    fn env_err(pairs: Vec<(&'static str, String)>) -> String {
        let p: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env(&p).expect_err("an error").to_string()
    }

    #[test]
    fn the_launcher_environment_is_read_and_checked() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(
            env(&FULL).unwrap(),
            Some(Launch { rank: 1, world: 4, local_rank: 1, master_addr: "node0".into(), master_port: 29500 })
        );
        let e = env(&FULL[..2]).unwrap_err().to_string();
        assert!(e.contains("RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"), "{e}");
        assert!(env_err(with("RANK", "one")).contains(r#"RANK="one": expected a non-negative integer"#));
        assert!(env_err(with("RANK", "-1")).contains(r#"RANK="-1""#));
        assert!(env_err(with("RANK", "4")).contains("RANK=4: expected a rank below WORLD_SIZE=4"));
        assert!(env_err(with("WORLD_SIZE", "0")).contains("WORLD_SIZE=0: expected 1..=4096"));
        assert!(env_err(with("WORLD_SIZE", "4294967297")).contains("WORLD_SIZE=4294967297: expected 1..=4096"));
        assert!(env_err(with("LOCAL_RANK", "9")).contains("LOCAL_RANK=9: expected a rank below WORLD_SIZE=4"));
        assert!(env_err(with("MASTER_PORT", "70000")).contains(r#"MASTER_PORT="70000": expected a TCP port 1..65535"#));
        assert!(env_err(with("MASTER_PORT", "0")).contains(r#"MASTER_PORT="0""#));
        assert!(env_err(with("MASTER_ADDR", " ")).contains("MASTER_ADDR is empty"));
    }
}
