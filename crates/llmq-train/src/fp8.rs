//! FP8 (e4m3) block matmuls with just-in-time per-tensor scaling.
//!
//! The four block matmuls (QKV, attention-out, up+gate, down) and their input- and
//! weight-gradient matmuls run with fp8 operands; everything else stays in bf16/fp32. Every fp8
//! matmul has the "TN" shape cuBLASLt requires on Hopper: both operands contiguous along the
//! contraction dimension, i.e. `a` [M, K], `b` [N, K] with `trans_b`:
//!
//! | matmul  | a (fp8)                  | b (fp8)                  |
//! |---------|--------------------------|--------------------------|
//! | forward | x  [N, in]     e4m3      | W  [out, in]   e4m3      |
//! | dgrad   | dy [N, out]    grad type | Wᵀ [in, out]   e4m3      |
//! | wgrad   | dyᵀ [out, N]   grad type | xᵀ [in, N]     e4m3      |
//!
//! Scales are "current": scale = max_fp8 / max(absmax, 1e-10) of the tensor being quantised.
//! Activation and activation-gradient abs-maxes come out of the kernel that produced the tensor
//! (RMSNorm, residual RMSNorm, SwiGLU, attention, their backwards with RoPE's, qk-norm's
//! backward), never from an extra pass. Weight abs-maxes come out of the AdamW update (per
//! segment = per weight matrix) and are computed once at start.
//! The weight gradient needs each matmul input transposed (xᵀ). Where the input is not
//! recomputed, the forward quantises it plain and transposed in one pass and keeps xᵀ and its
//! descale (`act_t`); the bf16 input itself is then kept only where something else needs it (the
//! attention output, or ln1/ln2 for a recomputation: `acts::Keep`). Where the input is recomputed
//! (or kept in bf16 anyway, with `Recompute::fp8_inputs`, `--recompute-fp8-inputs`, to save the
//! transpose's memory), the backward quantises the bf16 tensor transposed with the kept abs-max.
//! Both give the same bytes, so the recompute options still cannot change the numbers.
//!
//! With persistent quants the quantised weights (and transposes) are kept and refreshed once per
//! optimizer step; without, they are re-quantised at each use. Both give the same bytes. Kept
//! quants live on the device, or (`--offload-quants`, and under ZeRO-3 weight sharding) away from
//! it and pass through two device slots per block (`crate::fp8_stream`).
//!
//! With `wgrad_overlap`, a weight gradient whose input transpose is kept runs on the side stream
//! (`side::SideWgrads`). It then still reads the quantised dyᵀ after the next matmul's backward
//! has begun, so dyᵀ has two slots: one for the matmuls whose dy is C wide (attention-out, down),
//! one for the others, which alternate with them.

use crate::acts::BackwardScratch;
use crate::fp8_stream::StreamedQuants;
use crate::params::Params;
use crate::side::SideWgrads;
use llmq_core::layout::ParamKind;
use crate::memory::MemoryOptions;
use crate::precision::Precision;
use llmq_core::{Backend, DType, Matmul, Mem, MemCategory, ModelConfig, Result, Stream, Tensor};

/// The block matmuls that run in fp8, in layout order.
pub const WEIGHTS: [ParamKind; 4] = [ParamKind::QkvW, ParamKind::OutW, ParamKind::UpGateW, ParamKind::DownW];

/// Activation abs-max slots per layer: inputs of the four matmuls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Ln1 = 0,
    Att = 1,
    Ln2 = 2,
    Sw = 3,
}

/// A weight matrix in fp8 form: quantised [out, in], its transpose [in, out], and the descale.
#[derive(Clone, Copy, Debug)]
struct QuantWeight {
    q: Tensor,
    qt: Tensor,
    descale: Tensor,
}

pub struct Fp8 {
    pub grad_dtype: DType,
    /// The matmuls accumulate without promotion (`Precision::fp8_fast_accumulation`).
    fast_accumulation: bool,
    /// f32 [L, 4]: abs-max of ln1, att, ln2, sw per layer (kept for the backward pass).
    act_amax: Tensor,
    /// f32 [1]: abs-max of the activation gradient being consumed.
    pub grad_amax: Tensor,
    /// f32 per group: abs-max of each segment (entry) of each group, from the optimizer.
    pub weight_amax: Vec<Tensor>,
    // scratch (sized for the widest matmul input / output)
    xq: Tensor,
    dyq: Tensor,
    /// The transposed activation gradient (quantised together with `dyq`), in the slot
    /// `dy_slot(k)` of matmul k (one tensor for both slots without `wgrad_overlap`).
    dytq: [Tensor; 2],
    /// f32, DESCALE_SLOTS slots 16 bytes apart (`DS_*`).
    descales: Tensor,
    /// Scratch for on-the-fly weight quantisation (no persistent quants).
    scratch_w: QuantWeight,
    /// Per layer, per matmul (persistent quants on the device).
    persistent: Option<Vec<[QuantWeight; 4]>>,
    /// Persistent quants in pinned host memory or sharded over ranks, streamed per block.
    streamed: Option<StreamedQuants>,
    /// Per activation (`Act`), where it is kept for the backward pass: per layer, its fp8
    /// transpose [in, N] from the forward pass.
    act_t: [Option<Vec<Tensor>>; 4],
    /// f32, 16 bytes per (layer, activation): the descale of each kept transpose.
    act_descale: Tensor,
    /// `--log-amax`: statistics of the quantised tensors every N steps.
    pub health: Option<crate::fp8_health::Health>,
}

/// Descale slots: the forward's matmul input, the backward's re-quantised input, dy (per dyᵀ
/// slot: a side-stream wgrad reads its dy's descale after the next dy has been quantised).
const DS_X_FWD: usize = 0;
const DS_X_BWD: usize = 1;
const DS_DY: [usize; 2] = [2, 3];
const DESCALE_SLOTS: usize = 4;

/// The dyᵀ slot of block matmul k: matmuls alternate between the slots in backward order
/// (down 0, up+gate 1, attention-out 0, QKV 1), and the C-wide ones share slot 0.
fn dy_slot(k: usize) -> usize {
    match WEIGHTS[k] {
        ParamKind::OutW | ParamKind::DownW => 0,
        _ => 1,
    }
}

fn fp8_slot(t: &Tensor, n: usize, dims: &[usize]) -> Tensor {
    t.slice(0, &[n]).reshape(dims)
}

impl Fp8 {
    /// `keep[a]`: the forward pass keeps activation `a`'s (`Act`) fp8 transpose per layer for the
    /// weight gradient (otherwise the backward pass quantises the bf16 input). `bwd`: where the
    /// gradient scratch goes (only the backward pass uses it).
    #[allow(clippy::too_many_arguments)]
    pub fn alloc(be: &mut dyn Backend, cfg: &ModelConfig, params: &Params, n: usize, precision: &Precision, mem: &MemoryOptions, keep: [bool; 4], bwd: &mut BackwardScratch) -> Result<Fp8> {
        let (grad_dtype, persistent) = (precision.act_grads, mem.persistent_quants);
        // fp8 tensor-core matmuls need every dimension a multiple of 16 (16-byte rows)
        for (what, v) in [
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_attention_heads * head_dim", cfg.attn_width()),
            ("qkv width", cfg.qkv_width()),
            ("tokens per micro-batch (batch size * seq len)", n),
        ] {
            if v % 16 != 0 {
                return Err(llmq_core::Error::Config(format!("--matmul-dtype e4m3 needs {what} to be a multiple of 16, got {v}")));
            }
        }
        let (c, d) = (cfg.hidden_size, cfg.intermediate_size);
        // matmul inputs (xq) are C, Aw or D wide; outputs (dy) QKV, C, 2D or C
        let widest_in = [c, cfg.attn_width(), d].into_iter().max().unwrap();
        let widest_out = [cfg.qkv_width(), c, 2 * d].into_iter().max().unwrap();
        let biggest_w = [cfg.qkv_width() * c, c * cfg.attn_width(), 2 * d * c, c * d].into_iter().max().unwrap();
        let f32 = DType::F32;
        let tmp = MemCategory::Temporaries;
        let act_amax = be.alloc(MemCategory::Activations, Mem::Device, f32, &[cfg.num_layers, 4])?;
        let grad_amax = be.alloc(tmp, Mem::Device, f32, &[1])?;
        let weight_amax = params
            .layout
            .groups
            .iter()
            .map(|g| be.alloc(MemCategory::Quants, Mem::Device, f32, &[g.entries.len()]))
            .collect::<Result<Vec<_>>>()?;
        let xq = be.alloc(tmp, Mem::Device, DType::E4M3, &[n * widest_in])?;
        let dyq = bwd.take(be, grad_dtype, &[n * widest_out])?;
        let dytq1 = bwd.take(be, grad_dtype, &[n * widest_out])?;
        let dytq = if mem.wgrad_overlap { [bwd.take(be, grad_dtype, &[n * c])?, dytq1] } else { [dytq1, dytq1] };
        // scale slots 16 bytes apart: cuBLASLt wants aligned scale pointers
        let descales = be.alloc(tmp, Mem::Device, f32, &[4 * DESCALE_SLOTS])?;
        let quant = |be: &mut dyn Backend, cat: MemCategory, numel: usize| -> Result<QuantWeight> {
            Ok(QuantWeight {
                q: be.alloc(cat, Mem::Device, DType::E4M3, &[numel])?,
                qt: be.alloc(cat, Mem::Device, DType::E4M3, &[numel])?,
                descale: be.alloc(cat, Mem::Device, f32, &[1])?,
            })
        };
        let scratch_w = quant(be, tmp, biggest_w)?;
        // ZeRO-3 cannot keep whole blocks on every rank: there each rank keeps its shard
        let stream = persistent && (mem.offload_quants || (0..cfg.num_layers).any(|l| params.weights_sharded(params.layout.block_group(l))));
        let streamed = if stream { Some(StreamedQuants::alloc(be, params, mem.offload_quants)?) } else { None };
        let persistent = if persistent && !stream {
            let mut layers = vec![];
            for l in 0..cfg.num_layers {
                let blk = params.weights.block(&params.layout, l);
                let sizes = [blk.qkv_w.numel(), blk.o_w.numel(), blk.up_gate_w.numel(), blk.down_w.numel()];
                let mut arr = vec![];
                for s in sizes {
                    arr.push(quant(be, MemCategory::Quants, s)?);
                }
                layers.push([arr[0], arr[1], arr[2], arr[3]]);
            }
            Some(layers)
        } else {
            None
        };
        let widths = [c, cfg.attn_width(), c, d]; // inputs of QKV, out, up+gate, down
        let mut act_t: [Option<Vec<Tensor>>; 4] = [None, None, None, None];
        for (a, slot) in act_t.iter_mut().enumerate() {
            if keep[a] {
                let per_layer = (0..cfg.num_layers).map(|_| be.alloc(MemCategory::Activations, Mem::Device, DType::E4M3, &[widths[a], n]));
                *slot = Some(per_layer.collect::<Result<Vec<_>>>()?);
            }
        }
        let act_descale = be.alloc(MemCategory::Activations, Mem::Device, f32, &[cfg.num_layers * 4 * 4])?;
        Ok(Fp8 { grad_dtype, fast_accumulation: precision.fp8_fast_accumulation, act_amax, grad_amax, weight_amax, xq, dyq, dytq, descales, scratch_w, persistent, streamed, act_t, act_descale, health: None })
    }

    /// The abs-max slot of activation `a` of layer l.
    pub fn act_amax(&self, l: usize, a: Act) -> Tensor {
        self.act_amax.slice(l * 4 + a as usize, &[1])
    }

    /// Abs-maxes of every weight matrix from the current weights (at start and after loading;
    /// afterwards the optimizer keeps them up to date), then refreshes persistent quants.
    pub fn init_weight_amax(&self, be: &dyn Backend, params: &Params) -> Result<()> {
        for (gi, g) in params.layout.groups.iter().enumerate() {
            if !params.weights_sharded(gi) {
                for (si, e) in g.entries.iter().enumerate() {
                    let w = params.weights.groups[gi].slice(e.offset, &[e.numel()]);
                    be.absmax(&self.weight_amax[gi].slice(si, &[1]), &w)?;
                }
                continue;
            }
            // ZeRO-3: each rank takes the abs-max of its part of every matrix, then the max over ranks
            let sh = params.shard(gi);
            be.zero(&self.weight_amax[gi], Stream::Compute)?;
            for (si, e) in g.entries.iter().enumerate() {
                let (a, b) = (e.offset.max(sh.start), (e.offset + e.numel()).min(sh.start + sh.len));
                if a < b {
                    be.absmax(&self.weight_amax[gi].slice(si, &[1]), &params.weights.groups[gi].slice(a - sh.start, &[b - a]))?;
                }
            }
            if let Some(d) = &params.dist {
                d.comm.all_reduce(be, &self.weight_amax[gi], llmq_core::ReduceOp::Max, Stream::Compute, &format!("weight abs-maxes of {}", g.name))?;
            }
        }
        self.refresh(be, params)
    }

    /// Re-quantises the persistent fp8 weights (once per optimizer step).
    pub fn refresh(&self, be: &dyn Backend, params: &Params) -> Result<()> {
        if let Some(s) = &self.streamed {
            return s.refresh(be, params, &self.weight_amax);
        }
        if let Some(layers) = &self.persistent {
            for (l, ws) in layers.iter().enumerate() {
                for (k, qw) in ws.iter().enumerate() {
                    self.quantize_weight(be, params, l, k, qw, true, true)?;
                }
            }
        }
        Ok(())
    }

    /// Quantises block l's matmul-k weight into `qw`: the plain form, the transposed form, or both
    /// (`plain`/`transposed`); the forward needs only the first, the backward only the second.
    #[allow(clippy::too_many_arguments)]
    fn quantize_weight(&self, be: &dyn Backend, params: &Params, l: usize, k: usize, qw: &QuantWeight, plain: bool, transposed: bool) -> Result<QuantWeight> {
        let gi = params.layout.block_group(l);
        let g = &params.layout.groups[gi];
        let si = g.entries.iter().position(|e| e.kind == WEIGHTS[k]).expect("block matmul weight");
        let e = &g.entries[si];
        // during a pass: the device slot of a streamed block (persistent quants are refreshed
        // outside the passes, from the weights where they live)
        let w = if self.persistent.is_some() { params.weights.groups[gi] } else { params.block_group_weights(l) }.slice(e.offset, &e.shape);
        let (out, inp) = (e.shape[0], e.shape[1]);
        let amax = self.weight_amax[gi].slice(si, &[1]);
        let q = fp8_slot(&qw.q, out * inp, &[out, inp]);
        let qt = fp8_slot(&qw.qt, out * inp, &[inp, out]);
        match (plain, transposed) {
            (true, true) => be.quantize_pair(&q, &qt, &qw.descale, &w, &amax)?,
            (true, false) => be.quantize(&q, &qw.descale, &w, &amax, false)?,
            (false, true) => be.quantize(&qt, &qw.descale, &w, &amax, true)?,
            (false, false) => {}
        }
        Ok(QuantWeight { q, qt, descale: qw.descale })
    }

    /// The fp8 form of block l's matmul k (0..4, see `WEIGHTS`); without persistent quants only
    /// the form the caller uses is quantised (`transposed` for the backward, plain otherwise).
    fn weight(&self, be: &dyn Backend, params: &Params, l: usize, k: usize, transposed: bool) -> Result<QuantWeight> {
        if let Some(s) = &self.streamed {
            let (q, qt, descale) = s.weight(params, l, k, transposed)?;
            return Ok(QuantWeight { q, qt, descale });
        }
        match &self.persistent {
            Some(layers) => {
                let qw = layers[l][k];
                let e = params.layout.block(l).entry(WEIGHTS[k]).unwrap();
                let (out, inp) = (e.shape[0], e.shape[1]);
                Ok(QuantWeight { q: fp8_slot(&qw.q, out * inp, &[out, inp]), qt: fp8_slot(&qw.qt, out * inp, &[inp, out]), descale: qw.descale })
            }
            None => self.quantize_weight(be, params, l, k, &self.scratch_w, !transposed, transposed),
        }
    }

    /// Streamed quants: makes block l's fp8 weights usable on the compute stream (with their
    /// transposes for the backward pass, `backward`). No-op otherwise.
    pub fn acquire(&self, be: &dyn Backend, params: &Params, l: usize, backward: bool) -> Result<()> {
        self.streamed.as_ref().map_or(Ok(()), |s| s.acquire(be, params, l, backward))
    }
    /// Streamed quants: starts bringing block l's fp8 weights (no-op past the last block).
    pub fn prefetch(&self, be: &dyn Backend, params: &Params, l: usize) -> Result<()> {
        self.streamed.as_ref().map_or(Ok(()), |s| s.prefetch(be, params, l))
    }
    /// Streamed quants: done with block l's fp8 weights for this pass.
    pub fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        self.streamed.as_ref().map_or(Ok(()), |s| s.release(be, l))
    }

    fn descale(&self, slot: usize) -> Tensor {
        self.descales.slice(4 * slot, &[1])
    }

    /// The kept fp8 transpose of activation `a` of layer l and its descale, if it is kept.
    fn kept_t(&self, l: usize, a: Act) -> Option<(Tensor, Tensor)> {
        let t = self.act_t[a as usize].as_ref()?[l];
        Some((t, self.act_descale.slice((l * 4 + a as usize) * 4, &[1])))
    }

    /// out = x · Wᵀ (+ bias) with x (activation `a` of layer l) quantised by `x_amax`; where `a`
    /// is kept, its transpose for the backward pass comes out of the same pass.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, be: &dyn Backend, params: &Params, l: usize, k: usize, out: &Tensor, x: &Tensor, a: Act, x_amax: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let (n, inp) = x.rows_cols();
        if let Some(h) = &self.health {
            let gi = params.layout.block_group(l);
            let si = params.layout.groups[gi].entries.iter().position(|e| e.kind == WEIGHTS[k]).expect("block matmul weight");
            let e = &params.layout.groups[gi].entries[si];
            h.observe(be, "weight", l, k, &params.block_matrices(l).slice(e.offset, &e.shape), &self.weight_amax[gi].slice(si, &[1]), DType::E4M3)?;
            h.observe(be, "activation", l, k, x, x_amax, DType::E4M3)?;
        }
        let w = self.weight(be, params, l, k, false)?;
        let xq = fp8_slot(&self.xq, n * inp, &[n, inp]);
        let ds_x = match self.kept_t(l, a) {
            Some((xt, ds)) => {
                be.quantize_pair(&xq, &xt, &ds, x, x_amax)?;
                ds
            }
            None => {
                let ds = self.descale(DS_X_FWD);
                be.quantize(&xq, &ds, x, x_amax, false)?;
                ds
            }
        };
        be.matmul(&Matmul { descale_a: Some(&ds_x), descale_b: Some(&w.descale), fast_accumulation: self.fast_accumulation, ..Matmul::linear(out, &xq, &w.q).with_bias(bias) })
    }

    /// dx = dy · W and dW += dyᵀ · x (x: activation `a` of layer l), with dy quantised by
    /// `self.grad_amax`; the weight gradient on the side stream where `side` is given (the
    /// overlap is on) and x's transpose is kept.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, be: &dyn Backend, params: &Params, l: usize, k: usize, dx: &Tensor, dw: &Tensor, dy: &Tensor, x: &Tensor, a: Act, x_amax: &Tensor, side: Option<&SideWgrads>) -> Result<()> {
        let (n, out) = dy.rows_cols();
        let inp = x.rows_cols().1;
        if let Some(h) = &self.health {
            h.observe(be, "gradient", l, k, dy, &self.grad_amax, self.grad_dtype)?;
        }
        let w = self.weight(be, params, l, k, true)?;
        let slot = dy_slot(k);
        let (ds_dy, ds_x) = (self.descale(DS_DY[slot]), self.descale(DS_X_BWD));
        let kept = self.kept_t(l, a);
        if let Some(s) = side {
            s.reuse(be, slot)?;
        }
        // the side stream takes the wgrad only where its x operand is kept (so is not rewritten
        // by a later recomputation or quantisation)
        let side = side.filter(|_| kept.is_some());
        // dy in both forms at once (one read of dy)
        let dyq = fp8_slot(&self.dyq, n * out, &[n, out]);
        let dytq = fp8_slot(&self.dytq[slot], n * out, &[out, n]);
        be.quantize_pair(&dyq, &dytq, &ds_dy, dy, &self.grad_amax)?;
        // dgrad: dx [N, in] = dy [N, out] · (Wᵀ [in, out])ᵀ
        be.matmul(&Matmul { descale_a: Some(&ds_dy), descale_b: Some(&w.descale), fast_accumulation: self.fast_accumulation, ..Matmul::linear(dx, &dyq, &w.qt) })?;
        // wgrad: dW [out, in] += dyᵀ [out, N] · (xᵀ [in, N])ᵀ
        let (xtq, ds_x) = match kept {
            Some(kept) => kept,
            None => {
                let xtq = fp8_slot(&self.xq, n * inp, &[inp, n]);
                be.quantize(&xtq, &ds_x, x, x_amax, true)?;
                (xtq, ds_x)
            }
        };
        // (with the side stream's algorithm wherever it runs: the same bits with or without overlap)
        let wgrad = Matmul { descale_a: Some(&ds_dy), descale_b: Some(&ds_x), accumulate: true, side_algo: true, fast_accumulation: self.fast_accumulation, ..Matmul::linear(dw, &dytq, &xtq) };
        match side {
            Some(s) => s.run(be, slot, &wgrad),
            None => be.matmul(&wgrad),
        }
    }
}
