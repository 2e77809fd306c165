#!/usr/bin/env python3
"""External reference for llmq's gradients: random-initialised Hugging Face models.

For each of Qwen2, Qwen3 and Llama (small shapes, GQA, tied and untied) this script
  1. builds the model with transformers from a config (random init, seeded), in fp32,
  2. saves it with save_pretrained (config.json + model.safetensors) into OUT/<name>/,
  3. runs one batch of random tokens (B x (T+1)): logits for the first T positions,
     mean cross-entropy against the next tokens, backward,
  4. writes OUT/<name>/batch.json (inputs, targets, loss) and OUT/<name>/grads.safetensors
     (every parameter gradient under its HF name, fp32).
llmq's test `hf_compare` (crates/llmq-cli/tests/hf_compare.rs, env LLMQ_HF_REF=OUT) loads the
same files and compares its loss and every gradient. No downloads: only local configs.
"""
import json, os, sys
import torch
from safetensors.torch import save_file
import transformers as tf

def build(kind, tied):
    common = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6,
                  rope_theta=50000.0)  # not the parser's default (10000), so a parsing slip shows
    if kind == "qwen2":
        cfg = tf.Qwen2Config(**common)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "qwen3":
        cfg = tf.Qwen3Config(head_dim=48, **common)   # explicit head_dim != C/Hq
        return tf.Qwen3ForCausalLM(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common)
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(kind)

def main(out):
    torch.manual_seed(0)
    B, T = 2, 96
    for kind, tied in [("qwen2", True), ("qwen3", False), ("llama", False), ("llama", True)]:
        name = f"{kind}_{'tied' if tied else 'untied'}"
        d = os.path.join(out, name)
        model = build(kind, tied).float()
        # norms and biases away from their trivial init, so their gradients are tested too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(d, safe_serialization=True)
        ids = torch.randint(0, model.config.vocab_size, (B, T + 1))
        inputs, targets = ids[:, :T], ids[:, 1:].clone()
        targets[0, 5] = -100  # a masked target
        model.zero_grad()
        logits = model(input_ids=inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        grads = {n: p.grad.detach().float().contiguous() for n, p in model.named_parameters() if p.grad is not None}
        save_file(grads, os.path.join(d, "grads.safetensors"))
        with open(os.path.join(d, "batch.json"), "w") as f:
            json.dump({"b": B, "t": T, "inputs": inputs.flatten().tolist(), "targets": targets.flatten().tolist(), "loss": loss.item()}, f)
        print(f"{name}: loss {loss.item():.6f}, {len(grads)} gradients -> {d}", flush=True)

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hf_ref")
