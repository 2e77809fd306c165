//! llmq-core: element types, tensor handles, model configuration and parameter layout, the op
//! interface (`Backend`) and its reference implementation on the CPU.
//!
//! Dependency direction: nothing in this crate knows about training, files or CUDA.

pub mod all_to_all;
pub mod attendance;
pub mod backend;
pub mod backend_options;
pub mod capture;
pub mod check;
pub mod comm;
pub mod config;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod observe;
pub mod plan_backend;
pub mod stream_check;
pub mod tensor;

pub use backend::{AdamScalars, AdamStep, AdamW, AttnShape, ADAM_SCALARS, Backend, Event, Matmul, MemCategory, Segment, Stream};
pub use capture::GraphKey;
pub use comm::{shard_len, Comm, ReduceOp, ThreadComm};
pub use backend_options::{AttentionKernels, BackendOptions};
pub use config::{Arch, ModelConfig};
pub use dtype::DType;
pub use error::{Error, Result};
pub use layout::{GroupLayout, ParamKind, ParamLayout};
pub use tensor::{Mem, Shape, Tensor};

/// Human-readable byte count ("1.50 GiB").
pub fn fmt_bytes(b: usize) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.2} {}", U[i]) }
}
