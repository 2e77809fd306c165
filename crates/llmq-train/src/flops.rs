//! FLOP accounting for tokens/s -> SOL% (REFERENCE.md's formula).

use llmq_core::ModelConfig;

/// (matmul FLOPs per token at the matmul-dtype peak, FLOPs per token at the bf16 peak):
/// 6·L·C·(3D + C + Q) for the block matmuls; 6·V·C for the LM head plus 6·L·(Hq·Hd)·T for
/// attention at the bf16 peak.
pub fn flops_per_token(cfg: &ModelConfig, t: usize) -> (f64, f64) {
    let (l, c, d, v) = (cfg.num_layers as f64, cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.vocab_size as f64);
    let q = cfg.qkv_width() as f64;
    let blocks = 6.0 * l * c * (3.0 * d + c + q);
    let other = 6.0 * v * c + 6.0 * l * cfg.attn_width() as f64 * t as f64;
    (blocks, other)
}

/// Speed of light: ideal time / measured time, given the peaks in FLOP/s.
pub fn sol_percent(cfg: &ModelConfig, t: usize, tokens_per_s: f64, matmul_peak: f64, bf16_peak: f64) -> f64 {
    let (a, b) = flops_per_token(cfg, t);
    let ideal_s_per_token = a / matmul_peak + b / bf16_peak;
    100.0 * ideal_s_per_token * tokens_per_s
}
