"""The package and `llmq train` are the same run: with the same options (and the same defaults
for the rest), every step's loss, gradient norm and learning rate are equal bit for bit.

Needs the `llmq` binary: LLMQ_BIN (scripts/test.sh sets it after the cargo tests built it)."""

import json
import os
import subprocess

import pytest

import llmq

OPTIONS = dict(model="tiny", from_scratch=True, device="cpu", batch_size=4, seq_len=32, steps=6,
               grad_accumulation=2, recompute_block=True, eval_every=3, eval_batches=2, seed=7)


def cli_flags(options):
    flags = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            flags.append(flag)
        elif v is not False:
            flags += [flag, str(v)]
    return flags


@pytest.mark.skipif(not os.environ.get("LLMQ_BIN"), reason="LLMQ_BIN (the llmq binary) not set")
def test_train_step_matches_llmq_train_bitwise(tmp_path):
    log = tmp_path / "run.jsonl"
    cmd = [os.environ["LLMQ_BIN"], "train", *cli_flags(OPTIONS), "--log-file", str(log)]
    subprocess.run(cmd, check=True, capture_output=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    cli_steps = [r for r in records if r["type"] == "step"]
    cli_evals = {r["step"]: r["loss"] for r in records if r["type"] == "eval"}

    py_log = tmp_path / "py.jsonl"
    tr = llmq.Trainer(**OPTIONS, log_file=py_log)
    py_evals = {}
    for cli in cli_steps:
        got = tr.train_step()
        assert (got["step"], got["loss"], got["grad_norm"], got["lr"]) == (cli["step"], cli["loss"], cli["norm"], cli["lr"])
        if "eval_loss" in got:
            py_evals[got["step"]] = got["eval_loss"]
    assert tr.done and len(cli_steps) == 6
    assert py_evals == cli_evals and set(cli_evals) == {3, 6}
    # the package's log has the CLI's records (for `llmq plot`), times and run ids aside; every
    # record names its run, and a fresh run is its own series
    py_records = [json.loads(line) for line in py_log.read_text().splitlines()]
    assert all(r["run"] == r["series"] == py_records[0]["run"] for r in py_records)
    untimed = lambda rs, kinds: [{k: v for k, v in r.items() if k not in ("ms", "issue_ms", "tokens_per_s", "run", "series")} for r in rs if r["type"] in kinds]
    assert untimed(py_records, ("options", "step", "eval")) == untimed(records, ("options", "step", "eval"))


def first_options_record(log):
    return next(r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "options")


@pytest.mark.skipif(not os.environ.get("LLMQ_BIN"), reason="LLMQ_BIN (the llmq binary) not set")
@pytest.mark.parametrize(
    "options, python_only",
    [
        # every other option at its default: the package's defaults are the CLI's
        (dict(), dict()),
        (dict(batch_size=4, seq_len=32, grad_accumulation=3, steps=40, learning_rate=1e-2, warmup=2, lr_schedule="wsd",
              final_lr_fraction=0.2, cooldown=5, beta2=0.99, adam_eps=1e-6, weight_decay=0.0, grad_clip=0.5, z_loss=1e-4,
              spike_z=4.0, spike_window=20, spike_max_skips=2, seed=3, eval_every=7, eval_batches=1, max_bad_steps=2), dict()),
        # memory options; a byte count for memory_limit is the package's own spelling of --memory-limit 1GiB
        (dict(batch_size=4, seq_len=32, matmul_dtype="bf16", grad_dtype="bf16", opt_v_dtype="bf16", recompute_ffn=True,
              recompute_att=True, offload_master=True, offload_opt_m=True, offload_residual=True, stream_weights=True,
              shard_gradients=True, attention="simple", memory_limit="1GiB"), dict(memory_limit=1 << 30)),
        # fp8 numerics
        (dict(batch_size=4, seq_len=32, matmul_dtype="e4m3", gradient_dtype="e5m2", fp8_fast_accumulation=True), dict()),
    ],
)
def test_the_run_configuration_is_the_clis(tmp_path, options, python_only):
    base = dict(model="tiny", from_scratch=True, device="cpu", **options)
    cli_log = tmp_path / "cli.jsonl"
    cmd = [os.environ["LLMQ_BIN"], "train", *cli_flags(base), "--stop-at", "1", "--log-file", str(cli_log)]
    subprocess.run(cmd, check=True, capture_output=True)
    py_log = tmp_path / "py.jsonl"
    llmq.Trainer(**dict(base, **python_only), log_file=py_log)
    cli, py = first_options_record(cli_log), first_options_record(py_log)
    assert (py["train"], py["model"], py["device"]) == (cli["train"], cli["model"], cli["device"])
    # the options reached the configuration (the comparison is not of two default runs)
    default_log = tmp_path / "default.jsonl"
    llmq.Trainer(model="tiny", from_scratch=True, device="cpu", log_file=default_log)
    assert (py["train"] != first_options_record(default_log)["train"]) == bool(options)
