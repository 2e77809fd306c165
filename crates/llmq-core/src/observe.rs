//! A backend wrapper that shows every call to an `Observer` before and after the wrapped backend
//! runs it, with the tensors the op reads and writes. This is the one list of each op's operands
//! for the tools that watch a run: the stream-order checker (`stream_check`) and the per-op
//! profiler (`llmq_train::profile`).

use crate::backend::{AdamW, AttnShape, Backend, Event, Matmul, MemCategory, Segment, Stream};
use crate::capture::{CaptureFn, GraphKey, Recordings};
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::{Mem, Tensor};

/// One call, as an observer sees it.
pub struct Call<'a> {
    /// The op's name (`quantize transposed` for the transposing quantisation).
    pub op: &'static str,
    /// The stream the call names (copy, zero); `None`: the current stream.
    pub stream: Option<Stream>,
    pub reads: &'a [Option<&'a Tensor>],
    pub writes: &'a [Option<&'a Tensor>],
    /// The call blocks the host until all queued work is done (upload, download, synchronize).
    pub host_sync: bool,
    pub matmul: Option<&'a Matmul<'a>>,
}

impl<'a> Call<'a> {
    fn op(op: &'static str, reads: &'a [Option<&'a Tensor>], writes: &'a [Option<&'a Tensor>]) -> Self {
        Call { op, stream: None, reads, writes, host_sync: false, matmul: None }
    }
}

pub trait Observer {
    /// Shown after the inner backend's name.
    fn name(&self) -> &'static str;
    /// Before the call runs; an error stops it.
    fn before(&self, _inner: &dyn Backend, _call: &Call) -> Result<()> {
        Ok(())
    }
    /// After it ran (successfully).
    fn after(&self, _inner: &dyn Backend, _call: &Call) -> Result<()> {
        Ok(())
    }
    fn record(&self, _ev: Event, _stream: Stream) {}
    fn wait(&self, _stream: Stream, _ev: Event) {}
    fn set_stream(&self, _stream: Stream) {}
}

pub struct Observed<O> {
    inner: Box<dyn Backend>,
    pub observer: O,
    /// Captures are recorded and replayed here, through the wrapper, so that the observer sees
    /// every replayed op (a device graph of the inner backend would hide them).
    graphs: Recordings,
}

impl<O: Observer> Observed<O> {
    pub fn wrap(inner: Box<dyn Backend>, observer: O) -> Self {
        Observed { inner, observer, graphs: Recordings::default() }
    }

    fn call<T>(&self, call: Call, f: impl FnOnce(&dyn Backend) -> Result<T>) -> Result<T> {
        let inner = self.inner.as_ref();
        self.observer.before(inner, &call)?;
        let r = f(inner)?;
        self.observer.after(inner, &call)?;
        Ok(r)
    }
}

impl<O: Observer> Backend for Observed<O> {
    fn name(&self) -> String {
        format!("{} ({})", self.inner.name(), self.observer.name())
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
    fn limit_device_memory(&mut self, bytes: usize) {
        self.inner.limit_device_memory(bytes)
    }
    fn upload(&self, dst: &Tensor, bytes: &[u8]) -> Result<()> {
        self.call(Call { host_sync: true, ..Call::op("upload", &[], &[Some(dst)]) }, |b| b.upload(dst, bytes))
    }
    fn download(&self, src: &Tensor) -> Result<Vec<u8>> {
        self.call(Call { host_sync: true, ..Call::op("download", &[Some(src)], &[]) }, |b| b.download(src))
    }
    fn stream_read(&self, t: &Tensor, stream: Stream) -> Result<Vec<u8>> {
        self.call(Call { stream: Some(stream), ..Call::op("collective read", &[Some(t)], &[]) }, |b| b.stream_read(t, stream))
    }
    fn stream_write(&self, t: &Tensor, bytes: &[u8], stream: Stream) -> Result<()> {
        self.call(Call { stream: Some(stream), ..Call::op("collective write", &[], &[Some(t)]) }, |b| b.stream_write(t, bytes, stream))
    }
    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()> {
        self.call(Call { stream: Some(stream), ..Call::op("copy", &[Some(src)], &[Some(dst)]) }, |b| b.copy(dst, src, stream))
    }
    fn zero(&self, t: &Tensor, stream: Stream) -> Result<()> {
        self.call(Call { stream: Some(stream), ..Call::op("zero", &[], &[Some(t)]) }, |b| b.zero(t, stream))
    }
    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.call(Call::op("convert", &[Some(src)], &[Some(dst)]), |b| b.convert(dst, src))
    }
    fn create_event(&mut self) -> Result<Event> {
        self.inner.create_event()
    }
    fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        self.inner.record(ev, stream)?;
        self.observer.record(ev, stream);
        Ok(())
    }
    fn wait(&self, stream: Stream, ev: Event) -> Result<()> {
        self.inner.wait(stream, ev)?;
        self.observer.wait(stream, ev);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        self.call(Call { host_sync: true, ..Call::op("synchronize", &[], &[]) }, |b| b.synchronize())
    }
    fn set_stream(&self, stream: Stream) -> Result<()> {
        self.inner.set_stream(stream)?;
        self.observer.set_stream(stream);
        Ok(())
    }
    fn capture(&self, key: GraphKey, f: &mut CaptureFn) -> Result<()> {
        self.graphs.capture(self, key, f)
    }
    fn matmul(&self, a: &Matmul) -> Result<()> {
        let out_read = a.accumulate.then_some(a.out);
        let reads = [Some(a.a), Some(a.b), a.bias, a.descale_a, a.descale_b, out_read];
        self.call(Call { matmul: Some(a), ..Call::op("matmul", &reads, &[Some(a.out)]) }, |b| b.matmul(a))
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        self.call(Call::op("embedding_fwd", &[Some(ids), Some(table)], &[Some(out)]), |b| b.embedding_fwd(out, ids, table))
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        self.call(Call::op("embedding_bwd", &[Some(ids), Some(dout)], &[Some(dtable)]), |b| b.embedding_bwd(dtable, ids, dout))
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        self.call(Call::op("rmsnorm_fwd", &[Some(x), Some(w)], &[Some(out), Some(rstd), am]), |b| b.rmsnorm_fwd(out, rstd, x, w, eps, am))
    }
    fn residual_rmsnorm_fwd(&self, r: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, d: &Tensor, w: &Tensor, eps: f32, am: Option<&Tensor>) -> Result<()> {
        let (reads, writes) = ([Some(x), Some(d), Some(w)], [Some(r), Some(out), Some(rstd), am]);
        self.call(Call::op("residual_rmsnorm_fwd", &reads, &writes), |b| b.residual_rmsnorm_fwd(r, out, rstd, x, d, w, eps, am))
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        let (reads, writes) = ([Some(dout), Some(x), Some(w), Some(rstd), dres], [Some(dx), Some(dw), am]);
        self.call(Call::op("rmsnorm_bwd", &reads, &writes), |b| b.rmsnorm_bwd(dx, dw, dout, x, w, rstd, dres, am))
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, s: AttnShape, eps: f32) -> Result<()> {
        self.call(Call::op("qk_norm_fwd", &[Some(qkv), Some(qw), Some(kw)], &[Some(out), Some(rstd)]), |b| b.qk_norm_fwd(out, rstd, qkv, qw, kw, s, eps))
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        let (reads, writes) = ([Some(dout), Some(qkv), Some(qw), Some(kw), Some(rstd)], [Some(dqkv), Some(dqw), Some(dkw), am]);
        self.call(Call::op("qk_norm_bwd", &reads, &writes), |b| b.qk_norm_bwd(dqkv, dqw, dkw, dout, qkv, qw, kw, rstd, s, am))
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, s: AttnShape, bias: Option<&Tensor>) -> Result<()> {
        self.call(Call::op("rope_fwd", &[Some(qkv), Some(freqs), bias], &[Some(out)]), |b| b.rope_fwd(out, qkv, freqs, s, bias))
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        self.call(Call::op("rope_bwd", &[Some(dout), Some(freqs)], &[Some(dqkv), am]), |b| b.rope_bwd(dqkv, dout, freqs, s, am))
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, s: AttnShape, am: Option<&Tensor>) -> Result<()> {
        self.call(Call::op("attention_fwd", &[Some(qkv)], &[Some(out), Some(lse), am]), |b| b.attention_fwd(out, lse, qkv, s, am))
    }
    fn attention_decode(&self, out: &Tensor, qkv: &Tensor, kc: &Tensor, vc: &Tensor, pos: usize, s: AttnShape) -> Result<()> {
        // the caches are read (earlier positions) and written (the new ones)
        self.call(Call::op("attention_decode", &[Some(qkv), Some(kc), Some(vc)], &[Some(out), Some(kc), Some(vc)]), |b| b.attention_decode(out, qkv, kc, vc, pos, s))
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, s: AttnShape, rope: Option<&Tensor>, am: Option<&Tensor>) -> Result<()> {
        let (reads, writes) = ([Some(dout), Some(qkv), Some(out), Some(lse), rope], [Some(dqkv), am]);
        self.call(Call::op("attention_bwd", &reads, &writes), |b| b.attention_bwd(dqkv, dout, qkv, out, lse, s, rope, am))
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        self.call(Call::op("swiglu_fwd", &[Some(inp)], &[Some(out), am]), |b| b.swiglu_fwd(out, inp, am))
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, am: Option<&Tensor>) -> Result<()> {
        self.call(Call::op("swiglu_bwd", &[Some(dout), Some(inp)], &[Some(dinp), am]), |b| b.swiglu_bwd(dinp, dout, inp, am))
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()> {
        // the logits are read and overwritten with their gradient
        self.call(Call::op("cross_entropy", &[Some(targets)], &[Some(logits), Some(losses)]), |b| b.cross_entropy(logits, losses, targets, dloss, z))
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        self.call(Call::op("colsum", &[Some(inp)], &[Some(out)]), |b| b.colsum(out, inp, accumulate))
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.call(Call::op("absmax", &[Some(inp)], &[Some(out)]), |b| b.absmax(out, inp))
    }
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        let op = if transpose { "quantize transposed" } else { "quantize" };
        self.call(Call::op(op, &[Some(inp), Some(absmax)], &[Some(out), Some(descale)]), |b| b.quantize(out, descale, inp, absmax, transpose))
    }
    fn quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<()> {
        let (reads, writes) = ([Some(inp), Some(absmax)], [Some(out), Some(out_t), Some(descale)]);
        self.call(Call::op("quantize pair", &reads, &writes), |b| b.quantize_pair(out, out_t, descale, inp, absmax))
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.call(Call::op("transpose", &[Some(inp)], &[Some(out)]), |b| b.transpose(out, inp))
    }
    fn adamw(&self, a: &AdamW, segments: &[Segment]) -> Result<()> {
        let (reads, writes) = ([Some(a.grads), Some(a.scalars)], [Some(a.params), Some(a.master), Some(a.m), Some(a.v), a.absmax]);
        self.call(Call::op("adamw", &reads, &writes), |b| b.adamw(a, segments))
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        self.call(Call::op("sum_squares", &[Some(t)], &[Some(out)]), |b| b.sum_squares(out, slot, t))
    }
    fn reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, stream: Stream) -> Result<()> {
        let reads = [Some(staged), accumulate.then_some(dst)];
        self.call(Call { stream: Some(stream), ..Call::op("reduce_shards", &reads, &[Some(dst)]) }, |b| b.reduce_shards(dst, staged, accumulate, stream))
    }
}
