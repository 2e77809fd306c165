//! Model configuration: the LLaMA-family decoder (Llama 3.x, Qwen2/2.5, Qwen3), from a Hugging
//! Face config.json or from the built-in shapes of REFERENCE.md.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// Llama-3.1 style rope scaling ("rope_type": "llama3").
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// C
    pub hidden_size: usize,
    /// D
    pub intermediate_size: usize,
    /// V
    pub vocab_size: usize,
    /// L
    pub num_layers: usize,
    /// Hq
    pub num_heads: usize,
    /// Hkv
    pub num_kv_heads: usize,
    /// Hd
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Qwen2: bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Qwen3: per-head RMSNorm on q and k.
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// Q = (Hq + 2 Hkv) Hd
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
    pub fn attn_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Checks the invariants the kernels rely on, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Config(format!("model config field `{f}`: {m}")));
        for (f, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(f, "must be positive, got 0".into());
            }
            if v > 1 << 24 {
                return bad(f, format!("implausibly large: {v}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_key_value_heads",
                format!("must divide num_attention_heads = {}, got {}", self.num_heads, self.num_kv_heads),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim", format!("must be even for RoPE, got {}", self.head_dim));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return bad("rope_theta", format!("must be positive, got {}", self.rope_theta));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad("rms_norm_eps", format!("must be in (0, 1), got {}", self.rms_norm_eps));
        }
        if self.vocab_size > i32::MAX as usize {
            return bad("vocab_size", format!("must fit in int32, got {}", self.vocab_size));
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        crate::layout::ParamLayout::new(self).total_numel()
    }

    fn qwen25(c: usize, d: usize, l: usize, hq: usize, hkv: usize, v: usize, tied: bool) -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen2,
            hidden_size: c,
            intermediate_size: d,
            vocab_size: v,
            num_layers: l,
            num_heads: hq,
            num_kv_heads: hkv,
            head_dim: c / hq,
            max_position_embeddings: 32768,
            rope_theta: 1e6,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: tied,
            qkv_bias: true,
            qk_norm: false,
            bos_token_id: Some(151643),
            eos_token_id: Some(151643),
            pad_token_id: None,
        }
    }

    fn llama3(c: usize, d: usize, l: usize, hq: usize, hkv: usize, tied: bool) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: c,
            intermediate_size: d,
            vocab_size: 128256,
            num_layers: l,
            num_heads: hq,
            num_kv_heads: hkv,
            head_dim: c / hq,
            max_position_embeddings: 131072,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling {
                factor: if l >= 32 { 8.0 } else { 32.0 },
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: tied,
            qkv_bias: false,
            qk_norm: false,
            bos_token_id: Some(128000),
            eos_token_id: Some(128001),
            pad_token_id: None,
        }
    }

    /// The built-in shapes (for --from-scratch without a config.json).
    pub fn builtin(name: &str) -> Option<ModelConfig> {
        let n = name.to_ascii_lowercase();
        let n = n.trim_start_matches("qwen/").trim_start_matches("meta-llama/");
        Some(match n {
            "qwen2.5-0.5b" => Self::qwen25(896, 4864, 24, 14, 2, 151936, true),
            "qwen2.5-1.5b" => Self::qwen25(1536, 8960, 28, 12, 2, 151936, true),
            "qwen2.5-3b" => Self::qwen25(2048, 11008, 36, 16, 2, 151936, true),
            "qwen2.5-7b" => Self::qwen25(3584, 18944, 28, 28, 4, 152064, false),
            "qwen2.5-14b" => Self::qwen25(5120, 13824, 48, 40, 8, 152064, false),
            "qwen2.5-32b" => Self::qwen25(5120, 27648, 64, 40, 8, 152064, false),
            "qwen2.5-72b" => Self::qwen25(8192, 29568, 80, 64, 8, 152064, false),
            "llama-3.2-1b" => Self::llama3(2048, 8192, 16, 32, 8, true),
            "llama-3.2-3b" => Self::llama3(3072, 8192, 28, 24, 8, true),
            "llama-3.1-8b" => Self::llama3(4096, 14336, 32, 32, 8, false),
            "tiny" => ModelConfig::tiny(Arch::Qwen2, 256),
            _ => return None,
        })
    }

    pub const BUILTIN_NAMES: &'static [&'static str] = &[
        "tiny",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "qwen2.5-7b",
        "qwen2.5-14b",
        "qwen2.5-32b",
        "qwen2.5-72b",
        "llama-3.2-1b",
        "llama-3.2-3b",
        "llama-3.1-8b",
    ];

    /// The small model of the embedded default run (about a million parameters).
    pub fn tiny(arch: Arch, vocab: usize) -> ModelConfig {
        ModelConfig {
            arch,
            hidden_size: 128,
            intermediate_size: 384,
            vocab_size: vocab,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            max_position_embeddings: 4096,
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            qkv_bias: arch == Arch::Qwen2,
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        }
    }

    /// Reads a Hugging Face config.json (transformers 4.x and 5.x spellings).
    pub fn from_hf_json(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Self::from_hf_str(&text).map_err(|e| match e {
            Error::Config(m) => Error::file(path, m),
            e => e,
        })
    }

    pub fn from_hf_str(text: &str) -> Result<ModelConfig> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::Config("top level must be a JSON object".into()))?;
        let get_usize = |k: &str| -> Result<Option<usize>> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|u| Some(u as usize))
                    .ok_or_else(|| Error::Config(format!("field `{k}`: expected a non-negative integer, got {x}"))),
            }
        };
        let req = |k: &str| -> Result<usize> {
            get_usize(k)?.ok_or_else(|| Error::Config(format!("missing required field `{k}`")))
        };
        let get_f64 = |k: &str, o: &serde_json::Map<String, serde_json::Value>| -> Result<Option<f64>> {
            match o.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| Error::Config(format!("field `{k}`: expected a number, got {x}"))),
            }
        };
        let token_id = |k: &str| -> Result<Option<u32>> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Array(a)) => Ok(a.first().and_then(|x| x.as_u64()).map(|x| x as u32)),
                Some(x) => x
                    .as_u64()
                    .map(|u| Some(u as u32))
                    .ok_or_else(|| Error::Config(format!("field `{k}`: expected an integer, got {x}"))),
            }
        };
        let archs = obj.get("architectures").and_then(|a| a.as_array()).cloned().unwrap_or_default();
        let arch_name = archs.first().and_then(|a| a.as_str()).unwrap_or("");
        let model_type = obj.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        let arch = match (arch_name, model_type) {
            ("LlamaForCausalLM", _) | ("", "llama") => Arch::Llama,
            ("Qwen2ForCausalLM", _) | ("", "qwen2") => Arch::Qwen2,
            ("Qwen3ForCausalLM", _) | ("", "qwen3") => Arch::Qwen3,
            _ => {
                return Err(Error::Config(format!(
                    "field `architectures`: expected one of LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, got {:?} (model_type {:?})",
                    arch_name, model_type
                )))
            }
        };
        let c = req("hidden_size")?;
        let hq = req("num_attention_heads")?;
        let head_dim = match get_usize("head_dim")? {
            Some(h) => h,
            None => {
                if hq == 0 || c % hq != 0 {
                    return Err(Error::Config(format!(
                        "field `num_attention_heads`: must divide hidden_size = {c}, got {hq}"
                    )));
                }
                c / hq
            }
        };
        // transformers 5.x nests rope_theta inside rope_parameters; older files keep it on top.
        let rope_params = obj.get("rope_parameters").and_then(|r| r.as_object());
        let scaling_obj = obj.get("rope_scaling").and_then(|r| r.as_object()).or(rope_params);
        let rope_theta = match rope_params.map(|r| get_f64("rope_theta", r)).transpose()?.flatten() {
            Some(t) => t,
            None => get_f64("rope_theta", obj)?.unwrap_or(10000.0),
        };
        let rope_scaling = match scaling_obj {
            Some(s) if s.get("rope_type").or(s.get("type")).and_then(|t| t.as_str()) == Some("llama3") => {
                let f = |k: &str| -> Result<f64> {
                    get_f64(k, s)?.ok_or_else(|| Error::Config(format!("rope scaling: missing field `{k}`")))
                };
                Some(RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                })
            }
            Some(s) => match s.get("rope_type").or(s.get("type")).and_then(|t| t.as_str()) {
                None | Some("default") => None,
                Some(other) => {
                    return Err(Error::Config(format!(
                        "field `rope_scaling.rope_type`: only \"default\" and \"llama3\" are supported, got {other:?}"
                    )))
                }
            },
            None => None,
        };
        let default_eps = if arch == Arch::Llama { 1e-5 } else { 1e-6 };
        let cfg = ModelConfig {
            arch,
            hidden_size: c,
            intermediate_size: req("intermediate_size")?,
            vocab_size: req("vocab_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads: hq,
            num_kv_heads: get_usize("num_key_value_heads")?.unwrap_or(hq),
            head_dim,
            max_position_embeddings: get_usize("max_position_embeddings")?.unwrap_or(4096),
            rope_theta,
            rope_scaling,
            rms_norm_eps: get_f64("rms_norm_eps", obj)?.unwrap_or(default_eps),
            tie_word_embeddings: obj.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => obj.get("attention_bias").and_then(|t| t.as_bool()).unwrap_or(false),
            },
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: token_id("bos_token_id")?,
            eos_token_id: token_id("eos_token_id")?,
            pad_token_id: token_id("pad_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A config.json that transformers 5.x loads.
    pub fn to_hf_json(&self, dtype: &str) -> serde_json::Value {
        let mut o = serde_json::json!({
            "architectures": [self.arch.hf_name()],
            "model_type": self.arch.hf_model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": dtype,
            "dtype": dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        let m = o.as_object_mut().unwrap();
        if let Some(p) = self.pad_token_id {
            m.insert("pad_token_id".into(), p.into());
        }
        if self.arch == Arch::Llama {
            m.insert("attention_bias".into(), self.qkv_bias.into());
            m.insert("mlp_bias".into(), false.into());
        }
        if let Some(s) = self.rope_scaling {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({
                    "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings
                }),
            );
        }
        o
    }

    /// RoPE (cos, sin) table, f32 [T, Hd/2, 2], computed in f64 so every backend gets the same bits.
    pub fn rope_table(&self, t: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let half = hd / 2;
        let mut inv_freq: Vec<f64> =
            (0..half).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64)).collect();
        if let Some(s) = self.rope_scaling {
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        let mut out = Vec::with_capacity(t * hd);
        for pos in 0..t {
            for f in &inv_freq {
                let a = pos as f64 * f;
                out.push(a.cos() as f32);
                out.push(a.sin() as f32);
            }
        }
        out
    }
}
