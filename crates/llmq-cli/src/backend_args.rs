//! `llmq train` options of the GPU backend: the kernel and algorithm choices that change the last
//! bits of the results (`llmq_core::BackendOptions`, part of the run configuration).

use clap::Args;
use llmq_core::{AttentionKernels, BackendOptions, Result};

#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Attention kernels: auto (the tensor-core kernels of the GPU's family), mma (the mma.sync
    /// kernels, also on Hopper: their cross-check) or simple (the slow reference kernels).
    #[arg(long, default_value = "auto", help_heading = "GPU backend")]
    pub attention: String,
    /// SMs the weight-gradient matmuls on the side stream are limited to (default: 3/4 of the
    /// GPU's; 0 = no limit). Their algorithms are chosen for this target.
    #[arg(long, help_heading = "GPU backend")]
    pub side_sms: Option<u32>,
    /// Give the side-stream matmuls the algorithms chosen without an SM target (for measurements).
    #[arg(long, help_heading = "GPU backend")]
    pub no_side_algo: bool,
    /// Which cuBLASLt algorithm each matmul shape runs: embedded (the measured table built in),
    /// off (the heuristic's first answer) or a table file (its entries override the built-in ones).
    #[arg(long, default_value = "embedded", help_heading = "GPU backend")]
    pub matmul_tuning: String,
    /// Make a tuning table: time the candidate algorithms of each shape the table does not list
    /// and append the choices to this file (results then depend on the timings).
    #[arg(long, help_heading = "GPU backend")]
    pub matmul_autotune: Option<String>,
}

impl BackendArgs {
    /// The validated options.
    pub fn options(&self) -> Result<BackendOptions> {
        let o = BackendOptions {
            attention: AttentionKernels::parse(&self.attention)?,
            side_sms: self.side_sms,
            side_algo: !self.no_side_algo,
            matmul_tuning: self.matmul_tuning.clone(),
            matmul_autotune: self.matmul_autotune.clone(),
        };
        o.validate()?;
        Ok(o)
    }
}
