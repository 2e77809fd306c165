"""llmq.generate: text from a model directory with its tokenizer, as `llmq generate` prints it."""

import json
import os
import subprocess

import pytest

import llmq


def tiny_model(path):
    """The embedded tiny model (vocab 256) trained a few steps, exported with a word-level
    tokenizer: ids 0 and 1 are [UNK] and [EOS], id i >= 2 is the word w<i>."""
    tr = llmq.Trainer(model="tiny", from_scratch=True, device="cpu", batch_size=4, seq_len=32, steps=5, eval_every=0)
    while not tr.done:
        tr.train_step()
    tr.export(path, dtype="fp32")
    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, 256)}}
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 1, "content": "[EOS]", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("gen") / "model")


def test_greedy_text_is_fixed_and_spells_its_tokens(model):
    r = llmq.generate(model, "w5 w9 w13", max_tokens=10, device="cpu", dtype="fp32")
    assert r == llmq.generate(str(model), "w5 w9 w13", max_tokens=10, device="cpu", dtype="fp32") | {
        "prompt_seconds": r["prompt_seconds"], "decode_seconds": r["decode_seconds"]}
    assert r["prompt_tokens"] == 3
    assert 0 < len(r["tokens"]) <= 10 and r["stop"] in ("max_tokens", "eos")
    assert r["stop"] == "eos" or len(r["tokens"]) == 10
    assert r["text"].split() == [f"w{t}" for t in r["tokens"] if t >= 2]


@pytest.mark.skipif(not os.environ.get("LLMQ_BIN"), reason="LLMQ_BIN (the llmq binary) not set")
def test_the_same_text_as_llmq_generate(model):
    args = dict(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    r = llmq.generate(model, "w7 w8", device="cpu", **args)
    flags = [f for k, v in args.items() for f in ("--" + k.replace("_", "-"), str(v))]
    cmd = [os.environ["LLMQ_BIN"], "generate", "--model", str(model), "--prompt", "w7 w8", "--device", "cpu", *flags]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert out == "w7 w8" + r["text"] + "\n"


def test_seeded_sampling_repeats_itself(model):
    run = lambda seed: llmq.generate(model, "w3", max_tokens=16, temperature=1.5, seed=seed, device="cpu")["tokens"]
    assert run(11) == run(11)


def test_bad_options_raise_value_errors_naming_them(model, tmp_path):
    for kwargs, want in [
        (dict(top_p=0.0), "--top-p: expected a number in (0, 1], got 0"),
        (dict(temperature=-1.0), "--temperature: expected a finite number >= 0"),
        (dict(dtype="e4m3"), '--dtype: expected bf16 or fp32, got "e4m3"'),
        (dict(device="tpu"), "--device: expected auto, cpu or cuda"),
    ]:
        with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            llmq.generate(model, "w3", **kwargs)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((model / f).read_bytes())
    with pytest.raises(ValueError, match="pass --tokenizer PATH"):
        llmq.generate(bare, "w3", device="cpu")
    assert llmq.generate(bare, "w3", max_tokens=2, tokenizer=model, device="cpu")["prompt_tokens"] == 1
    with pytest.raises(ValueError, match="not a checkpoint"):
        llmq.generate(tmp_path / "nothing", "w3", device="cpu")
