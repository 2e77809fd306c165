//! llmq-io: file formats and data. Depends on llmq-core only.
//! - `data`: the batch-source interface (token-file loader, synthetic corpus).

pub mod data;
