"""Training from token files given at construction (train_files=, eval_file=)."""

import numpy as np
import pytest

import llmq

OPTS = dict(model="tiny", from_scratch=True, device="cpu", batch_size=4, seq_len=32, steps=20, eval_every=0, eval_batches=2)


def write_token_file(path, tokens, vocab=256):
    """A version-2 token file without masks: a 1024-byte header, then int32 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:2] = np.frombuffer(b"BIN.TOK\n", dtype="<i4")
    header[2:7] = [2, 4, len(tokens), vocab, 0]
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<i4").tobytes())


def cyclic(n, period=24, seed=0):
    pattern = np.random.default_rng(seed).integers(0, 256, size=period)
    return pattern[np.arange(n) % period]


def test_training_reads_the_files_and_resumes_their_position(tmp_path):
    write_token_file(tmp_path / "train.bin", cyclic(20000))
    write_token_file(tmp_path / "eval.bin", cyclic(2000, seed=0))
    opts = dict(OPTS, train_files=str(tmp_path / "train.bin"), eval_file=tmp_path / "eval.bin")
    tr = llmq.Trainer(**opts)
    before = tr.validate()
    for _ in range(10):
        tr.train_step()
    assert tr.validate() < before - 1.0
    ckpt = tr.save_checkpoint(tmp_path / "ckpt")
    expected = [tr.train_step()["loss"] for _ in range(3)]

    resumed = llmq.Trainer(**opts)
    resumed.load_checkpoint(ckpt)
    assert [resumed.train_step()["loss"] for _ in range(3)] == expected


def test_a_token_id_beyond_the_model_vocabulary_is_refused(tmp_path):
    tokens = cyclic(5000)
    tokens[1234] = 600
    write_token_file(tmp_path / "big.bin", tokens, vocab=512)
    # found when the file is opened, before the first step (as `llmq train` does); a shape from
    # scratch takes the header's vocabulary
    with pytest.raises(llmq.LlmqError, match=r"big.bin: token 1234 .*id 600 outside the vocabulary 0..512"):
        llmq.Trainer(**dict(OPTS, train_files=str(tmp_path / "big.bin")))


def test_no_eval_data_validates_to_none(tmp_path):
    write_token_file(tmp_path / "train.bin", cyclic(5000))
    tr = llmq.Trainer(**dict(OPTS, train_files=str(tmp_path / "train.bin")))
    assert tr.validate() is None


def test_evaluate_gives_the_loss_and_perplexity_of_a_model_directory(tmp_path):
    write_token_file(tmp_path / "train.bin", cyclic(20000))
    write_token_file(tmp_path / "eval.bin", cyclic(33 * 4 * 3 + 10, seed=0))
    tr = llmq.Trainer(**dict(OPTS, train_files=str(tmp_path / "train.bin")))
    for _ in range(5):
        tr.train_step()
    tr.export(tmp_path / "model", dtype="fp32")
    ck = tr.save_checkpoint(tmp_path / "ck")

    shape = dict(device="cpu", batch_size=4, seq_len=32)
    r = llmq.evaluate(tmp_path / "model", tmp_path / "eval.bin", **shape)
    assert r["batches"] >= 2 and r["tokens"] == r["batches"] * 4 * 32
    assert r["perplexity"] == pytest.approx(np.exp(r["loss"]))
    # the same numbers as a trainer of that model evaluating those batches
    same = llmq.Trainer(tmp_path / "model", eval_file=tmp_path / "eval.bin", eval_batches=r["batches"], **shape)
    assert same.validate() == r["loss"]
    # the checkpoint holds the same weights (the export is fp32): the same loss, as the CLI's
    assert llmq.evaluate(ck, tmp_path / "eval.bin", **shape) == r
    with pytest.raises(ValueError, match="from scratch has no weights"):
        llmq.evaluate("tiny", tmp_path / "eval.bin", from_scratch=True, **shape)
    assert llmq.evaluate(tmp_path / "model", tmp_path / "eval.bin", batches=1, **shape)["batches"] == 1
    with pytest.raises(ValueError, match=rf"holds {r['batches']} whole batches of batch_size=4 sequences of seq_len=32, asked for 99"):
        llmq.evaluate(tmp_path / "model", tmp_path / "eval.bin", batches=99, **shape)
    with pytest.raises(ValueError, match="eval_file is required"):
        llmq.evaluate(tmp_path / "model", **shape)
