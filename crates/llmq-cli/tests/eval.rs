//! `llmq eval`: a trained-then-exported model (and its checkpoint) evaluated on the training
//! run's eval file gives the run's final eval loss bit for bit; bad inputs are refused naming
//! the file.

use std::path::Path;

mod common;

use common::*;

/// A token file of `n` pseudo-random ids below `below`, whose header says `vocab`.
fn token_file(path: &Path, n: usize, below: u64, vocab: u32, seed: u64) {
    let mut x = seed;
    let toks: Vec<i32> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % below) as i32
        })
        .collect();
    llmq_io::tokfile::write_token_file(path, &toks, None, Some(vocab)).unwrap();
}

/// The `{"loss", ...}` object `llmq eval --json` prints.
fn eval_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["eval", model.to_str().unwrap(), "--device", "cpu", "--json"];
    args.extend_from_slice(extra);
    let out = llmq(&args);
    serde_json::from_str(out.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Trains the tiny model on `device` (6 steps, a final eval of 3 batches of 4 x 32 on the eval
/// file) with `extra` options, exporting it in `export_dtype` and checkpointing it: (eval file,
/// export, checkpoint root, the final eval's loss as logged).
fn trained(d: &Path, device: &str, export_dtype: &str, extra: &[&str]) -> (String, std::path::PathBuf, std::path::PathBuf, serde_json::Value) {
    let data = dataset(d);
    let ev = d.join("eval.bin");
    token_file(&ev, 4 * 33 * 3 + 20, 256, 256, 7);
    let (out, ck, log) = (d.join("model"), d.join("ck"), d.join("run.jsonl"));
    llmq(&cmd(
        "train --model tiny --from-scratch --batch-size 4 --seq-len 32 --steps 6 --warmup 1 --eval-every 0 --eval-batches 3",
        &[extra, &["--device", device, "--export-dtype", export_dtype, "--train-file", &data, "--eval-file", ev.to_str().unwrap(), "--export", out.to_str().unwrap(), "--ckpt-dir", ck.to_str().unwrap(), "--log-file", log.to_str().unwrap()]].concat(),
    ));
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "eval")
        .collect();
    assert_eq!(evals.len(), 1, "{evals:?}");
    (ev.to_str().unwrap().to_string(), out, ck, evals[0]["loss"].clone())
}

#[test]
fn eval_of_the_exported_model_and_checkpoint_equals_the_runs_final_eval() {
    let d = tmpdir("eval");
    let (ev, out, ck, logged) = trained(&d, "cpu", "fp32", &[]);
    let ev = Path::new(&ev);
    let final_loss = logged.to_string();
    // a trained tiny model on random bytes: near ln 256, well below a uniform guess's upper bound
    assert!(logged.as_f64().is_some_and(|l| l > 4.0 && l < 7.0), "{final_loss}");

    let shape = ["--eval-file", ev.to_str().unwrap(), "--batch-size", "4", "--seq-len", "32", "--batches", "3"];
    for model in [out.clone(), ck.clone(), ck.join("step_00000006")] {
        let r = eval_json(&model, &shape);
        assert_eq!(r["loss"].to_string(), final_loss, "{}: {r}", model.display());
        assert_eq!(r["tokens"], 3 * 4 * 32);
        assert_eq!(r["batches"], 3);
        let (loss, ppl) = (r["loss"].as_f64().unwrap(), r["perplexity"].as_f64().unwrap());
        assert_eq!(ppl, loss.exp());
    }
    // other batches give another loss (the comparison above is not of a constant)
    let two = eval_json(&out, &shape[..6].iter().copied().chain(["--batches", "2"]).collect::<Vec<_>>());
    assert_ne!(two["loss"].to_string(), final_loss);
    // without --batches: every whole batch of the file (3 here); the human-readable summary
    let text = llmq(&cmd("eval --device cpu --batch-size 4 --seq-len 32 --eval-file", &[ev.to_str().unwrap(), out.to_str().unwrap()]));
    assert!(text.contains("384 tokens in 3 batches") && text.contains("perplexity"), "{text}");

    // a checkpoint evaluates with its run's matmul dtype unless told otherwise; a model directory
    // with the backend's default (fp32 on the CPU)
    let d2 = d.join("bf16");
    std::fs::create_dir_all(&d2).unwrap();
    let (_, out2, ck2, logged2) = trained(&d2, "cpu", "fp32", &["--matmul-dtype", "bf16"]);
    assert_eq!(eval_json(&ck2, &shape)["loss"], logged2);
    assert_ne!(eval_json(&out2, &shape)["loss"], logged2);
    let bf16: Vec<&str> = shape.iter().copied().chain(["--matmul-dtype", "bf16"]).collect();
    assert_eq!(eval_json(&out2, &bf16)["loss"], logged2);

    // bad inputs, each refused naming what is wrong
    let err = llmq_err(&cmd("eval --device cpu --batch-size 4 --seq-len 32 --batches 4 --eval-file", &[ev.to_str().unwrap(), out.to_str().unwrap()]));
    assert!(err.contains("holds 3 whole batches of batch_size=4 sequences of seq_len=32, asked for 4"), "{err}");
    let missing = d.join("nope_*.bin");
    let err = llmq_err(&cmd("eval --device cpu --eval-file", &[missing.to_str().unwrap(), out.to_str().unwrap()]));
    assert!(err.contains("nope_*.bin"), "{err}");
    let err = llmq_err(&cmd("eval --device cpu --eval-file", &[ev.to_str().unwrap(), d.join("no_model").to_str().unwrap()]));
    assert!(err.contains("no_model"), "{err}");
    // token files of a larger vocabulary than the model's: refused before anything runs
    let wide = d.join("wide.bin");
    token_file(&wide, 2000, 512, 512, 9);
    let err = llmq_err(&cmd("eval --device cpu --batch-size 4 --seq-len 32 --eval-file", &[wide.to_str().unwrap(), out.to_str().unwrap()]));
    assert!(err.contains("wide.bin") && err.contains("vocab_size 512") && err.contains("vocab_size 256"), "{err}");
    // a header without a vocabulary larger than the model's, but an id outside it: named with its file
    let bad = d.join("bad_id.bin");
    let mut toks = vec![1i32; 600];
    toks[333] = 300;
    llmq_io::tokfile::write_token_file(&bad, &toks, None, None).unwrap();
    let err = llmq_err(&cmd("eval --device cpu --batch-size 4 --seq-len 32 --eval-file", &[bad.to_str().unwrap(), out.to_str().unwrap()]));
    assert!(err.contains("bad_id.bin") && err.contains("300"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

/// On a GPU: the exported (bf16) model evaluated by `llmq eval --device cuda` gives the run's
/// final eval loss bit for bit, and the CPU backend with bf16 matmuls comes close to it.
#[test]
fn gpu_eval_equals_the_runs_final_eval_and_the_cpu_comes_close() {
    if let Err(reason) = llmq_cuda::cuda_available() {
        llmq_cuda::skip_gpu_test(&format!("no CUDA device: {reason}"));
        return;
    }
    let d = tmpdir("eval-gpu");
    let (ev, out, ck, logged) = trained(&d, "cuda", "bf16", &[]);
    let shape = ["--eval-file", ev.as_str(), "--batch-size", "4", "--seq-len", "32", "--batches", "3", "--json"];
    for model in [&out, &ck] {
        let mut args = vec!["eval", model.to_str().unwrap(), "--device", "cuda"];
        args.extend_from_slice(&shape);
        let r: serde_json::Value = serde_json::from_str(llmq(&args).lines().last().unwrap()).unwrap();
        assert_eq!(r["loss"], logged, "{}", model.display());
    }
    let mut args = vec!["eval", out.to_str().unwrap(), "--device", "cpu", "--matmul-dtype", "bf16"];
    args.extend_from_slice(&shape);
    let r: serde_json::Value = serde_json::from_str(llmq(&args).lines().last().unwrap()).unwrap();
    let (cpu, gpu) = (r["loss"].as_f64().unwrap(), logged.as_f64().unwrap());
    assert!((cpu - gpu).abs() < 0.02 * gpu, "CPU {cpu} vs GPU {gpu}");
    let _ = std::fs::remove_dir_all(&d);
}
