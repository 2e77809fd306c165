//! `llmq train`: resolve the model, data and device, print the resolved configuration and the
//! memory plan, then run the loop with a line per step.

use crate::device;
use crate::train_args::TrainArgs;
use llmq_core::{fmt_bytes, Arch, Error, ModelConfig, Result};
use llmq_io::data::BatchSource;
use llmq_train::log::JsonLog;
use llmq_train::synthetic::{MarkovSource, RandomTokens};
use llmq_train::{flops, Trainer};
use std::path::Path;

/// The model shape and where its weights come from.
struct ModelChoice {
    cfg: ModelConfig,
    describe: String,
}

fn resolve_model(args: &TrainArgs) -> Result<ModelChoice> {
    let Some(name) = &args.model else {
        let cfg = ModelConfig::tiny(Arch::Qwen2, args.synthetic_vocab);
        return Ok(ModelChoice { cfg, describe: "embedded default (tiny qwen2-style, from scratch)".into() });
    };
    if let Some(cfg) = ModelConfig::builtin(name) {
        if !args.from_scratch {
            return Err(Error::Config(format!(
                "--model {name} is a built-in shape without weights: add --from-scratch, or pass a directory with config.json and model.safetensors"
            )));
        }
        let cfg = if name == "tiny" { ModelConfig::tiny(Arch::Qwen2, args.synthetic_vocab) } else { cfg };
        return Ok(ModelChoice { cfg, describe: format!("built-in shape {name}, from scratch") });
    }
    let dir = Path::new(name);
    if dir.join("config.json").is_file() {
        let cfg = ModelConfig::from_hf_json(&dir.join("config.json"))?;
        if !args.from_scratch {
            return Err(Error::Config(format!(
                "--model {name}: loading pretrained weights comes with the checkpoint/import issue; use --from-scratch to train this shape"
            )));
        }
        return Ok(ModelChoice { cfg, describe: format!("{name}/config.json, from scratch") });
    }
    let names = ModelConfig::BUILTIN_NAMES.join(", ");
    Err(Error::Config(format!("--model {name}: not a built-in shape ({names}) and not a directory with config.json")))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let model = resolve_model(&args)?;
    let (be, gpu) = device::select(&args.device)?;
    let tc = args.train_config(gpu.is_some())?;
    tc.validate(&model.cfg)?;
    let cfg = model.cfg;

    // data
    let (data, eval, floor): (Box<dyn BatchSource>, Option<Box<dyn BatchSource>>, Option<f64>) = if args.train_file.is_some() {
        return Err(Error::Config("--train-file: token-file training comes with the data issue; not available in this build".into()));
    } else if args.random_data {
        (Box::new(RandomTokens::new(cfg.vocab_size, tc.seed)), None, None)
    } else {
        if args.synthetic_vocab > cfg.vocab_size || args.synthetic_vocab < 2 {
            return Err(Error::Config(format!(
                "--synthetic-vocab must be in 2..={} (the model's vocab_size), got {}",
                cfg.vocab_size, args.synthetic_vocab
            )));
        }
        let src = MarkovSource::new(args.synthetic_vocab, tc.seed);
        let floor = src.entropy_rate();
        let eval: Box<dyn BatchSource> = Box::new(src.stream(u64::MAX).mark_start());
        (Box::new(src.stream(0)), Some(eval), Some(floor))
    };

    // resolved configuration
    println!("llmq train");
    println!("  model      {} | {} | L={} C={} D={} Hq={} Hkv={} Hd={} V={} | {:.2}M parameters", model.describe, cfg.arch.hf_name(), cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.num_params() as f64 / 1e6);
    println!("  data       {}", data.describe());
    println!("  device     {}", be.name());
    println!("  batch      B={} T={} accumulation={} -> {} tokens/step, {} steps", tc.batch_size, tc.seq_len, tc.grad_accumulation, tc.tokens_per_step(), tc.steps);
    let p = tc.precision;
    println!("  precision  matmul {} | weights {} | master {} | grads {} | adam m {} v {}", p.matmul, p.weights, p.master, p.grads, p.opt_m, p.opt_v);
    let s = tc.schedule;
    println!("  optimizer  AdamW lr {:e} ({:?}, warmup {}, final x{}, cooldown {}) betas ({}, {}) eps {:e} wd {} clip {}", s.lr, s.decay, s.warmup, s.final_fraction, s.cooldown, tc.optim.beta1, tc.optim.beta2, tc.optim.eps, tc.optim.weight_decay, tc.optim.grad_clip);
    println!("  recompute  {:?}", tc.recompute);

    let mut trainer = Trainer::new(be, &cfg, tc.clone(), data, eval)?;
    print_memory(&trainer);
    trainer.init_from_scratch()?;
    if let Some(path) = &args.log_file {
        let mut log = JsonLog::open(path)?;
        log.write(&serde_json::json!({"type": "options", "model": cfg, "train": tc, "device": trainer.be.name()}));
        log.write(&serde_json::json!({"type": "dataset", "train": trainer.data.describe(), "floor": floor}));
        log.write(&memory_record(&trainer));
        trainer.log = Some(log);
    }
    let floor_txt = floor.map(|f| format!(" (floor {f:.3})")).unwrap_or_default();
    let peaks = gpu.and_then(|g| g.peaks);
    let steps = tc.steps;
    let mut last_eval = None;
    while trainer.step < steps {
        let st = trainer.train_step()?;
        let tps = st.tokens as f64 / st.seconds;
        if let Some(log) = &mut trainer.log {
            log.write(&serde_json::json!({"type": "step", "step": st.step, "loss": st.loss, "norm": st.grad_norm, "lr": st.lr, "tokens_per_s": tps, "ms": st.seconds * 1e3, "skipped": st.skipped}));
        }
        if st.step % args.print_every.max(1) == 0 || st.step == 1 || st.step == steps {
            let sol = peaks
                .map(|(mm, bf)| {
                    let mm = if tc.precision.matmul.is_fp8() { mm } else { bf };
                    format!(" | SOL {:.1}%", flops::sol_percent(&cfg, tc.seq_len, tps, mm, bf))
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
        let eval_now = (tc.eval_every > 0 && st.step % tc.eval_every == 0) || st.step == steps;
        if eval_now {
            if let Some(ev) = trainer.evaluate()? {
                println!("eval   {:>6} | loss {:.4}{}", st.step, ev, floor_txt);
                if let Some(log) = &mut trainer.log {
                    log.write(&serde_json::json!({"type": "eval", "step": st.step, "loss": ev}));
                }
                last_eval = Some(ev);
            }
        }
    }
    if let (Some(ev), Some(f)) = (last_eval, floor) {
        println!("done: final eval loss {ev:.4}, {:.4} nats above the entropy floor {f:.4}", ev - f);
    }
    Ok(())
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
    let cats: serde_json::Map<String, serde_json::Value> =
        tr.be.memory_by_category().iter().map(|(c, l, b)| (format!("{} ({:?})", c.name(), l), (*b).into())).collect();
    serde_json::json!({"type": "memory", "categories": cats, "free": tr.be.free_memory()})
}
