//! A non-finite gradient skips the update (weights and optimizer state untouched), is reported
//! with its step and cause, and K consecutive ones abort the run.

mod common;
use common::*;
use llmq_core::Arch;
use llmq_train::params::{download_f32, upload_f32};
use std::time::Instant;

#[test]
fn nan_gradient_skips_the_update_and_repeated_ones_abort() {
    let cfg = tiny(Arch::Qwen2, true);
    let mut tr = trainer(&cfg, train_config(2, 8, 1, 10));
    tr.train_step().unwrap();
    let before = tr.model.params.master_f32(tr.be.as_ref()).unwrap();
    let m_before = download_f32(tr.be.as_ref(), &tr.model.params.m.groups[1]).unwrap();
    for k in 1..=3u32 {
        let t0 = Instant::now();
        let (loss, _) = tr.accumulate_gradients().unwrap();
        // poison one gradient element of block 0
        let g = tr.model.params.grads.groups[1];
        let mut vals = download_f32(tr.be.as_ref(), &g).unwrap();
        vals[5] = f32::NAN;
        upload_f32(tr.be.as_ref(), &g, &vals).unwrap();
        let res = tr.finish_step(loss, t0);
        if k < 3 {
            let st = res.unwrap();
            assert!(st.skipped && st.grad_norm.is_nan(), "step {k}: {st:?}");
            assert_eq!(tr.model.params.master_f32(tr.be.as_ref()).unwrap(), before, "weights changed by a skipped step");
            assert_eq!(download_f32(tr.be.as_ref(), &tr.model.params.m.groups[1]).unwrap(), m_before);
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
    assert_eq!(tr.bad_in_a_row, 0);
    assert_eq!(tr.updates, 1);
}

#[test]
fn out_of_vocabulary_tokens_are_refused_before_upload() {
    let cfg = tiny(Arch::Llama, true);
    let tr = trainer(&cfg, train_config(1, 4, 1, 1));
    let be = tr.be.as_ref();
    let ok = llmq_io::data::Batch { inputs: vec![1, 2, 3, 4], targets: vec![2, 3, 4, -100] };
    tr.model.set_batch(be, &ok).unwrap();
    let bad_in = llmq_io::data::Batch { inputs: vec![1, 2, 37, 4], ..ok.clone() };
    assert!(tr.model.set_batch(be, &bad_in).unwrap_err().to_string().contains("input token 37"));
    let bad_tg = llmq_io::data::Batch { targets: vec![2, -5, 4, 5], ..ok.clone() };
    assert!(tr.model.set_batch(be, &bad_tg).unwrap_err().to_string().contains("target token -5"));
    let short = llmq_io::data::Batch { inputs: vec![1], targets: vec![2] };
    assert!(tr.model.set_batch(be, &short).unwrap_err().to_string().contains("B*T = 4"));
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
