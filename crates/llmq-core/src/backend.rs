//! The op interface. The model's forward, backward, recomputation and gradient accumulation are
//! written once against this trait; the CPU backend (`crate::cpu`) is the reference
//! implementation and the CUDA backend (`llmq-cuda`) implements the same ops with kernels.
//!
//! Conventions (symbols as in llm.c):
//! - `N` rows = B*T tokens, `C` model width, `D` MLP width, `V` vocab, `Hq`/`Hkv` query/kv heads,
//!   `Hd` head size, `Q = (Hq + 2*Hkv) * Hd` fused qkv width.
//! - Tensors are row-major. Floating point inputs may be f32 or bf16 (and fp8 where stated);
//!   arithmetic is f32; outputs are rounded to their own dtype with round-to-nearest-even.
//! - Ops are enqueued on the backend's compute stream; `copy` may use the copy stream. The CPU
//!   backend runs everything synchronously.
//! - `absmax: Option<&Tensor>` outputs are f32[1] and receive max(|y|) over the op's output
//!   (the value *after* rounding to the output dtype), overwriting the previous content; a NaN
//!   anywhere in the output makes it NaN.
//! - "accumulate" means `out += result`; otherwise `out = result`.
//! - Outputs never alias inputs unless the op says so.
//! - Ops are deterministic: the same inputs give the same bits on every call.

use crate::capture::{CaptureFn, GraphKey};
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::{Mem, Tensor};

/// Memory accounting categories (printed at start, written to the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemCategory {
    Weights,
    Master,
    Quants,
    AdamM,
    AdamV,
    Gradients,
    Activations,
    Temporaries,
    Other,
}

impl MemCategory {
    pub const ALL: [MemCategory; 9] = [
        MemCategory::Weights,
        MemCategory::Master,
        MemCategory::Quants,
        MemCategory::AdamM,
        MemCategory::AdamV,
        MemCategory::Gradients,
        MemCategory::Activations,
        MemCategory::Temporaries,
        MemCategory::Other,
    ];
    pub fn name(self) -> &'static str {
        match self {
            MemCategory::Weights => "weights",
            MemCategory::Master => "master weights",
            MemCategory::Quants => "fp8 weights",
            MemCategory::AdamM => "adam m",
            MemCategory::AdamV => "adam v",
            MemCategory::Gradients => "gradients",
            MemCategory::Activations => "activations",
            MemCategory::Temporaries => "temporaries",
            MemCategory::Other => "other",
        }
    }
}

/// The streams of a backend. Ops run on the current stream (`set_stream`): `Compute`, or `Side`,
/// a second compute stream for work that may run beside the main chain (weight gradients).
/// Copies and zeroing name their stream, which may also be `Copy` (host to device, and device
/// work beside the compute stream) or `CopyBack` (device to host), so that the two directions
/// of the host link run at once. Work on different streams is ordered only through events; a
/// backend without streams runs everything in call order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Compute,
    Copy,
    Side,
    CopyBack,
}

impl Stream {
    pub const ALL: [Stream; 4] = [Stream::Compute, Stream::Copy, Stream::Side, Stream::CopyBack];
    /// Position in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        match self {
            Stream::Compute => "compute",
            Stream::Copy => "copy",
            Stream::Side => "side",
            Stream::CopyBack => "copy-back",
        }
    }
}

/// An event handle created by `Backend::create_event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event(pub u32);

/// `out = op(A) · op(B) (+ bias) (+ out if accumulate)`, where op(A) is [M, K] and op(B) is [K, N].
/// `a` is stored [M, K] (or [K, M] when `trans_a`); `b` is stored [K, N] (or [N, K] when
/// `trans_b`); `out` is [M, N]. A linear layer y = x·Wᵀ with W [out, in] is
/// `a = x, b = W, trans_b = true`; its input gradient is `a = dy, b = W`; its weight gradient is
/// `a = dy, trans_a = true, b = x` with `accumulate`.
///
/// fp8 operands (e4m3/e5m2) come with `descale_a`/`descale_b`: f32[1] tensors holding the
/// factor that maps stored values back to real ones (absmax/448), applied to the f32 product.
#[derive(Clone, Copy, Debug)]
pub struct Matmul<'a> {
    pub out: &'a Tensor,
    pub a: &'a Tensor,
    pub trans_a: bool,
    pub b: &'a Tensor,
    pub trans_b: bool,
    /// [N], added to every row.
    pub bias: Option<&'a Tensor>,
    pub accumulate: bool,
    pub descale_a: Option<&'a Tensor>,
    pub descale_b: Option<&'a Tensor>,
    /// The matmul may run on the side stream beside other work (a weight gradient): a backend
    /// that picks algorithms picks this one for the side stream's share of the device on
    /// either stream, so the result does not depend on which stream runs it.
    pub side_algo: bool,
    /// fp8 only: the tensor cores' partial sums need not be promoted to full f32 precision
    /// (`Precision::fp8_fast_accumulation`). Hopper adds fp8 products with ~14 significant bits;
    /// cuBLASLt's default promotes them every few k-steps, this lets it skip that. Backends that
    /// accumulate exactly ignore it.
    pub fast_accumulation: bool,
}

impl<'a> Matmul<'a> {
    /// y = x · wᵀ
    pub fn linear(out: &'a Tensor, x: &'a Tensor, w: &'a Tensor) -> Self {
        Matmul { out, a: x, trans_a: false, b: w, trans_b: true, bias: None, accumulate: false, descale_a: None, descale_b: None, side_algo: false, fast_accumulation: false }
    }
    /// dx = dy · w
    pub fn linear_dgrad(dx: &'a Tensor, dy: &'a Tensor, w: &'a Tensor) -> Self {
        Matmul { out: dx, a: dy, trans_a: false, b: w, trans_b: false, bias: None, accumulate: false, descale_a: None, descale_b: None, side_algo: false, fast_accumulation: false }
    }
    /// dw += dyᵀ · x
    pub fn linear_wgrad(dw: &'a Tensor, dy: &'a Tensor, x: &'a Tensor) -> Self {
        Matmul { out: dw, a: dy, trans_a: true, b: x, trans_b: false, bias: None, accumulate: true, descale_a: None, descale_b: None, side_algo: false, fast_accumulation: false }
    }
    pub fn with_bias(mut self, bias: Option<&'a Tensor>) -> Self {
        self.bias = bias;
        self
    }
    pub fn accumulate(mut self, acc: bool) -> Self {
        self.accumulate = acc;
        self
    }
    /// (M, N, K) from the operand shapes, checking that they agree.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        let (ar, ac) = self.a.rows_cols();
        let (br, bc) = self.b.rows_cols();
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        let (or, oc) = self.out.rows_cols();
        if k != k2 || or != m || oc != n {
            return Err(crate::Error::Op(format!(
                "matmul: shapes do not agree: a {:?}{} b {:?}{} out {:?}",
                self.a.shape,
                if self.trans_a { "ᵀ" } else { "" },
                self.b.shape,
                if self.trans_b { "ᵀ" } else { "" },
                self.out.shape
            )));
        }
        if let Some(bias) = self.bias {
            bias.expect_numel("matmul", "bias", n)?;
        }
        Ok((m, n, k))
    }
}

/// Shapes for attention and RoPE over a fused qkv tensor [B*T, (Hq + 2*Hkv) * Hd], laid out per
/// row as Hq query heads, then Hkv key heads, then Hkv value heads, each Hd wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub hq: usize,
    pub hkv: usize,
    pub hd: usize,
}

impl AttnShape {
    pub fn n(&self) -> usize {
        self.b * self.t
    }
    pub fn qkv_width(&self) -> usize {
        (self.hq + 2 * self.hkv) * self.hd
    }
    pub fn out_width(&self) -> usize {
        self.hq * self.hd
    }
}

/// One AdamW update over a flat buffer (typically one block's parameters).
///
/// For each element i of every segment: g = grad[i] * grad_scale; m = b1 m + (1-b1) g;
/// v = b2 v + (1-b2) g²; m̂ = m / bc1; v̂ = v / bc2;
/// p = master[i] - lr (m̂ / (sqrt(v̂) + eps) + wd_i master[i]), with wd_i = weight_decay on
/// segments that decay and 0 elsewhere. The new master value is stored in `master` (f32 with
/// RNE, or bf16 with stochastic rounding from `hash_u32(seed, i)`), m and v in their dtypes (RNE),
/// and, when `params` is a different buffer (bf16 working copy of f32 master), the new value rounded
/// to the params dtype. `absmax` (f32[n_segments]) receives max |param| per segment, for fp8 scales.
/// m and v used in p are the unrounded f32 values of this step. Segments must not overlap;
/// elements outside every segment (padding) are neither read nor written.
///
/// The scalars that change every step (lr, bc1, bc2, grad_scale, seed) are read from device
/// memory, `scalars` (`AdamStep::words`), so that a captured update replays with each step's
/// values; the hyperparameters fixed for a run are arguments.
#[derive(Clone, Copy, Debug)]
pub struct AdamW<'a> {
    pub params: &'a Tensor,
    /// Same tensor as `params` when the working weights are the master weights.
    pub master: &'a Tensor,
    pub grads: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    /// i32 [ADAM_SCALARS]: this step's `AdamStep::words`.
    pub scalars: &'a Tensor,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub absmax: Option<&'a Tensor>,
}

/// Words of `AdamW::scalars`.
pub const ADAM_SCALARS: usize = 6;

/// The per-step scalars of an AdamW update, as the host knows them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    /// Optimizer step, starting at 1 (for bias correction).
    pub step: u64,
    /// Multiplier applied to gradients before the update (gradient clipping).
    pub grad_scale: f32,
    pub seed: u64,
}

/// The per-step scalars as an update reads them from `AdamW::scalars`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    pub lr: f32,
    /// Bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bc1: f32,
    pub bc2: f32,
    pub grad_scale: f32,
    pub seed: u64,
}

impl AdamStep {
    /// The words of `AdamW::scalars`: lr, bc1, bc2, grad_scale (f32 bits), then the seed's low
    /// and high 32 bits. The bias corrections are computed in f64 and rounded to f32, once, on
    /// the host, so every backend uses the same constants. `step` 0 is an error.
    pub fn words(&self, beta1: f32, beta2: f32) -> Result<[u32; ADAM_SCALARS]> {
        if self.step == 0 {
            return Err(crate::Error::Op("adamw: step starts at 1 (bias correction divides by 1 - beta^step)".into()));
        }
        let c = |b: f32| (1.0 - (b as f64).powf(self.step as f64)) as f32;
        Ok([self.lr.to_bits(), c(beta1).to_bits(), c(beta2).to_bits(), self.grad_scale.to_bits(), self.seed as u32, (self.seed >> 32) as u32])
    }
    /// `words` as the bytes of an i32 tensor.
    pub fn bytes(&self, beta1: f32, beta2: f32) -> Result<Vec<u8>> {
        Ok(self.words(beta1, beta2)?.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
}

impl AdamScalars {
    pub fn from_words(w: &[u32; ADAM_SCALARS]) -> AdamScalars {
        let f = f32::from_bits;
        AdamScalars { lr: f(w[0]), bc1: f(w[1]), bc2: f(w[2]), grad_scale: f(w[3]), seed: w[4] as u64 | (w[5] as u64) << 32 }
    }
}

impl AdamW<'_> {
    /// Checks dtypes, sizes and the segments (in range, not overlapping): the part of the
    /// contract every backend enforces before touching memory.
    pub fn validate(&self, segments: &[Segment]) -> Result<()> {
        const OP: &str = "adamw";
        let err = |m: String| Err(crate::Error::Op(format!("{OP}: {m}")));
        let n = self.master.numel();
        self.master.expect_dtype(OP, "master", &[DType::F32, DType::BF16])?;
        self.m.expect_dtype(OP, "m", &[DType::F32, DType::BF16])?;
        self.v.expect_dtype(OP, "v", &[DType::F32, DType::BF16])?;
        self.scalars.expect(OP, "scalars", Some(DType::I32), &[ADAM_SCALARS])?;
        for (name, t) in [("params", self.params), ("grads", self.grads), ("m", self.m), ("v", self.v)] {
            if !t.dtype.is_float() {
                return err(format!("{name} must be a float tensor, got {}", t.dtype));
            }
            t.expect_numel(OP, name, n)?;
        }
        if self.params.addr == self.master.addr && self.params.dtype != self.master.dtype {
            return err(format!("params and master share memory but have dtypes {} and {}", self.params.dtype, self.master.dtype));
        }
        if let Some(am) = self.absmax {
            am.expect(OP, "absmax", Some(DType::F32), &[segments.len()])?;
        }
        let mut segs: Vec<Segment> = segments.to_vec();
        segs.sort_by_key(|s| s.offset);
        let mut end = 0;
        for s in &segs {
            if s.offset.checked_add(s.len).is_none_or(|e| e > n) {
                return err(format!("segment {s:?} outside the buffer of {n} elements"));
            }
            if s.offset < end {
                return err(format!("segment {s:?} overlaps the previous one (ending at {end})"));
            }
            end = s.offset + s.len;
        }
        Ok(())
    }
}

/// A contiguous run of elements in a flat parameter buffer, with its weight-decay flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
    pub decay: bool,
}

/// The op interface. See the module documentation for conventions.
pub trait Backend {
    /// "cpu" or "cuda:0 (NVIDIA H200)" etc.
    fn name(&self) -> String;

    // ---- memory: allocation happens at setup only, never inside the step loop ----
    /// Allocates zero-initialised memory and accounts it under `cat`.
    fn alloc(&mut self, cat: MemCategory, mem: Mem, dtype: DType, dims: &[usize]) -> Result<Tensor>;
    /// Bytes allocated per category so far.
    fn memory_by_category(&self) -> Vec<(MemCategory, Mem, usize)>;
    /// Free device memory in bytes, if the backend knows it (under the limit, where one is set).
    fn free_memory(&self) -> Option<usize>;
    /// Caps the device memory (`Mem::Device`) this backend allocates from now on, counting what
    /// it holds already: an allocation past the cap fails with `Error::OutOfMemory`. Pinned host
    /// memory is not counted.
    fn limit_device_memory(&mut self, bytes: usize);
    /// Whether the backend only records allocations and holds no data (the planning backend):
    /// set-up code then skips computing the contents of what it would upload.
    fn records_only(&self) -> bool {
        false
    }
    /// Synchronous host -> tensor copy of raw bytes (setup, checkpoint load, tests).
    fn upload(&self, dst: &Tensor, bytes: &[u8]) -> Result<()>;
    /// Synchronous tensor -> host copy of raw bytes (waits for all queued work).
    fn download(&self, src: &Tensor) -> Result<Vec<u8>>;
    /// Asynchronous copy between any two tensors of the same dtype and element count
    /// (device<->device, device<->pinned host), on `stream`. Bit-exact.
    fn copy(&self, dst: &Tensor, src: &Tensor, stream: Stream) -> Result<()>;
    /// The bytes of `t` as of this point in `stream`'s order (collectives that move data through
    /// the host). The default waits for all queued work, which orders it after everything.
    fn stream_read(&self, t: &Tensor, stream: Stream) -> Result<Vec<u8>> {
        let _ = stream;
        self.download(t)
    }
    /// Writes `bytes` into `t` at this point in `stream`'s order (see `stream_read`).
    fn stream_write(&self, t: &Tensor, bytes: &[u8], stream: Stream) -> Result<()> {
        let _ = stream;
        self.upload(t, bytes)
    }
    /// Zeroes t, queued on `stream`.
    fn zero(&self, t: &Tensor, stream: Stream) -> Result<()>;
    /// dst = src converted to dst's dtype (RNE, saturating for fp8); same element count.
    fn convert(&self, dst: &Tensor, src: &Tensor) -> Result<()>;

    // ---- streams and events (no-ops on the CPU) ----
    fn create_event(&mut self) -> Result<Event>;
    fn record(&self, ev: Event, stream: Stream) -> Result<()>;
    /// Makes `stream` wait for `ev`.
    fn wait(&self, stream: Stream, ev: Event) -> Result<()>;
    /// Blocks the host until all queued work is done.
    fn synchronize(&self) -> Result<()>;
    /// The stream the following ops run on (`Compute` until changed; `Copy` is refused).
    fn set_stream(&self, stream: Stream) -> Result<()>;
    /// Runs the ops `f` issues as one graph named `key` (`crate::capture`): the backend may
    /// record them once and from then on replay the record instead of calling `f`, so `f` must
    /// issue the same ops every time and every value that changes between calls must be read
    /// from device memory. `f` starts and must end on the compute stream; see `crate::capture`
    /// for what it may not do.
    fn capture(&self, key: GraphKey, f: &mut CaptureFn) -> Result<()>;

    // ---- compute ----
    fn matmul(&self, args: &Matmul) -> Result<()>;
    /// out[n, :] = table[ids[n], :]. ids i32 [N], table [V, C], out [N, C].
    fn embedding_fwd(&self, out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()>;
    /// dtable[ids[n], :] += dout[n, :], summed over n in increasing order (deterministic).
    fn embedding_bwd(&self, dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()>;
    /// out = x * rstd * w with rstd = 1/sqrt(mean(x²) + eps) per row (f32 [N] output).
    fn rmsnorm_fwd(&self, out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()>;
    /// res_out = x + delta (rounded to res_out's dtype), then out = rmsnorm(res_out) computed
    /// from the *rounded* residual, so that `rmsnorm_fwd(res_out)` reproduces it bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn residual_rmsnorm_fwd(&self, res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()>;
    /// dx = rmsnorm input gradient (+ dres when given; dx may be the same tensor as dres);
    /// dw += weight gradient (f32 or bf16 [C]; summed over rows in a fixed order).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(&self, dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()>;
    /// Qwen3 qk-norm: RMSNorm over each q head (weight qw [Hd]) and k head (kw [Hd]) of a qkv
    /// tensor; v heads are copied. rstd: f32 [N, Hq + Hkv].
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_fwd(&self, out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, shape: AttnShape, eps: f32) -> Result<()>;
    /// Backward of `qk_norm_fwd`: dqkv (v part copied from dout), dqw += , dkw +=. `absmax`:
    /// f32 [1], the abs-max of all of dqkv as stored (fp8 runs quantise it next).
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_bwd(&self, dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()>;
    /// Rotate-half RoPE on the q and k heads of qkv; v heads copied. `freqs`: f32 [T, Hd/2, 2]
    /// holding (cos, sin) for position t (row n has position n % T). For pair i of a head:
    /// y[i] = x[i] cos - x[i + Hd/2] sin; y[i + Hd/2] = x[i + Hd/2] cos + x[i] sin.
    /// `bias` [Q] (any float dtype): x = qkv + bias in f32 first (the QKV matmul's bias, fused here
    /// so that the matmul runs without one), v heads included.
    fn rope_fwd(&self, out: &Tensor, qkv: &Tensor, freqs: &Tensor, shape: AttnShape, bias: Option<&Tensor>) -> Result<()>;
    /// The transpose of `rope_fwd` (rotation by -angle); v part copied.
    fn rope_bwd(&self, dqkv: &Tensor, dout: &Tensor, freqs: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()>;
    /// Causal grouped-query attention with softmax scale 1/sqrt(Hd). qkv [N, Q] (after RoPE);
    /// out [N, Hq*Hd]; lse f32 [B, Hq, T] = log-sum-exp of the scaled scores per query.
    /// `absmax`: f32 [1], the abs-max of out as stored (fp8 runs quantise out next).
    fn attention_fwd(&self, out: &Tensor, lse: &Tensor, qkv: &Tensor, shape: AttnShape, absmax: Option<&Tensor>) -> Result<()>;
    /// Attention of new rows against a key/value cache (decoding). `qkv` [B*T, Q] (after RoPE)
    /// holds T new rows per sequence, at positions pos..pos+T. Their key and value heads are
    /// first stored into `k_cache` and `v_cache` ([B, S, Hkv*Hd], one float dtype, S >= pos + T)
    /// at those positions; then the query of the row at position p attends causally to cache
    /// positions 0..=p, with the arithmetic of `attention_fwd` (keys and values as the cache
    /// stores them). out [B*T, Hq*Hd]. Cache positions past pos + T are neither read nor written.
    fn attention_decode(&self, out: &Tensor, qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: usize, shape: AttnShape) -> Result<()>;
    /// dqkv [N, Q] (overwritten) from dout [N, Hq*Hd]. With `rope` (the `rope_fwd` table), dqkv is
    /// the gradient of qkv *before* RoPE: `rope_bwd` of the attention gradient, applied in f32
    /// before the result is rounded (a backend may round in between; the CUDA backend's fused
    /// kernels do not). `absmax`: f32 [1], the abs-max of all of dqkv as stored.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(&self, dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, shape: AttnShape, rope: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()>;
    /// inp [N, 2D] holds per row [up (D) | gate (D)]; out [N, D] = up * silu(gate).
    fn swiglu_fwd(&self, out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()>;
    fn swiglu_bwd(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()>;
    /// Fused softmax cross-entropy over rows of `logits` [R, V], in place, with z-loss
    /// coefficient `z` (0: none): with lse = log-sum-exp of the row, losses f32 [R] get
    /// lse - x[target] + z·lse² (f64, rounded once) and each row is replaced by
    /// dloss * (softmax·c - onehot(target)) with c = 1 + 2z·lse rounded to f32 (exactly 1 for z = 0).
    /// Rows whose target is -100 get loss 0 and a zero gradient row. Targets outside 0..V are an
    /// error.
    fn cross_entropy(&self, logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32, z: f32) -> Result<()>;
    /// out[j] (+)= sum over rows of inp[:, j] (bias gradient), rows summed in order.
    fn colsum(&self, out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()>;
    /// out f32[1] = max |inp|.
    fn absmax(&self, out: &Tensor, inp: &Tensor) -> Result<()>;
    /// fp8 quantisation with current scaling: scale = 448 / max(absmax, 1e-10) (57344 for
    /// e5m2; f32 arithmetic, max as fmaxf), out = sat_rne(inp * scale); descale f32[1] = 1 / scale.
    /// `transpose` writes the [cols, rows] transpose of a 2-D inp instead.
    fn quantize(&self, out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()>;
    /// Both quantisations of a 2-D inp at once: `out` [rows, cols] and `out_t` [cols, rows], the
    /// same bytes as two `quantize` calls (a backend may read inp once for both).
    fn quantize_pair(&self, out: &Tensor, out_t: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor) -> Result<()> {
        self.quantize(out, descale, inp, absmax, false)?;
        self.quantize(out_t, descale, inp, absmax, true)
    }
    /// out [cols, rows] = inpᵀ (same dtype), bit-exact.
    fn transpose(&self, out: &Tensor, inp: &Tensor) -> Result<()>;
    fn adamw(&self, args: &AdamW, segments: &[Segment]) -> Result<()>;
    /// out f32 [slots]: out[slot] = sum of squares of t (deterministic order).
    fn sum_squares(&self, out: &Tensor, slot: usize, t: &Tensor) -> Result<()>;
    /// The local reduction of a reduce-scatter from all-to-all copies, queued on `stream`:
    /// dst [S] (+)= staged[0] + staged[1] + ... over the world shards of staged [world*S], in
    /// the collectives' reduction order (f32, in rank order, starting from dst when
    /// accumulating, rounded once: `llmq_core::comm`). f32 or bf16; dst must not overlap staged.
    fn reduce_shards(&self, dst: &Tensor, staged: &Tensor, accumulate: bool, stream: Stream) -> Result<()>;
}
