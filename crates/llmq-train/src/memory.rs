//! Memory options: where state lives and what is kept or recomputed. None of them changes the
//! numbers (the tests compare every option bitwise with the plain run), so a resumed run may pick
//! other ones. The numerics are `crate::precision::Precision`.

use crate::precision::Precision;
use llmq_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Memory and speed options of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryOptions {
    pub recompute: Recompute,
    /// fp8: keep the fp8 weights (and transposes) between micro-batches, re-quantised once per
    /// optimizer step.
    pub persistent_quants: bool,
    /// fp8, with `persistent_quants`: the kept fp8 block weights live in pinned host memory and
    /// pass through two device slots per block (`crate::fp8_stream`).
    pub offload_quants: bool,
    /// fp8: run the weight-gradient matmuls whose inputs are kept on a second stream, beside the
    /// input-gradient chain (the same ops on the same bytes).
    pub wgrad_overlap: bool,
    /// Master weights in pinned host memory (only when they are a copy of their own, i.e. not
    /// the working weights).
    pub offload_master: bool,
    /// Adam first moment in pinned host memory.
    pub offload_opt_m: bool,
    /// Adam second moment in pinned host memory.
    pub offload_opt_v: bool,
    /// Weight streaming on one device (`--shard-weights`): block weights in pinned host memory,
    /// brought to two device slots ahead of their block's forward, recompute and backward.
    pub stream_weights: bool,
    /// Block gradients in pinned host memory, accumulated in two device slots per block.
    pub offload_gradients: bool,
    /// Per-layer residuals in pinned host memory between the forward and the backward pass.
    pub offload_residual: bool,
    /// The optimizer reads and writes host-resident state in place over mapped memory instead
    /// of staging each block's through device slots (`crate::optimizer`).
    pub zero_copy: bool,
    /// The host buffers of the options above that the optimizer and the copy streams use
    /// (offloaded master weights and Adam moments, streamed weights, offloaded gradients) are
    /// allocated write-combined: faster for the device to read over the link, very slow for the
    /// host CPU to read (which only a checkpoint does, through the device).
    pub write_combined: bool,
    /// Device bytes the run may allocate (None: what the device has).
    pub memory_limit: Option<u64>,
    /// With several ranks: gradients sharded across ranks (ZeRO-2, `crate::zero`).
    pub shard_gradients: bool,
    /// With several ranks: block weights sharded across ranks and gathered per block (ZeRO-3).
    pub shard_weights: bool,
    /// With several ranks: gradients reduce-scattered by all-to-all copies into a device
    /// staging buffer plus one local reduction (`llmq_core::all_to_all`), the same bits.
    pub all_to_all_reduce: bool,
    /// Each block's forward and recompute+backward run as captured graphs (`Backend::capture`:
    /// CUDA graphs on the GPU, recorded and replayed op by op on the CPU), replayed after the
    /// first steps instead of issuing every op from the host.
    pub cuda_graphs: bool,
    /// Neither `--cuda-graphs` nor `--no-cuda-graphs` was given: `default_graphs` decides.
    pub graphs_by_default: bool,
}

/// Work of a micro-batch, B·T·C² (the block matmuls' size up to a constant), up to which its
/// blocks run as CUDA graphs when the run does not choose: where graphs measured faster than
/// eager launches (one H100, 2026-12-06, docs/BENCHMARKS.md, eighteenth round). bf16: Qwen2.5-0.5B
/// at B = 1, 2, 4 (+4.7%, +3.5%, +2.0%) and 1.5B at B = 1 (+1.7%; B = 4, +0.6%, is left out).
/// fp8 runs give up their second-stream weight gradients for graphs and gain less: 0.5B at
/// B = 1, 2 (+3.9%, +1.5%; B = 4, +0.4%, is left out); 1.5B at B = 1 lost 0.7%.
const GRAPHS_WORK_BF16: f64 = 3.5e9;
const GRAPHS_WORK_FP8: f64 = 2.0e9;

impl MemoryOptions {
    pub fn validate(&self, precision: &Precision) -> Result<()> {
        if self.persistent_quants && !precision.matmul.is_fp8() {
            return Err(Error::Config("--persistent-quants only applies with --matmul-dtype e4m3".into()));
        }
        if self.offload_quants && !self.persistent_quants {
            return Err(Error::Config("--offload-quants moves the kept fp8 weights to the host: it needs --persistent-quants (and --matmul-dtype e4m3)".into()));
        }
        if self.wgrad_overlap && !precision.matmul.is_fp8() {
            return Err(Error::Config("the side-stream weight gradients (wgrad_overlap) only apply with --matmul-dtype e4m3".into()));
        }
        if self.offload_master && precision.master == precision.weights {
            return Err(Error::Config(format!(
                "--offload-master: the master weights are the {} working weights (no copy of their own to offload); use --model-dtype fp32 with bf16 matmuls",
                precision.weights
            )));
        }
        if self.shard_gradients && self.wgrad_overlap {
            return Err(Error::Config("ZeRO-2 (--zero-level 2, --shard-gradients) reduce-scatters each block's gradient when its backward is issued: it runs the weight gradients on the main stream (leave out the second-stream overlap)".into()));
        }
        if self.offload_gradients && self.wgrad_overlap {
            return Err(Error::Config("--offload-gradients writes each block's gradient back when its backward is issued: it runs the weight gradients on the main stream (leave out the second-stream overlap)".into()));
        }
        if self.zero_copy && !(self.offload_master || self.offload_opt_m || self.offload_opt_v || self.stream_weights || self.offload_gradients) {
            return Err(Error::Config("--zero-copy lets the optimizer update host-resident state in place: it needs --offload-master, --offload-opt-m, --offload-opt-v, --shard-weights (one device) or --offload-gradients".into()));
        }
        if self.write_combined && !(self.offload_master || self.offload_opt_m || self.offload_opt_v || self.stream_weights || self.offload_gradients) {
            return Err(Error::Config("--write-combined allocates offloaded state write-combined: it needs --offload-master, --offload-opt-m, --offload-opt-v, --shard-weights (one device) or --offload-gradients".into()));
        }
        if self.cuda_graphs {
            self.validate_graphs()?;
        }
        if self.memory_limit == Some(0) {
            return Err(Error::Config("--memory-limit must be positive".into()));
        }
        Ok(())
    }

    /// With `graphs_by_default`, turns CUDA graphs on where they measured faster: a run on one
    /// GPU whose micro-batch `work` (B·T·C²) is small, so that launches are a large share of its
    /// step, and whose options a graph can hold (it then gives up the fp8 second-stream weight
    /// gradients). Same numbers either way. True if it turned them on.
    pub fn default_graphs(&mut self, on_gpu: bool, one_rank: bool, fp8: bool, work: f64) -> bool {
        let limit = if fp8 { GRAPHS_WORK_FP8 } else { GRAPHS_WORK_BF16 };
        if !self.graphs_by_default || self.cuda_graphs || !on_gpu || !one_rank || work > limit {
            return false;
        }
        let with = MemoryOptions { cuda_graphs: true, wgrad_overlap: false, ..*self };
        if with.validate_graphs().is_err() {
            return false;
        }
        *self = with;
        true
    }

    /// The options whose per-block work a captured graph cannot hold: host-side state that
    /// changes between calls (which slot or shard a block uses, the first micro-batch of a step),
    /// collectives, or side-stream work joined only after the last block.
    fn validate_graphs(&self) -> Result<()> {
        let refused = [
            (self.stream_weights, "--stream-weights/--shard-weights (block weights streamed into alternating slots)"),
            (self.offload_gradients, "--offload-gradients (gradient slots loaded from the host after the first micro-batch)"),
            (self.offload_residual, "--offload-residual (residual slots written back per block)"),
            (self.offload_quants, "--offload-quants (fp8 weights streamed into alternating slots)"),
            (self.shard_gradients, "ZeRO-2 (a reduce-scatter per block's backward)"),
            (self.shard_weights, "ZeRO-3 (a gather per block)"),
            (self.wgrad_overlap, "the second-stream weight gradients (joined after the last block; use --no-wgrad-overlap)"),
        ];
        match refused.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(Error::Config(format!("--cuda-graphs captures each block's passes as graphs, which cannot hold {what}: leave one of them out"))),
            None => Ok(()),
        }
    }

    /// One line for the printed configuration, e.g. "recompute block | offload m, v | limit 16 GiB".
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("recompute {}", self.recompute.describe())];
        let off: Vec<&str> = [(self.offload_master, "master"), (self.offload_opt_m, "adam m"), (self.offload_opt_v, "adam v"), (self.offload_gradients, "gradients"), (self.offload_residual, "residuals"), (self.offload_quants, "fp8 weights")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        if !off.is_empty() {
            parts.push(format!("offload {}", off.join(", ")));
        }
        if self.zero_copy {
            parts.push("optimizer in place on host memory (zero-copy)".into());
        }
        if self.write_combined {
            parts.push("offloaded state write-combined".into());
        }
        if self.persistent_quants {
            parts.push("persistent fp8 weights".into());
        }
        if self.stream_weights {
            parts.push("block weights streamed from the host".into());
        }
        if self.shard_gradients || self.shard_weights {
            parts.push(format!("ZeRO-{}", if self.shard_weights { 3 } else { 2 }));
        }
        if self.all_to_all_reduce {
            parts.push("reduce-scatters by all-to-all + local reduction".into());
        }
        if self.wgrad_overlap {
            parts.push("weight gradients on a second stream".into());
        }
        if self.cuda_graphs {
            parts.push(if self.graphs_by_default { "graphs per block (the default for small micro-batches; --no-cuda-graphs)" } else { "graphs per block" }.into());
        }
        if let Some(l) = self.memory_limit {
            parts.push(format!("device limit {}", llmq_core::fmt_bytes(l as usize)));
        }
        parts.join(" | ")
    }
}

/// Parses a size such as `16GiB`, `24GB`, `512MiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return Err(Error::Config(format!("size {s:?}: unknown unit {unit:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"))),
    };
    let v: f64 = num.parse().map_err(|_| Error::Config(format!("size {s:?}: expected a number followed by a unit, e.g. 16GiB")))?;
    let bytes = v * mult;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(Error::Config(format!("size {s:?}: out of range")));
    }
    Ok(bytes as u64)
}

/// Activation recomputation: which activations are recomputed in the backward pass instead of
/// being kept from the forward pass. None of these changes the numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recompute {
    /// SwiGLU output.
    pub swiglu: bool,
    /// RMSNorm outputs (ln1, ln2).
    pub norm: bool,
    /// Up/gate matmul and SwiGLU.
    pub ffn: bool,
    /// QKV matmul, qk-norm and RoPE.
    pub qkv: bool,
    /// ln1, QKV, RoPE and attention.
    pub att: bool,
    /// Everything but the residual stream.
    pub block: bool,
    /// fp8 runs: where a block matmul input's bf16 form is kept for the backward pass anyway (the
    /// attention output; ln1 or ln2 when QKV or up+gate are recomputed), re-quantise it
    /// transposed there instead of keeping the transpose the forward pass wrote beside the plain
    /// form (less activation memory, one more pass over those inputs). Inputs kept only in fp8
    /// (`acts::Keep::Fp8Only`) keep their transposes. No effect in other runs.
    #[serde(default)]
    pub fp8_inputs: bool,
    /// Not a recomputation: gives the backward pass's largest temporaries (the up+gate gradient,
    /// the fp8 gradient scratch) buffers of their own instead of placing them in the logits
    /// buffer, which only the forward pass uses (`acts::BackwardScratch`). More memory, the same
    /// numbers; for tests and debugging.
    #[serde(default)]
    pub own_backward_temporaries: bool,
}

impl Recompute {
    /// "none", or the recomputed parts joined by "+".
    pub fn describe(&self) -> String {
        let parts: Vec<&str> = [
            (self.block, "block"),
            (self.att, "attention"),
            (self.qkv, "qkv"),
            (self.ffn, "ffn"),
            (self.swiglu, "swiglu"),
            (self.norm, "norms"),
            (self.fp8_inputs, "fp8 inputs"),
            (self.own_backward_temporaries, "(own backward temporaries)"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("+")
        }
    }

    pub fn all_variants() -> Vec<(&'static str, Recompute)> {
        let r = Recompute::default();
        vec![
            ("none", r),
            ("swiglu", Recompute { swiglu: true, ..r }),
            ("norm", Recompute { norm: true, ..r }),
            ("ffn", Recompute { ffn: true, ..r }),
            ("qkv", Recompute { qkv: true, ..r }),
            ("att", Recompute { att: true, ..r }),
            ("block", Recompute { block: true, ..r }),
            ("fp8_inputs", Recompute { fp8_inputs: true, ..r }),
            ("own_backward_temporaries", Recompute { own_backward_temporaries: true, ..r }),
            ("att+ffn+norm", Recompute { att: true, ffn: true, norm: true, ..r }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_size("24GB").unwrap(), 24_000_000_000);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "GiB", "16XB", "-3GiB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
