//! Activation buffers, allocated once from the run's shape and recompute options.
//!
//! Each activation the backward pass needs is a `Slot`: either one buffer per layer (kept from
//! the forward pass) or a single buffer shared by all layers (overwritten in the forward pass and
//! recomputed by the backward pass). The residual stream is always kept.
//!
//! In fp8 runs a block matmul's input reaches the backward pass as the fp8 transpose the forward
//! pass wrote beside the plain form (`fp8::Fp8`), and the weight gradient reads only that. Where
//! nothing is recomputed from the bf16 input either, its slot is `Fp8Only`: one shared buffer
//! that the backward pass never touches, so it can live in a gradient temporary that only the
//! backward pass uses. For ln1, ln2 and the SwiGLU output this saves (2 C + D) x 2 bytes per
//! token and layer (22 GB for Qwen2.5-1.5B at B = 32) without changing a bit: the same ops run in
//! the same order.

use crate::memory::Recompute;
use crate::residual::Residuals;
use llmq_core::{AttnShape, Backend, DType, Mem, MemCategory, ModelConfig, Result, Tensor};

/// How an activation reaches the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// One buffer per layer.
    PerLayer,
    /// One shared buffer; the backward pass recomputes the value.
    Recomputed,
    /// One shared buffer; the backward pass needs only the fp8 transpose kept beside it.
    Fp8Only,
}

#[derive(Clone, Debug)]
pub struct Slot {
    bufs: Vec<Tensor>,
    keep: Keep,
}

impl Slot {
    /// `fp8_home`: the buffer an `Fp8Only` slot lives in (a gradient temporary that only the
    /// backward pass uses; an `Fp8Only` value is dead once the forward pass has quantised it).
    fn alloc(be: &mut dyn Backend, keep: Keep, layers: usize, dtype: DType, dims: &[usize], fp8_home: Option<&Tensor>) -> Result<Slot> {
        let bufs = match keep {
            Keep::PerLayer => (0..layers).map(|_| be.alloc(MemCategory::Activations, Mem::Device, dtype, dims)).collect::<Result<_>>()?,
            Keep::Recomputed => vec![be.alloc(MemCategory::Temporaries, Mem::Device, dtype, dims)?],
            Keep::Fp8Only => match fp8_home {
                Some(h) if h.dtype == dtype && h.dims() == dims => vec![*h],
                _ => return Err(llmq_core::Error::Op(format!("internal: no [{dims:?}] {dtype} buffer for an fp8-only activation"))),
            },
        };
        Ok(Slot { bufs, keep })
    }
    /// The buffer holding layer l's value.
    pub fn at(&self, l: usize) -> Tensor {
        if self.bufs.len() == 1 {
            self.bufs[0]
        } else {
            self.bufs[l]
        }
    }
    /// True when the backward pass does not recompute the value: it survives in a per-layer
    /// buffer, or (`Keep::Fp8Only`) only its fp8 transpose is needed and kept.
    pub fn kept(&self) -> bool {
        self.keep != Keep::Recomputed
    }
    pub fn keep(&self) -> Keep {
        self.keep
    }
}

/// Views into the logits buffer for temporaries that only the backward pass uses. The LM head,
/// the logits' only user, runs inside the forward pass (`Model::forward` with `dloss`), so the
/// buffer is free from the end of one forward pass to the start of the next. Each request gets
/// the next 256-byte-aligned range that fits, or a buffer of its own.
#[derive(Clone, Debug)]
pub struct BackwardScratch {
    region: Option<Tensor>,
    used: usize,
}

impl BackwardScratch {
    /// A temporary that only the backward pass uses.
    pub fn take(&mut self, be: &mut dyn Backend, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        let bytes = dims.iter().product::<usize>() * dtype.size();
        if let Some(r) = &self.region {
            let at = self.used.next_multiple_of(256);
            if at + bytes <= r.bytes() {
                self.used = at + bytes;
                return Ok(r.view(at, dtype, dims));
            }
        }
        be.alloc(MemCategory::Temporaries, Mem::Device, dtype, dims)
    }
    /// Bytes of the logits buffer in use by backward temporaries.
    pub fn used(&self) -> usize {
        self.used
    }
}

/// Shapes of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunShape {
    pub b: usize,
    pub t: usize,
}

pub struct Activations {
    pub shape: RunShape,
    pub attn: AttnShape,
    /// The residual stream [N, C] per layer (`crate::residual`).
    pub res: Residuals,
    pub rstd1: Vec<Tensor>,
    pub rstd2: Vec<Tensor>,
    /// qk-norm reciprocal std [N, Hq + Hkv] (Qwen3 only; empty otherwise).
    pub qk_rstd: Vec<Tensor>,
    pub ln1: Slot,
    /// QKV before qk-norm (kept only when there is a qk-norm to differentiate).
    pub qkv: Slot,
    /// QKV after qk-norm and RoPE: the attention input.
    pub qkv_r: Slot,
    pub att: Slot,
    pub lse: Slot,
    pub ln2: Slot,
    pub up_gate: Slot,
    pub sw: Slot,
    // ---- temporaries (one each) ----
    pub qkv_n: Tensor,
    pub proj: Tensor,
    pub final_ln: Tensor,
    pub final_rstd: Tensor,
    pub losses: Tensor,
    pub ids: Tensor,
    pub targets: Tensor,
    pub freqs: Tensor,
    /// Logits of one LM-head chunk [rows, V].
    pub logits: Tensor,
    pub d_res: Tensor,
    pub d_ln: Tensor,
    pub d_att: Tensor,
    pub d_qkv: Tensor,
    pub d_qkv2: Tensor,
    pub d_up_gate: Tensor,
    pub d_sw: Tensor,
    /// The rest of the logits buffer, for the backward temporaries of other modules (fp8).
    pub bwd_scratch: BackwardScratch,
    /// f32 scratch for per-group gradient sums of squares.
    pub norms: Tensor,
}

impl Activations {
    #[allow(clippy::too_many_arguments)]
    pub fn alloc(
        be: &mut dyn Backend,
        cfg: &ModelConfig,
        shape: RunShape,
        dtype: DType,
        rc: Recompute,
        fp8: bool,
        lmhead_rows: usize,
        norm_slots: usize,
        offload_residual: bool,
    ) -> Result<Activations> {
        let (l, c, d, v) = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let n = shape.b * shape.t;
        let attn = AttnShape { b: shape.b, t: shape.t, hq: cfg.num_heads, hkv: cfg.num_kv_heads, hd: cfg.head_dim };
        let q = attn.qkv_width();
        let f32 = DType::F32;
        let per_layer = |be: &mut dyn Backend, count: usize, dt: DType, dims: &[usize]| -> Result<Vec<Tensor>> {
            (0..count).map(|_| be.alloc(MemCategory::Activations, Mem::Device, dt, dims)).collect()
        };
        let res = Residuals::alloc(be, l, dtype, &[n, c], offload_residual)?;
        let rstd1 = per_layer(be, l, f32, &[n])?;
        let rstd2 = per_layer(be, l, f32, &[n])?;
        // qk-norm's temporaries (one row without qk-norm: nothing else uses them)
        let qk_rows = if cfg.qk_norm { n } else { 1 };
        let qk_rstd = if cfg.qk_norm { per_layer(be, l, f32, &[n, attn.hq + attn.hkv])? } else { vec![] };
        let keep_ln1 = !(rc.norm || rc.att || rc.block);
        let keep_ln2 = !(rc.norm || rc.block);
        let keep_qkv = !(rc.qkv || rc.att || rc.block);
        let keep_att = !(rc.att || rc.block);
        let keep_up = !(rc.ffn || rc.block);
        let keep_sw = !(rc.swiglu || rc.ffn || rc.block);
        // `fp8_only`: kept in fp8 only when the bf16 value feeds no recomputation in the backward
        // pass (ln1 feeds QKV's, ln2 up+gate's; nothing is recomputed from the SwiGLU output)
        let mode = |kept: bool, fp8_only: bool| match (kept, fp8_only && fp8) {
            (false, _) => Keep::Recomputed,
            (true, true) => Keep::Fp8Only,
            (true, false) => Keep::PerLayer,
        };
        let plain = |kept: bool| mode(kept, false);
        let tmp = |be: &mut dyn Backend, dt: DType, dims: &[usize]| be.alloc(MemCategory::Temporaries, Mem::Device, dt, dims);
        let logits = tmp(be, dtype, &[lmhead_rows, v])?;
        let mut bwd_scratch = BackwardScratch { region: (!rc.own_backward_temporaries).then_some(logits), used: 0 };
        let d_up_gate = bwd_scratch.take(be, dtype, &[n, 2 * d])?;
        // the homes of Fp8Only slots: ln1 and ln2 (never live at once) in d_ln, the SwiGLU output
        // in d_sw; the forward pass writes d_ln only in the LM head, after the last block
        let d_ln = tmp(be, dtype, &[n, c])?;
        let d_sw = tmp(be, dtype, &[n, d])?;
        let ln1 = Slot::alloc(be, mode(keep_ln1, keep_qkv && keep_att), l, dtype, &[n, c], Some(&d_ln))?;
        let qkv = Slot::alloc(be, plain(keep_qkv && cfg.qk_norm), l, dtype, &[n, q], None)?;
        let qkv_r = Slot::alloc(be, plain(keep_qkv), l, dtype, &[n, q], None)?;
        let att = Slot::alloc(be, plain(keep_att), l, dtype, &[n, attn.out_width()], None)?;
        let lse = Slot::alloc(be, plain(keep_att), l, f32, &[shape.b, attn.hq, shape.t], None)?;
        let ln2 = Slot::alloc(be, mode(keep_ln2, keep_up), l, dtype, &[n, c], Some(&d_ln))?;
        let up_gate = Slot::alloc(be, plain(keep_up), l, dtype, &[n, 2 * d], None)?;
        let sw = Slot::alloc(be, mode(keep_sw, true), l, dtype, &[n, d], Some(&d_sw))?;
        let mut tmp = |dt: DType, dims: &[usize]| tmp(be, dt, dims);
        Ok(Activations {
            shape,
            attn,
            res,
            rstd1,
            rstd2,
            qk_rstd,
            ln1,
            qkv,
            qkv_r,
            att,
            lse,
            ln2,
            up_gate,
            sw,
            qkv_n: tmp(dtype, &[qk_rows, q])?,
            proj: tmp(dtype, &[n, c])?,
            final_ln: tmp(dtype, &[n, c])?,
            final_rstd: tmp(f32, &[n])?,
            losses: tmp(f32, &[n])?,
            ids: tmp(DType::I32, &[n])?,
            targets: tmp(DType::I32, &[n])?,
            freqs: tmp(f32, &[shape.t, cfg.head_dim / 2, 2])?,
            logits,
            d_res: tmp(dtype, &[n, c])?,
            d_ln,
            d_att: tmp(dtype, &[n, attn.out_width()])?,
            d_qkv: tmp(dtype, &[n, q])?,
            d_qkv2: tmp(dtype, &[qk_rows, q])?,
            d_up_gate,
            d_sw,
            bwd_scratch,
            norms: tmp(f32, &[norm_slots])?,
        })
    }
}
