//! The CPU backend: the reference implementation of the op interface.
//!
//! Memory is ordinary host memory (64-byte aligned); a `Tensor::addr` is a host pointer. Every op
//! decodes its inputs to f32, computes in f32 (f64 where a reduction's order would otherwise
//! matter for determinism across chunkings), and encodes outputs into their dtype with the exact
//! conversions of `crate::dtype`, so low-precision numerics match what a GPU stores. Work is
//! spread over rows with rayon; results never depend on the thread count.
//!
//! Files: `matmul` (sgemm on fixed row blocks), `norm` (RMSNorm, fused residual, qk-norm),
//! `attention` (causal GQA), `elementwise` (embedding, RoPE, SwiGLU, colsum), `loss`
//! (cross-entropy), `quant` (absmax, fp8 quantisation, transpose), `optim` (AdamW, sum of
//! squares), `common` (checks, parallel encode, deterministic column sums, absmax).

mod attention;
mod common;
mod elementwise;
mod loss;
mod matmul;
mod norm;
mod optim;
mod quant;

pub use loss::IGNORE_INDEX;

use crate::backend::{Backend, Event, MemCategory, Stream};
use crate::capture::{CaptureFn, GraphKey, Recordings};
use crate::dtype::{decode_into, encode_into, DType};
use crate::error::{Error, Result};
use crate::tensor::{Mem, Shape, Tensor};
use std::collections::BTreeMap;

/// One allocation: a boxed slice of 64-byte blocks so that the address is aligned.
struct Block(Box<[[u8; 64]]>);

pub struct CpuBackend {
    blocks: Vec<Block>,
    /// (category, mem) -> bytes
    accounted: BTreeMap<(MemCategory, u8), usize>,
    events: u32,
    /// Upper bound for `Mem::Device` allocations together. Host and device memory are the same
    /// RAM here, but accounted apart, so that offloading is tested as on a GPU.
    limit: usize,
    /// Captures (`Backend::capture`), replayed op by op from their records.
    graphs: Recordings,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend { blocks: Vec::new(), accounted: BTreeMap::new(), events: 0, limit: usize::MAX, graphs: Recordings::default() }
    }
    /// A backend that refuses device allocations beyond `bytes` in total.
    pub fn with_limit(bytes: usize) -> CpuBackend {
        CpuBackend { limit: bytes, ..Self::new() }
    }
    /// Captures recorded so far (each key's code ran once; later calls replayed the record).
    pub fn graphs_recorded(&self) -> usize {
        self.graphs.len()
    }
    /// Bytes of `Mem::Device` allocated (nothing is freed before drop: also the high-water mark).
    pub fn device_allocated(&self) -> usize {
        self.accounted.iter().filter(|((_, m), _)| *m == Mem::Device as u8).map(|(_, b)| b).sum()
    }
}

// ---- raw access helpers used by the ops ----------------------------------------------------

/// The bytes of a tensor. SAFETY (for callers): `t` must come from a live `CpuBackend`
/// allocation; the slice must not be written through another reference while it is used.
pub(crate) unsafe fn bytes<'a>(t: &Tensor) -> &'a [u8] {
    std::slice::from_raw_parts(t.addr as *const u8, t.bytes())
}

/// SAFETY (for callers): as `bytes`, and no other reference to these bytes may be live.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn bytes_mut<'a>(t: &Tensor) -> &'a mut [u8] {
    std::slice::from_raw_parts_mut(t.addr as *mut u8, t.bytes())
}

/// Decodes a tensor into a new f32 vector (a copy, so outputs may alias inputs afterwards).
pub(crate) fn load(t: &Tensor) -> Vec<f32> {
    let mut v = vec![0f32; t.numel()];
    // SAFETY: read-only view of a live allocation, copied out immediately.
    decode_into(t.dtype, unsafe { bytes(t) }, &mut v);
    v
}

/// Encodes f32 values into a tensor of any float dtype (RNE / saturating).
pub(crate) fn store(t: &Tensor, vals: &[f32]) {
    assert_eq!(vals.len(), t.numel());
    // SAFETY: the caller holds no other reference to `t`'s bytes while storing.
    encode_into(t.dtype, vals, unsafe { bytes_mut(t) });
}

/// Reads an i32 tensor.
pub(crate) fn load_i32(t: &Tensor) -> Vec<i32> {
    // SAFETY: read-only view of a live allocation.
    unsafe { bytes(t) }.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn alloc(&mut self, cat: MemCategory, mem: Mem, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        let shape = Shape::new(dims);
        let bytes = shape.numel().checked_mul(dtype.size()).ok_or_else(|| Error::OutOfMemory(format!("{dims:?}")))?;
        if mem == Mem::Device && self.device_allocated().saturating_add(bytes) > self.limit {
            return Err(Error::OutOfMemory(format!(
                "cpu: cannot allocate {} for {} (device memory allocated {}, limit {})",
                crate::fmt_bytes(bytes),
                cat.name(),
                crate::fmt_bytes(self.device_allocated()),
                crate::fmt_bytes(self.limit)
            )));
        }
        let nblocks = bytes.div_ceil(64).max(1);
        let block = Block(vec![[0u8; 64]; nblocks].into_boxed_slice());
        let addr = block.0.as_ptr() as u64;
        self.blocks.push(block);
        *self.accounted.entry((cat, mem as u8)).or_default() += bytes;
        Ok(Tensor { addr, dtype, shape, mem })
    }

    fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)> {
        self.accounted
            .iter()
            .map(|(&(c, m), &b)| (c, Mem::from_index(m), b))
            .collect()
    }

    fn free_memory(&self) -> Option<usize> {
        (self.limit != usize::MAX).then(|| self.limit.saturating_sub(self.device_allocated()))
    }
    fn limit_device_memory(&mut self, bytes: usize) {
        self.limit = bytes;
    }

    fn upload(&self, dst: &Tensor, src: &[u8]) -> Result<()> {
        if src.len() != dst.bytes() {
            return Err(Error::Op(format!("upload: {} bytes into {:?}", src.len(), dst)));
        }
        // SAFETY: dst is a live allocation and `src` is a separate host slice.
        unsafe { bytes_mut(dst) }.copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &Tensor) -> Result<Vec<u8>> {
        // SAFETY: read-only view, copied.
        Ok(unsafe { bytes(src) }.to_vec())
    }

    fn copy(&self, dst: &Tensor, src: &Tensor, _stream: Stream) -> Result<()> {
        if dst.dtype != src.dtype || dst.numel() != src.numel() {
            return Err(Error::Op(format!("copy: {src:?} -> {dst:?}: dtype and size must match")));
        }
        // SAFETY: both are live allocations; `copy` handles overlap.
        unsafe { std::ptr::copy(src.addr as *const u8, dst.addr as *mut u8, src.bytes()) };
        Ok(())
    }

    fn zero(&self, t: &Tensor, _stream: Stream) -> Result<()> {
        // SAFETY: exclusive write to a live allocation.
        unsafe { bytes_mut(t) }.fill(0);
        Ok(())
    }

    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        if dst.numel() != src.numel() {
            return Err(Error::Op(format!("convert: {src:?} -> {dst:?}: sizes differ")));
        }
        if dst.dtype == src.dtype {
            return self.copy(dst, src, Stream::Compute);
        }
        store(dst, &load(src));
        Ok(())
    }

    fn create_event(&mut self) -> Result<Event> {
        self.events += 1;
        Ok(Event(self.events))
    }
    fn record(&self, _ev: Event, _stream: Stream) -> Result<()> {
        Ok(())
    }
    fn wait(&self, _stream: Stream, _ev: Event) -> Result<()> {
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn set_stream(&self, stream: Stream) -> Result<()> {
        crate::check::check_op_stream(stream)
    }

    fn matmul(&self, args: &crate::backend::Matmul) -> Result<()> {
        matmul::matmul(args)
    }
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
        elementwise::embedding_fwd(out, ids, table)
    }
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> {
        elementwise::embedding_bwd(dtable, ids, dout)
    }
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        norm::rmsnorm_fwd(out, rstd, x, w, eps, absmax)
    }
    fn residual_rmsnorm_fwd(&self, res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> {
        norm::residual_rmsnorm_fwd(res_out, out, rstd, x, delta, w, eps, absmax)
    }
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        norm::rmsnorm_bwd(dx, dw, dout, x, w, rstd, dres, absmax)
    }
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, shape: crate::backend::AttnShape, eps: f32) -> Result<()> {
        norm::qk_norm_fwd(out, rstd, qkv, qw, kw, shape, eps)
    }
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, shape: crate::backend::AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        norm::qk_norm_bwd(dqkv, dqw, dkw, dout, qkv, qw, kw, rstd, shape, absmax)
    }
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, shape: crate::backend::AttnShape, bias: Option<&Tensor>) -> Result<()> {
        elementwise::rope(out, qkv, freqs, shape, false, bias, None)
    }
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, shape: crate::backend::AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        elementwise::rope(dqkv, dout, freqs, shape, true, None, absmax)
    }
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, shape: crate::backend::AttnShape, absmax: Option<&Tensor>) -> Result<()> {
        attention::attention_fwd(out, lse, qkv, shape, absmax)
    }
    fn attention_decode(&self, out: &Tensor, qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: usize, shape: crate::backend::AttnShape) -> Result<()> {
        attention::attention_decode(out, qkv, k_cache, v_cache, pos, shape)
    }
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, shape: crate::backend::AttnShape, rope: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> {
        attention::attention_bwd(dqkv, dout, qkv, out, lse, shape, rope, absmax)
    }
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        elementwise::swiglu_fwd(out, inp, absmax)
    }
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> {
        elementwise::swiglu_bwd(dinp, dout, inp, absmax)
    }
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()> {
        loss::cross_entropy(logits, losses, targets, dloss, z)
    }
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> {
        elementwise::colsum(out, inp, accumulate)
    }
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        quant::absmax(out, inp)
    }
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> {
        quant::quantize(out, descale, inp, absmax, transpose)
    }
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        quant::transpose(out, inp)
    }
    fn capture(&self, key: GraphKey, f: &mut CaptureFn) -> Result<()> {
        self.graphs.capture(self, key, f)
    }
    fn adamw(&self, args: &crate::backend::AdamW, segments: &[crate::backend::Segment]) -> Result<()> {
        optim::adamw(args, segments)
    }
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()> {
        optim::sum_squares(out, slot, t)
    }
    fn reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, _stream: Stream) -> Result<()> {
        let world = crate::all_to_all::check_reduce_shards(dst, staged)?;
        // SAFETY: live allocations; dst does not overlap staged (checked), and the result is
        // computed into a buffer of its own before dst is written.
        let (staged_b, init) = unsafe { (bytes(staged), accumulate.then(|| bytes(dst).to_vec())) };
        let b = dst.bytes();
        let srcs: Vec<&[u8]> = (0..world).map(|r| &staged_b[r * b..(r + 1) * b]).collect();
        let mut out = vec![0u8; b];
        crate::comm::reduce_bytes(dst.dtype, init.as_deref(), &srcs, crate::ReduceOp::Sum, &mut out)?;
        // SAFETY: exclusive write to a live allocation.
        unsafe { bytes_mut(dst) }.copy_from_slice(&out);
        Ok(())
    }
}
