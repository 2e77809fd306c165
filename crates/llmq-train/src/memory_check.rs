//! The memory a run may take on this machine, for `llmq train`, `llmq plan` and the Python
//! package alike: the device budget (what the backend has free under `--memory-limit`, else the
//! RAM for the CPU backend), the pinned host budget (RAM available less a headroom), the check
//! that refuses a plan over either before anything is allocated, and `--auto-memory` against them.

use crate::plan::{self, AutoMemory, MemoryPlan};
use crate::TrainConfig;
use llmq_core::{fmt_bytes, Backend, Error, ModelConfig, Result};

/// Host memory a run keeps beside its pinned buffers: data, tokenizer, one group's f32 values at
/// initialisation. Measured necessary: with 2 GiB plus the largest f32 group instead, a 14B plan
/// of 119 GiB pinned on a 125 GiB host was killed by the OOM killer during set-up.
const HOST_HEADROOM: u64 = 8 << 30;

/// MemAvailable from /proc/meminfo (Linux), in bytes.
pub fn available_ram() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Pinned host memory a plan may take: what the machine has available less `HOST_HEADROOM`.
pub fn host_budget() -> Option<u64> {
    available_ram().map(|a| a.saturating_sub(HOST_HEADROOM))
}

/// Device memory a run may still allocate: what the backend has free (under `--memory-limit`,
/// counting what it holds for itself), else (the CPU backend without a limit) the RAM available,
/// shared by `ranks` ranks.
pub fn device_budget(be: &dyn Backend, ranks: usize) -> Option<u64> {
    be.free_memory().map(|f| f as u64).or_else(|| available_ram().map(|r| r / ranks.max(1) as u64))
}

/// How a message names the device budget of `device_budget`.
pub fn budget_name(tc: &TrainConfig, on_gpu: bool) -> &'static str {
    match (tc.memory.memory_limit, on_gpu) {
        (Some(_), _) => "what --memory-limit leaves beside the backend's own buffers",
        (None, true) => "the GPU's free memory",
        (None, false) if tc.world_size > 1 => "the RAM available, shared by the ranks",
        (None, false) => "the RAM available",
    }
}

/// `--auto-memory` on this machine: the fastest plan (by the H200's speeds) that fits `limit` on
/// the device and the host budget, and, where a faster plan needed more pinned host memory than
/// there is, a line saying so.
pub fn choose_memory(cfg: &ModelConfig, tc: &TrainConfig, reserve: usize, limit: u64) -> Result<(AutoMemory, Option<String>)> {
    let host = host_budget();
    let auto = plan::auto_memory(cfg, tc, reserve, limit, host, plan::DeviceSpeeds::h200_for(tc))?;
    let note = auto.host_note(host);
    Ok((auto, note))
}

/// `--auto-memory` for a run on `be` (which holds its own buffers already): `tc` with the chosen
/// memory options, and the lines that say what was chosen.
pub fn auto_memory_for(cfg: &ModelConfig, tc: &TrainConfig, be: &dyn Backend) -> Result<(TrainConfig, Vec<String>)> {
    let budget = device_budget(be, tc.world_size).ok_or_else(|| Error::Config("--auto-memory needs --memory-limit (the device's free memory is unknown)".into()))?;
    let (auto, host_note) = choose_memory(cfg, tc, 0, budget)?;
    let mut lines = vec![format!("auto-memory: {} (estimated {:.0} ms per step on an H200)", plan::memory_flags(&auto.config), auto.est * 1e3)];
    lines.extend(host_note);
    Ok((auto.config, lines))
}

/// `--auto-memory` for a plan without a device (`llmq plan`): within `--memory-limit`, with the
/// backend's own `reserve` counted.
pub fn auto_memory_plan(cfg: &ModelConfig, tc: &TrainConfig, reserve: usize, what: &str) -> Result<(TrainConfig, Vec<String>)> {
    let limit = tc.memory.memory_limit.ok_or_else(|| Error::Config(format!("{what} --auto-memory needs --memory-limit")))?;
    let (auto, host_note) = choose_memory(cfg, tc, reserve, limit)?;
    let mut lines = vec![format!("auto-memory: {}", plan::memory_flags(&auto.config))];
    lines.extend(host_note);
    Ok((auto.config, lines))
}

/// Refuses a run whose plan does not fit `budget` on the device (named `what`) or the host budget,
/// before anything is allocated: the plan, by how much it is over and the options that would fit.
pub fn check_plan_fits(cfg: &ModelConfig, tc: &TrainConfig, reserve: usize, budget: Option<u64>, what: &str) -> Result<MemoryPlan> {
    let plan = MemoryPlan::new(cfg, tc, reserve)?;
    if let Some(host) = host_budget().filter(|&h| plan.host_total() as u64 > h) {
        return Err(Error::OutOfMemory(format!(
            "the run needs {} of pinned host memory (offloaded state, token staging), more than this machine has available ({} less {} of headroom):\n{}",
            fmt_bytes(plan.host_total()),
            fmt_bytes((host + HOST_HEADROOM) as usize),
            fmt_bytes(HOST_HEADROOM as usize),
            plan.describe(tc.memory.memory_limit)
        )));
    }
    let Some(limit) = budget else { return Ok(plan) };
    if plan.fits(Some(limit)) {
        return Ok(plan);
    }
    let over = plan.device_peak() as u64 - limit;
    let mut msg = format!("the run needs {} of device memory, {} more than {what} ({}):\n{}", fmt_bytes(plan.device_peak()), fmt_bytes(over as usize), fmt_bytes(limit as usize), plan.describe(Some(limit)));
    let fit = plan::options_that_fit(cfg, tc, reserve, limit, 4);
    if fit.is_empty() {
        msg += "  no single memory option (offloading, recomputation, a smaller micro-batch) makes it fit";
    } else {
        msg += "  options that would fit:";
        for (opt, peak) in fit {
            msg += &format!("\n    {opt}  (device peak {})", fmt_bytes(peak));
        }
    }
    Err(Error::OutOfMemory(msg))
}

/// The check of `check_plan_fits` for a run on `be`, which holds its own buffers already.
pub fn check_run_fits(cfg: &ModelConfig, tc: &TrainConfig, be: &dyn Backend, on_gpu: bool) -> Result<MemoryPlan> {
    check_plan_fits(cfg, tc, 0, device_budget(be, tc.world_size), budget_name(tc, on_gpu))
}
