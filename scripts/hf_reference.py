#!/usr/bin/env python3
"""External reference for llmq's loss and gradients: small Hugging Face models, trained a little.

For each case below (Qwen2, Qwen3, Llama; small shapes, GQA, tied and untied; one Llama with
Llama-3.1 rope scaling) this script
  1. builds the model with transformers from a config (seeded random init), in fp32, moves its
     norms and biases away from their trivial init,
  2. trains it for TRAIN_STEPS AdamW steps on a fixed, learnable token pattern (below), so its
     predictions are sharp: at random initialisation the logits are nearly uniform and the loss is
     ~ln(V) whatever the numerics, so a loss comparison could not fail,
  3. saves it with save_pretrained (config.json + model.safetensors) into OUT/<name>/,
  4. runs one batch of the same pattern (B x (T+1)): logits for the first T positions, mean
     cross-entropy against the next tokens, backward, and writes OUT/<name>/grads.safetensors
     (every parameter gradient under its HF name, fp32),
  5. runs the same batch through a bf16 copy of the model: its loss and per-tensor gradient errors
     against fp32 are what bf16 rounding does to an independent implementation, and set the
     bars of llmq's bf16 comparison,
  6. writes OUT/<name>/batch.json (inputs, targets, loss, the bf16 run's errors, the rope scaling).
llmq's test `hf_compare` (crates/llmq-cli/tests/hf_compare.rs, env LLMQ_HF_REF=OUT) loads the
same files and compares its loss and every gradient. No downloads: only local configs.
"""
import copy, json, os, sys
import torch
from safetensors.torch import save_file
import transformers as tf

VOCAB, B, T = 1000, 2, 96
TRAIN_STEPS, TRAIN_ROWS, TRAIN_LR = 60, 8, 5e-3
# Llama-3.1 rope scaling with an original context (32) below the test's sequence length (96):
# the low-frequency rotary components (wavelength > 32 positions) are slowed down 8x, which changes
# the attention pattern at these positions. llmq's test checks that the parsed config carries it
# and that dropping it changes the loss far beyond the fp32 bar.
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)


def build(kind, tied, rope_scaling=None):
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6,
                  rope_theta=50000.0)  # not the parser's default (10000), so a parsing slip shows
    if rope_scaling is not None:
        # transformers 5 turns `rope_scaling` (with `rope_theta`) into `rope_parameters`
        common["rope_scaling"] = dict(rope_scaling)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=48, **common))  # head_dim != C/Hq
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    raise ValueError(kind)


def pattern(gen):
    """A fixed periodic sequence (period 61) over 40 token ids: the same token recurs with
    different successors, so predicting it needs the context (attention and its positions),
    not only the previous token."""
    ids = torch.randperm(VOCAB, generator=gen)[:40]
    return ids[torch.randint(0, 40, (61,), generator=gen)]


def rows(pat, n, gen):
    """n rows of T+1 tokens: the pattern repeated from random phases."""
    start = torch.randint(0, len(pat), (n,), generator=gen)
    idx = (start[:, None] + torch.arange(T + 1)[None, :]) % len(pat)
    return pat[idx]


def loss_of(model, inputs, targets):
    logits = model(input_ids=inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train(model, pat, gen):
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR)
    first = last = None
    for _ in range(TRAIN_STEPS):
        ids = rows(pat, TRAIN_ROWS, gen)
        loss = loss_of(model, ids[:, :T], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    return first, last


def grads_of(model, inputs, targets):
    model.zero_grad()
    loss = loss_of(model, inputs, targets)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().contiguous() for n, p in model.named_parameters() if p.grad is not None}


def main(out):
    cases = [("qwen2_tied", "qwen2", True, None), ("qwen3_untied", "qwen3", False, None),
             ("llama_untied", "llama", False, None), ("llama_tied", "llama", True, None),
             ("llama_rope_scaled", "llama", False, LLAMA3_SCALING)]
    for i, (name, kind, tied, scaling) in enumerate(cases):
        torch.manual_seed(i)
        gen = torch.Generator().manual_seed(1000 + i)
        d = os.path.join(out, name)
        model = build(kind, tied, scaling).float()
        # norms and biases away from their trivial init, so their gradients are tested too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        pat = pattern(gen)
        first, last = train(model, pat, gen)
        model.save_pretrained(d, safe_serialization=True)

        ids = rows(pat, B, gen)
        inputs, targets = ids[:, :T], ids[:, 1:].clone()
        targets[0, 5] = -100  # a masked target
        loss, grads = grads_of(model, inputs, targets)
        save_file(grads, os.path.join(d, "grads.safetensors"))

        loss16, grads16 = grads_of(copy.deepcopy(model).to(torch.bfloat16), inputs, targets)
        rel16 = {n: ((grads16[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in grads.items()}
        with open(os.path.join(d, "batch.json"), "w") as f:
            json.dump({"b": B, "t": T, "inputs": inputs.flatten().tolist(), "targets": targets.flatten().tolist(),
                       "loss": loss, "bf16_loss": loss16, "bf16_grad_rel": rel16, "rope_scaling": scaling}, f)
        print(f"{name}: trained {TRAIN_STEPS} steps (loss {first:.3f} -> {last:.3f}); reference loss {loss:.6f}, "
              f"bf16 copy {loss16:.6f} (relative gap {abs(loss16 - loss) / loss:.2e}), worst bf16 gradient error "
              f"{max(rel16.values()):.2e}; {len(grads)} gradients -> {d}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hf_ref")
