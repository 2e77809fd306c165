//! CPU reference ops. (stubs: being written)
#![allow(unused_variables)]
use crate::backend::{AdamW, AttnShape, Matmul, Segment};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

fn todo(op: &str) -> Result<()> { Err(Error::Op(format!("{op}: not implemented on cpu yet"))) }
pub fn matmul(a: &Matmul) -> Result<()> { todo("matmul") }
pub fn embedding_fwd(out: &Tensor, ids: &Tensor, table: &Tensor) -> Result<()> { todo("embedding_fwd") }
pub fn embedding_bwd(dtable: &Tensor, ids: &Tensor, dout: &Tensor) -> Result<()> { todo("embedding_bwd") }
pub fn rmsnorm_fwd(out: &Tensor, rstd: &Tensor, x: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> { todo("rmsnorm_fwd") }
#[allow(clippy::too_many_arguments)]
pub fn residual_rmsnorm_fwd(res_out: &Tensor, out: &Tensor, rstd: &Tensor, x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32, absmax: Option<&Tensor>) -> Result<()> { todo("residual_rmsnorm_fwd") }
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(dx: &Tensor, dw: &Tensor, dout: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor, dres: Option<&Tensor>, absmax: Option<&Tensor>) -> Result<()> { todo("rmsnorm_bwd") }
pub fn qk_norm_fwd(out: &Tensor, rstd: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, shape: AttnShape, eps: f32) -> Result<()> { todo("qk_norm_fwd") }
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_bwd(dqkv: &Tensor, dqw: &Tensor, dkw: &Tensor, dout: &Tensor, qkv: &Tensor, qw: &Tensor, kw: &Tensor, rstd: &Tensor, shape: AttnShape) -> Result<()> { todo("qk_norm_bwd") }
pub fn rope(out: &Tensor, inp: &Tensor, freqs: &Tensor, shape: AttnShape, backward: bool, absmax: Option<&Tensor>) -> Result<()> { todo("rope") }
pub fn attention_fwd(out: &Tensor, lse: &Tensor, qkv: &Tensor, shape: AttnShape) -> Result<()> { todo("attention_fwd") }
pub fn attention_bwd(dqkv: &Tensor, dout: &Tensor, qkv: &Tensor, out: &Tensor, lse: &Tensor, shape: AttnShape) -> Result<()> { todo("attention_bwd") }
pub fn swiglu_fwd(out: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> { todo("swiglu_fwd") }
pub fn swiglu_bwd(dinp: &Tensor, dout: &Tensor, inp: &Tensor, absmax: Option<&Tensor>) -> Result<()> { todo("swiglu_bwd") }
pub fn cross_entropy(logits: &Tensor, losses: &Tensor, targets: &Tensor, dloss: f32) -> Result<()> { todo("cross_entropy") }
pub fn colsum(out: &Tensor, inp: &Tensor, accumulate: bool) -> Result<()> { todo("colsum") }
pub fn absmax(out: &Tensor, inp: &Tensor) -> Result<()> { todo("absmax") }
pub fn quantize(out: &Tensor, descale: &Tensor, inp: &Tensor, absmax: &Tensor, transpose: bool) -> Result<()> { todo("quantize") }
pub fn transpose(out: &Tensor, inp: &Tensor) -> Result<()> { todo("transpose") }
pub fn adamw(a: &AdamW, segments: &[Segment]) -> Result<()> { todo("adamw") }
pub fn sum_squares(out: &Tensor, slot: usize, t: &Tensor) -> Result<()> { todo("sum_squares") }
