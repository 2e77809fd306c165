//! A backend wrapper that times every op (synchronising before and after it), for a per-op time
//! breakdown of a training step (`llmq train --profile`). Synchronising serialises the streams
//! and adds launch gaps, so the total is above the real step time; the shares are what matter.

use llmq_core::{AdamW, AttnShape, Backend, DType, Event, Matmul, Mem, MemCategory, Result, Segment, Stream, Tensor};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

/// op label -> (calls, seconds)
type Times = Rc<RefCell<BTreeMap<String, (u64, f64)>>>;

pub struct Profiled {
    inner: Box<dyn Backend>,
    times: Times,
}

/// Reads the times of a `Profiled` backend owned elsewhere (e.g. by a trainer).
#[derive(Clone)]
pub struct ProfileHandle(Times);

impl ProfileHandle {
    /// (label, calls, seconds), largest first; clears the table.
    pub fn take(&self) -> Vec<(String, u64, f64)> {
        let mut v: Vec<_> = std::mem::take(&mut *self.0.borrow_mut()).into_iter().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap());
        v
    }
}

impl Profiled {
    pub fn new(inner: Box<dyn Backend>) -> (Profiled, ProfileHandle) {
        let times = Times::default();
        (Profiled { inner, times: times.clone() }, ProfileHandle(times))
    }

    fn timed<T>(&self, label: impl FnOnce() -> String, f: impl FnOnce(&dyn Backend) -> Result<T>) -> Result<T> {
        self.inner.synchronize()?;
        let t0 = Instant::now();
        let r = f(self.inner.as_ref())?;
        self.inner.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        let mut m = self.times.borrow_mut();
        let e = m.entry(label()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        Ok(r)
    }
}

fn mm_label(a: &Matmul) -> String {
    let (m, n, k) = a.dims().unwrap_or((0, 0, 0));
    format!(
        "matmul {}{}x{} {}x{}x{}{}",
        a.a.dtype,
        if a.trans_a { "ᵀ" } else { "" },
        if a.trans_b { "ᵀ" } else { "" },
        m,
        n,
        k,
        if a.accumulate { " +=" } else { "" }
    )
}

impl Backend for Profiled {
    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
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
        self.timed(|| "upload".into(), |b| b.upload(dst, bytes))
    }
    fn download(&self, src: &Tensor) -> Result<Vec<u8>> {
        self.timed(|| "download".into(), |b| b.download(src))
    }
    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()> {
        self.timed(|| "copy".into(), |b| b.copy(dst, src, stream))
    }
    fn zero(&self, t: &Tensor, stream: Stream) -> Result<()> {
        self.timed(|| "zero".into(), |b| b.zero(t, stream))
    }
    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.timed(|| format!("convert {}->{}", src.dtype, dst.dtype), |b| b.convert(dst, src))
    }
    fn create_event(&mut self) -> Result<Event> {
        self.inner.create_event()
    }
    fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        self.inner.record(ev, stream)
    }
    fn wait(&self, stream: Stream, ev: Event) -> Result<()> {
        self.inner.wait(stream, ev)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn set_stream(&self, stream: Stream) -> Result<()> {
        self.inner.set_stream(stream)
    }
    fn matmul(&self, a: &Matmul) -> Result<()> {
        self.timed(|| mm_label(a), |b| b.matmul(a))
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        self.timed(|| "embedding_fwd".into(), |b| b.embedding_fwd(out, ids, table))
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        self.timed(|| "embedding_bwd".into(), |b| b.embedding_bwd(dtable, ids, dout))
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "rmsnorm_fwd".into(), |b| b.rmsnorm_fwd(out, rstd, x, w, eps, am))
    }
    fn residual_rmsnorm_fwd(&self, r: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, d: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "residual_rmsnorm_fwd".into(), |b| b.residual_rmsnorm_fwd(r, out, rstd, x, d, w, eps, am))
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "rmsnorm_bwd".into(), |b| b.rmsnorm_bwd(dx, dw, dout, x, w, rstd, dres, am))
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, s: AttnShape, eps: f32) -> Result<()> {
        self.timed(|| "qk_norm_fwd".into(), |b| b.qk_norm_fwd(out, rstd, qkv, qw, kw, s, eps))
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, s: AttnShape) -> Result<()> {
        self.timed(|| "qk_norm_bwd".into(), |b| b.qk_norm_bwd(dqkv, dqw, dkw, dout, qkv, qw, kw, rstd, s))
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, s: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        self.timed(|| "rope_fwd".into(), |b| b.rope_fwd(out, qkv, freqs, s, bias))
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "rope_bwd".into(), |b| b.rope_bwd(dqkv, dout, freqs, s, am))
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "attention_fwd".into(), |b| b.attention_fwd(out, lse, qkv, s, am))
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, s: AttnShape, rope: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "attention_bwd".into(), |b| b.attention_bwd(dqkv, dout, qkv, out, lse, s, rope, am))
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "swiglu_fwd".into(), |b| b.swiglu_fwd(out, inp, am))
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        self.timed(|| "swiglu_bwd".into(), |b| b.swiglu_bwd(dinp, dout, inp, am))
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32) -> Result<()> {
        self.timed(|| "cross_entropy".into(), |b| b.cross_entropy(logits, losses, targets, dloss))
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, acc: bool) -> Result<()> {
        self.timed(|| "colsum".into(), |b| b.colsum(out, inp, acc))
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.timed(|| "absmax".into(), |b| b.absmax(out, inp))
    }
    fn quantize_pair(&self, out: &Tensor, out_t: &Tensor, ds: &Tensor, inp: &Tensor, am: &Tensor) -> Result<()> {
        self.timed(|| "quantize pair".into(), |b| b.quantize_pair(out, out_t, ds, inp, am))
    }
    fn quantize(&self, out: &Tensor, ds: &Tensor, inp: &Tensor, am: &Tensor, tr: bool) -> Result<()> {
        self.timed(|| format!("quantize{}", if tr { " transposed" } else { "" }), |b| b.quantize(out, ds, inp, am, tr))
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.timed(|| "transpose".into(), |b| b.transpose(out, inp))
    }
    fn adamw(&self, args: &AdamW, segs: &[Segment]) -> Result<()> {
        self.timed(|| "adamw".into(), |b| b.adamw(args, segs))
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        self.timed(|| "sum_squares".into(), |b| b.sum_squares(out, slot, t))
    }
}
