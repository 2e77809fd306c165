//! Shared helpers for the model-level tests: tiny configs of each architecture and a trainer on
//! the synthetic corpus.
#![allow(dead_code)]

use llmq_core::cpu::CpuBackend;
use llmq_core::{Arch, ModelConfig};
use llmq_train::synthetic::MarkovSource;
use llmq_train::*;

/// A tiny model of `arch` with GQA (Hq=4, Hkv=2) and vocab 37 (widths multiples of 16, as fp8 needs).
pub fn tiny(arch: Arch, tied: bool) -> ModelConfig {
    let mut c = ModelConfig::tiny(arch, 37);
    c.hidden_size = 16;
    c.intermediate_size = 32;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 8;
    c.tie_word_embeddings = tied;
    c
}

pub fn all_tiny() -> Vec<(String, ModelConfig)> {
    let mut v = vec![];
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        for tied in [true, false] {
            v.push((format!("{arch:?}/{}", if tied { "tied" } else { "untied" }), tiny(arch, tied)));
        }
    }
    v
}

pub fn train_config(b: usize, t: usize, accum: usize, steps: u64) -> TrainConfig {
    TrainConfig {
        batch_size: b,
        seq_len: t,
        grad_accumulation: accum,
        steps,
        schedule: Schedule { lr: 1e-2, warmup: 2.min(steps), total: steps, decay: Decay::Cosine, final_fraction: 0.1, cooldown: 0 },
        optim: OptimConfig::default(),
        precision: Precision::fp32(),
        memory: MemoryOptions::default(),
        seed: 1234,
        eval_every: 0,
        eval_batches: 1,
        max_bad_steps: 3,
        spike: Default::default(),
        backend: Default::default(),
        world_size: 1,
        z_loss: 0.0,
    }
}

/// A CPU trainer on the Markov corpus with vocab = the model's.
pub fn trainer(cfg: &ModelConfig, tc: TrainConfig) -> Trainer {
    trainer_on(Box::new(CpuBackend::new()), cfg, tc)
}

/// A trainer on `be` on the Markov corpus with vocab = the model's.
pub fn trainer_on(be: Box<dyn llmq_core::Backend>, cfg: &ModelConfig, tc: TrainConfig) -> Trainer {
    let src = MarkovSource::new(cfg.vocab_size, 99);
    let eval = Box::new(src.stream(7).mark_start());
    let mut tr = Trainer::new(be, cfg, tc, Box::new(src.stream(0)), Some(eval)).unwrap();
    tr.init_from_scratch().unwrap();
    tr
}
