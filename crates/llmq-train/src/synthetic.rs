//! The embedded corpus: a seeded random first-order Markov source over a small vocabulary.
//!
//! Each state has a handful of successors with random probabilities. The stream starts from the
//! stationary distribution, so every window has the stationary marginal and the best possible
//! expected next-token loss of any model is exactly the entropy rate
//! H = −Σᵢ πᵢ Σⱼ Pᵢⱼ ln Pᵢⱼ (nats), which we compute and print as the "floor".

use crate::init::Rng;
use llmq_core::{Error, Result};
use llmq_io::data::{Batch, BatchSource};

#[derive(Clone, Debug)]
pub struct MarkovSource {
    /// successors[i] = (token, cumulative probability) pairs
    successors: Vec<Vec<(u32, f64)>>,
    stationary: Vec<f64>,
    entropy_rate: f64,
    seed: u64,
}

impl MarkovSource {
    /// `vocab` states, each with between `min_k` and `max_k` successors.
    pub fn new(vocab: usize, seed: u64) -> MarkovSource {
        let (min_k, max_k) = (3u64, 12u64);
        let mut rng = Rng::new(seed ^ 0xC0FFEE);
        let mut successors = Vec::with_capacity(vocab);
        for _ in 0..vocab {
            let k = (min_k + rng.below(max_k - min_k + 1)) as usize;
            let mut targets: Vec<u32> = Vec::with_capacity(k);
            while targets.len() < k {
                let t = rng.below(vocab as u64) as u32;
                if !targets.contains(&t) {
                    targets.push(t);
                }
            }
            // Dirichlet(1)-like weights, sharpened a little so the floor is well below ln(k)
            let w: Vec<f64> = (0..k).map(|_| (-(1.0 - rng.uniform()).ln()).powf(1.5)).collect();
            let sum: f64 = w.iter().sum();
            let mut acc = 0.0;
            let row = targets
                .into_iter()
                .zip(w)
                .map(|(t, wi)| {
                    acc += wi / sum;
                    (t, acc)
                })
                .collect::<Vec<_>>();
            successors.push(row);
        }
        let stationary = stationary(&successors, vocab);
        let entropy_rate = successors
            .iter()
            .zip(&stationary)
            .map(|(row, &pi)| {
                let mut prev = 0.0;
                let h: f64 = row
                    .iter()
                    .map(|&(_, c)| {
                        let p = c - prev;
                        prev = c;
                        if p > 0.0 { -p * p.ln() } else { 0.0 }
                    })
                    .sum();
                pi * h
            })
            .sum();
        MarkovSource { successors, stationary, entropy_rate, seed }
    }

    /// The entropy rate in nats: the lowest achievable expected loss.
    pub fn entropy_rate(&self) -> f64 {
        self.entropy_rate
    }
    pub fn vocab(&self) -> usize {
        self.successors.len()
    }

    fn sample_from(cum: impl Iterator<Item = (u32, f64)>, u: f64) -> u32 {
        let mut last = 0;
        for (t, c) in cum {
            last = t;
            if u < c {
                return t;
            }
        }
        last
    }

    fn next(&self, cur: u32, rng: &mut Rng) -> u32 {
        Self::sample_from(self.successors[cur as usize].iter().copied(), rng.uniform())
    }

    /// A stream of this source, seeded by `stream_seed` (train and eval use different seeds).
    pub fn stream(&self, stream_seed: u64) -> MarkovStream {
        let mut rng = Rng::new(self.seed.wrapping_mul(31).wrapping_add(stream_seed));
        let u = rng.uniform();
        let cum = self.stationary.iter().enumerate().scan(0.0, |acc, (i, p)| {
            *acc += p;
            Some((i as u32, *acc))
        });
        let cur = Self::sample_from(cum, u);
        MarkovStream { source: self.clone(), rng, cur, stream_seed, start: None, tokens: 0 }
    }
}

/// Power iteration for the stationary distribution (f64; converges fast for these chains).
fn stationary(succ: &[Vec<(u32, f64)>], v: usize) -> Vec<f64> {
    let mut pi = vec![1.0 / v as f64; v];
    for _ in 0..2000 {
        let mut next = vec![0.0; v];
        for (i, row) in succ.iter().enumerate() {
            let mut prev = 0.0;
            for &(t, c) in row {
                next[t as usize] += pi[i] * (c - prev);
                prev = c;
            }
        }
        // a little laziness guarantees convergence even for periodic chains
        let diff: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
        pi = next.iter().zip(&pi).map(|(a, b)| 0.5 * a + 0.5 * b).collect();
        if diff < 1e-13 {
            break;
        }
    }
    pi
}

/// An endless token stream from a `MarkovSource`; windows of T+1 tokens overlap by one token
/// (the last target of a window is the first input of the next), so the state is just the RNG
/// and the current token.
pub struct MarkovStream {
    source: MarkovSource,
    rng: Rng,
    cur: u32,
    stream_seed: u64,
    /// The state at the start, for `reset` (eval streams replay the same held-out data).
    start: Option<(Rng, u32)>,
    tokens: u64,
}

impl MarkovStream {
    /// Remembers the current position as the one `reset` returns to.
    pub fn mark_start(mut self) -> Self {
        self.start = Some((self.rng.clone(), self.cur));
        self
    }
    pub fn reset(&mut self) {
        if let Some((r, c)) = &self.start {
            self.rng = r.clone();
            self.cur = *c;
            self.tokens = 0;
        }
    }
}

impl BatchSource for MarkovStream {
    fn next_batch(&mut self, b: usize, t: usize) -> Result<Batch> {
        let mut batch = Batch { inputs: Vec::with_capacity(b * t), targets: Vec::with_capacity(b * t) };
        for _ in 0..b {
            for _ in 0..t {
                let nxt = self.source.next(self.cur, &mut self.rng);
                batch.inputs.push(self.cur as i32);
                batch.targets.push(nxt as i32);
                self.cur = nxt;
            }
        }
        self.tokens += (b * t) as u64;
        Ok(batch)
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({"kind": "markov", "rng": self.rng.state, "cur": self.cur, "stream_seed": self.stream_seed, "tokens": self.tokens})
    }
    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        let field = |k: &str| -> Result<u64> {
            s.get(k).and_then(|v| v.as_u64()).ok_or_else(|| Error::Config(format!("data state: missing or invalid field `{k}`")))
        };
        if s.get("kind").and_then(|k| k.as_str()) != Some("markov") {
            return Err(Error::Config(format!("data state: expected kind \"markov\", got {}", s.get("kind").unwrap_or(&serde_json::Value::Null))));
        }
        let seed = field("stream_seed")?;
        if seed != self.stream_seed {
            return Err(Error::Config(format!("data state: stream_seed expected {}, got {seed}", self.stream_seed)));
        }
        let cur = field("cur")?;
        if cur as usize >= self.source.vocab() {
            return Err(Error::Config(format!("data state: cur {cur} outside the vocabulary")));
        }
        self.rng.state = field("rng")?;
        self.cur = cur as u32;
        self.tokens = field("tokens")?;
        Ok(())
    }
    fn epoch(&self) -> f64 {
        0.0
    }
    fn describe(&self) -> String {
        format!(
            "synthetic Markov source: vocab {}, entropy floor {:.4} nats/token, stream seed {}",
            self.source.vocab(),
            self.source.entropy_rate,
            self.stream_seed
        )
    }
}

/// Uniformly random tokens, for throughput benchmarks (nothing to learn: the floor is ln V).
pub struct RandomTokens {
    rng: Rng,
    vocab: usize,
}

impl RandomTokens {
    pub fn new(vocab: usize, seed: u64) -> RandomTokens {
        RandomTokens { rng: Rng::new(seed ^ 0xBADC0DE), vocab }
    }
}

impl BatchSource for RandomTokens {
    fn next_batch(&mut self, b: usize, t: usize) -> Result<Batch> {
        let n = b * t;
        let toks: Vec<i32> = (0..=n).map(|_| self.rng.below(self.vocab as u64) as i32).collect();
        Ok(Batch { inputs: toks[..n].to_vec(), targets: toks[1..].to_vec() })
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({"kind": "random", "rng": self.rng.state})
    }
    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.rng.state = s.get("rng").and_then(|v| v.as_u64()).ok_or_else(|| Error::Config("data state: missing field `rng`".into()))?;
        Ok(())
    }
    fn epoch(&self) -> f64 {
        0.0
    }
    fn describe(&self) -> String {
        format!("uniformly random tokens over {} (benchmark data)", self.vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empirical_conditional_entropy_matches_the_floor() {
        let src = MarkovSource::new(64, 7);
        let mut s = src.stream(1);
        let b = s.next_batch(8, 25_000).unwrap();
        // average -ln P(target | input) under the true chain = cross-entropy of the ideal model
        let mut nll = 0.0;
        for (&i, &t) in b.inputs.iter().zip(&b.targets) {
            let row = &src.successors[i as usize];
            let mut prev = 0.0;
            let mut p = 0.0;
            for &(tok, c) in row {
                if tok == t as u32 {
                    p = c - prev;
                }
                prev = c;
            }
            assert!(p > 0.0, "sampled an impossible transition");
            nll -= p.ln();
        }
        let avg = nll / b.inputs.len() as f64;
        assert!((avg - src.entropy_rate()).abs() < 0.02, "empirical {avg} vs floor {}", src.entropy_rate());
    }

    #[test]
    fn state_restore_continues_exactly() {
        let src = MarkovSource::new(32, 3);
        let mut a = src.stream(5);
        a.next_batch(2, 10).unwrap();
        let st = a.state();
        let want = a.next_batch(3, 7).unwrap();
        let mut b = src.stream(5);
        b.restore(&st).unwrap();
        assert_eq!(b.next_batch(3, 7).unwrap(), want);
        let mut other = src.stream(6);
        assert!(other.restore(&st).unwrap_err().to_string().contains("stream_seed"));
    }
}
