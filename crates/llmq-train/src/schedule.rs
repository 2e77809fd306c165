//! Learning-rate schedules: linear warmup, then cosine / linear decay to lr·final_fraction, or
//! wsd (constant, then a cooldown). An optional cooldown of K steps with 1-sqrt annealing ends any
//! schedule. The decay phase spans (total − warmup) steps (the reference divides by total steps,
//! which never reaches the final value; we do not copy that).

use llmq_core::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    /// Warmup-stable-decay: constant lr, then the cooldown (default: the last 20% of steps).
    Wsd,
    Constant,
}

impl Decay {
    pub fn name(self) -> &'static str {
        match self {
            Decay::Cosine => "cosine",
            Decay::Linear => "linear",
            Decay::Wsd => "warmup-stable-decay",
            Decay::Constant => "constant",
        }
    }
    pub fn parse(s: &str) -> Result<Decay> {
        Ok(match s {
            "cosine" => Decay::Cosine,
            "linear" => Decay::Linear,
            "wsd" => Decay::Wsd,
            "constant" => Decay::Constant,
            _ => return Err(Error::Config(format!("--lr-schedule: expected cosine, linear, wsd or constant, got {s:?}"))),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: u64,
    pub total: u64,
    pub decay: Decay,
    pub final_fraction: f64,
    /// Steps of 1-sqrt cooldown at the end (0 = none; wsd defaults to total/5).
    pub cooldown: u64,
}

impl Schedule {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Config(format!("--learning-rate must be positive, got {}", self.lr)));
        }
        if !(0.0..=1.0).contains(&self.final_fraction) {
            return Err(Error::Config(format!("--final-lr-fraction must be in [0, 1], got {}", self.final_fraction)));
        }
        if self.warmup + self.cooldown > self.total {
            return Err(Error::Config(format!(
                "--warmup ({}) + --cooldown ({}) exceed the number of steps ({})",
                self.warmup, self.cooldown, self.total
            )));
        }
        Ok(())
    }

    fn cooldown_steps(&self) -> u64 {
        if self.cooldown == 0 && self.decay == Decay::Wsd {
            (self.total - self.warmup) / 5
        } else {
            self.cooldown
        }
    }

    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let lo = self.lr * self.final_fraction;
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let cd = self.cooldown_steps();
        let cd_start = self.total.saturating_sub(cd);
        // the main decay ends where the cooldown begins
        let main_len = cd_start.saturating_sub(self.warmup).max(1);
        let p = ((step - self.warmup) as f64 / main_len as f64).min(1.0);
        let base = match self.decay {
            Decay::Cosine if cd == 0 => lo + (self.lr - lo) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Decay::Linear if cd == 0 => self.lr + (lo - self.lr) * p,
            // with a cooldown, the main phase holds the peak and the cooldown does the decay
            _ => self.lr,
        };
        if cd > 0 && step >= cd_start {
            let q = ((step - cd_start + 1) as f64 / cd as f64).min(1.0);
            return lo + (base - lo) * (1.0 - q.sqrt());
        }
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay, cooldown: u64) -> Schedule {
        Schedule { lr: 1.0, warmup: 10, total: 110, decay, final_fraction: 0.1, cooldown }
    }

    #[test]
    fn warmup_is_linear_and_reaches_peak() {
        let s = sched(Decay::Cosine, 0);
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(4) - 0.5).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_ends_at_final_fraction_and_is_monotone() {
        let s = sched(Decay::Cosine, 0);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12, "midpoint {}", s.lr_at(60));
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        for i in 10..110 {
            assert!(s.lr_at(i + 1) <= s.lr_at(i) + 1e-15);
        }
    }

    #[test]
    fn linear_decay() {
        let s = sched(Decay::Linear, 0);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn wsd_holds_then_cools_down_with_one_minus_sqrt() {
        let s = sched(Decay::Wsd, 0); // cooldown = 20 steps from step 90
        assert_eq!(s.lr_at(50), 1.0);
        assert_eq!(s.lr_at(89), 1.0);
        let q: f64 = 5.0 / 20.0;
        assert!((s.lr_at(94) - (0.1 + 0.9 * (1.0 - q.sqrt()))).abs() < 1e-12);
        assert!((s.lr_at(109) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn validation_names_the_option() {
        let mut s = sched(Decay::Cosine, 0);
        s.final_fraction = 2.0;
        assert!(s.validate().unwrap_err().to_string().contains("--final-lr-fraction"));
        let mut s = sched(Decay::Cosine, 200);
        s.cooldown = 200;
        assert!(s.validate().unwrap_err().to_string().contains("--cooldown"));
    }
}
