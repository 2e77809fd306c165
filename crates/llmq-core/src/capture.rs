//! Graph capture (`Backend::capture`): a sequence of ops issued once and replayed afterwards
//! without the host issuing them again (CUDA graphs on the GPU).
//!
//! A replay repeats the ops with the operands and host scalars they were issued with. Whatever
//! changes between replays must therefore live in device memory (tensors written before the
//! replay), and the host code inside a capture must issue the same ops every time. To make a
//! host value baked into a capture show up in CI, backends without device graphs (the CPU
//! reference, the observing wrapper) record each op with its operands as a closure the first time
//! (`Recorder`) and replay the closures afterwards, never calling the capture's code again.
//!
//! `Recorder` also enforces what a CUDA stream capture allows, so that a violation fails here on
//! the CPU with a message rather than on the GPU with a capture error:
//! - no host synchronisation (upload, download, stream reads and writes, synchronize) and no
//!   allocation or event creation inside a capture;
//! - the capture starts and ends on the compute stream; another stream joins it by waiting for
//!   an event recorded inside the capture, and must be joined back (the compute stream waits for
//!   an event recorded after its last op) before the capture ends;
//! - no op on a stream that has not joined (CUDA would run it at once, outside the graph), and
//!   no wait for an event recorded outside the capture.

use crate::backend::{AdamW, AttnShape, Backend, Event, Matmul, MemCategory, Segment, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Mem, Tensor};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Names one captured sequence: a pass (e.g. "forward") and an index (e.g. the block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    pub pass: &'static str,
    pub index: usize,
}

impl GraphKey {
    pub fn new(pass: &'static str, index: usize) -> GraphKey {
        GraphKey { pass, index }
    }
}

impl std::fmt::Display for GraphKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.pass, self.index)
    }
}

/// The code of a capture: issues its ops on the backend it is given.
pub type CaptureFn<'a> = dyn FnMut(&dyn Backend) -> Result<()> + 'a;

type Op = Box<dyn Fn(&dyn Backend) -> Result<()> + Send + Sync>;

/// Recorded captures of a backend without device graphs, replayed op by op.
#[derive(Default)]
pub struct Recordings {
    map: Mutex<HashMap<GraphKey, Arc<Vec<Op>>>>,
}

impl Recordings {
    /// The first call for `key` runs `f` on a `Recorder` around `target` (the ops run and are
    /// recorded); later calls replay the record on `target`.
    pub fn capture(&self, target: &dyn Backend, key: GraphKey, f: &mut CaptureFn) -> Result<()> {
        let known = self.map.lock().map_err(|_| Error::Backend("graph recordings: lock poisoned".into()))?.get(&key).cloned();
        match known {
            Some(ops) => ops.iter().try_for_each(|op| op(target)),
            None => {
                let ops = Recorder::run(target, key, f)?;
                self.map.lock().map_err(|_| Error::Backend("graph recordings: lock poisoned".into()))?.insert(key, Arc::new(ops));
                Ok(())
            }
        }
    }

    /// Keys recorded so far.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A backend that forwards every op to `target` and records it (see the module documentation
/// for the rules it checks).
pub struct Recorder<'t> {
    target: &'t dyn Backend,
    key: GraphKey,
    ops: RefCell<Vec<Op>>,
    current: Cell<Stream>,
    /// Streams that joined the capture.
    joined: Cell<[bool; 4]>,
    /// Per stream: ops issued so far (the count at its last op), and how many of them the
    /// compute stream has waited for.
    issued: Cell<[usize; 4]>,
    waited: Cell<[usize; 4]>,
    /// Events recorded inside the capture: (stream, ops issued on it at the record).
    events: RefCell<HashMap<u32, (Stream, usize)>>,
}

impl<'t> Recorder<'t> {
    /// Runs `f` on a recorder around `target`, checks that every stream was joined back, and
    /// returns the record.
    pub fn run(target: &'t dyn Backend, key: GraphKey, f: &mut CaptureFn) -> Result<Vec<Op>> {
        let r = Recorder {
            target,
            key,
            ops: RefCell::new(Vec::new()),
            current: Cell::new(Stream::Compute),
            joined: Cell::new([true, false, false, false]),
            issued: Cell::new([0; 4]),
            waited: Cell::new([0; 4]),
            events: RefCell::new(HashMap::new()),
        };
        f(&r)?;
        if r.current.get() != Stream::Compute {
            return r.err(format!("the capture ends on the {} stream; it must end on the compute stream", r.current.get().name()));
        }
        let (issued, waited) = (r.issued.get(), r.waited.get());
        for s in Stream::ALL.into_iter().skip(1) {
            if issued[s.index()] > waited[s.index()] {
                return r.err(format!(
                    "work on the {} stream is not joined back: the compute stream must wait for an event recorded on it after its last op before the capture ends",
                    s.name()
                ));
            }
        }
        Ok(r.ops.into_inner())
    }

    fn err<T>(&self, msg: String) -> Result<T> {
        Err(Error::Op(format!("graph capture {}: {msg}", self.key)))
    }

    fn refuse<T>(&self, what: &str) -> Result<T> {
        self.err(format!("{what} inside a capture (a replay would not repeat it)"))
    }

    /// Checks that `stream` may take work, counts the op, runs it on the target and records it.
    fn op(&self, stream: Option<Stream>, op: impl Fn(&dyn Backend) -> Result<()> + Send + Sync + 'static) -> Result<()> {
        let s = stream.unwrap_or(self.current.get());
        if !self.joined.get()[s.index()] {
            return self.err(format!(
                "an op on the {} stream, which has not joined the capture (it must first wait for an event recorded inside the capture)",
                s.name()
            ));
        }
        op(self.target)?;
        let mut issued = self.issued.get();
        issued[s.index()] += 1;
        self.issued.set(issued);
        self.ops.borrow_mut().push(Box::new(op));
        Ok(())
    }
}

/// Owned operands of a `Matmul` (a record outlives the borrowed ones).
#[derive(Clone, Copy)]
struct MatmulArgs {
    out: Tensor,
    a: Tensor,
    trans_a: bool,
    b: Tensor,
    trans_b: bool,
    bias: Option<Tensor>,
    accumulate: bool,
    descale_a: Option<Tensor>,
    descale_b: Option<Tensor>,
    side_algo: bool,
    fast_accumulation: bool,
}

impl MatmulArgs {
    fn of(m: &Matmul) -> MatmulArgs {
        MatmulArgs {
            out: *m.out,
            a: *m.a,
            trans_a: m.trans_a,
            b: *m.b,
            trans_b: m.trans_b,
            bias: m.bias.copied(),
            accumulate: m.accumulate,
            descale_a: m.descale_a.copied(),
            descale_b: m.descale_b.copied(),
            side_algo: m.side_algo,
            fast_accumulation: m.fast_accumulation,
        }
    }
    fn issue(&self, be: &dyn Backend) -> Result<()> {
        be.matmul(&Matmul {
            out: &self.out,
            a: &self.a,
            trans_a: self.trans_a,
            b: &self.b,
            trans_b: self.trans_b,
            bias: self.bias.as_ref(),
            accumulate: self.accumulate,
            descale_a: self.descale_a.as_ref(),
            descale_b: self.descale_b.as_ref(),
            side_algo: self.side_algo,
            fast_accumulation: self.fast_accumulation,
        })
    }
}

/// Owned operands of an `AdamW` update.
#[derive(Clone, Copy)]
struct AdamArgs {
    params: Tensor,
    master: Tensor,
    grads: Tensor,
    m: Tensor,
    v: Tensor,
    scalars: Tensor,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    absmax: Option<Tensor>,
}

impl AdamArgs {
    fn of(a: &AdamW) -> AdamArgs {
        AdamArgs {
            params: *a.params,
            master: *a.master,
            grads: *a.grads,
            m: *a.m,
            v: *a.v,
            scalars: *a.scalars,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            absmax: a.absmax.copied(),
        }
    }
    fn issue(&self, be: &dyn Backend, segments: &[Segment]) -> Result<()> {
        be.adamw(
            &AdamW {
                params: &self.params,
                master: &self.master,
                grads: &self.grads,
                m: &self.m,
                v: &self.v,
                scalars: &self.scalars,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
                absmax: self.absmax.as_ref(),
            },
            segments,
        )
    }
}

fn opt(t: Option<&Tensor>) -> Option<Tensor> {
    t.copied()
}

impl Backend for Recorder<'_> {
    fn name(&self) -> String {
        format!("{} (capturing {})", self.target.name(), self.key)
    }
    fn alloc(&mut self, _: MemCategory, _: Mem, _: DType, _: &[usize]) -> Result<Tensor> {
        self.refuse("an allocation")
    }
    fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)> {
        self.target.memory_by_category()
    }
    fn free_memory(&self) -> Option<usize> {
        self.target.free_memory()
    }
    /// Not reachable through the `&dyn Backend` a capture hands out; a recorder has no memory.
    fn limit_device_memory(&mut self, _: usize) {}
    fn upload(&self, _: &Tensor, _: &[u8]) -> Result<()> {
        self.refuse("a synchronous upload")
    }
    fn download(&self, _: &Tensor) -> Result<Vec<u8>> {
        self.refuse("a download")
    }
    fn stream_read(&self, _: &Tensor, _: Stream) -> Result<Vec<u8>> {
        self.refuse("a read to the host")
    }
    fn stream_write(&self, _: &Tensor, _: &[u8], _: Stream) -> Result<()> {
        self.refuse("a write from the host")
    }
    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()> {
        let (d, s) = (*dst, *src);
        self.op(Some(stream), move |b| b.copy(&d, &s, stream))
    }
    fn zero(&self, t: &Tensor, stream: Stream) -> Result<()> {
        let t = *t;
        self.op(Some(stream), move |b| b.zero(&t, stream))
    }
    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        let (d, s) = (*dst, *src);
        self.op(None, move |b| b.convert(&d, &s))
    }
    fn reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, stream: Stream) -> Result<()> {
        let (d, s) = (*dst, *staged);
        self.op(Some(stream), move |b| b.reduce_shards(&d, &s, accumulate, stream))
    }
    fn create_event(&mut self) -> Result<Event> {
        self.refuse("creating an event")
    }
    fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        if !self.joined.get()[stream.index()] {
            return self.err(format!("an event recorded on the {} stream, which has not joined the capture", stream.name()));
        }
        self.target.record(ev, stream)?;
        self.events.borrow_mut().insert(ev.0, (stream, self.issued.get()[stream.index()]));
        self.ops.borrow_mut().push(Box::new(move |b| b.record(ev, stream)));
        Ok(())
    }
    fn wait(&self, stream: Stream, ev: Event) -> Result<()> {
        let Some((from, count)) = self.events.borrow().get(&ev.0).copied() else {
            return self.err(format!("the {} stream waits for event {} recorded outside the capture", stream.name(), ev.0));
        };
        self.target.wait(stream, ev)?;
        let mut joined = self.joined.get();
        joined[stream.index()] = true;
        self.joined.set(joined);
        if stream != Stream::Compute {
            // a forked stream must be joined back even when nothing follows its wait
            let mut issued = self.issued.get();
            issued[stream.index()] += 1;
            self.issued.set(issued);
        } else {
            let mut waited = self.waited.get();
            waited[from.index()] = waited[from.index()].max(count);
            self.waited.set(waited);
        }
        self.ops.borrow_mut().push(Box::new(move |b| b.wait(stream, ev)));
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        self.refuse("a synchronize")
    }
    fn set_stream(&self, stream: Stream) -> Result<()> {
        self.target.set_stream(stream)?;
        self.current.set(stream);
        self.ops.borrow_mut().push(Box::new(move |b| b.set_stream(stream)));
        Ok(())
    }
    fn capture(&self, key: GraphKey, _: &mut CaptureFn) -> Result<()> {
        self.err(format!("a capture ({key}) inside a capture"))
    }
    fn matmul(&self, args: &Matmul) -> Result<()> {
        let m = MatmulArgs::of(args);
        self.op(None, move |b| m.issue(b))
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        let (o, i, t) = (*out, *ids, *table);
        self.op(None, move |b| b.embedding_fwd(&o, &i, &t))
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        let (d, i, o) = (*dtable, *ids, *dout);
        self.op(None, move |b| b.embedding_bwd(&d, &i, &o))
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        let (o, r, x, w, am) = (*out, *rstd, *x, *w, opt(am));
        self.op(None, move |b| b.rmsnorm_fwd(&o, &r, &x, &w, eps, am.as_ref()))
    }
    fn residual_rmsnorm_fwd(&self, res: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, d: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        let (res, o, r, x, d, w, am) = (*res, *out, *rstd, *x, *d, *w, opt(am));
        self.op(None, move |b| b.residual_rmsnorm_fwd(&res, &o, &r, &x, &d, &w, eps, am.as_ref()))
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        let (dx, dw, dout, x, w, r, dres, am) = (*dx, *dw, *dout, *x, *w, *rstd, opt(dres), opt(am));
        self.op(None, move |b| b.rmsnorm_bwd(&dx, &dw, &dout, &x, &w, &r, dres.as_ref(), am.as_ref()))
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, s: AttnShape, eps: f32) -> Result<()> {
        let (o, r, q, qw, kw) = (*out, *rstd, *qkv, *qw, *kw);
        self.op(None, move |b| b.qk_norm_fwd(&o, &r, &q, &qw, &kw, s, eps))
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        let (d, dq, dk, dout, q, qw, kw, r, am) = (*dqkv, *dqw, *dkw, *dout, *qkv, *qw, *kw, *rstd, opt(am));
        self.op(None, move |b| b.qk_norm_bwd(&d, &dq, &dk, &dout, &q, &qw, &kw, &r, s, am.as_ref()))
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, s: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        let (o, q, f, bias) = (*out, *qkv, *freqs, opt(bias));
        self.op(None, move |b| b.rope_fwd(&o, &q, &f, s, bias.as_ref()))
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        let (d, o, f, am) = (*dqkv, *dout, *freqs, opt(am));
        self.op(None, move |b| b.rope_bwd(&d, &o, &f, s, am.as_ref()))
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        let (o, l, q, am) = (*out, *lse, *qkv, opt(am));
        self.op(None, move |b| b.attention_fwd(&o, &l, &q, s, am.as_ref()))
    }
    fn attention_decode(&self, out: &Tensor, qkv: &Tensor, kc: &Tensor, vc: &Tensor, pos: usize, s: AttnShape) -> Result<()> {
        let (o, q, kc, vc) = (*out, *qkv, *kc, *vc);
        self.op(None, move |b| b.attention_decode(&o, &q, &kc, &vc, pos, s))
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, s: AttnShape, rope: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        let (d, dout, q, o, l, rope, am) = (*dqkv, *dout, *qkv, *out, *lse, opt(rope), opt(am));
        self.op(None, move |b| b.attention_bwd(&d, &dout, &q, &o, &l, s, rope.as_ref(), am.as_ref()))
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        let (o, i, am) = (*out, *inp, opt(am));
        self.op(None, move |b| b.swiglu_fwd(&o, &i, am.as_ref()))
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        let (d, o, i, am) = (*dinp, *dout, *inp, opt(am));
        self.op(None, move |b| b.swiglu_bwd(&d, &o, &i, am.as_ref()))
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()> {
        let (lg, ls, t) = (*logits, *losses, *targets);
        self.op(None, move |b| b.cross_entropy(&lg, &ls, &t, dloss, z))
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        let (o, i) = (*out, *inp);
        self.op(None, move |b| b.colsum(&o, &i, accumulate))
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        let (o, i) = (*out, *inp);
        self.op(None, move |b| b.absmax(&o, &i))
    }
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        let (o, d, i, a) = (*out, *descale, *inp, *absmax);
        self.op(None, move |b| b.quantize(&o, &d, &i, &a, transpose))
    }
    fn quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<()> {
        let (o, ot, d, i, a) = (*out, *out_t, *descale, *inp, *absmax);
        self.op(None, move |b| b.quantize_pair(&o, &ot, &d, &i, &a))
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        let (o, i) = (*out, *inp);
        self.op(None, move |b| b.transpose(&o, &i))
    }
    fn adamw(&self, args: &AdamW, segments: &[Segment]) -> Result<()> {
        let (a, segs) = (AdamArgs::of(args), segments.to_vec());
        self.op(None, move |b| a.issue(b, &segs))
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        let (o, t) = (*out, *t);
        self.op(None, move |b| b.sum_squares(&o, slot, &t))
    }
}
