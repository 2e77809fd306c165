//! `llmq train`: resolve the model, data and device, print the resolved configuration and the
//! memory plan, then drive a `llmq_train::run::Run` and print its events, a line per step.

use crate::device;
use crate::preflight;
use crate::signals;
use crate::train_args::TrainArgs;
use llmq_core::{fmt_bytes, Error, ModelConfig, Result};
use llmq_train::memory_check;
use llmq_train::plan::{self, MemoryPlan};
use llmq_train::setup::{self, DataChoice};
use llmq_train::run::{Run, RunEvent, RunOptions};
use llmq_io::hf;
use llmq_train::log::JsonLog;
use llmq_train::{flops, TrainConfig, Trainer};
pub use llmq_train::setup::ModelChoice;

fn data_choice(args: &TrainArgs, rank: usize, world: usize) -> DataChoice {
    DataChoice { allow_data_change: args.allow_data_change, rank, world, ..args.opts.data_choice() }
}

/// The data of rank `rank` (of `tc.world_size`); rank 0 checks every token id up front.
fn resolve_data(args: &TrainArgs, cfg: &ModelConfig, tc: &TrainConfig, rank: usize) -> Result<setup::Sources> {
    let d = data_choice(args, rank, tc.world_size);
    let no_check = |_: &llmq_io::loader::TokenLoader, _: &str| Ok(());
    setup::resolve_data(&d, cfg, tc, if rank == 0 { &preflight::check_tokens } else { &no_check })
}

/// The tokenizer directory `--export` copies from (the model's, or the one a resumed checkpoint
/// recorded); where none is known, rank 0 says so before the run rather than after it.
fn export_tokenizer(trainer: &Trainer, dir: &std::path::Path, lead: bool) -> Option<std::path::PathBuf> {
    let tokenizer = trainer.source().and_then(|s| s.tokenizer.clone());
    if tokenizer.is_none() && lead {
        eprintln!("warning: --export {} will hold no tokenizer: none is known for this model (built from scratch, or its directory holds no tokenizer files); copy one into it", dir.display());
    }
    tokenizer
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
    let opts = tc.backend.clone();
    let mut make = || device::select(&args.opts.device, &opts).map(|(b, _)| b);
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

/// Device memory the backend holds for itself, for the plan.
fn backend_reserve(on_gpu: bool) -> usize {
    if on_gpu {
        llmq_cuda::OWN_DEVICE_BYTES
    } else {
        0
    }
}

/// The resolved configuration, as a person reads it.
pub fn print_config(model: &ModelChoice, data: &str, device: &str, tc: &TrainConfig, fit_line: Option<&str>) {
    let cfg = &model.cfg;
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
    println!("  data       {data}");
    println!("  device     {device}");
    let ranks = if tc.world_size > 1 { format!(" x {} ranks", tc.world_size) } else { String::new() };
    println!("  batch      B={} T={} accumulation={}{ranks} -> {} tokens/step, {} steps", tc.batch_size, tc.seq_len, tc.grad_accumulation, tc.tokens_per_step(), tc.steps);
    if let Some(line) = fit_line {
        println!("  fit-batch  {line}");
    }
    let p = tc.precision;
    let fp8 = if p.matmul.is_fp8() { format!(" | activation gradients {} | fast accumulation {}", p.act_grads, if p.fp8_fast_accumulation { "on" } else { "off" }) } else { String::new() };
    println!("  precision  matmul {} | weights {} | master {} | gradients {} | adam m {}, v {}{fp8}", p.matmul, p.weights, p.master, p.grads, p.opt_m, p.opt_v);
    let s = tc.schedule;
    let cooldown = if s.cooldown > 0 { format!(", 1-sqrt cooldown over the last {} steps", s.cooldown) } else { String::new() };
    println!("  schedule   lr {:e}, {} warmup steps, {} decay to {} x lr{cooldown}", s.lr, s.warmup, s.decay.name(), s.final_fraction);
    let o = &tc.optim;
    let clip = if o.grad_clip > 0.0 { format!("clip gradient norm at {}", o.grad_clip) } else { "no clipping".into() };
    let z = if tc.z_loss > 0.0 { format!(", z-loss {}", tc.z_loss) } else { String::new() };
    println!("  optimizer  AdamW betas {} / {}, eps {:e}, weight decay {}, {clip}{z}", o.beta1, o.beta2, o.eps, o.weight_decay);
    println!("  memory     {}", tc.memory.describe());
    println!("  backend    {}", tc.backend.describe());
    if tc.spike.z > 0.0 {
        println!("  spikes     skip an update above z {} over {} steps; stop after {} in a row", tc.spike.z, tc.spike.window, tc.spike.max_skips);
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let stop = signals::install();
    if let Some(l) = llmq_train::rendezvous::Launch::from_env()? {
        return crate::ranks::run_launched(args, l, stop, run_rank);
    }
    // clap keeps --gpus in 1..=MAX_RANKS
    match args.gpus {
        1 => run_rank(&args, None, stop),
        _ => crate::ranks::run_threads(args, stop, run_rank),
    }
}

/// One rank of a run (the whole run with one device): rank 0 prints, logs and writes
/// checkpoints and the export; every rank trains its share of each step.
fn run_rank(args: &TrainArgs, start: Option<crate::ranks::RankStart>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    let rank = start.as_ref().map_or(0, |s| s.rank);
    let lead = rank == 0;
    let say = |line: &str| {
        if lead {
            println!("{line}");
        }
    };
    let model = args.opts.resolve_model()?;
    let cfg = model.cfg.clone();
    let ordinal = start.as_ref().map_or(0, |s| s.ordinal);
    let (mut be, gpu, comm) = device::select_with(&args.opts.device, ordinal, &args.opts.backend.options()?, |cuda| start.as_ref().map(|s| s.comm(cuda)).transpose())?;
    let mut tc = args.train_config(gpu.is_some())?;
    if !args.opts.auto_memory {
        tc.validate(&cfg)?; // auto_memory validates what it chooses
    }
    if lead {
        preflight::check_outputs(args)?;
    }
    let mut ckpts = args.opts.checkpoints(args.drop_abandoned, lead)?;
    if let Some(limit) = tc.memory.memory_limit {
        be.limit_device_memory(limit as usize);
    }
    if args.opts.auto_memory && args.fit_batch {
        return Err(Error::Config("--auto-memory and --fit-batch both choose the micro-batch: pass one".into()));
    }
    if args.opts.auto_memory {
        let (chosen, lines) = memory_check::auto_memory_for(&cfg, &tc, be.as_ref())?;
        lines.iter().for_each(|l| say(l));
        tc = chosen;
    }
    let (be, fit_line) = if args.fit_batch { fit_batch(args, be, gpu.is_some(), &cfg, &mut tc).map(|(b, l)| (b, Some(l)))? } else { (be, None) };
    args.default_graphs(&mut tc, &cfg, gpu.is_some());
    // the backend holds its own buffers already: the budget is what is left beside them
    memory_check::check_run_fits(&cfg, &tc, be.as_ref(), gpu.is_some())?;
    let be: Box<dyn llmq_core::Backend> = if args.check_streams { Box::new(llmq_core::stream_check::StreamChecked::new(be)) } else { be };
    let (be, profile): (Box<dyn llmq_core::Backend>, _) = if args.profile {
        let (p, h) = llmq_train::profile::profiled(be);
        (Box::new(p), Some(h))
    } else {
        (be, None)
    };

    let (data, eval, floor) = resolve_data(args, &cfg, &tc, rank)?;
    if lead {
        print_config(&model, &data.describe(), &be.name(), &tc, fit_line.as_deref());
        if let Some(c) = &comm {
            let level = if tc.memory.shard_weights { 3 } else if tc.memory.shard_gradients { 2 } else { 1 };
            println!("  ranks      {} | ZeRO-{level} | each rank reads every N-th chunk", c.describe());
        }
    }

    let mut trainer = Trainer::new_rank(be, &cfg, tc.clone(), data, eval, comm.clone())?;
    trainer.set_source(model.source());
    if args.log_amax > 0 {
        if args.opts.log_file.is_none() {
            return Err(Error::Config("--log-amax writes into the JSON log: add --log-file".into()));
        }
        if lead {
            trainer.log_fp8_health(args.log_amax)?;
        }
    }
    if lead {
        print_memory(&trainer);
    }
    let spinner = if lead { indicatif::ProgressBar::new_spinner() } else { indicatif::ProgressBar::hidden() };
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner.set_message(if args.continue_from.is_some() {
        "loading checkpoint"
    } else if model.dir.is_some() && !args.opts.from_scratch {
        "loading weights"
    } else {
        "initialising weights"
    });
    match (&args.continue_from, &model.dir) {
        (Some(which), _) => {
            let ck = ckpts.as_mut().expect("validated: --continue needs --ckpt-dir");
            for line in ck.resume(&mut trainer, which, args.opts.stop_at.unwrap_or(tc.steps))? {
                say(&line);
            }
        }
        (None, Some(dir)) if !args.opts.from_scratch => {
            let groups = hf::load_weights(dir, &cfg)?;
            trainer.set_weights(&groups)?;
            say(&format!("loaded weights from {}", dir.display()));
        }
        _ => trainer.init_from_scratch()?,
    }
    spinner.finish_and_clear();
    // every rank has read the checkpoint before rank 0 moves anything aside
    if let Some(c) = &comm {
        c.barrier("checkpoint loaded")?;
    }
    if lead {
        for line in ckpts.as_ref().map(|c| c.set_aside()).transpose()?.unwrap_or_default() {
            println!("{line}");
        }
    }
    if let (true, Some(path)) = (lead, &args.opts.log_file) {
        let mut log = JsonLog::open(path)?;
        log.set_run(&ckpts.as_ref().map_or_else(llmq_io::ckpt::Lineage::fresh, |c| c.lineage().clone()));
        log.write(&serde_json::json!({"type": "options", "model": cfg, "train": tc, "device": trainer.backend().name()}));
        log.write(&serde_json::json!({"type": "config", "toml": args.effective_config}));
        log.write(&serde_json::json!({"type": "dataset", "train": trainer.data().describe(), "floor": floor}));
        log.write(&memory_record(&trainer));
        trainer.set_log(log);
    }
    let export = args.opts.export(|dir| export_tokenizer(&trainer, dir, lead))?;
    let opts = RunOptions {
        checkpoints: ckpts,
        ckpt_interval: args.opts.ckpt_interval,
        stop_at: args.opts.stop_at,
        skip_eval: profile.is_some(),
        export,
    };
    if let Some(p) = &profile {
        p.take(); // setup is not part of a step
    }
    let mut run = Run::new(trainer, opts, stop);
    // telemetry of rank 0's GPU (NVML); none on the CPU or without NVML
    if let (true, Some(bus)) = (lead, gpu.as_ref().and_then(|g| g.pci_bus_id.clone())) {
        match llmq_cuda::telemetry::Telemetry::open(&bus) {
            Ok(t) => run = run.with_probe(Box::new(move || t.sample())),
            Err(why) => println!("telemetry: none ({why})"),
        }
    }
    let show = Show { floor, peaks: gpu.and_then(|g| g.peaks), print_every: args.print_every.max(1), cfg: &cfg, tc: &tc };
    while !run.done() {
        for ev in run.step()? {
            if lead {
                show.event(&ev);
            }
        }
    }
    for ev in run.finish()? {
        if lead {
            show.event(&ev);
        }
    }
    if let Some(why) = run.failure() {
        return Err(Error::Backend(why.to_string()));
    }
    if !lead {
        return Ok(());
    }
    if let Some(p) = &profile {
        print_profile(&p.take(), run.throughput().map_or(1, |t| t.steps + t.warmup));
    }
    if let Some(t) = run.throughput() {
        println!("throughput: median step {:.1} ms over {} steps after {} warm-up -> {:.0} tokens/s{}", t.median_step_s * 1e3, t.steps, t.warmup, t.tokens_per_s, show.sol(t.tokens_per_s, ", "));
    }
    if let (Some(ev), Some(f)) = (run.last_eval(), floor) {
        println!("done: final eval loss {ev:.4}, {:.4} nats above the entropy floor {f:.4}", ev - f);
    }
    Ok(())
}

/// Prints run events.
struct Show<'a> {
    floor: Option<f64>,
    peaks: Option<(f64, f64)>,
    print_every: u64,
    cfg: &'a ModelConfig,
    tc: &'a TrainConfig,
}

impl Show<'_> {
    fn floor_txt(&self) -> String {
        self.floor.map(|f| format!(" (floor {f:.3})")).unwrap_or_default()
    }
    fn sol(&self, tps: f64, sep: &str) -> String {
        self.peaks
            .map(|(mm, bf)| {
                let mm = if self.tc.precision.matmul.is_fp8() { mm } else { bf };
                format!("{sep}SOL {:.1}%", flops::sol_percent(self.cfg, self.tc.seq_len, tps, mm, bf))
            })
            .unwrap_or_default()
    }
    fn event(&self, ev: &RunEvent) {
        match ev {
            RunEvent::Step { stats: st, tokens_per_s, elapsed, eta, telemetry } => {
                let steps = self.tc.steps;
                if st.step % self.print_every == 0 || st.step == 1 || st.step == steps {
                    println!(
                        "step {:>6}/{} ({:5.1}%) | {:7.1} ms | loss {:.4}{} | norm {:.3} | lr {:.2e} | {:.0} tok/s{} | {} elapsed, ETA {}{}",
                        st.step,
                        steps,
                        100.0 * st.step as f64 / steps as f64,
                        st.seconds * 1e3,
                        st.loss,
                        self.floor_txt(),
                        st.grad_norm,
                        st.lr,
                        tokens_per_s,
                        self.sol(*tokens_per_s, " | "),
                        fmt_duration(*elapsed),
                        fmt_duration(*eta),
                        telemetry.as_ref().map(llmq_cuda::telemetry::step_text).unwrap_or_default()
                    );
                }
            }
            RunEvent::Eval { step, loss } => println!("eval   {:>6} | loss {:.4}{}", step, loss, self.floor_txt()),
            RunEvent::Checkpoint { path, removed, .. } => {
                let removed = if *removed > 0 { format!(" ({removed} old removed)") } else { String::new() };
                println!("checkpoint {} written{removed}", path.display());
            }
            RunEvent::CheckpointNote(note) => println!("{note}"),
            RunEvent::SpikeStop { why } => println!("{why}"),
            RunEvent::CheckpointSkipped { step } => println!("not writing a checkpoint at step {step}: the last step was not finite"),
            RunEvent::Stopped { step } => println!("signal received: stopping after step {step}"),
            RunEvent::StoppedWithoutCheckpoint => println!("no --ckpt-dir: stopping without a checkpoint"),
            RunEvent::Exported { dir, dtype } => println!("exported {} ({dtype}) to {}", self.cfg.arch.hf_name(), dir.display()),
        }
    }
}

/// 75 -> "1m15s", 4000 -> "1h06m".
fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
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

fn place(m: llmq_core::Mem, on_cpu: bool) -> &'static str {
    match (m, on_cpu) {
        (llmq_core::Mem::Device, false) => "device",
        (llmq_core::Mem::Device, true) => "device (emulated in RAM)",
        (m, _) => m.name(),
    }
}

fn print_memory(tr: &Trainer) {
    let mem = tr.backend().memory_by_category();
    let on_cpu = tr.backend().name().starts_with("cpu");
    let dev: usize = mem.iter().filter(|m| m.1 == llmq_core::Mem::Device).map(|m| m.2).sum();
    let host: usize = mem.iter().filter(|m| m.1.is_host()).map(|m| m.2).sum();
    println!("memory ({}):", tr.backend().name());
    for (cat, loc, bytes) in &mem {
        println!("  {:<16} {:>12}  {}", cat.name(), fmt_bytes(*bytes), place(*loc, on_cpu));
    }
    println!("  {:<16} {:>12}", "device total", fmt_bytes(dev));
    if host > 0 {
        println!("  {:<16} {:>12}", "host total", fmt_bytes(host));
    }
    if let Some(free) = tr.backend().free_memory() {
        println!("  {:<16} {:>12}", "free", fmt_bytes(free));
    }
}

fn memory_record(tr: &Trainer) -> serde_json::Value {
    let cats: serde_json::Map<String, serde_json::Value> = tr
        .backend()
        .memory_by_category()
        .iter()
        .map(|(c, l, b)| (format!("{} ({})", c.name(), place(*l, false)), (*b).into()))
        .collect();
    serde_json::json!({"type": "memory", "categories": cats, "free": tr.backend().free_memory()})
}

/// `llmq plan`: the memory plan and an estimated step time of `llmq train` with the same
/// arguments, without a device and without reading weights.
pub fn plan(args: TrainArgs, verbose: bool) -> Result<()> {
    let model = args.opts.resolve_model()?;
    let cfg = &model.cfg;
    let on_gpu = args.opts.device != "cpu";
    let mut tc = args.train_config(on_gpu)?;
    if !args.opts.auto_memory {
        tc.validate(cfg)?; // auto_memory validates what it chooses
    }
    let reserve = backend_reserve(on_gpu);
    if args.opts.auto_memory {
        let (chosen, lines) = memory_check::auto_memory_plan(cfg, &tc, reserve, "llmq plan")?;
        lines.iter().for_each(|l| println!("{l}"));
        tc = chosen;
    }
    args.default_graphs(&mut tc, cfg, on_gpu);
    let plan = MemoryPlan::new(cfg, &tc, reserve)?;
    println!("llmq plan: {} ({:.2}B parameters) on {}", model.describe, cfg.num_params() as f64 / 1e9, if on_gpu { "a CUDA GPU" } else { "the CPU" });
    println!("  batch      B={} T={} accumulation={} -> {} tokens/step", tc.batch_size, tc.seq_len, tc.grad_accumulation, tc.tokens_per_step());
    let p = tc.precision;
    println!("  precision  matmul {} | weights {} | master {} | gradients {} | adam m {}, v {}", p.matmul, p.weights, p.master, p.grads, p.opt_m, p.opt_v);
    println!("  memory     {}", tc.memory.describe());
    if tc.world_size > 1 {
        println!("  ranks      {} (the plan is one rank's)", tc.world_size);
    }
    print!("{}", plan.describe(tc.memory.memory_limit));
    if verbose {
        println!("largest buffers:");
        print!("{}", plan.describe_buffers(16));
    }
    if on_gpu {
        let est = plan::estimate_step_seconds(cfg, &tc, &plan, plan::DeviceSpeeds::h200_for(&tc));
        println!("estimated step on an H200: {:.1} ms -> {:.0} tokens/s", est * 1e3, tc.tokens_per_step() as f64 / est);
    }
    match tc.memory.memory_limit {
        Some(limit) if !plan.fits(Some(limit)) => {
            let fit = plan::options_that_fit(cfg, &tc, reserve, limit, 4);
            let mut msg = format!("the plan is {} over --memory-limit", fmt_bytes(plan.device_peak() - limit as usize));
            if fit.is_empty() {
                msg += "; no single memory option (offloading, recomputation, a smaller micro-batch) makes it fit";
            }
            for (opt, peak) in fit {
                msg += &format!("\n  would fit: {opt}  (device peak {})", fmt_bytes(peak));
            }
            Err(Error::OutOfMemory(msg))
        }
        _ => Ok(()),
    }
}
