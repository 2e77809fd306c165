//! Whole-model parameter gradients against central finite differences, on tiny configs of
//! Llama, Qwen2 (QKV bias) and Qwen3 (qk-norm), tied and untied.
//!
//! For every parameter tensor we compare directional derivatives along random unit directions:
//! (L(w + h u) − L(w − h u)) / 2h  versus  ⟨∇L, u⟩. The model runs in f32; the loss is a mean of
//! f32 per-row losses summed in f64, so each loss evaluation carries a rounding error of about
//! 1e-7 relative (≈ 4e-7 absolute at L ≈ 3.6) plus the f32 rounding inside the network
//! (≈ 1e-6). With h = 1e-2 the finite difference has a rounding error of about 1e-6/h = 1e-4
//! and a truncation error O(h²·L''') of the same order. We therefore accept
//! |fd − an| ≤ 3e-3·max(|fd|, |an|) + 2e-4.

mod common;
use common::*;
use llmq_core::layout::ParamKind;
use llmq_io::data::BatchSource;
use llmq_train::init::Rng;
use llmq_train::synthetic::MarkovSource;
use llmq_train::params::{download_f32, upload_f32};
use llmq_train::Trainer;

#[test]
fn model_gradients_match_finite_differences() {
    for (name, cfg) in all_tiny() {
        let tr = trainer(&cfg, train_config(2, 5, 1, 1));
        // larger weights than the 0.02 init, so every path matters and the model is nonlinear
        let be = tr.backend();
        let p = &tr.model().params;
        let mut rng = Rng::new(5);
        for (gi, g) in p.layout.groups.iter().enumerate() {
            let mut vals = vec![0f32; g.numel];
            for e in &g.entries {
                for x in &mut vals[e.offset..e.offset + e.numel()] {
                    *x = if e.kind.is_norm() { 1.0 + 0.2 * rng.normal() as f32 } else { 0.3 * rng.normal() as f32 };
                }
            }
            upload_f32(be, &p.weights.groups[gi], &vals).unwrap();
        }
        // a batch with masked targets
        let mut batch = MarkovSource::new(cfg.vocab_size, 99).stream(0).next_batch(2, 5).unwrap();
        batch.targets[3] = -100;
        batch.targets[7] = -100;
        let valid = batch.valid_targets() as f32;
        let loss = |tr: &Trainer| -> f64 {
            let be = tr.backend();
            tr.model().set_batch(be, &batch).unwrap();
            tr.model().forward(be, None).unwrap();
            tr.model().loss_sum(be).unwrap() / valid as f64
        };
        let be = tr.backend();
        tr.model().params.grads.zero(be).unwrap();
        tr.model().set_batch(be, &batch).unwrap();
        tr.model().forward(be, Some(1.0 / valid)).unwrap();
        tr.model().backward(be).unwrap();
        let grads = tr.model().params.grads_f32(be).unwrap();
        let h = 1e-2f32;
        let mut checked = 0;
        let groups = tr.model().params.layout.groups.clone();
        for (gi, g) in groups.iter().enumerate() {
            let w_t = tr.model().params.weights.groups[gi];
            let w0 = download_f32(tr.backend(), &w_t).unwrap();
            for e in &g.entries {
                for _dir in 0..2 {
                    let mut u: Vec<f32> = (0..e.numel()).map(|_| rng.normal() as f32).collect();
                    let un = u.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
                    u.iter_mut().for_each(|x| *x /= un);
                    let an: f64 = u.iter().zip(&grads[gi][e.offset..]).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let mut wp = w0.clone();
                    let mut wm = w0.clone();
                    for (i, ui) in u.iter().enumerate() {
                        wp[e.offset + i] += h * ui;
                        wm[e.offset + i] -= h * ui;
                    }
                    upload_f32(tr.backend(), &w_t, &wp).unwrap();
                    let lp = loss(&tr);
                    upload_f32(tr.backend(), &w_t, &wm).unwrap();
                    let lm = loss(&tr);
                    upload_f32(tr.backend(), &w_t, &w0).unwrap();
                    let fd = (lp - lm) / (2.0 * h as f64);
                    let tol = 3e-3 * fd.abs().max(an.abs()) + 2e-4;
                    assert!(
                        (fd - an).abs() <= tol,
                        "{name}: {} {:?}: finite difference {fd:.6} vs analytic {an:.6}",
                        g.name,
                        e.kind
                    );
                    checked += 1;
                }
                // the gradient must not be trivially zero (except a tied model's unused head entries)
                let gnorm: f64 = grads[gi][e.offset..e.offset + e.numel()].iter().map(|x| (*x as f64).powi(2)).sum();
                assert!(gnorm > 1e-12 || e.kind == ParamKind::LmHead, "{name}: {} {:?} has a zero gradient", g.name, e.kind);
            }
        }
        assert!(checked > 20, "{name}: only {checked} checks");
    }
}
