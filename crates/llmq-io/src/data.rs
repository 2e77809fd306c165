//! The batch-source interface shared by the token-file loader and the built-in synthetic corpus.

use llmq_core::Result;

/// One micro-batch of B sequences of T tokens, row-major [B, T]. `targets[i]` is the token that
/// follows `inputs[i]`, or -100 where the loss must ignore the position (masked target).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<i32>,
    pub targets: Vec<i32>,
}

impl Batch {
    /// Targets that count towards the loss.
    pub fn valid_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != -100).count()
    }
}

/// A deterministic stream of batches whose position can be saved and restored exactly.
pub trait BatchSource: Send {
    /// The next B x T batch.
    fn next_batch(&mut self, b: usize, t: usize) -> Result<Batch>;
    /// Position (and anything else needed to continue exactly), for checkpoints.
    fn state(&self) -> serde_json::Value;
    /// Restores a position saved by `state` (errors name the field that does not fit).
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
    /// Epochs completed so far as a fraction (e.g. 1.25).
    fn epoch(&self) -> f64;
    /// One line describing the data (files, tokens), printed at start and logged.
    fn describe(&self) -> String;
}
