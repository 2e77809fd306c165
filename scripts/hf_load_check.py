#!/usr/bin/env python3
"""Loads models exported by `llmq train --export` with transformers and runs a forward pass:
the exported directory must load without missing/unexpected weights and give a finite loss.
Usage: hf_load_check.py DIR [DIR ...]"""
import sys
import torch
import transformers as tf

for d in sys.argv[1:]:
    model, info = tf.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    loss = model(input_ids=ids, labels=ids).loss.item()
    print(f"{d}: {type(model).__name__} tied={model.config.tie_word_embeddings} loss={loss:.4f} loading issues={bad or 'none'}")
    assert not bad and loss == loss, d
