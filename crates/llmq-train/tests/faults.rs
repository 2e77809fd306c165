//! A non-finite gradient skips the update (weights and optimizer state untouched), is reported
//! with its step and cause, and K consecutive ones abort the run.

mod common;
use common::*;
use llmq_core::Arch;
use llmq_train::params::{download_f32, upload_f32};
use std::time::Instant;

/// Adam's first moments of group gi (one rank: the whole group).
fn adam_m(tr: &llmq_train::Trainer, gi: usize) -> llmq_core::Result<Vec<f32>> {
    let [_, (_, m), _] = tr.optimizer().state_tensors(&tr.model().params, gi);
    download_f32(tr.backend(), &m)
}

#[test]
fn nan_gradient_skips_the_update_and_repeated_ones_abort() {
    let cfg = tiny(Arch::Qwen2, true);
    let mut tr = trainer(&cfg, train_config(2, 8, 1, 10));
    tr.train_step().unwrap();
    let before = tr.master_weights().unwrap();
    let m_before = adam_m(&tr, 1).unwrap();
    for k in 1..=3u32 {
        let t0 = Instant::now();
        let (loss, _) = tr.accumulate_gradients().unwrap();
        // poison one gradient element of block 0
        let g = tr.model().params.grads.groups[1];
        let mut vals = download_f32(tr.backend(), &g).unwrap();
        vals[5] = f32::NAN;
        upload_f32(tr.backend(), &g, &vals).unwrap();
        let res = tr.finish_step(loss, t0);
        if k < 3 {
            let st = res.unwrap();
            assert!(st.skipped && st.grad_norm.is_nan(), "step {k}: {st:?}");
            assert_eq!(tr.master_weights().unwrap(), before, "weights changed by a skipped step");
            assert_eq!(adam_m(&tr, 1).unwrap(), m_before);
        } else {
            let err = res.unwrap_err().to_string();
            assert!(err.contains("3 consecutive") && err.contains("step 4"), "{err}");
        }
    }
    // a good step after a bad one resets the counter
    let mut tr = trainer(&cfg, train_config(2, 8, 1, 10));
    let t0 = Instant::now();
    let (loss, _) = tr.accumulate_gradients().unwrap();
    let st = tr.finish_step(f64::INFINITY.min(loss * f64::NAN), t0).unwrap();
    assert!(st.skipped);
    assert!(!tr.train_step().unwrap().skipped);
    assert_eq!(tr.bad_steps_in_a_row(), 0);
    assert_eq!(tr.optimizer().updates(), 1);
}

#[test]
fn out_of_vocabulary_tokens_are_refused_before_upload() {
    let cfg = tiny(Arch::Llama, true);
    let tr = trainer(&cfg, train_config(1, 4, 1, 1));
    let be = tr.backend();
    let ok = llmq_io::data::Batch { inputs: vec![1, 2, 3, 4], targets: vec![2, 3, 4, -100] };
    tr.model().set_batch(be, &ok).unwrap();
    let bad_in = llmq_io::data::Batch { inputs: vec![1, 2, 37, 4], ..ok.clone() };
    assert!(tr.model().set_batch(be, &bad_in).unwrap_err().to_string().contains("input token 37"));
    let bad_tg = llmq_io::data::Batch { targets: vec![2, -5, 4, 5], ..ok.clone() };
    assert!(tr.model().set_batch(be, &bad_tg).unwrap_err().to_string().contains("target token -5"));
    let short = llmq_io::data::Batch { inputs: vec![1], targets: vec![2] };
    assert!(tr.model().set_batch(be, &short).unwrap_err().to_string().contains("B*T = 4"));
}

#[test]
fn out_of_memory_reports_the_plan_and_what_would_help() {
    let cfg = tiny(Arch::Qwen2, true);
    let src = llmq_train::synthetic::MarkovSource::new(cfg.vocab_size, 1);
    let be = Box::new(llmq_core::cpu::CpuBackend::with_limit(64 << 10));
    let err = match llmq_train::Trainer::new(be, &cfg, train_config(8, 64, 1, 1), Box::new(src.stream(0)), None) {
        Ok(_) => panic!("a 64 KiB budget cannot hold this model"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("out of memory"), "{err}");
    assert!(err.contains("allocated before the failure") && err.contains("weights"), "{err}");
    assert!(err.contains("free now") && err.contains("--recompute-block"), "{err}");
}

/// Device bytes a run of micro-batch `b` (keeping the tokens per step) allocates on the CPU
/// backend: model, optimizer and the step's token buffers.
fn model_bytes(cfg: &llmq_core::ModelConfig, tc: &llmq_train::TrainConfig, b: usize) -> usize {
    let mut be = llmq_core::cpu::CpuBackend::new();
    let trial = llmq_train::TrainConfig { batch_size: b, grad_accumulation: tc.batch_size * tc.grad_accumulation / b, ..tc.clone() };
    llmq_train::trainer::RunBuffers::alloc(&mut be, cfg, &trial, None).unwrap();
    be.device_allocated()
}

#[test]
fn fit_batch_takes_the_largest_micro_batch_that_fits_at_the_same_tokens_per_step() {
    use llmq_train::fit::{fit_micro_batch, Fit};
    let cfg = tiny(Arch::Qwen2, true);
    let tc = train_config(2, 16, 12, 1); // candidates 2 x 12, 4 x 6, 8 x 3
    let (m2, m4, m8) = (model_bytes(&cfg, &tc, 2), model_bytes(&cfg, &tc, 4), model_bytes(&cfg, &tc, 8));
    assert!(m2 < m4 && m4 < m8, "activations grow with the micro-batch: {m2} {m4} {m8}");
    let headroom = 1000;
    let fit = |limit: usize| {
        let mut make = || -> llmq_core::Result<Box<dyn llmq_core::Backend>> { Ok(Box::new(llmq_core::cpu::CpuBackend::with_limit(limit))) };
        fit_micro_batch(&mut make, &cfg, &tc, headroom).unwrap()
    };
    // room for 8 (with the headroom): 8 x 3
    assert_eq!(fit(m8 + headroom), Fit { batch_size: 8, grad_accumulation: 3, free_after: Some(headroom) });
    // 8 fits, but not with the headroom; 4 does: 4 x 6
    let f = fit(m8 + headroom - 1);
    assert_eq!((f.batch_size, f.grad_accumulation), (4, 6));
    assert_eq!(f.free_after, Some(m8 + headroom - 1 - m4));
    // only 2 fits: the configured setting
    assert_eq!((fit(m4).batch_size, fit(m4).grad_accumulation), (2, 12));
    // nothing fits: the configured setting, unprobed (the real allocation reports the failure)
    assert_eq!(fit(m2 / 2), Fit { batch_size: 2, grad_accumulation: 12, free_after: None });
    // a backend without a memory budget keeps the configured micro-batch
    let mut unlimited = || -> llmq_core::Result<Box<dyn llmq_core::Backend>> { Ok(Box::new(llmq_core::cpu::CpuBackend::new())) };
    assert_eq!(fit_micro_batch(&mut unlimited, &cfg, &tc, 0).unwrap(), Fit { batch_size: 2, grad_accumulation: 12, free_after: None });
}

#[test]
fn spike_guard_skips_injected_spikes_and_stops_after_k_in_a_row() {
    let cfg = tiny(Arch::Qwen2, true);
    let mut tc = train_config(2, 8, 1, 40);
    tc.spike = llmq_train::spike::SpikeGuard { z: 6.0, window: 10, max_skips: 2 };
    let mut tr = trainer(&cfg, tc.clone());
    for _ in 0..12 {
        let st = tr.train_step().unwrap();
        assert!(!st.skipped, "an ordinary step taken for a spike: {st:?}");
    }
    let before = tr.master_weights().unwrap();
    // a gradient-norm spike: every gradient of block 0 scaled by 10^4
    let t0 = Instant::now();
    let (loss, _) = tr.accumulate_gradients().unwrap();
    let g = tr.model().params.grads.groups[1];
    let vals: Vec<f32> = download_f32(tr.backend(), &g).unwrap().iter().map(|v| v * 1e4).collect();
    upload_f32(tr.backend(), &g, &vals).unwrap();
    let st = tr.finish_step(loss, t0).unwrap();
    assert!(st.skipped && st.stop.is_none(), "{st:?}");
    assert_eq!(tr.master_weights().unwrap(), before, "weights changed by a skipped spike");
    assert_eq!(tr.spikes().skips_in_a_row, 1);
    // a loss spike right after: the second in a row stops the run
    let t0 = Instant::now();
    let (loss, _) = tr.accumulate_gradients().unwrap();
    let st = tr.finish_step(loss * 100.0, t0).unwrap();
    assert!(st.skipped, "{st:?}");
    let why = st.stop.expect("stops after 2 spikes in a row");
    assert!(why.contains("2 consecutive loss spikes") && why.contains("step 14"), "{why}");
    assert_eq!(tr.master_weights().unwrap(), before);
    // an ordinary step is accepted again and resets the count
    assert!(!tr.train_step().unwrap().skipped);
    assert_eq!(tr.spikes().skips_in_a_row, 0);

    // with the guard off (the default) the same injected spike is applied
    let mut off = trainer(&cfg, train_config(2, 8, 1, 40));
    for _ in 0..12 {
        off.train_step().unwrap();
    }
    let t0 = Instant::now();
    let (loss, _) = off.accumulate_gradients().unwrap();
    let st = off.finish_step(loss * 100.0, t0).unwrap();
    assert!(!st.skipped && st.stop.is_none());
    // an invalid guard is refused with the option named
    let mut bad = train_config(2, 8, 1, 40);
    bad.spike.z = 3.0;
    bad.spike.window = 2;
    assert!(bad.validate(&cfg).unwrap_err().to_string().contains("--spike-window"));
}

#[test]
fn a_run_stopped_by_the_spike_guard_writes_the_last_good_state_and_fails() {
    use llmq_train::ckpt_session::CkptSession;
    use llmq_train::run::{Run, RunEvent, RunOptions};
    let root = std::env::temp_dir().join(format!("llmq-spike-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cfg = tiny(Arch::Qwen2, true);
    let mut tc = train_config(2, 8, 1, 60);
    // a threshold so low that the first step above the recent mean counts as a spike, and one
    // such step ends the run: deterministic, and exercises the stop path end to end
    tc.spike = llmq_train::spike::SpikeGuard { z: 0.01, window: 10, max_skips: 1 };
    let mut tr = trainer(&cfg, tc);
    tr.init_from_scratch().unwrap();
    let ck = CkptSession::new(root.clone(), 2, None, false).unwrap();
    let opts = RunOptions { checkpoints: Some(ck), ..Default::default() };
    let mut run = Run::new(tr, opts, Default::default());
    let mut stop = None;
    while !run.done() {
        for ev in run.step().unwrap() {
            if let RunEvent::SpikeStop { why } = ev {
                stop = Some(why);
            }
        }
    }
    let why = stop.expect("the guard stops the run");
    assert!(why.contains("1 consecutive loss spikes"), "{why}");
    let step = run.trainer().steps_done();
    assert!((11..60).contains(&step), "stopped at step {step}");
    let events = run.finish().unwrap();
    assert!(events.iter().any(|e| matches!(e, RunEvent::Checkpoint { step: s, .. } if *s == step)), "{events:?}");
    assert_eq!(run.failure(), Some(why.as_str()));
    // the checkpoint holds the weights before the skipped update (the trainer's, untouched)
    let tr = run.into_trainer();
    let (_, groups) = llmq_train::checkpoint::model_config(&llmq_io::ckpt::checkpoint_dir(&root, step)).unwrap();
    assert_eq!(groups, tr.master_weights().unwrap());
    let _ = std::fs::remove_dir_all(&root);
}
