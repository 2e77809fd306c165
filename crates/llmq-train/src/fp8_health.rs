//! FP8 health (`--log-amax N`): every N steps, for each tensor an fp8 matmul quantises (weights,
//! activations, activation gradients of every block matmul), its abs-max, the scale and the
//! fractions of values that saturate (|x·scale| would round above the format's largest value:
//! past 464 for e4m3, 61440 for e5m2) or flush to zero (non-zero values that round to 0:
//! |x·scale| at most half the smallest subnormal). A run
//! drifting out of fp8's range shows here before its loss does.
//!
//! The statistics are taken on the host from the bf16/f32 tensor about to be quantised and the
//! abs-max its producer wrote, so a health step synchronises the device once per tensor; other
//! steps pay one branch per quantisation.

use llmq_core::{Backend, DType, Result, Tensor};
use serde::Serialize;
use std::cell::{Cell, RefCell};

/// Names of the four block matmuls (`crate::fp8::WEIGHTS` order).
pub const MATMULS: [&str; 4] = ["qkv", "out", "up_gate", "down"];

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorHealth {
    /// "weight", "activation" (the matmul's input) or "gradient" (its output gradient).
    pub class: &'static str,
    pub layer: usize,
    pub matmul: &'static str,
    /// The fp8 format it is quantised to.
    pub dtype: DType,
    pub amax: f32,
    pub scale: f32,
    pub saturated: f64,
    pub flushed: f64,
}

/// Collects `TensorHealth` records while active (once per tensor and step).
#[derive(Debug)]
pub struct Health {
    pub every: u64,
    active: Cell<bool>,
    records: RefCell<Vec<TensorHealth>>,
}

/// (saturated, flushed) fractions of `vals` quantised with `scale` to `dtype`.
pub fn fractions(vals: &[f32], scale: f32, dtype: DType) -> (f64, f64) {
    // the largest value plus half a step (rounding stays below it), half the smallest subnormal
    let (max, tiny) = match dtype {
        DType::E5M2 => (61440f32, 2f32.powi(-17)),
        _ => (464f32, 2f32.powi(-10)),
    };
    let (mut sat, mut flush) = (0usize, 0usize);
    for &v in vals {
        let y = (v * scale).abs();
        if y > max {
            sat += 1;
        } else if v != 0.0 && y <= tiny {
            flush += 1;
        }
    }
    let n = vals.len().max(1) as f64;
    (sat as f64 / n, flush as f64 / n)
}

impl Health {
    pub fn new(every: u64) -> Health {
        Health { every, active: Cell::new(false), records: RefCell::new(vec![]) }
    }

    /// Whether step `step` (1-based) is a health step; starts collecting if so.
    pub fn begin_step(&self, step: u64) -> bool {
        let on = self.every > 0 && step.is_multiple_of(self.every);
        self.active.set(on);
        self.records.borrow_mut().clear();
        on
    }

    /// The records of the step, and stops collecting.
    pub fn take(&self) -> Vec<TensorHealth> {
        self.active.set(false);
        std::mem::take(&mut *self.records.borrow_mut())
    }

    /// Records tensor `x`, quantised to `dtype` with abs-max `amax` (f32 [1]), unless it was
    /// recorded in this step already (a recomputation, a later micro-batch).
    #[allow(clippy::too_many_arguments)]
    pub fn observe(&self, be: &dyn Backend, class: &'static str, layer: usize, k: usize, x: &Tensor, amax: &Tensor, dtype: DType) -> Result<()> {
        if !self.active.get() || self.records.borrow().iter().any(|r| r.class == class && r.layer == layer && r.matmul == MATMULS[k]) {
            return Ok(());
        }
        let a = crate::params::download_f32(be, amax)?[0];
        let fmax = if dtype == DType::E5M2 { 57344f32 } else { 448f32 };
        let scale = fmax / a.max(1e-10);
        let (saturated, flushed) = fractions(&crate::params::download_f32(be, x)?, scale, dtype);
        self.records.borrow_mut().push(TensorHealth { class, layer, matmul: MATMULS[k], dtype, amax: a, scale, saturated, flushed });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_and_flushing_follow_the_format() {
        // scale 1: 448 is the largest e4m3 value (up to 464 rounds to it), 2^-10 half its
        // smallest subnormal
        let v = [0.0, 1.0, 460.0, -500.0, 2f32.powi(-10), -2f32.powi(-11), 2f32.powi(-9), 465.0];
        let (s, f) = fractions(&v, 1.0, DType::E4M3);
        assert_eq!((s, f), (2.0 / 8.0, 2.0 / 8.0));
        // e5m2 reaches 57344 and 2^-16
        let (s, f) = fractions(&v, 1.0, DType::E5M2);
        assert_eq!((s, f), (0.0, 0.0));
    }

    #[test]
    fn health_steps_are_every_nth() {
        let h = Health::new(3);
        assert_eq!((1..=7).map(|s| h.begin_step(s)).collect::<Vec<_>>(), [false, false, true, false, false, true, false]);
        assert!(!Health::new(0).begin_step(5));
    }
}
