//! llmq-io: file formats and data. Depends on llmq-core only.
//! - `data`: the batch-source interface (token-file loader, synthetic corpus).
//! - `safetensors`: hardened safetensors reader and atomic writer.
//! - `hf`: HF model directories: resolve names in the local cache, import weights into llmq's
//!   layout, export back (model.safetensors + config.json + tokenizer files).
//! - `tokfile`: the reference's token file format (reader, writer, validation).
//! - `loader`: `TokenLoader`, the token-file `BatchSource` with exact resume.
//! - `ckpt`: crash-safe checkpoint store with manifest, commit record, checksums and lineage.
//! - `retention`: which checkpoints stay (one lineage in the root, the newest few of it);
//!   `root_lock`: one run at a time writes into a checkpoint root.
//! - `tokenize`: text/jsonl/parquet -> token files with a HF tokenizer.json (`chat`: chat
//!   templates and assistant-only loss masks; `parquet_input`: Parquet columns).

pub mod chat;
pub mod ckpt;
pub mod data;
pub mod hf;
pub mod loader;
pub mod parquet_input;
pub mod retention;
pub mod root_lock;
pub mod safetensors;
pub mod tokenize;
pub mod tokfile;
pub mod xxh64;

pub use data::{Batch, BatchSource};
pub use loader::{LoaderOptions, TokenLoader};

/// Runs a fallible call into a library that panics on some malformed input instead of returning
/// an error: either way the result is an error message, for an error naming the file. Found by tests/mutations.rs and by
/// hostile tokenizers: parquet 60 (a corrupted page reached an out-of-range slice in
/// `util/bit_util.rs`), tokenizers 0.22 (a malformed `decoder` in tokenizer.json:
/// `expect("Helper")`) and onig 6.5 (a pre-tokenizer regex over its backtracking limit). The
/// default hook still prints the panic to stderr.
pub fn guarded<T, E: std::fmt::Display>(call: impl FnOnce() -> std::result::Result<T, E>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(payload) => {
            let text = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
            Err(format!("the library panicked: {}", text.unwrap_or_else(|| "no message".into())))
        }
    }
}
