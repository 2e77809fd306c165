//! The loss-spike guard (as in llm.c and llm-foundry): a step whose loss or gradient norm lies
//! more than `z` standard deviations above the mean of the last `window` accepted steps is not
//! applied; after `max_skips` such steps in a row the run stops (the caller writes a checkpoint of
//! the last good state). It changes numbers, so it is part of the validated `TrainConfig`; its
//! history is part of the checkpoint, so a resumed run decides exactly as a straight one.

use llmq_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpikeGuard {
    /// The z-score above which an update is skipped (0: the guard is off).
    pub z: f64,
    /// Accepted steps the mean and deviation are taken over; the guard acts once it is full.
    pub window: usize,
    /// Consecutive skipped spikes after which the run stops.
    pub max_skips: u32,
}

impl Default for SpikeGuard {
    fn default() -> Self {
        SpikeGuard { z: 0.0, window: 100, max_skips: 5 }
    }
}

impl SpikeGuard {
    pub fn validate(&self) -> Result<()> {
        if !self.z.is_finite() || self.z < 0.0 {
            return Err(Error::Config(format!("--spike-z must be 0 (off) or positive, got {}", self.z)));
        }
        if self.z > 0.0 && (self.window < 10 || self.max_skips == 0) {
            return Err(Error::Config(format!(
                "--spike-window must be at least 10 and --spike-max-skips at least 1, got {} and {}",
                self.window, self.max_skips
            )));
        }
        Ok(())
    }
}

/// The guard's history: losses and gradient norms of the last accepted steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpikeState {
    losses: VecDeque<f64>,
    norms: VecDeque<f64>,
    pub skips_in_a_row: u32,
}

/// How far `x` lies above the mean of `h`, in standard deviations (0 when they do not vary).
fn zscore(h: &VecDeque<f64>, x: f64) -> f64 {
    let n = h.len() as f64;
    let mean = h.iter().sum::<f64>() / n;
    let sd = (h.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    if sd > 0.0 {
        (x - mean) / sd
    } else {
        0.0
    }
}

impl SpikeState {
    /// Judges a step with finite `loss` and `norm`: `None` accepts it (and records it), `Some`
    /// says why it is a spike.
    pub fn check(&mut self, g: &SpikeGuard, loss: f64, norm: f64) -> Option<String> {
        if g.z <= 0.0 {
            return None;
        }
        if self.losses.len() >= g.window {
            for (name, hist, x) in [("loss", &self.losses, loss), ("gradient norm", &self.norms, norm)] {
                let z = zscore(hist, x);
                if z > g.z {
                    self.skips_in_a_row += 1;
                    return Some(format!("{name} {x:.4} is {z:.1} standard deviations above the mean of the last {} steps (limit {})", hist.len(), g.z));
                }
            }
        }
        self.skips_in_a_row = 0;
        for (hist, x) in [(&mut self.losses, loss), (&mut self.norms, norm)] {
            hist.push_back(x);
            while hist.len() > g.window {
                hist.pop_front();
            }
        }
        None
    }
}
