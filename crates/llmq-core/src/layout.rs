//! Parameter layout: parameters, gradients, master weights and optimizer state all live in
//! per-group flat buffers with this layout, so that ZeRO sharding, offloading, per-block gather and
//! checkpointing operate on whole groups.
//!
//! Groups, in order: `embed` (token embedding [V, C]), `block.0` .. `block.{L-1}`, `head` (final
//! norm [C], plus the LM head [V, C] when embeddings are untied). Within a block:
//!
//! | entry     | shape          | decay | HF names                                   |
//! |-----------|----------------|-------|--------------------------------------------|
//! | ln1       | [C]            | no    | input_layernorm                            |
//! | qkv_w     | [Q, C]         | yes   | self_attn.{q,k,v}_proj.weight (stacked)    |
//! | qkv_b     | [Q]            | no    | self_attn.{q,k,v}_proj.bias (Qwen2)        |
//! | q_norm    | [Hd]           | no    | self_attn.q_norm (Qwen3)                   |
//! | k_norm    | [Hd]           | no    | self_attn.k_norm (Qwen3)                   |
//! | o_w       | [C, Hq Hd]     | yes   | self_attn.o_proj.weight                    |
//! | ln2       | [C]            | no    | post_attention_layernorm                   |
//! | up_gate_w | [2D, C]        | yes   | mlp.up_proj (rows 0..D), mlp.gate_proj     |
//! | down_w    | [C, D]         | yes   | mlp.down_proj.weight                       |
//!
//! Every entry starts at a multiple of `ALIGN` elements (vector loads, cuBLASLt pointer
//! alignment); the gaps are zero and belong to no segment.

use crate::backend::Segment;
use crate::config::ModelConfig;

pub const ALIGN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    Embedding,
    Ln1,
    QkvW,
    QkvB,
    QNorm,
    KNorm,
    OutW,
    Ln2,
    UpGateW,
    DownW,
    FinalNorm,
    LmHead,
}

impl ParamKind {
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::Embedding => "embedding",
            ParamKind::Ln1 => "ln1",
            ParamKind::QkvW => "qkv_w",
            ParamKind::QkvB => "qkv_b",
            ParamKind::QNorm => "q_norm",
            ParamKind::KNorm => "k_norm",
            ParamKind::OutW => "o_w",
            ParamKind::Ln2 => "ln2",
            ParamKind::UpGateW => "up_gate_w",
            ParamKind::DownW => "down_w",
            ParamKind::FinalNorm => "final_norm",
            ParamKind::LmHead => "lm_head",
        }
    }
    /// Weight decay applies to matrices and embeddings, not to norms or biases.
    pub fn decays(self) -> bool {
        matches!(self, ParamKind::Embedding | ParamKind::QkvW | ParamKind::OutW | ParamKind::UpGateW | ParamKind::DownW | ParamKind::LmHead)
    }
    /// Norm weights start at 1, everything else is drawn or zero.
    pub fn is_norm(self) -> bool {
        matches!(self, ParamKind::Ln1 | ParamKind::Ln2 | ParamKind::QNorm | ParamKind::KNorm | ParamKind::FinalNorm)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamEntry {
    pub kind: ParamKind,
    /// Element offset in the group's flat buffer.
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl ParamEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    pub name: String,
    pub entries: Vec<ParamEntry>,
    /// Elements in the flat buffer, padding included.
    pub numel: usize,
}

impl GroupLayout {
    fn build(name: String, items: &[(ParamKind, Vec<usize>)]) -> GroupLayout {
        let mut off = 0;
        let mut entries = Vec::new();
        for (kind, shape) in items {
            let e = ParamEntry { kind: *kind, offset: off, shape: shape.clone() };
            off += e.numel().div_ceil(ALIGN) * ALIGN;
            entries.push(e);
        }
        GroupLayout { name, entries, numel: off }
    }
    pub fn entry(&self, kind: ParamKind) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.kind == kind)
    }
    /// Segments for the optimizer: every entry with its decay flag (padding excluded).
    pub fn segments(&self) -> Vec<Segment> {
        self.entries.iter().map(|e| Segment { offset: e.offset, len: e.numel(), decay: e.kind.decays() }).collect()
    }
    /// Parameters, padding excluded.
    pub fn param_count(&self) -> usize {
        self.entries.iter().map(|e| e.numel()).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub groups: Vec<GroupLayout>,
    pub num_layers: usize,
    pub tied: bool,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> ParamLayout {
        let (c, d, v, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim);
        let q = cfg.qkv_width();
        let mut groups = vec![GroupLayout::build("embed".into(), &[(ParamKind::Embedding, vec![v, c])])];
        for l in 0..cfg.num_layers {
            let mut items = vec![(ParamKind::Ln1, vec![c]), (ParamKind::QkvW, vec![q, c])];
            if cfg.qkv_bias {
                items.push((ParamKind::QkvB, vec![q]));
            }
            if cfg.qk_norm {
                items.push((ParamKind::QNorm, vec![hd]));
                items.push((ParamKind::KNorm, vec![hd]));
            }
            items.push((ParamKind::OutW, vec![c, cfg.attn_width()]));
            items.push((ParamKind::Ln2, vec![c]));
            items.push((ParamKind::UpGateW, vec![2 * d, c]));
            items.push((ParamKind::DownW, vec![c, d]));
            groups.push(GroupLayout::build(format!("block.{l}"), &items));
        }
        let mut head = vec![(ParamKind::FinalNorm, vec![c])];
        if !cfg.tie_word_embeddings {
            head.push((ParamKind::LmHead, vec![v, c]));
        }
        groups.push(GroupLayout::build("head".into(), &head));
        ParamLayout { groups, num_layers: cfg.num_layers, tied: cfg.tie_word_embeddings }
    }
    pub const EMBED: usize = 0;
    pub fn block_group(&self, l: usize) -> usize {
        1 + l
    }
    pub fn head_group(&self) -> usize {
        1 + self.num_layers
    }
    pub fn block(&self, l: usize) -> &GroupLayout {
        &self.groups[self.block_group(l)]
    }
    /// Elements over all groups, padding included.
    pub fn total_numel(&self) -> usize {
        self.groups.iter().map(|g| g.param_count()).sum()
    }
    /// The group and entry holding the LM head weight (the embedding when tied).
    pub fn lm_head(&self) -> (usize, &ParamEntry) {
        if self.tied {
            (Self::EMBED, self.groups[0].entry(ParamKind::Embedding).unwrap())
        } else {
            let h = self.head_group();
            (h, self.groups[h].entry(ParamKind::LmHead).unwrap())
        }
    }
}
