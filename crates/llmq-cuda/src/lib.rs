//! llmq-cuda (being written)
