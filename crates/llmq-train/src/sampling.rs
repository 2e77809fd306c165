//! Choosing the next token from a row of logits, on the host: greedy (temperature 0) or a seeded
//! draw from softmax(logits / temperature) restricted to the top-k tokens and then to the
//! smallest set of most likely tokens whose probability reaches top-p. Ties are broken by the
//! lower token id, probabilities are computed in f64, and the draw uses `llmq_io::loader::Rng`,
//! so a seed gives the same tokens for the same logits on every machine.

use llmq_core::{Error, Result};
use llmq_io::loader::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0: greedy (the most likely token); otherwise the softmax temperature.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p, in (0, 1]
    /// (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { max_tokens: 64, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Config(format!("--temperature: expected a finite number >= 0 (0: greedy), got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!("--top-p: expected a number in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: Rng,
}

impl Sampler {
    pub fn new(opts: &SamplingOptions) -> Sampler {
        Sampler { opts: opts.clone(), rng: Rng::new(opts.seed) }
    }

    /// The next token for one row of logits [V].
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            return Err(Error::Op(format!("generation: logit {i} of {} is {} (the model's output is not finite)", logits.len(), logits[i])));
        }
        if logits.is_empty() {
            return Err(Error::Op("generation: empty logits row".into()));
        }
        if self.opts.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        // most likely first, lower id first among equals
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let k = if self.opts.top_k == 0 { logits.len() } else { self.opts.top_k.min(logits.len()) };
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let t = self.opts.temperature as f64;
        let top = logits[order[0] as usize] as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] as f64 - top) / t).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // the smallest prefix reaching top_p (at least one token)
        let mut keep = probs.len();
        if self.opts.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.opts.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept: f64 = probs[..keep].iter().sum();
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept;
        let mut cum = 0.0;
        for (i, p) in probs[..keep].iter().enumerate() {
            cum += p;
            if u < cum {
                return Ok(order[i]);
            }
        }
        Ok(order[keep - 1])
    }
}

/// The index of the largest value (the lowest such index).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
