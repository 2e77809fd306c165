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
/// panic's message and location go into the error instead of stderr: while any guarded call
/// runs, the panic hook (`quiet_hook`) records instead of printing, on every thread, since a
/// library may panic on its own worker threads (the tokenizers crate encodes on rayon's).
pub fn guarded<T, E: std::fmt::Display>(call: impl FnOnce() -> std::result::Result<T, E>) -> std::result::Result<T, String> {
    quiet_hook();
    let result = {
        let _active = Guarded::enter();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
    };
    match result {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(payload) => {
            let text = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
            let at = last_panic_location().map(|l| format!(" at {l}")).unwrap_or_default();
            Err(format!("the library panicked{at}: {}", text.unwrap_or_else(|| "no message".into())))
        }
    }
}

/// Guarded calls in progress, over all threads.
static GUARDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Where the last panic during a guarded call happened.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

struct Guarded;

impl Guarded {
    fn enter() -> Guarded {
        GUARDED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Guarded
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        GUARDED.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn last_panic_location() -> Option<String> {
    LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Installs (once per process) a panic hook that, while a guarded call runs, records the panic's
/// location for its error instead of printing, and otherwise does what the previous hook did.
fn quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return previous(info);
            }
            let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = at;
        }));
    });
}
