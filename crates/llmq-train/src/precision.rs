//! Numeric formats of a run and memory options, validated together.

use llmq_core::{DType, Error, Result};
use serde::{Deserialize, Serialize};

/// Which dtypes hold what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Precision {
    /// Working weights and activations (matmul inputs): fp32 or bf16.
    pub weights: DType,
    /// Matmul operand dtype: fp32, bf16 or e4m3 (fp8 with per-tensor current scaling).
    pub matmul: DType,
    /// Master weights the optimizer updates: fp32 or bf16 (stochastic rounding).
    pub master: DType,
    /// Parameter gradients (accumulated over micro-batches): fp32 or bf16.
    pub grads: DType,
    pub opt_m: DType,
    pub opt_v: DType,
    /// fp8 format of activation gradients in fp8 matmuls: e4m3 or e5m2.
    #[serde(default = "default_act_grads")]
    pub act_grads: DType,
    /// Keep the fp8 weights (and transposes) between micro-batches, re-quantised once per
    /// optimizer step (a memory/speed option: it does not change the numbers).
    #[serde(default)]
    pub persistent_quants: bool,
    /// fp8: run the weight-gradient matmuls whose inputs are kept on a second stream, beside
    /// the input-gradient chain (a speed option: the same ops on the same bytes, so the same
    /// numbers).
    #[serde(default)]
    pub wgrad_overlap: bool,
}

fn default_act_grads() -> DType {
    DType::E4M3
}

impl Precision {
    /// The all-fp32 reference numerics (CPU default, gradient checks).
    pub fn fp32() -> Precision {
        Precision {
            weights: DType::F32,
            matmul: DType::F32,
            master: DType::F32,
            grads: DType::F32,
            opt_m: DType::F32,
            opt_v: DType::F32,
            act_grads: DType::E4M3,
            persistent_quants: false,
            wgrad_overlap: false,
        }
    }
    /// bf16 weights/activations with fp32 master weights, gradients and optimizer state.
    pub fn bf16() -> Precision {
        Precision { weights: DType::BF16, matmul: DType::BF16, ..Self::fp32() }
    }
    /// fp8 (e4m3) block matmuls on bf16 weights and activations.
    pub fn fp8() -> Precision {
        Precision { weights: DType::BF16, matmul: DType::E4M3, ..Self::fp32() }
    }
    pub fn validate(&self) -> Result<()> {
        let one_of = |what: &str, d: DType, ok: &[DType]| -> Result<()> {
            if ok.contains(&d) {
                Ok(())
            } else {
                let names: Vec<_> = ok.iter().map(|d| d.name()).collect();
                Err(Error::Config(format!("{what}: expected one of {}, got {d}", names.join(", "))))
            }
        };
        one_of("--matmul-dtype", self.matmul, &[DType::F32, DType::BF16, DType::E4M3])?;
        one_of("--model-dtype", self.master, &[DType::F32, DType::BF16])?;
        one_of("--grad-dtype", self.grads, &[DType::F32, DType::BF16])?;
        one_of("--opt-m-dtype", self.opt_m, &[DType::F32, DType::BF16])?;
        one_of("--opt-v-dtype", self.opt_v, &[DType::F32, DType::BF16])?;
        one_of("working weights", self.weights, &[DType::F32, DType::BF16])?;
        if self.master == DType::F32 && self.weights == DType::BF16 && self.matmul == DType::F32 {
            return Err(Error::Config("fp32 matmuls need fp32 working weights".into()));
        }
        one_of("--gradient-dtype", self.act_grads, &[DType::E4M3, DType::E5M2])?;
        if self.matmul.is_fp8() && self.weights != DType::BF16 {
            return Err(Error::Config("--matmul-dtype e4m3 runs on bf16 weights and activations".into()));
        }
        if self.persistent_quants && !self.matmul.is_fp8() {
            return Err(Error::Config("--persistent-quants only applies with --matmul-dtype e4m3".into()));
        }
        if self.wgrad_overlap && !self.matmul.is_fp8() {
            return Err(Error::Config("the side-stream weight gradients (wgrad_overlap) only apply with --matmul-dtype e4m3".into()));
        }
        Ok(())
    }
}

/// Activation recomputation: which activations are recomputed in the backward pass instead of
/// being kept from the forward pass. None of these changes the numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recompute {
    /// SwiGLU output.
    pub swiglu: bool,
    /// RMSNorm outputs (ln1, ln2).
    pub norm: bool,
    /// Up/gate matmul and SwiGLU.
    pub ffn: bool,
    /// QKV matmul, qk-norm and RoPE.
    pub qkv: bool,
    /// ln1, QKV, RoPE and attention.
    pub att: bool,
    /// Everything but the residual stream.
    pub block: bool,
    /// fp8 runs: where a block matmul input's bf16 form is kept for the backward pass anyway (the
    /// attention output; ln1 or ln2 when QKV or up+gate are recomputed), re-quantise it
    /// transposed there instead of keeping the transpose the forward pass wrote beside the plain
    /// form (less activation memory, one more pass over those inputs). Inputs kept only in fp8
    /// (`acts::Keep::Fp8Only`) keep their transposes. No effect in other runs.
    #[serde(default)]
    pub fp8_inputs: bool,
    /// Not a recomputation: gives the backward pass's largest temporaries (the up+gate gradient,
    /// the fp8 gradient scratch) buffers of their own instead of placing them in the logits
    /// buffer, which only the forward pass uses (`acts::BackwardScratch`). More memory, the same
    /// numbers; for tests and debugging.
    #[serde(default)]
    pub own_backward_temporaries: bool,
}

impl Recompute {
    pub fn all_variants() -> Vec<(&'static str, Recompute)> {
        let r = Recompute::default();
        vec![
            ("none", r),
            ("swiglu", Recompute { swiglu: true, ..r }),
            ("norm", Recompute { norm: true, ..r }),
            ("ffn", Recompute { ffn: true, ..r }),
            ("qkv", Recompute { qkv: true, ..r }),
            ("att", Recompute { att: true, ..r }),
            ("block", Recompute { block: true, ..r }),
            ("fp8_inputs", Recompute { fp8_inputs: true, ..r }),
            ("own_backward_temporaries", Recompute { own_backward_temporaries: true, ..r }),
            ("att+ffn+norm", Recompute { att: true, ffn: true, norm: true, ..r }),
        ]
    }
}
