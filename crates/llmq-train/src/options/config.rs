//! Validation of `TrainOptions` into the run configuration (`TrainConfig` and what it holds), the
//! checkpoint session, the export and the data choice. Messages name the CLI flag.

use super::{BackendFlags, Size, TrainOptions};
use crate::ckpt_session::CkptSession;
use crate::memory::parse_size;
use crate::run::Export;
use crate::setup::{self, DataChoice, ModelChoice};
use crate::spike::SpikeGuard;
use crate::{Decay, MemoryOptions, OptimConfig, Precision, Recompute, Schedule, TrainConfig};
use llmq_core::{AttentionKernels, BackendOptions, DType, Error, Result};
use std::path::{Path, PathBuf};

/// The data-parallel layout the options are validated for (`--gpus`, `--zero-level`).
#[derive(Clone, Copy, Debug)]
pub struct DataParallel {
    pub world: usize,
    /// 1 shards the optimizer state, 2 also the gradients, 3 also the block weights.
    pub zero_level: u8,
    /// Gradient reduce-scatters as all-to-all copies plus one local reduction (`--all-to-all-reduce`).
    pub all_to_all_reduce: bool,
}

impl DataParallel {
    pub const ONE: DataParallel = DataParallel { world: 1, zero_level: 1, all_to_all_reduce: false };
}

fn dtype(opt: &str, s: &str) -> Result<DType> {
    DType::parse(s).ok_or_else(|| Error::Config(format!("{opt}: unknown dtype {s:?} (fp32, bf16, e4m3, e5m2)")))
}

/// An export dtype (bf16 or fp32); `what` names the option in the message.
pub fn export_dtype(what: &str, s: &str) -> Result<DType> {
    DType::parse(s)
        .filter(|d| matches!(d, DType::F32 | DType::BF16))
        .ok_or_else(|| Error::Config(format!("{what}: expected bf16 or fp32, got {s:?}")))
}

impl BackendFlags {
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

impl TrainOptions {
    pub fn recompute(&self) -> Recompute {
        Recompute {
            swiglu: self.recompute_swiglu,
            norm: self.recompute_norm,
            ffn: self.recompute_ffn,
            qkv: self.recompute_qkv,
            att: self.recompute_att,
            block: self.recompute_block,
            fp8_inputs: self.recompute_fp8_inputs,
            own_backward_temporaries: false,
        }
    }

    /// The memory options; `fp8`: the matmuls run in fp8.
    pub fn memory(&self, fp8: bool, dp: DataParallel) -> Result<MemoryOptions> {
        if self.no_wgrad_overlap && !fp8 {
            return Err(Error::Config("--no-wgrad-overlap only applies with --matmul-dtype e4m3".into()));
        }
        if self.cuda_graphs && self.no_cuda_graphs {
            // clap refuses the pair on the command line; Python keyword options reach here
            return Err(Error::Config("--cuda-graphs and --no-cuda-graphs: pass one of them".into()));
        }
        let many = dp.world > 1;
        if dp.all_to_all_reduce && !many {
            return Err(Error::Config("--all-to-all-reduce reduces gradients between ranks: use it with --gpus N (N > 1)".into()));
        }
        let shard_gradients = many && (self.shard_gradients || self.shard_weights || dp.zero_level >= 2);
        let memory_limit = match &self.memory_limit {
            None => None,
            Some(Size::Bytes(b)) => Some(*b),
            Some(Size::Text(s)) => Some(parse_size(s).map_err(|e| Error::Config(format!("--memory-limit: {e}")))?),
        };
        Ok(MemoryOptions {
            recompute: self.recompute(),
            persistent_quants: self.persistent_quants,
            offload_quants: self.offload_quants,
            zero_copy: self.zero_copy,
            write_combined: self.write_combined,
            cuda_graphs: self.cuda_graphs,
            graphs_by_default: !self.cuda_graphs && !self.no_cuda_graphs,
            wgrad_overlap: fp8 && !self.no_wgrad_overlap && !self.offload_gradients && !shard_gradients && !self.cuda_graphs,
            offload_master: self.offload_master,
            offload_opt_m: self.offload_opt_m,
            offload_opt_v: self.offload_opt_v,
            // on one GPU, --shard-weights streams them
            stream_weights: self.stream_weights || (self.shard_weights && !many),
            offload_gradients: self.offload_gradients,
            shard_weights: many && (self.shard_weights || dp.zero_level >= 3),
            shard_gradients,
            offload_residual: self.offload_residual,
            all_to_all_reduce: dp.all_to_all_reduce,
            memory_limit,
        })
    }

    fn precision(&self, on_gpu: bool) -> Result<Precision> {
        let matmul = match &self.matmul_dtype {
            Some(s) => dtype("--matmul-dtype", s)?,
            None if on_gpu => DType::BF16,
            None => DType::F32,
        };
        if self.gradient_dtype.is_some() && !matmul.is_fp8() {
            return Err(Error::Config("--gradient-dtype only applies with --matmul-dtype e4m3".into()));
        }
        let weights = if matmul == DType::F32 { DType::F32 } else { DType::BF16 };
        let precision = Precision {
            weights,
            matmul,
            master: dtype("--model-dtype", &self.model_dtype)?,
            grads: dtype("--grad-dtype", &self.grad_dtype)?,
            opt_m: dtype("--opt-m-dtype", &self.opt_m_dtype)?,
            opt_v: dtype("--opt-v-dtype", &self.opt_v_dtype)?,
            act_grads: match &self.gradient_dtype {
                Some(s) => dtype("--gradient-dtype", s)?,
                None => DType::E4M3,
            },
            fp8_fast_accumulation: self.fp8_fast_accumulation,
        };
        if precision.master == DType::BF16 && weights == DType::F32 {
            return Err(Error::Config("--model-dtype bf16 needs bf16 matmuls (--matmul-dtype bf16)".into()));
        }
        Ok(precision)
    }

    /// Validates the options that do not depend on the model and builds the run config.
    pub fn train_config(&self, on_gpu: bool, dp: DataParallel) -> Result<TrainConfig> {
        if self.ckpt_interval > 0 && self.ckpt_dir.is_none() {
            return Err(Error::Config("--ckpt-interval needs --ckpt-dir".into()));
        }
        if self.stop_at == Some(0) || self.stop_at.is_some_and(|s| s > self.steps) {
            return Err(Error::Config(format!("--stop-at must be in 1..={} (--steps), got {:?}", self.steps, self.stop_at)));
        }
        if self.train_file.is_some() && self.random_data {
            return Err(Error::Config("--random-data and --train-file exclude each other".into()));
        }
        // checked with or without --export: a bad value is a mistake either way
        export_dtype("--export-dtype", &self.export_dtype)?;
        let precision = self.precision(on_gpu)?;
        let fp8 = precision.matmul.is_fp8();
        Ok(TrainConfig {
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            grad_accumulation: self.grad_accumulation,
            steps: self.steps,
            schedule: Schedule {
                lr: self.learning_rate,
                warmup: self.warmup.unwrap_or((self.steps / 10).min(if self.steps <= 1000 { 25 } else { 1000 })),
                total: self.steps,
                decay: Decay::parse(&self.lr_schedule)?,
                final_fraction: self.final_lr_fraction,
                cooldown: self.cooldown,
            },
            optim: OptimConfig {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.adam_eps,
                weight_decay: self.weight_decay,
                grad_clip: self.grad_clip,
            },
            precision,
            memory: self.memory(fp8, dp)?,
            seed: self.seed,
            eval_every: self.eval_every,
            eval_batches: self.eval_batches,
            max_bad_steps: self.max_bad_steps,
            spike: SpikeGuard { z: self.spike_z, window: self.spike_window, max_skips: self.spike_max_skips },
            backend: self.backend.options()?,
            world_size: dp.world,
            z_loss: self.z_loss,
        })
    }

    /// The checkpoint session of `--ckpt-dir` (none without it); `lead` (the run's first rank)
    /// takes the directory's lock.
    pub fn checkpoints(&self, drop_abandoned: bool, lead: bool) -> Result<Option<CkptSession>> {
        let Some(root) = self.ckpt_dir.clone() else { return Ok(None) };
        let mut session = CkptSession::new(root, self.keep_last, self.keep_major, drop_abandoned)?;
        if lead {
            session.lock()?;
        }
        Ok(Some(session))
    }

    /// The export of `--export` (none without it); `tokenizer` gives the directory its tokenizer
    /// files are copied from, asked only once the dtype is valid.
    pub fn export(&self, tokenizer: impl FnOnce(&Path) -> Option<PathBuf>) -> Result<Option<Export>> {
        let Some(dir) = &self.export else { return Ok(None) };
        let dtype = export_dtype("--export-dtype", &self.export_dtype)?;
        Ok(Some(Export { dir: dir.clone(), dtype, source: tokenizer(dir) }))
    }

    /// The data for one rank (resuming refuses changed token files).
    pub fn data_choice(&self) -> DataChoice {
        DataChoice {
            train_file: self.train_file.clone(),
            eval_file: self.eval_file.clone(),
            random_data: self.random_data,
            synthetic_vocab: self.synthetic_vocab,
            ..Default::default()
        }
    }

    /// The model of `--model`, its vocabulary fitted to the token files (checked before anything
    /// is allocated).
    pub fn resolve_model(&self) -> Result<ModelChoice> {
        let mut m = setup::resolve_model(self.model.as_deref(), self.from_scratch, self.synthetic_vocab)?;
        setup::fit_vocab_to_data(&mut m, &self.data_choice())?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(flags: &[&str]) -> TrainOptions {
        super::super::parse_flags(flags).unwrap()
    }

    #[test]
    fn shard_weights_streams_on_one_rank_and_shards_on_several() {
        let o = options(&["--shard-weights"]);
        let one = o.memory(false, DataParallel::ONE).unwrap();
        assert!(one.stream_weights && !one.shard_weights && !one.shard_gradients);
        let four = o.memory(false, DataParallel { world: 4, zero_level: 1, all_to_all_reduce: false }).unwrap();
        assert!(!four.stream_weights && four.shard_weights && four.shard_gradients);
        let zero2 = options(&["--matmul-dtype", "e4m3"]).train_config(true, DataParallel { world: 2, zero_level: 2, all_to_all_reduce: false }).unwrap();
        assert!(zero2.memory.shard_gradients && !zero2.memory.shard_weights && !zero2.memory.wgrad_overlap && zero2.world_size == 2);
    }

    #[test]
    fn errors_name_the_flag() {
        let e = |args: &[&str]| options(args).train_config(false, DataParallel::ONE).unwrap_err().to_string();
        assert!(e(&["--memory-limit", "16XB"]).contains("--memory-limit: "));
        assert!(e(&["--grad-dtype", "fp16"]).contains("--grad-dtype: unknown dtype \"fp16\""));
        assert!(e(&["--model-dtype", "bf16"]).contains("--model-dtype bf16 needs bf16 matmuls"));
        assert!(e(&["--stop-at", "300"]).contains("--stop-at must be in 1..=250 (--steps), got Some(300)"));
        let o = options(&["--export", "out", "--export-dtype", "e4m3"]);
        let e = o.export(|_| panic!("asked for a tokenizer before the dtype was checked")).unwrap_err().to_string();
        assert!(e.contains("--export-dtype: expected bf16 or fp32, got \"e4m3\""), "{e}");
    }
}
