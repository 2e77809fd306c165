//! Seeded initialisation and the small random-number generator used across llmq.
//!
//! The generator is written here (splitmix64) rather than taken from a crate so that a seed gives
//! the same model in every version of llmq and on every backend.

use llmq_core::layout::{ParamKind, ParamLayout};
use llmq_core::ModelConfig;
use rayon::prelude::*;

/// splitmix64: tiny, fast, statistically fine for initialisation and data generation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed ^ 0x853C_49E6_748F_EA9B }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Initial values of group `gi` as an f32 host vector (padding zero). Each tensor has its own
/// streams, seeded from (seed, group, entry, chunk), so the result depends neither on threads nor
/// on the other groups: a large model is initialised one group at a time.
pub fn init_group(cfg: &ModelConfig, layout: &ParamLayout, seed: u64, gi: usize) -> Vec<f32> {
    let std = 0.02f64;
    let proj_scale = 1.0 / ((2 * cfg.num_layers) as f64).sqrt();
    let g = &layout.groups[gi];
    let mut buf = vec![0f32; g.numel];
    for (ei, e) in g.entries.iter().enumerate() {
        let dst = &mut buf[e.offset..e.offset + e.numel()];
        match e.kind {
            k if k.is_norm() => dst.fill(1.0),
            ParamKind::QkvB => {}
            k => {
                let scale = if matches!(k, ParamKind::OutW | ParamKind::DownW) { std * proj_scale } else { std };
                // one stream per chunk of 2^20 values, so large embeddings fill in parallel
                dst.par_chunks_mut(1 << 20).enumerate().for_each(|(ci, chunk)| {
                    let mut rng = Rng::new(seed ^ ((gi as u64) << 40) ^ ((ei as u64) << 32) ^ ((ci as u64) << 8) ^ 0x1111);
                    for x in chunk.iter_mut() {
                        *x = (rng.normal() * scale) as f32;
                    }
                });
            }
        }
    }
    buf
}
