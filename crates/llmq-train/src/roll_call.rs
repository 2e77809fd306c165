//! The roll call of a launch of one process per rank: after the rendezvous
//! (`crate::rendezvous::rendezvous_kept`) every rank keeps its connection to rank 0 and reports
//! each collective it enters; rank 0 keeps the table (a thread per connection) and answers
//! which ranks have not entered a given collective, so that a collective that times out on NCCL
//! (which cannot say who is missing) names them (`llmq_core::attendance`).
//!
//! Frames (`rendezvous`'s length-prefixed format) from rank r to rank 0: `ENTER` + seq (u64) +
//! signature (at most `MAX_NAME` bytes; no answer) or `ASK` + seq, answered with one frame of
//! text. A rank whose connection closed is reported as gone, with where it last was.

use crate::rendezvous::{read_frame, write_frame};
use llmq_core::attendance::Attendance;
use llmq_core::{Error, Result};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ENTER: u8 = 1;
const ASK: u8 = 2;
/// Longest signature sent (longer ones are cut).
const MAX_NAME: usize = 512;
/// Longest answer accepted from rank 0.
const MAX_ANSWER: usize = 1 << 16;
/// How long a rank waits for rank 0's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Longest rank 0 waits, after its own timeout, for the others to ask.
const LINGER: Duration = Duration::from_secs(10);

/// Where one rank last was.
#[derive(Clone, Debug, Default)]
struct Seen {
    seq: u64,
    what: String,
    gone: bool,
    /// The latest collective the rank asked about.
    asked: u64,
}

/// Rank 0's table, or another rank's connection to it.
pub struct RollCall(Side);

enum Side {
    Rank0 { seen: Arc<Mutex<Vec<Seen>>> },
    Rank { rank: usize, conn: Mutex<TcpStream> },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The answer to "who has not entered collective `seq`" from the table. A rank whose connection
/// closed cannot finish it either and is named wherever it was, unless it had asked about `seq`
/// itself (it timed out waiting too, and ended).
fn absent_from(seen: &[Seen], seq: u64) -> String {
    let behind: Vec<(usize, &Seen)> = seen.iter().enumerate().filter(|(_, s)| s.seq < seq || (s.gone && s.asked < seq)).collect();
    if behind.is_empty() {
        return String::new();
    }
    let names: Vec<String> = behind.iter().map(|(r, _)| r.to_string()).collect();
    let wheres: Vec<String> = behind
        .iter()
        .map(|(r, s)| {
            let at = if s.seq == 0 { "had entered no collective".to_string() } else { format!("last entered #{} {}", s.seq, s.what) };
            format!("rank {r} {at}{}", if s.gone { ", then its connection closed" } else { "" })
        })
        .collect();
    format!("rank(s) {} did not arrive ({})", names.join(", "), wheres.join("; "))
}

impl RollCall {
    /// Rank 0 over the kept connections of ranks 1.. (in rank order): one thread per
    /// connection keeps the table until the connection closes.
    pub fn serve(conns: Vec<TcpStream>) -> RollCall {
        let seen = Arc::new(Mutex::new(vec![Seen::default(); conns.len() + 1]));
        for (i, mut c) in conns.into_iter().enumerate() {
            let (r, seen) = (i + 1, seen.clone());
            let _ = c.set_nodelay(true);
            std::thread::Builder::new()
                .name(format!("roll call of rank {r}"))
                .spawn(move || {
                    // ends when the rank closes the connection or sends garbage
                    while let Ok(f) = read_frame(&mut c, 9 + MAX_NAME, "roll call") {
                        if f.len() < 9 {
                            break;
                        }
                        let seq = u64::from_le_bytes(f[1..9].try_into().expect("8 bytes"));
                        match f[0] {
                            ENTER => {
                                let mut t = lock(&seen);
                                (t[r].seq, t[r].what) = (seq, String::from_utf8_lossy(&f[9..]).into_owned());
                            }
                            ASK => {
                                let answer = {
                                    let mut t = lock(&seen);
                                    t[r].asked = seq;
                                    absent_from(&t, seq)
                                };
                                if write_frame(&mut c, answer.as_bytes()).is_err() {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                    lock(&seen)[r].gone = true;
                })
                .expect("spawning a roll call thread");
        }
        RollCall(Side::Rank0 { seen })
    }

    /// Rank `rank` (> 0) over its kept connection to rank 0.
    pub fn join(rank: usize, conn: TcpStream) -> RollCall {
        let _ = conn.set_nodelay(true);
        RollCall(Side::Rank { rank, conn: Mutex::new(conn) })
    }

    /// Rank 0's or the given connections' roll call, from `rendezvous_kept`'s result.
    pub fn of_rendezvous(rank: usize, conns: Vec<TcpStream>) -> Result<RollCall> {
        match (rank, conns.len()) {
            (0, _) => Ok(RollCall::serve(conns)),
            (r, 1) => Ok(RollCall::join(r, conns.into_iter().next().expect("one connection"))),
            (r, n) => Err(Error::Backend(format!("roll call: rank {r} has {n} connections to rank 0, expected 1"))),
        }
    }
}

fn frame(kind: u8, seq: u64, what: &str) -> Vec<u8> {
    let mut cut = what.len().min(MAX_NAME);
    while !what.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut b = vec![kind];
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&what.as_bytes()[..cut]);
    b
}

impl Attendance for RollCall {
    fn enter(&self, seq: u64, what: &str) {
        match &self.0 {
            Side::Rank0 { seen } => {
                let mut t = lock(seen);
                (t[0].seq, t[0].what) = (seq, what.to_string());
            }
            // a lost connection shows when a timeout asks; the collectives go on without it
            Side::Rank { conn, .. } => {
                let _ = write_frame(&mut lock(conn), &frame(ENTER, seq, what));
            }
        }
    }

    fn absent(&self, seq: u64) -> Result<String> {
        match &self.0 {
            Side::Rank0 { seen } => Ok(absent_from(&lock(seen), seq)),
            Side::Rank { rank, conn } => {
                let mut c = lock(conn);
                let io = |e: std::io::Error| Error::Backend(format!("rank {rank} asking rank 0: {e}"));
                c.set_read_timeout(Some(ANSWER_WAIT)).map_err(io)?;
                write_frame(&mut c, &frame(ASK, seq, "")).map_err(io)?;
                let answer = read_frame(&mut c, MAX_ANSWER, "roll call answer").map_err(io)?;
                Ok(String::from_utf8_lossy(&answer).into_owned())
            }
        }
    }

    /// Rank 0 stays (at most `LINGER`) until every rank that entered `seq` too has asked about
    /// it or gone, so that its answer reaches them before this process ends.
    fn linger(&self, seq: u64) {
        let Side::Rank0 { seen } = &self.0 else { return };
        let until = std::time::Instant::now() + LINGER;
        while std::time::Instant::now() < until {
            if lock(seen).iter().skip(1).all(|s| s.gone || s.asked >= seq || s.seq < seq) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_every_rank_behind_and_where_it_was() {
        let seen = vec![
            Seen { seq: 7, what: "all-reduce 'loss'".into(), ..Seen::default() },
            Seen { seq: 5, what: "reduce-scatter 'gradients of block 3' (fp32 x 4096)".into(), ..Seen::default() },
            Seen { gone: true, ..Seen::default() },
            Seen { seq: 9, what: "x".into(), ..Seen::default() },
            Seen { seq: 9, what: "y".into(), gone: true, ..Seen::default() },
            // timed out at #9 too, asked, and ended: not a missing rank
            Seen { seq: 9, what: "y".into(), gone: true, asked: 9 },
        ];
        assert_eq!(
            absent_from(&seen, 5),
            "rank(s) 2, 4 did not arrive (rank 2 had entered no collective, then its connection closed; rank 4 last entered #9 y, then its connection closed)"
        );
        let a = absent_from(&seen, 7);
        assert!(a.starts_with("rank(s) 1, 2, 4 did not arrive (rank 1 last entered #5 reduce-scatter 'gradients of block 3'"), "{a}");
        assert_eq!(absent_from(&seen[..2], 0), "");
        // a long signature is cut at a character boundary
        let f = frame(ENTER, 3, &"é".repeat(MAX_NAME));
        assert!(f.len() <= 9 + MAX_NAME && std::str::from_utf8(&f[9..]).is_ok());
    }
}
