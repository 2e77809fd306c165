//! llmq-train: the model written once against the op interface (forward, backward,
//! recomputation, gradient accumulation), the optimizer step, learning-rate schedules, the
//! embedded synthetic corpus and the training loop.
//!
//! Depends on llmq-core (ops, config, layout) and llmq-io (data and file formats); knows nothing
//! about CUDA: backends are handed in as `Box<dyn Backend>`.

pub mod acts;
pub mod checkpoint;
pub mod eval;
pub mod ckpt_session;
pub mod fit;
pub mod flops;
pub mod fp8;
pub mod fp8_stream;
pub mod fp8_health;
pub mod generate;
pub mod init;
pub mod log;
pub mod memory;
pub mod memory_check;
pub mod model;
pub mod options;
pub mod optimizer;
pub mod params;
pub mod plan;
pub mod precision;
pub mod profile;
pub mod ranks;
pub mod rendezvous;
pub mod roll_call;
pub mod residual;
pub mod run;
pub mod sampling;
pub mod schedule;
pub mod setup;
pub mod side;
pub mod spike;
pub mod stream;
pub mod synthetic;
pub mod textgen;
pub mod token_stage;
pub mod train_config;
pub mod trainer;
pub mod zero;

pub use acts::RunShape;
pub use model::Model;
pub use memory::{MemoryOptions, Recompute};
pub use precision::Precision;
pub use schedule::{Decay, Schedule};
pub use trainer::{OptimConfig, StepStats, TrainConfig, Trainer};
