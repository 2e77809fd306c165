//! Checks the stream ordering of everything queued through a backend (`StreamChecked`: the
//! backend observed, `observe`, by `StreamOrder`).
//!
//! Every op's reads and writes (the byte ranges of its tensors) must come after each earlier
//! conflicting access from another stream (read after write, write after read, write after
//! write): ordered through events (`record` on that stream, `wait` on this one) or through a
//! host-blocking call (`upload`, `download`, `synchronize`, which wait for every stream). Same
//! stream accesses are ordered by program order. The bookkeeping is a vector clock per stream:
//! an op on stream s ticks s's own component; `record` snapshots the clock; `wait` takes the
//! element-wise maximum; an earlier access from stream s' at tick t is ordered before the current
//! op on stream s when s's clock has seen s' reach t.
//!
//! The inner backend runs unchanged. Under the CPU backend, which runs everything in call order,
//! this is how CI tests multi-stream orchestration (side-stream weight gradients, gradient
//! zeroing on the copy stream): a missing event is an `Error::Op` naming both ops, not a race
//! that only a GPU would show, and only sometimes.

use crate::backend::{Backend, Event, Stream};
use crate::error::{Error, Result};
use crate::observe::{Call, Observed, Observer};
use std::cell::RefCell;
use std::collections::HashMap;

const STREAMS: usize = Stream::ALL.len();
type Clock = [u64; STREAMS];

fn index(s: Stream) -> usize {
    s.index()
}

/// `into` learns everything `from` has seen (element-wise maximum).
fn merge(into: &mut Clock, from: &Clock) {
    for (m, v) in into.iter_mut().zip(from) {
        *m = (*m).max(*v);
    }
}

/// One op's access to one byte range.
struct Access {
    lo: u64,
    hi: u64,
    write: bool,
    stream: usize,
    tick: u64,
    op: &'static str,
}

#[derive(Default)]
struct State {
    /// clocks[s]: what stream s has seen of every stream (its own component: its op count).
    clocks: [Clock; STREAMS],
    events: HashMap<u32, Clock>,
    /// Accesses not yet known to every stream (older ones cannot conflict any more).
    history: Vec<Access>,
    current: usize,
    ops: u64,
}

/// The observer that checks the ordering (see the module comment).
#[derive(Default)]
pub struct StreamOrder(RefCell<State>);

/// A backend under the stream-order check.
pub type StreamChecked = Observed<StreamOrder>;

impl Observed<StreamOrder> {
    pub fn new(inner: Box<dyn Backend>) -> StreamChecked {
        Observed::wrap(inner, StreamOrder::default())
    }

    /// Ops checked so far.
    pub fn ops_checked(&self) -> u64 {
        self.observer.0.borrow().ops
    }
}

impl StreamOrder {
    /// A host-blocking call: every stream has seen everything.
    fn barrier(&self) {
        let mut st = self.0.borrow_mut();
        let mut all = Clock::default();
        for c in &st.clocks {
            merge(&mut all, c);
        }
        st.clocks = [all; STREAMS];
        st.history.clear();
    }
}

impl Observer for StreamOrder {
    fn name(&self) -> &'static str {
        "stream-checked"
    }

    /// Checks and records one op on its stream.
    fn before(&self, _inner: &dyn Backend, call: &Call) -> Result<()> {
        if call.host_sync {
            self.barrier();
            return Ok(());
        }
        let mut st = self.0.borrow_mut();
        let s = call.stream.map_or(st.current, index);
        st.clocks[s][s] += 1;
        st.ops += 1;
        let (clock, tick) = (st.clocks[s], st.clocks[s][s]);
        let ranges = call.reads.iter().map(|t| (t, false)).chain(call.writes.iter().map(|t| (t, true)));
        let mut new = vec![];
        for (t, write) in ranges {
            let Some(t) = t.filter(|t| t.bytes() > 0) else { continue };
            let (lo, hi) = (t.addr, t.addr + t.bytes() as u64);
            for a in &st.history {
                let conflict = a.stream != s && (write || a.write) && a.lo < hi && lo < a.hi;
                if conflict && clock[a.stream] < a.tick {
                    return Err(Error::Op(format!(
                        "stream order: {} on the {} stream {} bytes [{lo:#x}, {hi:#x}) that {} on the {} stream {} before, with no event or synchronisation between",
                        call.op,
                        Stream::ALL[s].name(),
                        if write { "writes" } else { "reads" },
                        a.op,
                        Stream::ALL[a.stream].name(),
                        if a.write { "wrote" } else { "read" },
                    )));
                }
            }
            new.push(Access { lo, hi, write, stream: s, tick, op: call.op });
        }
        st.history.extend(new);
        Ok(())
    }

    fn record(&self, ev: Event, stream: Stream) {
        let mut st = self.0.borrow_mut();
        let c = st.clocks[index(stream)];
        st.events.insert(ev.0, c);
    }

    fn wait(&self, stream: Stream, ev: Event) {
        let mut st = self.0.borrow_mut();
        if let Some(e) = st.events.get(&ev.0).copied() {
            merge(&mut st.clocks[index(stream)], &e);
        }
    }

    fn set_stream(&self, stream: Stream) {
        self.0.borrow_mut().current = index(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemCategory;
    use crate::cpu::CpuBackend;
    use crate::dtype::DType;
    use crate::tensor::{Mem, Tensor};

    fn setup() -> (StreamChecked, Tensor, Tensor, Tensor, Event) {
        let mut be = StreamChecked::new(Box::new(CpuBackend::new()));
        let t = |be: &mut StreamChecked| be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[4, 4]).unwrap();
        let (a, b, c) = (t(&mut be), t(&mut be), t(&mut be));
        let ev = be.create_event().unwrap();
        (be, a, b, c, ev)
    }

    #[test]
    fn a_write_on_one_stream_needs_an_event_before_another_stream_reads_it() {
        let (be, a, b, c, ev) = setup();
        be.set_stream(Stream::Side).unwrap();
        be.transpose(&b, &a).unwrap(); // side writes b
        be.set_stream(Stream::Compute).unwrap();
        let e = be.transpose(&c, &b).unwrap_err().to_string(); // compute reads b: unordered
        assert!(e.contains("transpose on the compute stream reads") && e.contains("transpose on the side stream wrote"), "{e}");
        // with the event, the same read is fine
        be.record(ev, Stream::Side).unwrap();
        be.wait(Stream::Compute, ev).unwrap();
        be.transpose(&c, &b).unwrap();
        // reads on two streams do not conflict; a write after another stream's read does
        be.set_stream(Stream::Side).unwrap();
        be.transpose(&a, &b).unwrap();
        be.set_stream(Stream::Compute).unwrap();
        be.transpose(&c, &b).unwrap();
        assert!(be.zero(&b, Stream::Compute).is_err(), "write after the side stream's unordered read");
        // a host-blocking call orders everything
        be.synchronize().unwrap();
        be.zero(&b, Stream::Compute).unwrap();
        assert_eq!(be.ops_checked(), 7);
    }

    #[test]
    fn an_event_orders_only_what_was_queued_before_it_was_recorded() {
        let (mut be, a, b, _c, ev) = setup();
        be.zero(&a, Stream::Copy).unwrap();
        be.record(ev, Stream::Copy).unwrap();
        be.zero(&b, Stream::Copy).unwrap(); // after the record
        be.wait(Stream::Compute, ev).unwrap();
        be.transpose(&b.slice(0, &[4]).reshape(&[2, 2]), &a.slice(0, &[4]).reshape(&[2, 2])).unwrap_err();
        // disjoint parts of a tensor do not conflict
        be.transpose(&a.slice(8, &[4]).reshape(&[2, 2]), &a.slice(0, &[4]).reshape(&[2, 2])).unwrap();
        // a copy back to the host reading what the compute stream writes, then a host-to-device
        // copy overwriting its source: each needs its event
        let host = be.alloc(MemCategory::Other, Mem::Host, DType::F32, &[4, 4]).unwrap();
        let ev2 = be.create_event().unwrap();
        be.zero(&a, Stream::Compute).unwrap();
        assert!(be.copy(&host, &a, Stream::CopyBack).is_err(), "copy back of an unordered write");
        be.record(ev2, Stream::Compute).unwrap();
        be.wait(Stream::CopyBack, ev2).unwrap();
        be.copy(&host, &a, Stream::CopyBack).unwrap();
        assert!(be.copy(&a, &b, Stream::Copy).is_err(), "overwrote the copy back's source");
        be.record(ev2, Stream::CopyBack).unwrap();
        be.wait(Stream::Copy, ev2).unwrap();
        be.copy(&a, &b, Stream::Copy).unwrap();
    }
}
