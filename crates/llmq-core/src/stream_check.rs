//! A backend wrapper that checks the stream ordering of everything queued through it.
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

use crate::backend::{AdamW, AttnShape, Backend, Event, Matmul, MemCategory, Segment, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Mem, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

const STREAMS: usize = 3;
type Clock = [u64; STREAMS];

fn index(s: Stream) -> usize {
    match s {
        Stream::Compute => 0,
        Stream::Copy => 1,
        Stream::Side => 2,
    }
}

const NAMES: [&str; STREAMS] = ["compute", "copy", "side"];

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

pub struct StreamChecked {
    inner: Box<dyn Backend>,
    st: RefCell<State>,
}

impl StreamChecked {
    pub fn new(inner: Box<dyn Backend>) -> StreamChecked {
        StreamChecked { inner, st: RefCell::default() }
    }

    /// Ops checked so far.
    pub fn ops_checked(&self) -> u64 {
        self.st.borrow().ops
    }

    /// Checks and records one op on `stream` (default: the current stream).
    fn access(&self, op: &'static str, stream: Option<Stream>, reads: &[Option<&Tensor>], writes: &[Option<&Tensor>]) -> Result<()> {
        let mut st = self.st.borrow_mut();
        let s = stream.map_or(st.current, index);
        st.clocks[s][s] += 1;
        st.ops += 1;
        let (clock, tick) = (st.clocks[s], st.clocks[s][s]);
        let ranges = reads.iter().map(|t| (t, false)).chain(writes.iter().map(|t| (t, true)));
        let mut new = vec![];
        for (t, write) in ranges {
            let Some(t) = t.filter(|t| t.bytes() > 0) else { continue };
            let (lo, hi) = (t.addr, t.addr + t.bytes() as u64);
            for a in &st.history {
                let conflict = a.stream != s && (write || a.write) && a.lo < hi && lo < a.hi;
                if conflict && clock[a.stream] < a.tick {
                    return Err(Error::Op(format!(
                        "stream order: {op} on the {} stream {} bytes [{lo:#x}, {hi:#x}) that {} on the {} stream {} before, with no event or synchronisation between",
                        NAMES[s],
                        if write { "writes" } else { "reads" },
                        a.op,
                        NAMES[a.stream],
                        if a.write { "wrote" } else { "read" },
                    )));
                }
            }
            new.push(Access { lo, hi, write, stream: s, tick, op });
        }
        st.history.extend(new);
        Ok(())
    }

    /// A host-blocking call: every stream has seen everything.
    fn barrier(&self) {
        let mut st = self.st.borrow_mut();
        let mut all = Clock::default();
        for c in &st.clocks {
            for (m, v) in all.iter_mut().zip(c) {
                *m = (*m).max(*v);
            }
        }
        st.clocks = [all; STREAMS];
        st.history.clear();
    }
}

impl Backend for StreamChecked {
    fn name(&self) -> String {
        format!("{} (stream-checked)", self.inner.name())
    }
    fn alloc(&mut self, cat: MemCategory, mem: Mem, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        self.inner.alloc(cat, mem, dtype, dims)
    }
    fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)> {
        self.inner.memory_by_category()
    }
    fn free_memory(&self) -> Option<usize> {
        self.inner.free_memory()
    }
    fn upload(&self, dst: &Tensor, bytes: &[u8]) -> Result<()> {
        self.barrier();
        self.inner.upload(dst, bytes)
    }
    fn download(&self, src: &Tensor) -> Result<Vec<u8>> {
        self.barrier();
        self.inner.download(src)
    }
    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()> {
        self.access("copy", Some(stream), &[Some(src)], &[Some(dst)])?;
        self.inner.copy(dst, src, stream)
    }
    fn zero(&self, t: &Tensor, stream: Stream) -> Result<()> {
        self.access("zero", Some(stream), &[], &[Some(t)])?;
        self.inner.zero(t, stream)
    }
    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.access("convert", None, &[Some(src)], &[Some(dst)])?;
        self.inner.convert(dst, src)
    }
    fn create_event(&mut self) -> Result<Event> {
        self.inner.create_event()
    }
    fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        let mut st = self.st.borrow_mut();
        let c = st.clocks[index(stream)];
        st.events.insert(ev.0, c);
        drop(st);
        self.inner.record(ev, stream)
    }
    fn wait(&self, stream: Stream, ev: Event) -> Result<()> {
        let mut st = self.st.borrow_mut();
        if let Some(e) = st.events.get(&ev.0).copied() {
            let c = &mut st.clocks[index(stream)];
            for (m, v) in c.iter_mut().zip(e) {
                *m = (*m).max(v);
            }
        }
        drop(st);
        self.inner.wait(stream, ev)
    }
    fn synchronize(&self) -> Result<()> {
        self.barrier();
        self.inner.synchronize()
    }
    fn set_stream(&self, stream: Stream) -> Result<()> {
        self.inner.set_stream(stream)?;
        self.st.borrow_mut().current = index(stream);
        Ok(())
    }
    fn matmul(&self, a: &Matmul) -> Result<()> {
        let out_read = a.accumulate.then_some(a.out);
        self.access("matmul", None, &[Some(a.a), Some(a.b), a.bias, a.descale_a, a.descale_b, out_read], &[Some(a.out)])?;
        self.inner.matmul(a)
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        self.access("embedding_fwd", None, &[Some(ids), Some(table)], &[Some(out)])?;
        self.inner.embedding_fwd(out, ids, table)
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        self.access("embedding_bwd", None, &[Some(ids), Some(dout)], &[Some(dtable)])?;
        self.inner.embedding_bwd(dtable, ids, dout)
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        self.access("rmsnorm_fwd", None, &[Some(x), Some(w)], &[Some(out), Some(rstd), am])?;
        self.inner.rmsnorm_fwd(out, rstd, x, w, eps, am)
    }
    fn residual_rmsnorm_fwd(&self, r: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, d: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        self.access("residual_rmsnorm_fwd", None, &[Some(x), Some(d), Some(w)], &[Some(r), Some(out), Some(rstd), am])?;
        self.inner.residual_rmsnorm_fwd(r, out, rstd, x, d, w, eps, am)
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        self.access("rmsnorm_bwd", None, &[Some(dout), Some(x), Some(w), Some(rstd), dres], &[Some(dx), Some(dw), am])?;
        self.inner.rmsnorm_bwd(dx, dw, dout, x, w, rstd, dres, am)
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, s: AttnShape, eps: f32) -> Result<()> {
        self.access("qk_norm_fwd", None, &[Some(qkv), Some(qw), Some(kw)], &[Some(out), Some(rstd)])?;
        self.inner.qk_norm_fwd(out, rstd, qkv, qw, kw, s, eps)
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, s: AttnShape) -> Result<()> {
        self.access("qk_norm_bwd", None, &[Some(dout), Some(qkv), Some(qw), Some(kw), Some(rstd)], &[Some(dqkv), Some(dqw), Some(dkw)])?;
        self.inner.qk_norm_bwd(dqkv, dqw, dkw, dout, qkv, qw, kw, rstd, s)
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, s: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        self.access("rope_fwd", None, &[Some(qkv), Some(freqs), bias], &[Some(out)])?;
        self.inner.rope_fwd(out, qkv, freqs, s, bias)
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        self.access("rope_bwd", None, &[Some(dout), Some(freqs)], &[Some(dqkv), am])?;
        self.inner.rope_bwd(dqkv, dout, freqs, s, am)
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        self.access("attention_fwd", None, &[Some(qkv)], &[Some(out), Some(lse), am])?;
        self.inner.attention_fwd(out, lse, qkv, s, am)
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, s: AttnShape, rope: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        self.access("attention_bwd", None, &[Some(dout), Some(qkv), Some(out), Some(lse), rope], &[Some(dqkv), am])?;
        self.inner.attention_bwd(dqkv, dout, qkv, out, lse, s, rope, am)
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        self.access("swiglu_fwd", None, &[Some(inp)], &[Some(out), am])?;
        self.inner.swiglu_fwd(out, inp, am)
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        self.access("swiglu_bwd", None, &[Some(dout), Some(inp)], &[Some(dinp), am])?;
        self.inner.swiglu_bwd(dinp, dout, inp, am)
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32) -> Result<()> {
        self.access("cross_entropy", None, &[Some(targets)], &[Some(logits), Some(losses)])?;
        self.inner.cross_entropy(logits, losses, targets, dloss)
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        self.access("colsum", None, &[Some(inp)], &[Some(out)])?;
        self.inner.colsum(out, inp, accumulate)
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.access("absmax", None, &[Some(inp)], &[Some(out)])?;
        self.inner.absmax(out, inp)
    }
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        self.access("quantize", None, &[Some(inp), Some(absmax)], &[Some(out), Some(descale)])?;
        self.inner.quantize(out, descale, inp, absmax, transpose)
    }
    fn quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<()> {
        self.access("quantize_pair", None, &[Some(inp), Some(absmax)], &[Some(out), Some(out_t), Some(descale)])?;
        self.inner.quantize_pair(out, out_t, descale, inp, absmax)
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.access("transpose", None, &[Some(inp)], &[Some(out)])?;
        self.inner.transpose(out, inp)
    }
    fn adamw(&self, a: &AdamW, segments: &[Segment]) -> Result<()> {
        self.access("adamw", None, &[Some(a.grads)], &[Some(a.params), Some(a.master), Some(a.m), Some(a.v), a.absmax])?;
        self.inner.adamw(a, segments)
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        self.access("sum_squares", None, &[Some(t)], &[Some(out)])?;
        self.inner.sum_squares(out, slot, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

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
        let (be, a, b, _c, ev) = setup();
        be.zero(&a, Stream::Copy).unwrap();
        be.record(ev, Stream::Copy).unwrap();
        be.zero(&b, Stream::Copy).unwrap(); // after the record
        be.wait(Stream::Compute, ev).unwrap();
        be.transpose(&b.slice(0, &[4]).reshape(&[2, 2]), &a.slice(0, &[4]).reshape(&[2, 2])).unwrap_err();
        // disjoint parts of a tensor do not conflict
        be.transpose(&a.slice(8, &[4]).reshape(&[2, 2]), &a.slice(0, &[4]).reshape(&[2, 2])).unwrap();
    }
}
