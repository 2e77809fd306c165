//! Streamed persistent fp8 weights: with `--persistent-quants`, the quantised block weights live
//! away from the compute — in pinned host memory (`--offload-quants`) or as this rank's shard
//! (ZeRO-3, `--shard-weights` over several ranks, on the device or with `--offload-quants` on the
//! host) — and pass through two device slots (`crate::stream::Slots`) for the forward pass, the
//! recomputation and the backward pass of their block, block l + 1 arriving while l computes.
//!
//! What lives at home, per block: the plain e4m3 form of the block's four matrices, one byte per
//! parameter, laid out like the block's bf16 group (matrix k at its entry's offset; the bytes of
//! the norms and biases are not used) and cut like it into the ranks' shards. Only the plain
//! form: the transpose cannot be quantised from a shard (it mixes rows that different ranks
//! hold), and moving it too would double the bytes. The slot's second part receives the
//! transposes, made on the device where the backward pass first needs them
//! (`Backend::transpose`, bit-exact): quantisation is element-wise with one scale per matrix,
//! so the transposed quantised bytes are exactly those of quantising the transpose, and the
//! numbers are those of resident persistent quants.
//!
//! Refresh (once per optimizer step, and after loading): each rank quantises the part of every
//! matrix inside its shard with the matrix's abs-max, which is global (the optimizer
//! max-reduces it over ranks), so the pieces are bytewise pieces of the whole quantised matrix.
//! The descale depends on the abs-max alone; a rank whose shard holds no part of a matrix still
//! writes it, by quantising one element into a scratch byte. Fill: a copy from the host (one
//! rank) or an all-gather of the ranks' shards, on the copy stream. The refresh writes the homes
//! on the compute stream after every earlier fill has landed, and the copy stream waits for it
//! before the next fill.
//!
//! The bf16 state the device still needs: the norms and the QKV bias of each block (read by
//! RMSNorm, qk-norm and RoPE): resident, streamed through two slots with `--shard-weights` on
//! one device, or broadcast piece by piece from the ranks that hold them under ZeRO-3
//! (`Params::gather_small`).
//! The matmuls no longer read the bf16 matrices; the refresh reads them where they live (host
//! memory when streamed), once per step, and so does `--log-amax`. With `--shard-weights` on one
//! device as well, the device holds no block's weights beyond its two bf16 and two fp8 slots.

use crate::fp8::WEIGHTS;
use crate::params::Params;
use crate::stream::Slots;
use llmq_core::{Backend, DType, Event, Mem, MemCategory, Result, Stream, Tensor};
use std::cell::Cell;

pub struct StreamedQuants {
    /// Per layer: the rank's shard (the whole block with one rank) of the plain e4m3 form.
    homes: Vec<Tensor>,
    slots: Slots,
    /// Per slot: the block whose transposes the slot's second part holds.
    transposed: [Cell<Option<usize>>; 2],
    /// f32, 16 bytes per (layer, matrix): the descales.
    descales: Tensor,
    /// One e4m3 element for descale-only quantisations.
    scratch: Tensor,
    /// compute -> copy: the homes were rewritten.
    refreshed: Event,
    /// Per matrix: its offset in the slot's transpose part.
    t_offsets: [usize; 4],
}

impl StreamedQuants {
    pub fn alloc(be: &mut dyn Backend, params: &Params, offload: bool) -> Result<StreamedQuants> {
        let layers = params.cfg.num_layers;
        let place = if offload { Mem::Host } else { Mem::Device };
        let homes = (0..layers).map(|l| be.alloc(MemCategory::Quants, place, DType::E4M3, &[params.shard(params.layout.block_group(l)).size])).collect::<Result<Vec<_>>>()?;
        let mut t_offsets = [0; 4];
        let mut t_total = 0;
        for (k, off) in t_offsets.iter_mut().enumerate() {
            *off = t_total;
            t_total += params.layout.block(0).entry(WEIGHTS[k]).expect("block matmul weight").numel();
        }
        let padded = (0..layers).map(|l| params.shard(params.layout.block_group(l)).padded).max().unwrap_or(0);
        let slots = Slots::alloc(be, MemCategory::Quants, DType::E4M3, padded + t_total)?;
        let descales = be.alloc(MemCategory::Quants, Mem::Device, DType::F32, &[layers * 4 * 4])?;
        let scratch = be.alloc(MemCategory::Quants, Mem::Device, DType::E4M3, &[16])?;
        Ok(StreamedQuants { homes, slots, transposed: [Cell::new(None), Cell::new(None)], descales, scratch, refreshed: be.create_event()?, t_offsets })
    }

    fn padded(params: &Params, l: usize) -> usize {
        params.shard(params.layout.block_group(l)).padded
    }

    /// Re-quantises every block's home from the bf16 weights where they live (its shard of them
    /// under ZeRO-3) with the abs-maxes in `weight_amax` (per group, per entry).
    pub fn refresh(&self, be: &dyn Backend, params: &Params, weight_amax: &[Tensor]) -> Result<()> {
        self.slots.fills_done(be)?;
        for (l, home) in self.homes.iter().enumerate() {
            let gi = params.layout.block_group(l);
            let (g, sh) = (&params.layout.groups[gi], params.shard(gi));
            let w = &params.weights.groups[gi];
            // where element 0 of `w` sits in the group
            let base = if params.weights_sharded(gi) { sh.start } else { 0 };
            for (k, kind) in WEIGHTS.iter().enumerate() {
                let si = g.entries.iter().position(|e| e.kind == *kind).expect("block matmul weight");
                let e = &g.entries[si];
                let amax = weight_amax[gi].slice(si, &[1]);
                let ds = self.descale(l, k);
                let (a, b) = (e.offset.max(sh.start), (e.offset + e.numel()).min(sh.start + sh.len));
                if a < b {
                    be.quantize(&home.slice(a - sh.start, &[b - a]), &ds, &w.slice(a - base, &[b - a]), &amax, false)?;
                } else {
                    let one = params.weights.groups[llmq_core::ParamLayout::EMBED].slice(0, &[1]);
                    be.quantize(&self.scratch.slice(0, &[1]), &ds, &one, &amax, false)?;
                }
            }
        }
        be.record(self.refreshed, Stream::Compute)?;
        be.wait(Stream::Copy, self.refreshed)?;
        self.slots.invalidate();
        self.transposed.iter().for_each(|t| t.set(None));
        Ok(())
    }

    fn descale(&self, l: usize, k: usize) -> Tensor {
        self.descales.slice((l * 4 + k) * 4, &[1])
    }

    /// Starts bringing block l's quants to its slot on the copy stream (unless it holds them).
    pub fn prefetch(&self, be: &dyn Backend, params: &Params, l: usize) -> Result<()> {
        if l >= self.homes.len() {
            return Ok(());
        }
        let (home, transposed) = (&self.homes[l], &self.transposed[l % 2]);
        self.slots.fetch_with(be, l, Self::padded(params, l), |dst| {
            transposed.set(None);
            match &params.dist {
                Some(d) => d.comm.all_gather(be, dst, home, Stream::Copy, &format!("fp8 weights of block {l}")),
                None => be.copy(dst, home, Stream::Copy),
            }
        })
    }

    /// Makes block l's quants usable on the compute stream: the plain forms, and with
    /// `transposes` (the backward pass) the transposed ones too.
    pub fn acquire(&self, be: &dyn Backend, params: &Params, l: usize, transposes: bool) -> Result<()> {
        self.prefetch(be, params, l)?;
        let padded = Self::padded(params, l);
        self.slots.ready_for_compute(be, l, padded)?;
        let done = &self.transposed[l % 2];
        if transposes && done.get() != Some(l) {
            for k in 0..4 {
                let (q, qt) = self.views(params, l, k, padded);
                be.transpose(&qt, &q)?;
            }
            done.set(Some(l));
        }
        Ok(())
    }

    /// The compute stream is done with block l's slot for this pass.
    pub fn release(&self, be: &dyn Backend, l: usize) -> Result<()> {
        self.slots.release(be, l)
    }

    fn views(&self, params: &Params, l: usize, k: usize, padded: usize) -> (Tensor, Tensor) {
        let e = params.layout.block(l).entry(WEIGHTS[k]).expect("block matmul weight");
        let (out, inp) = (e.shape[0], e.shape[1]);
        (self.slots.view_at(l, e.offset, &[out, inp]), self.slots.view_at(l, padded + self.t_offsets[k], &[inp, out]))
    }

    /// Block l's matrix k: (plain [out, in], transposed [in, out], descale), from its slot
    /// (acquired, with the transposes where `transposed`).
    pub fn weight(&self, params: &Params, l: usize, k: usize, transposed: bool) -> Result<(Tensor, Tensor, Tensor)> {
        if !self.slots.holds(l) || (transposed && self.transposed[l % 2].get() != Some(l)) {
            return Err(llmq_core::Error::Op(format!("fp8 weights of block {l} used outside its acquire/release (its slot holds another block)")));
        }
        let (q, qt) = self.views(params, l, k, Self::padded(params, l));
        Ok((q, qt, self.descale(l, k)))
    }
}
