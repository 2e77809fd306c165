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
