//! Complete training state to and from the crash-safe checkpoint store of `llmq_io::ckpt`:
//! master weights, Adam m and v (per group, raw bytes in their dtypes), the step counters, the
//! data position, and the configuration. Working weights are not stored: they are the master
//! weights rounded to the working dtype, re-derived on load.
//!
//! Every random stream in a run is a pure function of (seed, step, index) (stochastic rounding)
//! or lives in the data source's state, so restoring these gives a bitwise-exact continuation.

use crate::trainer::Trainer;
use llmq_core::{Error, ModelConfig, Result, Tensor};
use llmq_io::ckpt::{self, TensorRef};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The checkpoint format version written into the state.
const FORMAT: u64 = 1;

fn buffers(tr: &Trainer) -> Vec<(String, Tensor)> {
    let p = &tr.model.params;
    let mut out = vec![];
    for (gi, g) in p.layout.groups.iter().enumerate() {
        out.push((format!("master.{}", g.name), p.master.groups[gi]));
        out.push((format!("adam_m.{}", g.name), p.m.groups[gi]));
        out.push((format!("adam_v.{}", g.name), p.v.groups[gi]));
    }
    out
}

/// Writes the trainer's state as checkpoint `tr.step` under `root`; returns its directory.
pub fn save(tr: &Trainer, root: &Path) -> Result<PathBuf> {
    tr.be.synchronize()?;
    let bufs = buffers(tr);
    let data: Vec<(String, Tensor, Vec<u8>)> =
        bufs.into_iter().map(|(n, t)| tr.be.download(&t).map(|b| (n, t, b))).collect::<Result<_>>()?;
    let shapes: Vec<[usize; 1]> = data.iter().map(|(_, t, _)| [t.numel()]).collect();
    let refs: Vec<TensorRef> = data
        .iter()
        .zip(&shapes)
        .map(|((n, t, b), s)| TensorRef { name: n, dtype: t.dtype, shape: s, data: b })
        .collect();
    let state = json!({
        "format": FORMAT,
        "step": tr.step,
        "updates": tr.updates,
        "bad_in_a_row": tr.bad_in_a_row,
        "model": tr.model.cfg(),
        "train": tr.tc,
        "world_size": 1,
        "data": tr.data.state(),
        "data_describe": tr.data.describe(),
    });
    ckpt::write_checkpoint(root, tr.step, &refs, &state)
}

/// Fields of `a` and `b` (JSON objects) that differ, as "field: checkpoint X, now Y".
fn differing(prefix: &str, saved: &Value, now: &Value, out: &mut Vec<String>) {
    match (saved.as_object(), now.as_object()) {
        (Some(s), Some(n)) => {
            for (k, sv) in s {
                let nv = n.get(k).unwrap_or(&Value::Null);
                differing(&format!("{prefix}{k}."), sv, nv, out);
            }
            for (k, nv) in n {
                if !s.contains_key(k) {
                    out.push(format!("{prefix}{k}: checkpoint (absent), now {nv}"));
                }
            }
        }
        _ if saved != now => out.push(format!("{}: checkpoint {saved}, now {now}", prefix.trim_end_matches('.'))),
        _ => {}
    }
}

/// Memory options that checkpoints written before `MemoryOptions` existed hold under
/// `precision`: not compared, like the rest of the memory options.
const SPEED_OPTIONS: [&str; 2] = ["persistent_quants", "wgrad_overlap"];

/// Checks that a checkpoint's configuration is compatible with this run, naming every field
/// that differs. The step budget, the learning-rate schedule (to extend a run) and the memory
/// and speed options may change; everything that shapes the state, the numbers or the data
/// order may not.
pub fn check_compatible(state: &Value, cfg: &ModelConfig, tr: &Trainer) -> Result<()> {
    let mut diffs = vec![];
    differing("model.", state.get("model").unwrap_or(&Value::Null), &serde_json::to_value(cfg).unwrap(), &mut diffs);
    let mut now = serde_json::to_value(&tr.tc).unwrap();
    let mut saved = state.get("train").cloned().unwrap_or(Value::Null);
    for t in [&mut now, &mut saved] {
        if let Some(p) = t.get_mut("precision").and_then(Value::as_object_mut) {
            p.retain(|k, _| !SPEED_OPTIONS.contains(&k.as_str()));
        }
    }
    // checkpoints written before the backend options existed ran with today's defaults
    if let Some(t) = saved.as_object_mut() {
        t.entry("backend").or_insert_with(|| serde_json::to_value(llmq_core::BackendOptions::default()).unwrap());
    }
    for key in ["batch_size", "seq_len", "grad_accumulation", "precision", "seed", "backend"] {
        differing(&format!("train.{key}."), saved.get(key).unwrap_or(&Value::Null), now.get(key).unwrap_or(&Value::Null), &mut diffs);
    }
    if state.get("world_size").and_then(|w| w.as_u64()) != Some(1) {
        diffs.push(format!("world_size: checkpoint {}, now 1", state.get("world_size").unwrap_or(&Value::Null)));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!("checkpoint is incompatible with this run:\n  {}", diffs.join("\n  "))))
    }
}

/// Restores a trainer (already built with the same configuration) from checkpoint `dir`.
pub fn load(tr: &mut Trainer, dir: &Path) -> Result<()> {
    let ck = ckpt::load_checkpoint(dir)?;
    let st = &ck.state;
    if st.get("format").and_then(|f| f.as_u64()) != Some(FORMAT) {
        return Err(Error::file(dir, format!("checkpoint format {:?}, expected {FORMAT}", st.get("format"))));
    }
    let cfg = tr.model.cfg().clone();
    check_compatible(st, &cfg, tr).map_err(|e| Error::file(dir, e.to_string()))?;
    for (name, t) in buffers(tr) {
        let lt = ck.tensor(&name)?;
        if lt.dtype != t.dtype || lt.data.len() != t.bytes() {
            return Err(Error::file(
                dir,
                format!("tensor `{name}`: expected {} x {} elements, found {} with {} bytes", t.dtype, t.numel(), lt.dtype, lt.data.len()),
            ));
        }
        tr.be.upload(&t, &lt.data)?;
    }
    let p = &tr.model.params;
    if !p.master_is_weights() {
        for (w, m) in p.weights.groups.iter().zip(&p.master.groups) {
            tr.be.convert(w, m)?;
        }
    }
    tr.model.weights_changed(tr.be.as_ref())?;
    let num = |k: &str| st.get(k).and_then(|v| v.as_u64()).ok_or_else(|| Error::file(dir, format!("state field `{k}` missing")));
    tr.step = num("step")?;
    tr.updates = num("updates")?;
    tr.bad_in_a_row = num("bad_in_a_row")? as u32;
    let data = st.get("data").ok_or_else(|| Error::file(dir, "state field `data` missing"))?;
    tr.data.restore(data).map_err(|e| Error::file(dir, format!("data position: {e}")))?;
    tr.be.synchronize()
}

/// The model configuration stored in a checkpoint (for export without the original files).
pub fn model_config(dir: &Path) -> Result<(ModelConfig, Vec<Vec<f32>>)> {
    let ck = ckpt::load_checkpoint(dir)?;
    let cfg: ModelConfig = serde_json::from_value(ck.state.get("model").cloned().unwrap_or(Value::Null))
        .map_err(|e| Error::file(dir, format!("state field `model`: {e}")))?;
    let layout = llmq_core::ParamLayout::new(&cfg);
    let mut groups = vec![];
    for g in &layout.groups {
        let t = ck.tensor(&format!("master.{}", g.name))?;
        let mut v = vec![0f32; g.numel];
        if t.data.len() != g.numel * t.dtype.size() {
            return Err(Error::file(dir, format!("tensor `master.{}` has {} bytes, expected {}", g.name, t.data.len(), g.numel * t.dtype.size())));
        }
        llmq_core::dtype::decode_into(t.dtype, &t.data, &mut v);
        groups.push(v);
    }
    Ok((cfg, groups))
}
