//! Numeric formats of a run: everything here changes the numbers, so a resumed run must match
//! it field for field. Options that only move memory or time are `crate::memory::MemoryOptions`.

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
    /// fp8 matmuls skip the promotion of the tensor cores' partial sums ("fast accumulation"):
    /// Hopper adds fp8 products with ~14 significant bits, and cuBLASLt by default promotes the
    /// partial sums into full f32 every few k-steps. Skipping that is faster on some shapes (the
    /// long-K weight gradients above all) and less accurate.
    #[serde(default)]
    pub fp8_fast_accumulation: bool,
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
            fp8_fast_accumulation: false,
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
        if self.fp8_fast_accumulation && !self.matmul.is_fp8() {
            return Err(Error::Config(format!("--fp8-fast-accumulation needs --matmul-dtype e4m3, got {}", self.matmul)));
        }
        if self.matmul.is_fp8() && self.weights != DType::BF16 {
            return Err(Error::Config("--matmul-dtype e4m3 runs on bf16 weights and activations".into()));
        }
        Ok(())
    }
}

