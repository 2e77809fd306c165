//! The trainer's batch source in Python: batches passed as arrays come first, in order; without
//! any, the configured source (token files, the synthetic corpus) gives the next one. Its
//! position is the configured source's, so checkpoints resume the files where they were.

use llmq_core::{Error, Result};
use llmq_io::data::{Batch, BatchSource};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

pub type Queue = Arc<Mutex<VecDeque<Batch>>>;

pub struct Feed {
    pub queue: Queue,
    pub source: Box<dyn BatchSource>,
}

impl BatchSource for Feed {
    fn next_batch(&mut self, b: usize, t: usize) -> Result<Batch> {
        let queued = self.queue.lock().map_err(|_| Error::Backend("batch queue poisoned".into()))?.pop_front();
        match queued {
            Some(batch) => Ok(batch),
            None => self.source.next_batch(b, t),
        }
    }
    fn state(&self) -> serde_json::Value {
        self.source.state()
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.source.restore(state)
    }
    fn epoch(&self) -> f64 {
        self.source.epoch()
    }
    fn describe(&self) -> String {
        self.source.describe()
    }
}

/// Splits a [N, T+1] token array (row-major, `n * (t + 1)` values) into micro-batches of `b`
/// rows: inputs are the first T tokens of a row, targets the last T (every target counts: a
/// token is both an input and a target, so there is no place for the ignore marker -100).
pub fn batches_from_tokens(tokens: &[i32], n: usize, t: usize, b: usize, vocab: usize) -> Result<Vec<Batch>> {
    if n == 0 || !n.is_multiple_of(b) {
        return Err(Error::Config(format!("tokens: expected a multiple of batch_size={b} rows, got {n}")));
    }
    for (i, &tok) in tokens.iter().enumerate() {
        if tok < 0 || tok as usize >= vocab {
            let (row, col) = (i / (t + 1), i % (t + 1));
            return Err(Error::Config(format!("tokens[{row}, {col}] = {tok}: token ids must be in 0..{vocab} (the model's vocab_size)")));
        }
    }
    Ok(tokens
        .chunks(b * (t + 1))
        .map(|rows| {
            let mut batch = Batch { inputs: Vec::with_capacity(b * t), targets: Vec::with_capacity(b * t) };
            for row in rows.chunks(t + 1) {
                batch.inputs.extend_from_slice(&row[..t]);
                batch.targets.extend_from_slice(&row[1..]);
            }
            batch
        })
        .collect())
}
