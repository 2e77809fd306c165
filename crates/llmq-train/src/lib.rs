//! llmq-train
