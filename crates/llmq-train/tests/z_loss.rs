//! z-loss (`TrainConfig::z_loss`): it adds z·lse² to the training loss (the op's gradient is
//! checked by finite differences in llmq-core's grad_check), leaves evaluation the plain
//! cross-entropy, and is part of the configuration a checkpoint is checked against.

mod common;

use common::*;
use llmq_train::*;

#[test]
fn z_loss_raises_the_training_loss_not_the_eval_loss() {
    let cfg = tiny(llmq_core::Arch::Qwen2, false);
    let plain = train_config(2, 16, 1, 3);
    let z = TrainConfig { z_loss: 0.05, ..plain.clone() };
    let mut a = trainer(&cfg, plain);
    let mut b = trainer(&cfg, z);
    // the same weights: the same eval loss
    assert_eq!(a.evaluate().unwrap(), b.evaluate().unwrap());
    let (la, lb) = (a.train_step().unwrap().loss, b.train_step().unwrap().loss);
    // lse ≥ log V... at initialisation the logits are near 0, lse near ln V = ln 37 ≈ 3.6:
    // z·lse² ≈ 0.05 · 13 ≈ 0.65
    let extra = lb - la;
    assert!((0.5..0.8).contains(&extra), "z-loss adds {extra} (losses {la}, {lb})");
    // and the updates differ
    assert_ne!(a.master_weights().unwrap(), b.master_weights().unwrap());
}

#[test]
fn a_checkpoint_resumes_only_with_its_z_loss() {
    let cfg = tiny(llmq_core::Arch::Qwen2, false);
    let dir = std::env::temp_dir().join(format!("llmq_zloss_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut a = trainer(&cfg, train_config(2, 16, 1, 3));
    a.train_step().unwrap();
    let saved = llmq_train::checkpoint::save(&a, &dir, &llmq_io::ckpt::Lineage::fresh()).unwrap().unwrap();
    let mut b = trainer(&cfg, TrainConfig { z_loss: 1e-4, ..train_config(2, 16, 1, 3) });
    let e = llmq_train::checkpoint::load(&mut b, &saved).unwrap_err().to_string();
    assert!(e.contains("z_loss") && e.contains("0.0001"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
