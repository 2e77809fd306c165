//! Model resolution against token files: a model built from a shape takes its vocabulary from the
//! files; a model directory is checked against them before anything is allocated.

use llmq_core::Error;
use llmq_io::tokfile::write_token_file;
use llmq_train::setup::{fit_vocab_to_data, resolve_model, DataChoice};
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmq-setup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files(train: &Path, eval: Option<&Path>) -> DataChoice {
    DataChoice { train_file: Some(train.to_str().unwrap().into()), eval_file: eval.map(|e| e.to_str().unwrap().into()), synthetic_vocab: 256, ..Default::default() }
}

/// Writes a version-1 token file (no vocab_size in the header) holding `tokens`.
fn write_v1(path: &Path, tokens: &[i32]) {
    let mut b = vec![0u8; 1024];
    b[..8].copy_from_slice(b"BIN.TOK\n");
    b[8..12].copy_from_slice(&1i32.to_le_bytes());
    b[12..16].copy_from_slice(&4i32.to_le_bytes());
    b[16..20].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    for t in tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_shape_from_scratch_takes_the_vocabulary_of_the_headers() {
    let d = tmpdir("v2");
    let (train, eval) = (d.join("train.bin"), d.join("eval.bin"));
    write_token_file(&train, &[0, 5, 999], None, Some(1000)).unwrap();
    write_token_file(&eval, &[1, 2, 1100], None, Some(1200)).unwrap();
    for name in [Some("tiny"), None, Some("qwen2.5-0.5b")] {
        let mut m = resolve_model(name, true, 256).unwrap();
        fit_vocab_to_data(&mut m, &files(&train, Some(&eval))).unwrap();
        assert_eq!(m.cfg.vocab_size, 1200, "{name:?}: the largest header, eval file included");
        assert!(m.describe.contains("vocabulary 1200 from the token files' headers (field vocab_size)"), "{}", m.describe);
    }
    // without token files the shape keeps its vocabulary
    let mut m = resolve_model(Some("tiny"), true, 256).unwrap();
    fit_vocab_to_data(&mut m, &DataChoice { synthetic_vocab: 256, ..Default::default() }).unwrap();
    assert_eq!(m.cfg.vocab_size, 256);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn version_1_files_give_their_largest_id_and_say_so() {
    let d = tmpdir("v1");
    let (v1, v2) = (d.join("a.bin"), d.join("b.bin"));
    write_v1(&v1, &[3, 700, 12]);
    let mut m = resolve_model(Some("tiny"), true, 256).unwrap();
    fit_vocab_to_data(&mut m, &files(&v1, None)).unwrap();
    assert_eq!(m.cfg.vocab_size, 701);
    assert!(m.describe.contains("a.bin is a version-1 token file, whose header records no vocabulary: the largest token id"), "{}", m.describe);
    // beside a version-2 file with a larger header, the larger wins
    write_token_file(&v2, &[1], None, Some(900)).unwrap();
    let mut m = resolve_model(Some("tiny"), true, 256).unwrap();
    fit_vocab_to_data(&mut m, &files(&d.join("*.bin"), None)).unwrap();
    assert_eq!(m.cfg.vocab_size, 900);
    // a negative id is named with its position
    write_v1(&v1, &[3, -4]);
    let e = fit_vocab_to_data(&mut resolve_model(Some("tiny"), true, 256).unwrap(), &files(&v1, None)).unwrap_err();
    assert!(matches!(&e, Error::File { path, msg } if path == &v1 && msg.contains("position 1") && msg.contains("id -4")), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_model_directory_is_checked_against_the_headers_naming_both() {
    let d = tmpdir("dir");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let cfg = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;
    std::fs::write(model.join("config.json"), cfg).unwrap();
    let (ok, big) = (d.join("ok.bin"), d.join("big.bin"));
    write_token_file(&ok, &[1, 2], None, Some(480)).unwrap();
    write_token_file(&big, &[1, 2], None, Some(600)).unwrap();
    for from_scratch in [false, true] {
        let mut m = resolve_model(Some(model.to_str().unwrap()), from_scratch, 256).unwrap();
        fit_vocab_to_data(&mut m, &files(&ok, None)).unwrap();
        assert_eq!(m.cfg.vocab_size, 500, "the model's own vocabulary stays");
        let e = fit_vocab_to_data(&mut m, &files(&ok, Some(&big))).unwrap_err();
        let Error::File { path, msg } = &e else { panic!("{e}") };
        assert_eq!(path, &big);
        for w in ["field `vocab_size`", "is 600", "vocab_size 500", "model/config.json"] {
            assert!(msg.contains(w), "{w:?} not in {msg}");
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_checkpoint_without_a_recorded_source_still_reads() {
    let d = tmpdir("source");
    let lineage = llmq_io::ckpt::Lineage::fresh();
    let old = llmq_io::ckpt::write_checkpoint(&d, 1, &lineage, &[], &serde_json::json!({"step": 1})).unwrap();
    assert_eq!(llmq_train::setup::recorded_source(&old).unwrap(), None);
    let src = resolve_model(Some("tiny"), true, 256).unwrap().source();
    assert_eq!((src.dir.as_ref(), src.tokenizer.as_ref()), (None, None));
    let new = llmq_io::ckpt::write_checkpoint(&d, 2, &lineage, &[], &serde_json::json!({"step": 2, "source": src})).unwrap();
    assert_eq!(llmq_train::setup::recorded_source(&new).unwrap(), Some(src));
    let bad = llmq_io::ckpt::write_checkpoint(&d, 3, &lineage, &[], &serde_json::json!({"step": 3, "source": 7})).unwrap();
    let e = llmq_train::setup::recorded_source(&bad).unwrap_err();
    assert!(e.to_string().contains("state field `source`"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
