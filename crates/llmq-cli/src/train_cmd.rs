//! `llmq train`: resolve the model, data and device, print the resolved configuration and the
//! memory plan, then run the loop with a line per step.

use crate::ckpt_run::CkptRun;
use crate::device;
use crate::preflight;
use crate::signals;
use crate::train_args::TrainArgs;
use llmq_core::{fmt_bytes, Arch, Error, ModelConfig, Result};
use llmq_io::data::BatchSource;
use llmq_io::loader::{self, LoaderOptions, TokenLoader};
use llmq_io::hf;
use llmq_train::log::JsonLog;
use llmq_train::synthetic::{MarkovSource, RandomTokens};
use llmq_train::{flops, Trainer};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// The model shape and where its weights come from.
struct ModelChoice {
    cfg: ModelConfig,
    describe: String,
    /// A Hugging Face directory to load weights (and tokenizer files for export) from.
    dir: Option<PathBuf>,
}

fn resolve_model(args: &TrainArgs) -> Result<ModelChoice> {
    let Some(name) = &args.model else {
        let cfg = ModelConfig::tiny(Arch::Qwen2, args.synthetic_vocab);
        return Ok(ModelChoice {
            cfg,
            describe: "embedded default (tiny qwen2-style, from scratch)".into(),
            dir: None,
        });
    };
    if let Some(cfg) = ModelConfig::builtin(name) {
        if !args.from_scratch {
            return Err(Error::Config(format!(
                "--model {name} is a built-in shape without weights: add --from-scratch, or pass a directory with config.json and model.safetensors"
            )));
        }
        let cfg = if name == "tiny" {
            ModelConfig::tiny(Arch::Qwen2, args.synthetic_vocab)
        } else {
            cfg
        };
        return Ok(ModelChoice {
            cfg,
            describe: format!("built-in shape {name}, from scratch"),
            dir: None,
        });
    }
    let dir = hf::resolve_model_dir(name).map_err(|e| {
        Error::Config(format!(
            "--model {name}: not a built-in shape ({}) and {e}",
            ModelConfig::BUILTIN_NAMES.join(", ")
        ))
    })?;
    let cfg = hf::load_config(&dir)?;
    let how = if args.from_scratch {
        "config only, from scratch"
    } else {
        "pretrained weights"
    };
    Ok(ModelChoice {
        cfg,
        describe: format!("{} ({how})", dir.display()),
        dir: Some(dir),
    })
}

type Sources = (
    Box<dyn BatchSource>,
    Option<Box<dyn BatchSource>>,
    Option<f64>,
);

fn resolve_data(
    args: &TrainArgs,
    cfg: &ModelConfig,
    tc: &llmq_train::TrainConfig,
) -> Result<Sources> {
    let eval_file = |args: &TrainArgs| -> Result<Option<Box<dyn BatchSource>>> {
        match &args.eval_file {
            None => Ok(None),
            Some(p) => {
                let files = loader::expand_glob(p)?;
                let ev = TokenLoader::eval(&files, tc.seq_len, 0, 1, Some(cfg.vocab_size))?;
                preflight::check_tokens(&ev, "eval")?;
                Ok(Some(Box::new(ev)))
            }
        }
    };
    if let Some(pattern) = &args.train_file {
        let opts = LoaderOptions {
            vocab_limit: Some(cfg.vocab_size),
            allow_data_change: args.allow_data_change,
            ..LoaderOptions::train(tc.seq_len, tc.seed)
        };
        let train = TokenLoader::from_glob(pattern, opts)?;
        preflight::check_tokens(&train, "training")?;
        return Ok((Box::new(train), eval_file(args)?, None));
    }
    if args.random_data {
        return Ok((
            Box::new(RandomTokens::new(cfg.vocab_size, tc.seed)),
            eval_file(args)?,
            None,
        ));
    }
    if args.synthetic_vocab > cfg.vocab_size || args.synthetic_vocab < 2 {
        return Err(Error::Config(format!(
            "--synthetic-vocab must be in 2..={} (the model's vocab_size), got {}",
            cfg.vocab_size, args.synthetic_vocab
        )));
    }
    let src = MarkovSource::new(args.synthetic_vocab, tc.seed);
    let floor = src.entropy_rate();
    let eval: Box<dyn BatchSource> = match eval_file(args)? {
        Some(e) => e,
        None => Box::new(src.stream(u64::MAX).mark_start()),
    };
    Ok((Box::new(src.stream(0)), Some(eval), Some(floor)))
}

/// Free device memory `--fit-batch` leaves beside the model (driver, library workspaces).
const FIT_HEADROOM: usize = 2 << 30;

/// `--fit-batch`: probes micro-batches on fresh backends (the selected one is dropped first so
/// that its memory is free) and returns the backend for the run, with `tc` updated, and the
/// line to print.
fn fit_batch(args: &TrainArgs, be: Box<dyn llmq_core::Backend>, on_gpu: bool, cfg: &llmq_core::ModelConfig, tc: &mut llmq_train::TrainConfig) -> Result<(Box<dyn llmq_core::Backend>, String)> {
    if !on_gpu {
        return Ok((be, "not applied: the CPU backend has no device memory budget".into()));
    }
    drop(be);
    let mut make = || device::select(&args.device).map(|(b, _)| b);
    let fit = llmq_train::fit::fit_micro_batch(&mut make, cfg, tc, FIT_HEADROOM)?;
    let line = match fit.free_after {
        Some(free) => format!(
            "micro-batch {} x {} accumulation (configured {} x {}), {} free with it allocated",
            fit.batch_size,
            fit.grad_accumulation,
            tc.batch_size,
            tc.grad_accumulation,
            llmq_core::fmt_bytes(free)
        ),
        None => format!("kept {} x {}: nothing larger fits with {} free", tc.batch_size, tc.grad_accumulation, llmq_core::fmt_bytes(FIT_HEADROOM)),
    };
    tc.batch_size = fit.batch_size;
    tc.grad_accumulation = fit.grad_accumulation;
    tc.validate(cfg)?;
    Ok((make()?, line))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let model = resolve_model(&args)?;
    let cfg = model.cfg;
    let (be, gpu) = device::select(&args.device)?;
    let mut tc = args.train_config(gpu.is_some())?;
    tc.validate(&cfg)?;
    let mut ckpts = CkptRun::new(&args)?;
    preflight::check_outputs(&args)?;
    let (be, fit_line) = if args.fit_batch { fit_batch(&args, be, gpu.is_some(), &cfg, &mut tc).map(|(b, l)| (b, Some(l)))? } else { (be, None) };
    let be: Box<dyn llmq_core::Backend> = if args.check_streams { Box::new(llmq_core::stream_check::StreamChecked::new(be)) } else { be };
    let (be, profile): (Box<dyn llmq_core::Backend>, _) = if args.profile {
        let (p, h) = llmq_train::profile::profiled(be);
        (Box::new(p), Some(h))
    } else {
        (be, None)
    };

    let (data, eval, floor) = resolve_data(&args, &cfg, &tc)?;

    // resolved configuration
    println!("llmq train");
    println!(
        "  model      {} | {} | L={} C={} D={} Hq={} Hkv={} Hd={} V={} | {:.2}M parameters",
        model.describe,
        cfg.arch.hf_name(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.num_params() as f64 / 1e6
    );
    println!("  data       {}", data.describe());
    println!("  device     {}", be.name());
    println!(
        "  batch      B={} T={} accumulation={} -> {} tokens/step, {} steps",
        tc.batch_size,
        tc.seq_len,
        tc.grad_accumulation,
        tc.tokens_per_step(),
        tc.steps
    );
    if let Some(line) = fit_line {
        println!("  fit-batch  {line}");
    }
    let p = tc.precision;
    let fp8 = if p.matmul.is_fp8() {
        format!(
            " | activation grads {}{}{}",
            p.act_grads,
            if p.persistent_quants { " | persistent quants" } else { "" },
            if p.wgrad_overlap { " | wgrad overlap" } else { "" }
        )
    } else {
        String::new()
    };
    println!(
        "  precision  matmul {} | weights {} | master {} | grads {} | adam m {} v {}{fp8}",
        p.matmul, p.weights, p.master, p.grads, p.opt_m, p.opt_v
    );
    let s = tc.schedule;
    println!("  optimizer  AdamW lr {:e} ({:?}, warmup {}, final x{}, cooldown {}) betas ({}, {}) eps {:e} wd {} clip {}", s.lr, s.decay, s.warmup, s.final_fraction, s.cooldown, tc.optim.beta1, tc.optim.beta2, tc.optim.eps, tc.optim.weight_decay, tc.optim.grad_clip);
    println!("  recompute  {:?}", tc.recompute);
    if tc.spike.z > 0.0 {
        println!("  spikes     skip an update above z {} over {} steps; stop after {} in a row", tc.spike.z, tc.spike.window, tc.spike.max_skips);
    }

    let mut trainer = Trainer::new(be, &cfg, tc.clone(), data, eval)?;
    print_memory(&trainer);
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner.set_message(if args.continue_from.is_some() {
        "loading checkpoint"
    } else if model.dir.is_some() && !args.from_scratch {
        "loading weights"
    } else {
        "initialising weights"
    });
    match (&args.continue_from, &model.dir) {
        (Some(which), _) => ckpts.as_mut().expect("validated").resume(&mut trainer, which, args.stop_at.unwrap_or(tc.steps))?,
        (None, Some(dir)) if !args.from_scratch => {
            let groups = hf::load_weights(dir, &cfg)?;
            trainer.set_weights(&groups)?;
            println!("loaded weights from {}", dir.display());
        }
        _ => trainer.init_from_scratch()?,
    }
    spinner.finish_and_clear();
    if let Some(c) = &ckpts {
        c.set_aside()?;
    }
    let stop = signals::install();
    if let Some(path) = &args.log_file {
        let mut log = JsonLog::open(path)?;
        log.write(&serde_json::json!({"type": "options", "model": cfg, "train": tc, "device": trainer.be.name()}));
        log.write(&serde_json::json!({"type": "dataset", "train": trainer.data.describe(), "floor": floor}));
        log.write(&memory_record(&trainer));
        trainer.log = Some(log);
    }
    let floor_txt = floor
        .map(|f| format!(" (floor {f:.3})"))
        .unwrap_or_default();
    let peaks = gpu.and_then(|g| g.peaks);
    let steps = tc.steps;
    let mut last_eval = None;
    let mut step_times = vec![];
    let stop_at = args.stop_at.unwrap_or(steps);
    if let Some(p) = &profile {
        p.take(); // setup is not part of a step
    }
    let mut interrupted = false;
    let mut spike_stop = None;
    while trainer.step < stop_at {
        let st = trainer.train_step()?;
        let tps = st.tokens as f64 / st.seconds;
        step_times.push(st.seconds);
        if let Some(log) = &mut trainer.log {
            log.write(&serde_json::json!({"type": "step", "step": st.step, "loss": st.loss, "norm": st.grad_norm, "lr": st.lr, "tokens_per_s": tps, "ms": st.seconds * 1e3, "issue_ms": st.issue_seconds * 1e3, "skipped": st.skipped}));
        }
        if st.step % args.print_every.max(1) == 0 || st.step == 1 || st.step == steps {
            let sol = peaks
                .map(|(mm, bf)| {
                    let mm = if tc.precision.matmul.is_fp8() { mm } else { bf };
                    format!(
                        " | SOL {:.1}%",
                        flops::sol_percent(&cfg, tc.seq_len, tps, mm, bf)
                    )
                })
                .unwrap_or_default();
            println!(
                "step {:>6}/{} ({:5.1}%) | {:7.1} ms | loss {:.4}{} | norm {:.3} | lr {:.2e} | {:.0} tok/s{}",
                st.step,
                steps,
                100.0 * st.step as f64 / steps as f64,
                st.seconds * 1e3,
                st.loss,
                floor_txt,
                st.grad_norm,
                st.lr,
                tps,
                sol
            );
        }
        // (no evals while profiling: the breakdown is of training steps)
        let eval_now = profile.is_none() && ((tc.eval_every > 0 && st.step % tc.eval_every == 0) || st.step == steps);
        if eval_now {
            if let Some(ev) = trainer.evaluate()? {
                println!("eval   {:>6} | loss {:.4}{}", st.step, ev, floor_txt);
                if let Some(log) = &mut trainer.log {
                    log.write(&serde_json::json!({"type": "eval", "step": st.step, "loss": ev}));
                }
                last_eval = Some(ev);
            }
        }
        let periodic = args.ckpt_interval > 0 && st.step % args.ckpt_interval == 0;
        if let Some(c) = ckpts.as_mut().filter(|_| periodic && st.step < stop_at) {
            c.save(&mut trainer)?;
        }
        if let Some(why) = st.stop {
            println!("{why}");
            spike_stop = Some(why);
            break;
        }
        if stop.load(Ordering::SeqCst) {
            println!("signal received: stopping after step {}", st.step);
            interrupted = true;
            break;
        }
    }
    if let Some(c) = &mut ckpts {
        c.save(&mut trainer)?;
    } else if interrupted {
        println!("no --ckpt-dir: stopping without a checkpoint");
    }
    if let Some(why) = spike_stop {
        return Err(Error::Backend(why));
    }
    if let Some(out) = &args.export {
        let dtype = llmq_core::DType::parse(&args.export_dtype)
            .filter(|d| matches!(d, llmq_core::DType::F32 | llmq_core::DType::BF16))
            .ok_or_else(|| {
                Error::Config(format!(
                    "--export-dtype: expected bf16 or fp32, got {:?}",
                    args.export_dtype
                ))
            })?;
        let groups = trainer.model.params.master_f32(trainer.be.as_ref())?;
        hf::export_model(out, &cfg, &groups, dtype, model.dir.as_deref())?;
        println!(
            "exported {} ({dtype}) to {}",
            cfg.arch.hf_name(),
            out.display()
        );
    }
    if let Some(p) = &profile {
        print_profile(&p.take(), step_times.len());
    }
    // throughput: median over the steps after warm-up (the first steps include one-time work)
    let warm = (step_times.len() / 5).clamp(usize::from(step_times.len() > 1), 5);
    let mut t: Vec<f64> = step_times[warm..].to_vec();
    if !t.is_empty() {
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = t[t.len() / 2];
        let tps = tc.tokens_per_step() as f64 / med;
        let sol = peaks
            .map(|(mm, bf)| {
                let mm = if tc.precision.matmul.is_fp8() { mm } else { bf };
                format!(
                    ", SOL {:.1}%",
                    flops::sol_percent(&cfg, tc.seq_len, tps, mm, bf)
                )
            })
            .unwrap_or_default();
        println!("throughput: median step {:.1} ms over {} steps after {warm} warm-up -> {:.0} tokens/s{sol}", med * 1e3, t.len(), tps);
        if let Some(log) = &mut trainer.log {
            log.write(&serde_json::json!({"type": "throughput", "median_step_ms": med * 1e3, "tokens_per_s": tps, "steps": t.len()}));
        }
    }
    if let (Some(ev), Some(f)) = (last_eval, floor) {
        println!(
            "done: final eval loss {ev:.4}, {:.4} nats above the entropy floor {f:.4}",
            ev - f
        );
    }
    Ok(())
}

/// The per-op breakdown: time per step, share, calls per step.
fn print_profile(rows: &[(String, u64, f64)], steps: usize) {
    let total: f64 = rows.iter().map(|r| r.2).sum();
    let steps = steps.max(1) as f64;
    println!("profile: {:.1} ms per step in ops (each synchronised), by op:", 1e3 * total / steps);
    for (label, calls, secs) in rows.iter().take(40) {
        println!("  {:>9.3} ms {:>5.1}%  {:>6.1}x  {label}", 1e3 * secs / steps, 100.0 * secs / total, *calls as f64 / steps);
    }
}

fn print_memory(tr: &Trainer) {
    let mem = tr.be.memory_by_category();
    let total: usize = mem.iter().map(|m| m.2).sum();
    println!("memory ({}):", tr.be.name());
    for (cat, loc, bytes) in &mem {
        println!("  {:<16} {:>12}  {:?}", cat.name(), fmt_bytes(*bytes), loc);
    }
    println!("  {:<16} {:>12}", "total", fmt_bytes(total));
    if let Some(free) = tr.be.free_memory() {
        println!("  {:<16} {:>12}", "free", fmt_bytes(free));
    }
}

fn memory_record(tr: &Trainer) -> serde_json::Value {
    let cats: serde_json::Map<String, serde_json::Value> = tr
        .be
        .memory_by_category()
        .iter()
        .map(|(c, l, b)| (format!("{} ({:?})", c.name(), l), (*b).into()))
        .collect();
    serde_json::json!({"type": "memory", "categories": cats, "free": tr.be.free_memory()})
}
