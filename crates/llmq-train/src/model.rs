//! The LLaMA-family decoder, written once against the op interface: forward, backward,
//! recomputation and gradient accumulation for every backend.
//!
//! Block l (pre-norm):  h = x + Wo·attn(rope(qknorm(Wqkv·rms1(x) + b)))
//!                      y = h + Wdown·swiglu(Wup_gate·rms2(h))
//! The residual add and the following RMSNorm are one fused op. The LM head runs on groups of
//! whole sequences (`lm_head_seqs`, up to LM_HEAD_ROWS rows, a function of B and T only): its
//! logits buffer holds one group, and because every group has the same shape whatever the memory
//! options, they cannot change the numbers.

use crate::acts::{Activations, Keep, RunShape};
use crate::fp8::{Act, Fp8};
use crate::params::{upload_f32, upload_i32, BlockTensors, Params};
use crate::memory::{MemoryOptions, Recompute};
use crate::precision::Precision;
use crate::side::SideWgrads;
use crate::zero::Dist;
use llmq_core::{Backend, Event, GraphKey, Matmul, ModelConfig, Result, Stream, Tensor};
use llmq_io::data::Batch;

/// Rows of logits the LM head materialises at once (one group): cross-entropy, the input
/// gradient and the weight gradient run on whole groups, so that the f32 read-modify-write of the
/// [V, C] weight gradient happens once per group. Measured on the H200 (Qwen2.5-0.5B, bf16): with
/// 1024-row groups the weight gradient cost 15.8 ms per 16k tokens, mostly that read-modify-write;
/// 16384-row groups (one per B16 x T1024 micro-batch) run 2% faster end to end than 4096-row ones
/// (0.5B bf16 and e4m3; 1.5B unchanged). The logits buffer (rows x V bf16, 5 GB for Qwen2.5 at
/// 16k rows) grows with the micro-batch up to this cap, like the other activations.
pub const LM_HEAD_ROWS: usize = 16384;
/// Rows per logits matmul inside a group: cuBLASLt's heuristic picked a 265 TFLOP/s kernel for the
/// [4096, V] logits product and a 710 TFLOP/s one for [1024, V] (H200, V = 151936, C = 896).
pub const LOGITS_ROWS: usize = 1024;

/// Sequences per LM-head group: the largest divisor of B with at most LM_HEAD_ROWS rows (≥ 1).
pub fn lm_head_seqs(b: usize, t: usize) -> usize {
    (1..=b).rev().find(|&g| b.is_multiple_of(g) && g * t <= LM_HEAD_ROWS).unwrap_or(1)
}

pub struct Model {
    pub params: Params,
    pub acts: Activations,
    pub recompute: Recompute,
    /// FP8 state when the matmul dtype is e4m3.
    pub fp8: Option<Fp8>,
    /// fp8 weight gradients on the side stream (`MemoryOptions::wgrad_overlap`).
    side: Option<SideWgrads>,
    /// z-loss coefficient of training passes (evaluation reports the plain cross-entropy).
    pub z_loss: f32,
    /// Blocks (and the optimizer update) run as captured graphs (`MemoryOptions::cuda_graphs`).
    graphs: bool,
    eps: f32,
    /// Recorded on the compute stream before the gradients are zeroed on the copy stream, and on
    /// the copy stream after; the first gradient write (the LM head's) waits for the second.
    compute_idle: Event,
    grads_zeroed: Event,
}

/// Index of each block matmul in `fp8::WEIGHTS`.
const QKV: usize = 0;
const OUT: usize = 1;
const UP: usize = 2;
const DOWN: usize = 3;

impl Model {
    pub fn new(be: &mut dyn Backend, cfg: &ModelConfig, precision: Precision, shape: RunShape, mem: &MemoryOptions) -> Result<Model> {
        Model::new_dist(be, cfg, precision, shape, mem, None)
    }

    /// A model replica of one rank of a data-parallel group (`dist`, more than one rank), its
    /// state sharded as `crate::zero` describes.
    pub fn new_dist(be: &mut dyn Backend, cfg: &ModelConfig, precision: Precision, shape: RunShape, mem: &MemoryOptions, dist: Option<Dist>) -> Result<Model> {
        let (compute_idle, grads_zeroed) = (be.create_event()?, be.create_event()?);
        cfg.validate()?;
        precision.validate()?;
        mem.validate(&precision)?;
        let recompute = mem.recompute;
        let params = Params::alloc(be, cfg, precision, mem, dist)?;
        let norm_slots = params.layout.groups.len();
        let lm_rows = lm_head_seqs(shape.b, shape.t) * shape.t;
        let fp8 = precision.matmul.is_fp8();
        let mut acts = Activations::alloc(be, cfg, shape, precision.weights, recompute, fp8, lm_rows, norm_slots, mem.offload_residual)?;
        if !be.records_only() {
            upload_f32(be, &acts.freqs, &cfg.rope_table(shape.t))?;
        }
        let fp8 = if fp8 {
            // Act order. The weight gradient reads each input's transpose: kept from the forward
            // pass, or quantised in the backward pass from the bf16 input, recomputed or (with
            // `recompute.fp8_inputs`) kept
            let keep = [&acts.ln1, &acts.att, &acts.ln2, &acts.sw].map(|s| match s.keep() {
                Keep::Fp8Only => true,
                Keep::PerLayer => !recompute.fp8_inputs,
                Keep::Recomputed => false,
            });
            Some(Fp8::alloc(be, cfg, &params, shape.b * shape.t, &precision, mem, keep, &mut acts.bwd_scratch)?)
        } else {
            None
        };
        let side = if mem.wgrad_overlap { Some(SideWgrads::new(be)?) } else { None };
        Ok(Model { params, acts, recompute, fp8, side, z_loss: 0.0, graphs: mem.cuda_graphs, eps: cfg.rms_norm_eps as f32, compute_idle, grads_zeroed })
    }

    /// To be called whenever the weights change outside the optimizer (init, load): refreshes
    /// the fp8 weight abs-maxes and persistent quants.
    pub fn weights_changed(&self, be: &dyn Backend) -> Result<()> {
        self.params.weights_changed();
        match &self.fp8 {
            Some(f) => f.init_weight_amax(be, &self.params),
            None => Ok(()),
        }
    }

    /// After an optimizer update (whose AdamW wrote the weight abs-maxes).
    pub fn weights_updated(&self, be: &dyn Backend) -> Result<()> {
        self.params.weights_changed();
        match &self.fp8 {
            Some(f) => f.refresh(be, &self.params),
            None => Ok(()),
        }
    }

    /// Abs-max output slot for activation `a` of layer l (fp8 runs only).
    fn amax(&self, l: usize, a: Act) -> Option<Tensor> {
        self.fp8.as_ref().map(|f| f.act_amax(l, a))
    }
    /// Abs-max output for the activation gradient a backward op produces (fp8 runs only).
    fn gamax(&self) -> Option<Tensor> {
        self.fp8.as_ref().map(|f| f.grad_amax)
    }

    /// Block matmul k of layer l: out = x · Wᵀ (+ bias), in fp8 when enabled.
    #[allow(clippy::too_many_arguments)]
    fn mm(&self, be: &dyn Backend, l: usize, k: usize, out: &Tensor, x: &Tensor, act: Act, w: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        match &self.fp8 {
            Some(f) => f.forward(be, &self.params, l, k, out, x, act, &f.act_amax(l, act), bias),
            None => be.matmul(&Matmul::linear(out, x, w).with_bias(bias)),
        }
    }

    /// Backward of block matmul k: dx = dy · W, dW += dyᵀ · x.
    #[allow(clippy::too_many_arguments)]
    fn mm_bwd(&self, be: &dyn Backend, l: usize, k: usize, dx: &Tensor, dw: &Tensor, dy: &Tensor, x: &Tensor, act: Act, w: &Tensor) -> Result<()> {
        match &self.fp8 {
            Some(f) => f.backward(be, &self.params, l, k, dx, dw, dy, x, act, &f.act_amax(l, act), self.side.as_ref()),
            None => {
                be.matmul(&Matmul::linear_dgrad(dx, dy, w))?;
                be.matmul(&Matmul::linear_wgrad(dw, dy, x))
            }
        }
    }

    /// Block l's weights for a pass (bf16, and streamed fp8 quants, with their transposes in
    /// the `backward` pass). Pair with `release(l)`.
    fn block(&self, be: &dyn Backend, l: usize, backward: bool) -> Result<BlockTensors> {
        let w = self.params.block(be, l)?;
        if let Some(f) = &self.fp8 {
            f.acquire(be, &self.params, l, backward)?;
        }
        Ok(w)
    }
    /// Starts bringing block l's weights (streamed or gathered; no-op otherwise).
    fn prefetch(&self, be: &dyn Backend, l: usize) -> Result<()> {
        self.params.prefetch(be, l)?;
        self.fp8.as_ref().map_or(Ok(()), |f| f.prefetch(be, &self.params, l))
    }
    fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        self.params.release(be, l)?;
        self.fp8.as_ref().map_or(Ok(()), |f| f.release(be, l))
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.params.cfg
    }

    fn n(&self) -> usize {
        self.acts.shape.b * self.acts.shape.t
    }

    /// Zeroes the gradients on the copy stream, beside the next forward pass (which writes no
    /// gradient before the LM head, and that waits for this). Ordered after all work queued so far.
    pub fn zero_grads(&self, be: &dyn Backend) -> Result<()> {
        be.record(self.compute_idle, Stream::Compute)?;
        be.wait(Stream::Copy, self.compute_idle)?;
        self.params.grads.zero_device_on(be, Stream::Copy)?;
        self.params.start_step();
        be.record(self.grads_zeroed, Stream::Copy)
    }

    /// Uploads a batch (inputs and targets, [B*T] each).
    pub fn set_batch(&self, be: &dyn Backend, batch: &Batch) -> Result<()> {
        self.check_batch(batch)?;
        upload_i32(be, &self.acts.ids, &batch.inputs)?;
        upload_i32(be, &self.acts.targets, &batch.targets)
    }

    /// Points the passes at a micro-batch staged on the device (`crate::token_stage`): its
    /// inputs and targets, and the rows its per-row losses go to.
    pub fn use_staged(&mut self, ids: Tensor, targets: Tensor, losses: Tensor) {
        (self.acts.ids, self.acts.targets, self.acts.losses) = (ids, targets, losses);
    }

    /// Checks a batch's size and tokens against the model.
    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = self.n();
        if batch.inputs.len() != n || batch.targets.len() != n {
            return Err(llmq_core::Error::Op(format!(
                "batch has {} inputs and {} targets, the model was built for B*T = {n}",
                batch.inputs.len(),
                batch.targets.len()
            )));
        }
        let v = self.cfg().vocab_size as i32;
        if let Some(bad) = batch.inputs.iter().find(|&&t| t < 0 || t >= v) {
            return Err(llmq_core::Error::Op(format!("input token {bad} is outside the vocabulary 0..{v}")));
        }
        // checked here because a GPU kernel cannot report it (it would write NaN rows)
        if let Some(bad) = batch.targets.iter().find(|&&t| t != -100 && (t < 0 || t >= v)) {
            return Err(llmq_core::Error::Op(format!("target token {bad} is outside the vocabulary 0..{v} (and not -100)")));
        }
        Ok(())
    }

    // ---- forward ------------------------------------------------------------------------

    /// Forward pass over the uploaded batch, leaving per-row losses in `acts.losses`. With
    /// `dloss = Some(s)`, also runs the LM head's backward (dlogits = s·(softmax − onehot)),
    /// accumulating its weight gradient, so that `backward` can follow.
    pub fn forward(&self, be: &dyn Backend, dloss: Option<f32>) -> Result<()> {
        let a = &self.acts;
        let head = self.params.head();
        let l_count = self.cfg().num_layers;
        be.embedding_fwd(&a.res.write_att(be, 0)?, &a.ids, &head.embedding)?;
        let w0 = self.params.block(be, 0)?;
        be.rmsnorm_fwd(&a.ln1.at(0), &a.rstd1[0], &a.res.att(0), &w0.ln1, self.eps, self.amax(0, Act::Ln1).as_ref())?;
        for l in 0..l_count {
            let w = self.block(be, l, false)?;
            self.prefetch(be, l + 1)?;
            self.graph(be, GraphKey::new("forward", l), &mut |be| self.block_forward(be, l, &w))?;
            a.res.stored(be, l)?;
            self.release(be, l)?;
        }
        self.lm_head(be, dloss)
    }

    /// Block l's forward pass, from its ln1 output to the next block's (or the final norm's).
    fn block_forward(&self, be: &dyn Backend, l: usize, w: &BlockTensors) -> Result<()> {
        let a = &self.acts;
        let l_count = self.cfg().num_layers;
        self.attention_stages(be, l, w, true)?;
        self.mm(be, l, OUT, &a.proj, &a.att.at(l), Act::Att, &w.o_w, None)?;
        let res_ffn = a.res.write_ffn(be, l)?;
        be.residual_rmsnorm_fwd(&res_ffn, &a.ln2.at(l), &a.rstd2[l], &a.res.att(l), &a.proj, &w.ln2, self.eps, self.amax(l, Act::Ln2).as_ref())?;
        self.mlp_stages(be, l, w, true)?;
        self.mm(be, l, DOWN, &a.proj, &a.sw.at(l), Act::Sw, &w.down_w, None)?;
        // fused: next residual + the norm that consumes it
        if l + 1 < l_count {
            let next = self.params.block(be, l + 1)?;
            let am = self.amax(l + 1, Act::Ln1);
            be.residual_rmsnorm_fwd(&a.res.write_att(be, l + 1)?, &a.ln1.at(l + 1), &a.rstd1[l + 1], &res_ffn, &a.proj, &next.ln1, self.eps, am.as_ref())?;
            self.params.release(be, l + 1)
        } else {
            let head = self.params.head();
            be.residual_rmsnorm_fwd(&a.res.write_att(be, l + 1)?, &a.final_ln, &a.final_rstd, &res_ffn, &a.proj, &head.final_norm, self.eps, None)
        }
    }

    /// Runs `f` as the captured graph `key` with `MemoryOptions::cuda_graphs`, else directly.
    /// The options that would make a block's ops differ between calls (streamed, offloaded or
    /// sharded block state, side-stream work) are refused with graphs (`MemoryOptions::validate`).
    pub fn graph(&self, be: &dyn Backend, key: GraphKey, f: &mut llmq_core::capture::CaptureFn) -> Result<()> {
        if self.graphs {
            be.capture(key, f)
        } else {
            f(be)
        }
    }

    /// ln1 (unless the forward pass just produced it), QKV, qk-norm, RoPE, attention for block l.
    /// In the backward pass (`full = false`) only what was not kept is recomputed.
    fn attention_stages(&self, be: &dyn Backend, l: usize, w: &BlockTensors, full: bool) -> Result<()> {
        let a = &self.acts;
        if !full && !a.ln1.kept() {
            be.rmsnorm_fwd(&a.ln1.at(l), &a.rstd1[l], &a.res.att(l), &w.ln1, self.eps, self.amax(l, Act::Ln1).as_ref())?;
        }
        if full || !a.qkv_r.kept() || !a.att.kept() {
            if full || !a.qkv_r.kept() {
                match (&w.q_norm, &w.k_norm) {
                    (Some(qn), Some(kn)) => {
                        self.mm(be, l, QKV, &a.qkv.at(l), &a.ln1.at(l), Act::Ln1, &w.qkv_w, w.qkv_b.as_ref())?;
                        be.qk_norm_fwd(&a.qkv_n, &a.qk_rstd[l], &a.qkv.at(l), qn, kn, a.attn, self.eps)?;
                        be.rope_fwd(&a.qkv_r.at(l), &a.qkv_n, &a.freqs, a.attn, None)?;
                    }
                    // the bias is added by RoPE's pass (one pass over qkv fewer)
                    _ => {
                        self.mm(be, l, QKV, &a.qkv.at(l), &a.ln1.at(l), Act::Ln1, &w.qkv_w, None)?;
                        be.rope_fwd(&a.qkv_r.at(l), &a.qkv.at(l), &a.freqs, a.attn, w.qkv_b.as_ref())?;
                    }
                }
            }
            if full || !a.att.kept() {
                be.attention_fwd(&a.att.at(l), &a.lse.at(l), &a.qkv_r.at(l), a.attn, self.amax(l, Act::Att).as_ref())?;
            }
        }
        Ok(())
    }

    /// ln2 (backward only), up+gate matmul and SwiGLU for block l; recomputes what was not kept.
    fn mlp_stages(&self, be: &dyn Backend, l: usize, w: &BlockTensors, full: bool) -> Result<()> {
        let a = &self.acts;
        if !full && !a.ln2.kept() {
            be.rmsnorm_fwd(&a.ln2.at(l), &a.rstd2[l], &a.res.ffn(l), &w.ln2, self.eps, self.amax(l, Act::Ln2).as_ref())?;
        }
        if full || !a.up_gate.kept() {
            self.mm(be, l, UP, &a.up_gate.at(l), &a.ln2.at(l), Act::Ln2, &w.up_gate_w, None)?;
        }
        if full || !a.sw.kept() {
            be.swiglu_fwd(&a.sw.at(l), &a.up_gate.at(l), self.amax(l, Act::Sw).as_ref())?;
        }
        Ok(())
    }

    /// Logits and fused cross-entropy one group of sequences at a time; with `dloss`, also the LM
    /// head's input gradient (into `acts.d_ln`) and weight gradient.
    fn lm_head(&self, be: &dyn Backend, dloss: Option<f32>) -> Result<()> {
        let a = &self.acts;
        let rows = lm_head_seqs(a.shape.b, a.shape.t) * a.shape.t;
        let head = self.params.head();
        let ghead = self.params.grad_head();
        if dloss.is_some() {
            be.wait(Stream::Compute, self.grads_zeroed)?; // see zero_grads
        }
        for r0 in (0..a.shape.b * a.shape.t).step_by(rows) {
            let x = a.final_ln.rows(r0, rows);
            for s0 in (0..rows).step_by(LOGITS_ROWS) {
                let sub = LOGITS_ROWS.min(rows - s0);
                be.matmul(&Matmul::linear(&a.logits.rows(s0, sub), &x.rows(s0, sub), &head.lm_head))?;
            }
            let losses = a.losses.slice(r0, &[rows]);
            let tg = a.targets.slice(r0, &[rows]);
            let z = if dloss.is_some() { self.z_loss } else { 0.0 };
            be.cross_entropy(&a.logits, &losses, &tg, dloss.unwrap_or(0.0), z)?;
            if dloss.is_some() {
                be.matmul(&Matmul::linear_dgrad(&a.d_ln.rows(r0, rows), &a.logits, &head.lm_head))?;
                be.matmul(&Matmul::linear_wgrad(&ghead.lm_head, &a.logits, &x))?;
            }
        }
        Ok(())
    }

    // ---- backward -----------------------------------------------------------------------

    /// Backward pass after `forward(.., Some(dloss))`: accumulates every parameter gradient.
    pub fn backward(&self, be: &dyn Backend) -> Result<()> {
        let a = &self.acts;
        let head = self.params.head();
        let ghead = self.params.grad_head();
        let l_count = self.cfg().num_layers;
        // final norm: d_res = d(final residual)
        be.rmsnorm_bwd(&a.d_res, &ghead.final_norm, &a.d_ln, &a.res.att(l_count), &head.final_norm, &a.final_rstd, None, self.gamax().as_ref())?;
        for l in (0..l_count).rev() {
            let w = self.block(be, l, true)?;
            let g = self.params.grad_block(be, l)?;
            a.res.acquire(be, l)?;
            if l > 0 {
                self.prefetch(be, l - 1)?;
                self.params.prefetch_grad(be, l - 1)?;
                a.res.prefetch(be, l - 1)?;
            }
            self.graph(be, GraphKey::new("backward", l), &mut |be| self.block_backward(be, l, &w, &g))?;
            self.release(be, l)?;
            self.params.release_grad(be, l)?;
            a.res.release(be, l)?;
        }
        self.params.micro_batch_done(be)?;
        be.embedding_bwd(&ghead.embedding, &a.ids, &a.d_res)?;
        match &self.side {
            Some(s) => s.join(be),
            None => Ok(()),
        }
    }

    /// On entry `d_res` holds the gradient of block l's output; on exit that of its input.
    fn block_backward(&self, be: &dyn Backend, l: usize, w: &BlockTensors, g: &BlockTensors) -> Result<()> {
        let a = &self.acts;
        // MLP
        // (in fp8 runs, each op that produces an activation gradient also writes its abs-max,
        // which the next block matmul backward consumes)
        let gam = self.gamax();
        let gam = gam.as_ref();
        self.mlp_stages(be, l, w, false)?;
        self.mm_bwd(be, l, DOWN, &a.d_sw, &g.down_w, &a.d_res, &a.sw.at(l), Act::Sw, &w.down_w)?;
        be.swiglu_bwd(&a.d_up_gate, &a.d_sw, &a.up_gate.at(l), gam)?;
        self.mm_bwd(be, l, UP, &a.d_ln, &g.up_gate_w, &a.d_up_gate, &a.ln2.at(l), Act::Ln2, &w.up_gate_w)?;
        be.rmsnorm_bwd(&a.d_res, &g.ln2, &a.d_ln, &a.res.ffn(l), &w.ln2, &a.rstd2[l], Some(&a.d_res), gam)?;
        // attention
        self.attention_stages(be, l, w, false)?;
        self.mm_bwd(be, l, OUT, &a.d_att, &g.o_w, &a.d_res, &a.att.at(l), Act::Att, &w.o_w)?;
        // attention's backward also applies RoPE's (and, in fp8 runs, takes the abs-max)
        let (qkv_r, att, lse) = (a.qkv_r.at(l), a.att.at(l), a.lse.at(l));
        match (&w.q_norm, &w.k_norm, &g.q_norm, &g.k_norm) {
            (Some(qn), Some(kn), Some(gq), Some(gk)) => {
                be.attention_bwd(&a.d_qkv2, &a.d_att, &qkv_r, &att, &lse, a.attn, Some(&a.freqs), None)?;
                be.qk_norm_bwd(&a.d_qkv, gq, gk, &a.d_qkv2, &a.qkv.at(l), qn, kn, &a.qk_rstd[l], a.attn, gam)?;
            }
            _ => be.attention_bwd(&a.d_qkv, &a.d_att, &qkv_r, &att, &lse, a.attn, Some(&a.freqs), gam)?,
        }
        if let Some(gb) = &g.qkv_b {
            be.colsum(gb, &a.d_qkv, true)?;
        }
        self.mm_bwd(be, l, QKV, &a.d_ln, &g.qkv_w, &a.d_qkv, &a.ln1.at(l), Act::Ln1, &w.qkv_w)?;
        be.rmsnorm_bwd(&a.d_res, &g.ln1, &a.d_ln, &a.res.att(l), &w.ln1, &a.rstd1[l], Some(&a.d_res), gam)
    }

    /// Sum of the per-row losses of the last forward pass (f64, in row order).
    pub fn loss_sum(&self, be: &dyn Backend) -> Result<f64> {
        let v = crate::params::download_f32(be, &self.acts.losses)?;
        Ok(v.iter().map(|&x| x as f64).sum())
    }

    /// Per-group sums of squares of the gradients (computed on the device, summed on the host in
    /// group order in f64, so the result does not depend on how groups are placed). With several
    /// ranks each rank sums its shard of the reduced gradients and the shards' sums are added in
    /// rank order.
    pub fn grad_norm_squares(&self, be: &dyn Backend) -> Result<Vec<f64>> {
        let p = &self.params;
        let Some(d) = &p.dist else {
            for (i, t) in p.grads.groups.iter().enumerate() {
                be.sum_squares(&self.acts.norms, i, t)?;
            }
            return Ok(crate::params::download_f32(be, &self.acts.norms)?.iter().map(|&x| x as f64).collect());
        };
        let mut owned = vec![false; p.layout.groups.len()];
        for (i, o) in owned.iter_mut().enumerate() {
            let g = p.own_grads(i);
            if g.numel() > 0 {
                be.sum_squares(&self.acts.norms, i, &g)?;
                *o = true;
            }
        }
        let sums = crate::params::download_f32(be, &self.acts.norms)?;
        let mut v: Vec<f64> = sums.iter().zip(&owned).map(|(&x, &o)| if o { x as f64 } else { 0.0 }).collect();
        d.comm.all_reduce_host(&mut v, llmq_core::ReduceOp::Sum, "gradient norm")?;
        Ok(v)
    }
}
