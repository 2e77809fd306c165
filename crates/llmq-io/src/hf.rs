//! Hugging Face model directories: resolving a model argument, importing safetensors weights into
//! llmq's parameter layout, and exporting back to a directory `transformers` loads.
//!
//! Name mapping (see `llmq_core::layout`): `model.embed_tokens.weight` -> `embed`;
//! per layer `model.layers.{l}.`: `input_layernorm`, `self_attn.{q,k,v}_proj.weight` stacked by
//! rows into `qkv_w` (q rows first, then k, then v), their biases into `qkv_b` (Qwen2, or Llama
//! with `attention_bias`), `self_attn.{q,k}_norm` (Qwen3), `self_attn.o_proj`,
//! `post_attention_layernorm`, `mlp.up_proj` then `mlp.gate_proj` stacked into `up_gate_w`,
//! `mlp.down_proj`; `model.norm.weight` and (untied) `lm_head.weight` -> `head`.
//!
//! Tied embeddings: when the config says `tie_word_embeddings`, a stored `lm_head.weight` is
//! accepted if its shape is right and otherwise ignored, exactly as `transformers` does (it ties
//! the head to the embedding after loading). Export of a tied model writes no `lm_head.weight`.
//! Llama's `o_proj.bias` / `mlp.*.bias` (attention_bias / mlp_bias) have no place in the layout
//! and are reported as unexpected tensors.

use crate::safetensors::{encode_from_f32, write_safetensors_with, SafeTensorsFile, StDtype, TensorSpec};
use llmq_core::{DType, Error, ModelConfig, ParamKind, ParamLayout, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files copied by [`export_model`] from a tokenizer source directory when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

// ---------------------------------------------------------------------------------------------
// Resolving a model argument
// ---------------------------------------------------------------------------------------------

/// The hub cache directories to search, in order: `$HF_HUB_CACHE`, `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (`$XDG_CACHE_HOME/huggingface/hub` when that is set).
pub fn hf_hub_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p).join("hub"));
    } else if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(p).join("huggingface").join("hub"));
    } else if let Some(h) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        v.push(PathBuf::from(h).join(".cache").join("huggingface").join("hub"));
    }
    v
}

/// Resolves a model argument to a directory: an existing directory is returned as is; a name
/// like `Qwen/Qwen2.5-0.5B` is looked up in the local HF cache ([`hf_hub_dirs`]). Never downloads.
pub fn resolve_model_dir(arg: &str) -> Result<PathBuf> {
    resolve_model_dir_in(arg, &hf_hub_dirs())
}

/// [`resolve_model_dir`] with explicit hub directories. In a cache entry
/// `models--Org--Name/`, the snapshot `refs/main` names is chosen; without a usable ref, the only
/// snapshot, or else the most recently modified one.
pub fn resolve_model_dir_in(arg: &str, hub_dirs: &[PathBuf]) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(Error::file(p, "expected a model directory (holding config.json and *.safetensors), found a file"));
    }
    let mut looked = vec![format!("directory {arg:?} (does not exist)")];
    let parts: Vec<&str> = arg.split('/').collect();
    let looks_like_repo = parts.len() == 2
        && parts.iter().all(|s| !s.is_empty() && *s != "." && *s != ".." && !s.contains('\\'))
        && !arg.starts_with('.');
    if looks_like_repo {
        let entry = format!("models--{}--{}", parts[0], parts[1]);
        for hub in hub_dirs {
            let d = hub.join(&entry);
            if !d.is_dir() {
                looked.push(format!("{} (no such directory)", d.display()));
                continue;
            }
            match pick_snapshot(&d) {
                Ok(s) => return Ok(s),
                Err(m) => looked.push(format!("{} ({m})", d.display())),
            }
        }
        if hub_dirs.is_empty() {
            looked.push("no HF cache directory (HF_HUB_CACHE, HF_HOME and HOME unset)".into());
        }
    } else {
        looked.push("not an Org/Name model id, so the HF cache was not searched".into());
    }
    Err(Error::Config(format!(
        "model {arg:?} not found (llmq never downloads; fetch it with `huggingface-cli download {arg}` or pass a directory). Looked in: {}",
        looked.join("; ")
    )))
}

fn pick_snapshot(model_dir: &Path) -> std::result::Result<PathBuf, String> {
    let snaps = model_dir.join("snapshots");
    if let Ok(r) = std::fs::read_to_string(model_dir.join("refs").join("main")) {
        let h = r.trim();
        if !h.is_empty() && !h.contains('/') && !h.contains("..") {
            let s = snaps.join(h);
            if s.is_dir() {
                return Ok(s);
            }
        }
    }
    let rd = std::fs::read_dir(&snaps).map_err(|e| format!("cannot list snapshots/: {e}"))?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let t = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, bp)| t > *bt || (t == *bt && p > *bp)) {
            best = Some((t, p));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| "no snapshot in snapshots/".into())
}

/// Reads `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    ModelConfig::from_hf_json(&dir.join("config.json"))
}

// ---------------------------------------------------------------------------------------------
// Name mapping
// ---------------------------------------------------------------------------------------------

/// One HF tensor and where it lives in llmq's layout: group `group`, element offset `offset`
/// (entry offset plus the rows of earlier pieces of a fused entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfPiece {
    pub hf_name: String,
    pub shape: Vec<usize>,
    pub group: usize,
    pub offset: usize,
}

impl HfPiece {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every HF tensor of the model `cfg`, in layout order.
pub fn hf_pieces(cfg: &ModelConfig) -> Vec<HfPiece> {
    let layout = ParamLayout::new(cfg);
    let (c, d, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qw, kvw) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut out = Vec::new();
    for (gi, g) in layout.groups.iter().enumerate() {
        for e in &g.entries {
            let p = |name: String, shape: Vec<usize>, row_off: usize| HfPiece {
                hf_name: name,
                shape,
                group: gi,
                offset: e.offset + row_off,
            };
            let l = gi.wrapping_sub(1);
            let pre = format!("model.layers.{l}.");
            match e.kind {
                ParamKind::Embedding => out.push(p("model.embed_tokens.weight".into(), e.shape.clone(), 0)),
                ParamKind::FinalNorm => out.push(p("model.norm.weight".into(), e.shape.clone(), 0)),
                ParamKind::LmHead => out.push(p("lm_head.weight".into(), e.shape.clone(), 0)),
                ParamKind::Ln1 => out.push(p(format!("{pre}input_layernorm.weight"), e.shape.clone(), 0)),
                ParamKind::Ln2 => out.push(p(format!("{pre}post_attention_layernorm.weight"), e.shape.clone(), 0)),
                ParamKind::QNorm => out.push(p(format!("{pre}self_attn.q_norm.weight"), e.shape.clone(), 0)),
                ParamKind::KNorm => out.push(p(format!("{pre}self_attn.k_norm.weight"), e.shape.clone(), 0)),
                ParamKind::OutW => out.push(p(format!("{pre}self_attn.o_proj.weight"), e.shape.clone(), 0)),
                ParamKind::DownW => out.push(p(format!("{pre}mlp.down_proj.weight"), e.shape.clone(), 0)),
                ParamKind::QkvW => {
                    out.push(p(format!("{pre}self_attn.q_proj.weight"), vec![qw, c], 0));
                    out.push(p(format!("{pre}self_attn.k_proj.weight"), vec![kvw, c], qw * c));
                    out.push(p(format!("{pre}self_attn.v_proj.weight"), vec![kvw, c], (qw + kvw) * c));
                }
                ParamKind::QkvB => {
                    out.push(p(format!("{pre}self_attn.q_proj.bias"), vec![qw], 0));
                    out.push(p(format!("{pre}self_attn.k_proj.bias"), vec![kvw], qw));
                    out.push(p(format!("{pre}self_attn.v_proj.bias"), vec![kvw], qw + kvw));
                }
                ParamKind::UpGateW => {
                    out.push(p(format!("{pre}mlp.up_proj.weight"), vec![d, c], 0));
                    out.push(p(format!("{pre}mlp.gate_proj.weight"), vec![d, c], d * c));
                }
            }
        }
    }
    out
}

/// Tensors a checkpoint may hold that carry no parameters (rotary tables of old exports).
pub fn is_harmless_extra(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// The safetensors files of a model directory with the tensors each one holds.
pub struct WeightFiles {
    pub files: Vec<SafeTensorsFile>,
    /// tensor name -> index into `files`
    pub index: BTreeMap<String, usize>,
}

impl WeightFiles {
    pub fn get(&self, name: &str) -> Option<&SafeTensorsFile> {
        self.index.get(name).map(|&i| &self.files[i])
    }
}

/// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`
/// (checking that every listed file exists and holds the tensors the index assigns to it, and
/// that no shard holds a tensor the index does not list there).
pub fn open_weights(dir: &Path) -> Result<WeightFiles> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    if single.is_file() {
        let f = SafeTensorsFile::open(&single)?;
        let index = f.names().map(|n| (n.to_string(), 0)).collect();
        return Ok(WeightFiles { files: vec![f], index });
    }
    if !index_path.is_file() {
        let mut msg = format!(
            "no weights: expected model.safetensors or model.safetensors.index.json in {}",
            dir.display()
        );
        if dir.join("pytorch_model.bin").exists() {
            msg.push_str(" (pytorch_model.bin is not supported; convert it to safetensors)");
        }
        return Err(Error::file(dir, msg));
    }
    let ierr = |m: String| Error::file(&index_path, m);
    let text = std::fs::read_to_string(&index_path).map_err(|e| ierr(format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ierr(format!("not valid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| ierr("missing object field `weight_map`".into()))?;
    let mut files: Vec<SafeTensorsFile> = Vec::new();
    let mut file_idx: BTreeMap<String, usize> = BTreeMap::new();
    let mut index = BTreeMap::new();
    for (name, f) in wm {
        let fname = f.as_str().ok_or_else(|| ierr(format!("weight_map[`{name}`]: expected a file name, got {f}")))?;
        if fname.is_empty() || fname.contains('/') || fname.contains('\\') || fname == "." || fname == ".." {
            return Err(ierr(format!("weight_map[`{name}`]: file name {fname:?} must be a plain name in the model directory")));
        }
        let i = match file_idx.get(fname) {
            Some(&i) => i,
            None => {
                let p = dir.join(fname);
                if !p.is_file() {
                    return Err(ierr(format!("weight_map[`{name}`]: shard file {fname} does not exist in {}", dir.display())));
                }
                files.push(SafeTensorsFile::open(&p)?);
                file_idx.insert(fname.to_string(), files.len() - 1);
                files.len() - 1
            }
        };
        if !files[i].contains(name) {
            return Err(ierr(format!("weight_map says tensor `{name}` is in {fname}, but that file does not hold it")));
        }
        index.insert(name.clone(), i);
    }
    for (i, f) in files.iter().enumerate() {
        for n in f.names() {
            if index.get(n) != Some(&i) {
                return Err(Error::file(
                    f.path(),
                    format!("tensor `{n}` is in this shard but model.safetensors.index.json does not list it here"),
                ));
            }
        }
    }
    Ok(WeightFiles { files, index })
}

/// Loads the weights of `dir` (single file or sharded) into llmq's layout for `cfg`: one flat f32
/// vector per group of `ParamLayout::new(cfg)`, `group.numel` long, zero padding.
/// Missing tensors, unexpected tensors and shape mismatches are errors naming the tensor.
pub fn load_weights(dir: &Path, cfg: &ModelConfig) -> Result<Vec<Vec<f32>>> {
    let wf = open_weights(dir)?;
    load_weights_from(&wf, cfg)
}

/// [`load_weights`] from already opened files.
pub fn load_weights_from(wf: &WeightFiles, cfg: &ModelConfig) -> Result<Vec<Vec<f32>>> {
    let layout = ParamLayout::new(cfg);
    let pieces = hf_pieces(cfg);
    let where_ = || match wf.files.len() {
        1 => wf.files[0].path().display().to_string(),
        n => format!("{} shards in {}", n, wf.files[0].path().parent().map(|p| p.display().to_string()).unwrap_or_default()),
    };
    // Check names and shapes of everything before reading any data.
    let expected: BTreeSet<&str> = pieces.iter().map(|p| p.hf_name.as_str()).collect();
    let missing: Vec<&str> = pieces.iter().filter(|p| wf.get(&p.hf_name).is_none()).map(|p| p.hf_name.as_str()).collect();
    if !missing.is_empty() {
        let p = &pieces.iter().find(|p| p.hf_name == missing[0]).unwrap();
        return Err(Error::Config(format!(
            "weights in {}: missing tensor `{}` (expected shape {:?}){}",
            where_(),
            p.hf_name,
            p.shape,
            if missing.len() > 1 { format!(" and {} more: {}", missing.len() - 1, preview(&missing[1..])) } else { String::new() }
        )));
    }
    let mut unexpected = Vec::new();
    for name in wf.index.keys() {
        if expected.contains(name.as_str()) || is_harmless_extra(name) {
            continue;
        }
        if name == "lm_head.weight" && cfg.tie_word_embeddings {
            let f = wf.get(name).unwrap();
            let info = f.info(name)?;
            let want = [cfg.vocab_size, cfg.hidden_size];
            if info.shape != want {
                return Err(Error::file(
                    f.path(),
                    format!("tensor `lm_head.weight` (tied, ignored): expected shape {want:?}, got {:?}", info.shape),
                ));
            }
            continue;
        }
        unexpected.push(name.as_str());
    }
    if !unexpected.is_empty() {
        return Err(Error::Config(format!(
            "weights in {}: unexpected tensor `{}` for a {} model with this config{}",
            where_(),
            unexpected[0],
            cfg.arch.hf_name(),
            if unexpected.len() > 1 {
                format!(" (and {} more: {})", unexpected.len() - 1, preview(&unexpected[1..]))
            } else {
                String::new()
            }
        )));
    }
    for p in &pieces {
        let f = wf.get(&p.hf_name).unwrap();
        let info = f.info(&p.hf_name)?;
        if info.shape != p.shape {
            return Err(Error::file(
                f.path(),
                format!("tensor `{}`: expected shape {:?}, got {:?}", p.hf_name, p.shape, info.shape),
            ));
        }
        if !info.dtype.converts_to_f32() {
            return Err(Error::file(f.path(), format!("tensor `{}`: dtype {} is not a floating-point type", p.hf_name, info.dtype)));
        }
    }
    let mut groups: Vec<Vec<f32>> = layout.groups.iter().map(|g| vec![0f32; g.numel]).collect();
    for p in &pieces {
        let f = wf.get(&p.hf_name).unwrap();
        let n = p.numel();
        f.read_f32_into(&p.hf_name, &mut groups[p.group][p.offset..p.offset + n])?;
    }
    Ok(groups)
}

fn preview(names: &[&str]) -> String {
    let mut s: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
    if names.len() > 5 {
        s.push("...".into());
    }
    s.join(", ")
}

// ---------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------

/// Writes `out_dir/model.safetensors` (`dtype` F32 or BF16) under HF names with fused tensors
/// split back, `out_dir/config.json`, and copies [`TOKENIZER_FILES`] present in `tokenizer_src`.
/// `groups` is the layout of `ParamLayout::new(cfg)` (as returned by [`load_weights`]).
pub fn export_model<G: AsRef<[f32]>>(
    out_dir: &Path,
    cfg: &ModelConfig,
    groups: &[G],
    dtype: DType,
    tokenizer_src: Option<&Path>,
) -> Result<()> {
    let layout = ParamLayout::new(cfg);
    let (st, dname) = match dtype {
        DType::F32 => (StDtype::F32, "float32"),
        DType::BF16 => (StDtype::BF16, "bfloat16"),
        other => return Err(Error::Config(format!("export dtype must be fp32 or bf16, got {other}"))),
    };
    if groups.len() != layout.groups.len() {
        return Err(Error::Op(format!("export: {} parameter groups given, the layout has {}", groups.len(), layout.groups.len())));
    }
    for (g, lg) in groups.iter().zip(&layout.groups) {
        if g.as_ref().len() != lg.numel {
            return Err(Error::Op(format!(
                "export: group `{}` has {} elements, the layout needs {}",
                lg.name,
                g.as_ref().len(),
                lg.numel
            )));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::file(out_dir, format!("cannot create directory: {e}")))?;
    let pieces = hf_pieces(cfg);
    let by_name: BTreeMap<&str, &HfPiece> = pieces.iter().map(|p| (p.hf_name.as_str(), p)).collect();
    let specs: Vec<TensorSpec> =
        pieces.iter().map(|p| TensorSpec { name: p.hf_name.clone(), dtype: st, shape: p.shape.clone() }).collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st_path = out_dir.join("model.safetensors");
    write_safetensors_with(&st_path, &specs, Some(&meta), |name, buf| {
        let p = by_name[name];
        let src = &groups[p.group].as_ref()[p.offset..p.offset + p.numel()];
        encode_from_f32(st, src, buf).map_err(|m| Error::file(&st_path, m))
    })?;
    let cfg_json = serde_json::to_string_pretty(&cfg.to_hf_json(dname)).map_err(|e| Error::Op(e.to_string()))?;
    write_atomic(&out_dir.join("config.json"), cfg_json.as_bytes())?;
    if let Some(src) = tokenizer_src {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                let to = out_dir.join(f);
                if std::fs::canonicalize(&from).ok() == std::fs::canonicalize(&to).ok() {
                    continue;
                }
                let data = std::fs::read(&from).map_err(|e| Error::file(&from, format!("cannot read: {e}")))?;
                write_atomic(&to, &data)?;
            }
        }
    }
    Ok(())
}

/// Writes `path` via a temporary file, fsync and rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = crate::safetensors::tmp_name(path);
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, format!("cannot write: {e}")));
    }
    crate::safetensors::sync_parent(path);
    Ok(())
}
