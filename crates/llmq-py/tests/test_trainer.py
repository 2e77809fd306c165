"""The Python package on the CPU backend: training, arrays, options, plans, checkpoints, export."""

import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest

import llmq

# a tiny model that runs a step in tens of milliseconds on the CPU
TINY = dict(model="tiny", from_scratch=True, device="cpu", batch_size=4, seq_len=32, steps=30, eval_every=0, eval_batches=2)


def cyclic_tokens(rows, t, period=16, vocab=256, seed=0):
    """Rows of a repeating pattern (learnable quickly), int32 [rows, t + 1]."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, vocab, size=period)
    starts = rng.integers(0, period, size=rows)
    idx = (starts[:, None] + np.arange(t + 1)[None, :]) % period
    return pattern[idx].astype(np.int32)


def test_tiny_model_trains_and_its_loss_falls():
    tr = llmq.Trainer(**TINY)
    before = tr.validate()
    results = []
    while not tr.done:
        results.append(tr.train_step())
    after = tr.validate()
    assert [r["step"] for r in results] == list(range(1, 31))
    assert results[-1]["eval_loss"] == after  # the run evaluates at its last step
    assert after < before - 0.5, (before, after)
    for r in results:
        assert r["tokens"] == 4 * 32 and r["tokens_per_s"] > 0 and np.isfinite(r["grad_norm"])
    # the schedule of the CLI: warmup to learning_rate, cosine down to a tenth of it
    assert max(r["lr"] for r in results) == pytest.approx(3e-3)
    assert results[-1]["lr"] == pytest.approx(3e-4, rel=0.05)


def test_step_and_update_with_numpy_arrays():
    tr = llmq.Trainer(**dict(TINY, grad_accumulation=2, learning_rate=1e-2))
    x = cyclic_tokens(8, 32)
    first = tr.validate(x)
    losses = []
    for _ in range(15):
        loss = tr.step(x)
        stats = tr.update()
        assert stats["loss"] == loss
        assert set(stats) >= {"loss", "grad_norm", "lr", "tokens_per_s", "step"}
        losses.append(loss)
    assert losses[0] == pytest.approx(first)
    assert tr.validate(x) < first - 1.0
    assert tr.step_count == 15
    with pytest.raises(llmq.LlmqError, match="call step\\(\\) first"):
        tr.update()
    tr.step(x)
    with pytest.raises(llmq.LlmqError, match="call update\\(\\) first"):
        tr.step(x)


def test_bad_token_arrays_raise_with_the_expected_shape():
    tr = llmq.Trainer(**TINY)
    with pytest.raises(ValueError, match=r"int32 array of shape \[N, seq_len \+ 1 = 33\].*shape \[4, 32\]"):
        tr.step(np.zeros((4, 32), dtype=np.int32))
    with pytest.raises(ValueError, match=r"dtype \"<i8\""):
        tr.step(np.zeros((4, 33), dtype=np.int64))
    with pytest.raises(ValueError, match=r"batch_size \* grad_accumulation = 4 rows, got 8"):
        tr.step(np.zeros((8, 33), dtype=np.int32))
    x = np.zeros((4, 33), dtype=np.int32)
    x[2, 5] = 256
    with pytest.raises(ValueError, match=r"tokens\[2, 5\] = 256: token ids must be in 0..256"):
        tr.step(x)
    # nothing was queued by the refused calls: the next step reads the configured data
    assert np.isfinite(tr.step())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(batch_size=0), "--batch-size must be positive, got 0"),
        (dict(batchsize=4), "unknown field `batchsize`"),
        (dict(batch_size=1.5), "option batch_size: invalid type: floating point `1.5`"),
        (dict(matmul_dtype="fp16"), '--matmul-dtype: unknown dtype "fp16"'),
        (dict(device="tpu"), '--device: expected auto, cpu or cuda, got "tpu"'),
        (dict(seq_len=100000), "--seq-len 100000 exceeds the model's max_position_embeddings"),
        (dict(memory_limit="16XB"), "--memory-limit: .*unknown unit"),
        (dict(batch_size=2**64), "option batch_size: expected an integer of at most 64 bits, got 18446744073709551616"),
        (dict(learning_rate=-(2**70)), "option learning_rate: expected an integer of at most 64 bits"),
        (dict(ckpt_interval=5), "--ckpt-interval needs --ckpt-dir"),
        (dict(from_scratch=False), "it names a built-in shape, which has no weights"),
        (dict(attention="fast"), '--attention: expected auto, mma or simple, got "fast"'),
    ],
)
def test_bad_options_raise_value_error_with_the_cli_message(options, message):
    with pytest.raises(ValueError, match=message):
        llmq.Trainer(**dict(TINY, **options))
    with pytest.raises(ValueError, match=message):
        llmq.plan(**dict(TINY, **options))


def test_a_missing_model_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "nope")):
        llmq.Trainer(model=tmp_path / "nope", device="cpu")


def test_memory_plan_dict():
    tr = llmq.Trainer(**TINY)
    p = tr.memory_plan()
    assert p == llmq.plan(**TINY)
    # the host holds only the step's tokens on their way to the device: inputs and targets, i32
    staging = {"other": 2 * 4 * 4 * 32}
    assert p["backend_reserve"] == 0 and p["host"] == staging and p["fits"] and p["limit"] is None
    assert p["device_peak"] == sum(p["device"].values())
    assert p["device"]["adam m"] == p["device"]["weights"] > 0
    off = llmq.plan(**dict(TINY, offload_opt_m=True, offload_opt_v=True, zero_copy=True))
    assert off["host"] == dict(staging, **{"adam m": p["device"]["adam m"], "adam v": p["device"]["adam v"]})
    assert off["device_peak"] == p["device_peak"] - p["device"]["adam m"] - p["device"]["adam v"]
    # staged updates keep two device slots of one block's m and v; write-combined is its own space
    staged = llmq.plan(**dict(TINY, offload_opt_m=True, offload_opt_v=True, write_combined=True))
    assert off["device_peak"] < staged["device_peak"] < p["device_peak"]
    assert staged["host"] == staging and staged["host_write_combined"] == {k: off["host"][k] for k in ("adam m", "adam v")}
    limited = llmq.plan(**dict(TINY, memory_limit=1 << 20))
    assert limited["limit"] == 1 << 20 and not limited["fits"]
    # a GPU plan counts the CUDA backend's own buffers
    assert llmq.plan(**dict(TINY, device="cuda"))["backend_reserve"] > 0
    # a GPU plan carries the step time llmq plan estimates; a CPU plan none
    assert p["estimated_step_s"] is None
    seven = llmq.plan(model="qwen2.5-7b", from_scratch=True, device="cuda", batch_size=4, seq_len=1024)
    fourteen = llmq.plan(model="qwen2.5-14b", from_scratch=True, device="cuda", batch_size=4, seq_len=1024)
    assert 0 < seven["estimated_step_s"] < fourteen["estimated_step_s"]


def test_a_run_over_its_memory_limit_is_refused_before_allocating():
    limit = "(?s)out of memory: the run needs .* more than what --memory-limit leaves beside the backend's own buffers \\(16.00 MiB\\)"
    with pytest.raises(llmq.LlmqError, match=limit + ".*options that would fit:\n    --batch-size 2 --grad-accumulation 32"):
        llmq.Trainer(**dict(TINY, batch_size=64, memory_limit="16MiB"))


def flags_as_options(flags):
    """`llmq train` flags ("--batch-size 2 --recompute-block ...") as Python options."""
    words, options = flags.split(), {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            options[w[2:].replace("-", "_")] = int(value) if value is not True else True
    return options


def test_auto_memory_fits_the_limit_as_the_plan_says_and_its_flags_repeat_it():
    opts = dict(TINY, batch_size=64, steps=2, memory_limit="16MiB")
    assert not llmq.plan(**opts)["fits"]
    chosen = llmq.plan(**dict(opts, auto_memory=True))
    assert chosen["fits"] and chosen["device_peak"] <= 16 << 20
    flags = flags_as_options(chosen["memory_flags"])
    # the tokens per step are kept, in micro-batches that fit
    assert flags["batch_size"] * flags["grad_accumulation"] == 64 and flags["batch_size"] < 64
    by_hand = dict(opts, **flags)
    assert llmq.plan(**by_hand) == chosen
    auto = llmq.Trainer(**dict(opts, auto_memory=True))
    assert auto.memory_plan() == chosen
    x = cyclic_tokens(64, 32, seed=5)
    manual = llmq.Trainer(**by_hand)
    for _ in range(2):
        a, m = auto.train_step(x), manual.train_step(x)
        assert (a["loss"], a["grad_norm"]) == (m["loss"], m["grad_norm"])
    with pytest.raises(ValueError, match="llmq.plan --auto-memory needs --memory-limit"):
        llmq.plan(**dict(TINY, auto_memory=True))


@pytest.mark.parametrize("arrays", [False, True])
def test_checkpoint_round_trip_gives_the_same_next_step(tmp_path, arrays):
    x = cyclic_tokens(4, 32, seed=3) if arrays else None
    a = llmq.Trainer(**TINY)
    for _ in range(3):
        a.train_step(x)
    path = a.save_checkpoint(tmp_path)
    assert path.name == "step_00000003"
    expected = a.train_step(x)

    b = llmq.Trainer(**TINY)
    assert b.load_checkpoint(tmp_path) == path  # the newest checkpoint under the root
    assert b.step_count == 3
    got = b.train_step(x)
    for k in ("step", "loss", "grad_norm", "lr"):
        assert got[k] == expected[k], k
    # a checkpoint of another model shape is refused, naming the checkpoint
    c = llmq.Trainer(**dict(TINY, batch_size=2, synthetic_vocab=128))
    with pytest.raises(llmq.LlmqError, match="step_00000003"):
        c.load_checkpoint(path)


def test_a_log_names_each_run_and_a_resumed_run_continues_its_series(tmp_path):
    log = tmp_path / "run.jsonl"
    a = llmq.Trainer(**dict(TINY, log_file=log))
    for _ in range(2):
        a.train_step()
    a.save_checkpoint(tmp_path / "ck")
    b = llmq.Trainer(**dict(TINY, log_file=log))
    b.load_checkpoint(tmp_path / "ck")
    b.train_step()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [(r["step"], r["run"], r["series"]) for r in records if r["type"] == "step"]
    (s1, run_a, series), (s2, _, _), (s3, run_b, series_b) = steps
    assert (s1, s2, s3) == (1, 2, 3)
    assert run_a == series == series_b and run_b != run_a


@pytest.mark.skipif(not os.environ.get("LLMQ_BIN"), reason="LLMQ_BIN (the llmq binary) not set")
def test_a_checkpoint_of_a_loaded_model_exports_its_tokenizer(tmp_path):
    base = llmq.Trainer(**TINY)
    base.export(tmp_path / "base", dtype="fp32")
    (tmp_path / "base" / "tokenizer.json").write_text('{"stand-in": 1}')
    tr = llmq.Trainer(model=tmp_path / "base", **{k: v for k, v in TINY.items() if k not in ("model", "from_scratch")})
    tr.train_step()
    ck = tr.save_checkpoint(tmp_path / "ck")
    out = subprocess.run([os.environ["LLMQ_BIN"], "export", str(ck), "-o", str(tmp_path / "hf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == '{"stand-in": 1}'


def test_export_writes_a_model_that_loads_with_the_same_loss(tmp_path):
    tr = llmq.Trainer(**TINY)
    for _ in range(3):
        tr.train_step()
    tr.export(tmp_path / "out", dtype="fp32")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == 256 and cfg["num_hidden_layers"] == tr.model_config()["num_layers"]
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 0
    x = cyclic_tokens(4, 32, seed=5)
    loaded = llmq.Trainer(model=tmp_path / "out", **{k: v for k, v in TINY.items() if k not in ("model", "from_scratch")})
    assert loaded.validate(x) == tr.validate(x)
    with pytest.raises(ValueError, match='expected bf16 or fp32, got "e4m3"'):
        tr.export(tmp_path / "bad", dtype="e4m3")


def test_the_gil_is_released_while_the_model_runs():
    tr = llmq.Trainer(**TINY)
    # one call long enough to tell: validate() over as many rows as take ~0.5 s (timed after a
    # first, slower call)
    tr.validate(cyclic_tokens(4, 32))
    t0 = time.perf_counter()
    tr.validate(cyclic_tokens(4, 32))
    rows = 4 * (int(0.5 / (time.perf_counter() - t0)) + 1)
    x = cyclic_tokens(rows, 32)
    stamps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    th = threading.Thread(target=tick)
    th.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    tr.validate(x)
    t1 = time.perf_counter()
    stop.set()
    th.join()
    # another thread ran Python code during the call, not only before and after it
    inside = [s for s in stamps if t0 + 0.05 < s < t1 - 0.05]
    assert t1 - t0 > 0.15 and len(inside) > 10, (t1 - t0, len(inside))


def test_a_checkpoint_directory_takes_one_trainer_at_a_time(tmp_path):
    first = llmq.Trainer(**dict(TINY, ckpt_dir=str(tmp_path / "ck")))
    with pytest.raises(llmq.LlmqError, match=f"in use by another run \\(pid {os.getpid()} on "):
        llmq.Trainer(**dict(TINY, ckpt_dir=str(tmp_path / "ck")))
    del first
    llmq.Trainer(**dict(TINY, ckpt_dir=str(tmp_path / "ck")))
