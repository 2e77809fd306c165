//! `llmq train --config FILE`: a run from a config file equals the same run from flags (bitwise
//! losses and norms), flags override the file, the effective options saved by `--save-config`
//! (and logged) repeat the run, and keys that are not options are refused naming the file.

use std::path::Path;

mod common;

use common::*;

/// The `toml` text of the log's `config` record.
fn logged_config(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "config")
        .map(|v| v["toml"].as_str().unwrap().to_string())
        .expect("a config record")
}

#[test]
fn a_config_file_runs_as_its_flags_and_the_saved_config_repeats_the_run() {
    let d = tmpdir("config");
    let data = dataset(&d);
    let p = |name: &str| d.join(name).to_str().unwrap().to_string();

    // from flags, saving the effective options
    let flags = "train --device cpu --model tiny --from-scratch --batch-size 4 --seq-len 32 --steps 5 --warmup 1 --eval-every 0 --learning-rate 0.02 --weight-decay 0.05 --grad-clip 0.5";
    llmq(&cmd(flags, &["--train-file", &data, "--log-file", &p("a.jsonl"), "--save-config", &p("saved.toml")]));
    let a = steps(&d.join("a.jsonl"));
    assert_eq!(a.len(), 5);

    // the same options in a file: kebab and snake case, TOML integers, floats, strings, booleans
    let file = format!(
        "device = \"cpu\"\nmodel = \"tiny\"\nfrom_scratch = true\nrandom-data = false\ntrain-file = \"{data}\"\nbatch_size = 4\nseq-len = 32\nsteps = 5\nwarmup = 1\neval_every = 0\nlearning-rate = 2e-2\nweight_decay = 0.05\ngrad-clip = 0.5\n"
    );
    std::fs::write(d.join("run.toml"), file).unwrap();
    llmq(&cmd("train --config", &[&p("run.toml"), "--log-file", &p("b.jsonl")]));
    assert_eq!(steps(&d.join("b.jsonl")), a, "the run from the config file differs from the run from flags");

    // flags override the file, wherever --config stands
    llmq(&cmd("train --steps 3 --config", &[&p("run.toml"), "--learning-rate", "0.01", "--log-file", &p("c.jsonl")]));
    let c = steps(&d.join("c.jsonl"));
    assert_eq!(c.len(), 3);
    let logged = logged_config(&d.join("c.jsonl"));
    assert!(logged.contains("\nsteps = 3\n") && logged.contains("\nlearning-rate = 0.01\n") && logged.contains("\nweight-decay = 0.05\n"), "{logged}");
    assert_ne!(c[1], a[1], "a lower learning rate changes the second step");

    // the saved effective options (also the log's config record) repeat the run bit for bit
    let saved = std::fs::read_to_string(d.join("saved.toml")).unwrap();
    assert_eq!(logged_config(&d.join("a.jsonl")), saved);
    assert!(saved.contains("\nfrom-scratch = true\n") && saved.contains("\nseq-len = 32\n") && !saved.contains("save-config"), "{saved}");
    llmq(&cmd("train --config", &[&p("saved.toml"), "--log-file", &p("d.jsonl")]));
    assert_eq!(steps(&d.join("d.jsonl")), a, "the saved config does not repeat the run");

    // keys that are not options, and values of the wrong kind, are refused naming key and file
    std::fs::write(d.join("typo.toml"), "steps = 5\nlearning_rat = 0.1\n").unwrap();
    let err = llmq_err(&cmd("train --config", &[&p("typo.toml")]));
    assert!(err.contains("typo.toml") && err.contains("key `learning_rat`") && err.contains("not an option of `llmq train`"), "{err}");
    std::fs::write(d.join("flag.toml"), "from-scratch = \"yes\"\n").unwrap();
    let err = llmq_err(&cmd("train --config", &[&p("flag.toml")]));
    assert!(err.contains("flag.toml") && err.contains("key `from-scratch`") && err.contains("expected true or false"), "{err}");
    std::fs::write(d.join("nested.toml"), "config = \"other.toml\"\n").unwrap();
    let err = llmq_err(&cmd("train --config", &[&p("nested.toml")]));
    assert!(err.contains("nested.toml") && err.contains("key `config`"), "{err}");
    std::fs::write(d.join("broken.toml"), "steps = \n").unwrap();
    let err = llmq_err(&cmd("train --config", &[&p("broken.toml")]));
    assert!(err.contains("broken.toml") && err.contains("not a valid TOML file"), "{err}");
    let err = llmq_err(&cmd("train --config", &[&p("missing.toml")]));
    assert!(err.contains("missing.toml") && err.contains("cannot read"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
