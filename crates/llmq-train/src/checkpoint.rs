//! Complete training state to and from the crash-safe checkpoint store of `llmq_io::ckpt`:
//! master weights, Adam m and v (per group, raw bytes in their dtypes), the step counters, the
//! data position, and the configuration. Working weights are not stored: they are the master
//! weights rounded to the working dtype, re-derived on load.
//!
//! Every random stream in a run is a pure function of (seed, step, index) (stochastic rounding)
//! or lives in the data source's state, so restoring these gives a bitwise-exact continuation.

use crate::trainer::Trainer;
use llmq_core::{Error, ModelConfig, Result, Tensor};
use llmq_io::ckpt::{self, Lineage, OpenCheckpoint, TensorRef};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The checkpoint format version written into the state.
const FORMAT: u64 = 1;

/// The stored tensors of group gi: (name, this rank's part of it).
fn buffers(tr: &Trainer, gi: usize) -> [(String, Tensor); 3] {
    tr.optimizer().state_tensors(&tr.model().params, gi)
}

/// Writes the trainer's state as checkpoint `tr.steps_done()` of run `lineage` under `root`; returns its
/// directory. One tensor at a time: the host holds one group's tensors, never the whole state.
/// With several ranks every rank calls this: each tensor's shards are gathered to rank 0, which
/// writes the whole tensor in the layout of one rank (so that any number of ranks can resume
/// from it), and `None` is returned on the other ranks.
pub fn save(tr: &Trainer, root: &Path, lineage: &Lineage) -> Result<Option<PathBuf>> {
    let be = tr.backend();
    be.synchronize()?;
    let mut writer = if tr.rank() == 0 { Some(ckpt::CheckpointWriter::create(root, tr.steps_done())?) } else { None };
    for gi in 0..tr.model().params.layout.groups.len() {
        for (name, t) in buffers(tr, gi) {
            let mine = be.download(&t)?;
            let whole = match tr.comm() {
                None => Some(mine),
                Some(c) => c.gather_bytes(&mine, 0, &format!("checkpoint tensor {name}"))?.map(|parts| parts.concat()),
            };
            if let (Some(w), Some(data)) = (writer.as_mut(), whole) {
                let shape = [data.len() / t.dtype.size()];
                w.add(&TensorRef { name: &name, dtype: t.dtype, shape: &shape, data: &data })?;
            }
        }
    }
    let Some(writer) = writer else { return Ok(None) };
    let state = json!({
        "format": FORMAT,
        "step": tr.steps_done(),
        "updates": tr.optimizer().updates(),
        "bad_in_a_row": tr.bad_steps_in_a_row(),
        "spikes": tr.spikes(),
        "model": tr.model().cfg(),
        "train": tr.config(),
        "world_size": tr.config().world_size,
        "data": tr.data().state(),
        "data_describe": tr.data().describe(),
        "source": tr.source(),
    });
    writer.finish(lineage, &state).map(Some)
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
    let mut now = serde_json::to_value(tr.config()).unwrap();
    let mut saved = state.get("train").cloned().unwrap_or(Value::Null);
    for t in [&mut now, &mut saved] {
        if let Some(p) = t.get_mut("precision").and_then(Value::as_object_mut) {
            p.retain(|k, _| !SPEED_OPTIONS.contains(&k.as_str()));
        }
    }
    // checkpoints written before the backend options existed ran with today's defaults
    if let Some(t) = saved.as_object_mut() {
        t.entry("backend").or_insert_with(|| serde_json::to_value(llmq_core::BackendOptions::default()).unwrap());
        t.entry("z_loss").or_insert(json!(0.0));
        // and those written before fp8 fast accumulation existed promoted every sum
        if let Some(p) = t.get_mut("precision").and_then(Value::as_object_mut) {
            p.entry("fp8_fast_accumulation").or_insert(json!(false));
        }
    }
    for key in ["batch_size", "seq_len", "precision", "seed", "backend", "spike", "z_loss"] {
        differing(&format!("train.{key}."), saved.get(key).unwrap_or(&Value::Null), now.get(key).unwrap_or(&Value::Null), &mut diffs);
    }
    // the number of ranks may change, the micro-batches per step over all ranks may not
    let saved_world = state.get("world_size").and_then(|w| w.as_u64());
    let saved_accum = saved.get("grad_accumulation").and_then(|a| a.as_u64());
    let (world, accum) = (tr.config().world_size as u64, tr.config().grad_accumulation as u64);
    match (saved_world, saved_accum) {
        (Some(w), Some(a)) if w > 0 && a * w == accum * world => {}
        (Some(w), Some(a)) if w > 0 => diffs.push(format!(
            "micro-batches per step over all ranks (grad_accumulation x ranks): checkpoint {a} x {w} = {}, now {accum} x {world} = {}{}",
            a * w,
            accum * world,
            if (a * w).is_multiple_of(world) { format!(" (use --grad-accumulation {} with {world} ranks)", a * w / world) } else { String::new() }
        )),
        _ => diffs.push(format!("world_size and grad_accumulation: missing or invalid in the checkpoint ({saved_world:?}, {saved_accum:?})")),
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!("checkpoint is incompatible with this run:\n  {}", diffs.join("\n  "))))
    }
}

/// Checks the state's own fields against the manifest: the format, the step and the set of
/// tensors, which must be exactly the parameter groups of `cfg` (no missing or extra layer).
fn check_state(ck: &OpenCheckpoint, cfg: &ModelConfig) -> Result<()> {
    let dir = &ck.path;
    let st = &ck.state;
    if st.get("format").and_then(|f| f.as_u64()) != Some(FORMAT) {
        return Err(Error::file(dir, format!("state field `format`: expected {FORMAT}, got {:?}", st.get("format"))));
    }
    let step = st.get("step").and_then(|s| s.as_u64());
    if step != Some(ck.step) {
        return Err(Error::file(dir, format!("state field `step`: {step:?} differs from the manifest's step {}", ck.step)));
    }
    // every step applied its update or skipped it: never more updates (Adam's bias-correction
    // counter) or bad steps in a row than steps
    for k in ["updates", "bad_in_a_row"] {
        let v = st.get(k).and_then(|v| v.as_u64());
        if v.is_none_or(|v| v > ck.step) {
            return Err(Error::file(dir, format!("state field `{k}`: {v:?}, expected an integer no larger than the step {}", ck.step)));
        }
    }
    // three tensors (master, adam m, adam v) per group: the blocks, the embedding and the head;
    // counted before the layout is built, since the config is input
    let groups = cfg.num_layers.saturating_add(2);
    if groups.saturating_mul(3) != ck.names().len() {
        return Err(Error::file(
            dir,
            format!("{} tensors, but the model config of the state (num_layers {}) needs {}", ck.names().len(), cfg.num_layers, groups * 3),
        ));
    }
    let layout = llmq_core::ParamLayout::new(cfg);
    let mut want: Vec<String> =
        layout.groups.iter().flat_map(|g| ["master", "adam_m", "adam_v"].map(|k| format!("{k}.{}", g.name))).collect();
    let mut have: Vec<String> = ck.names().iter().map(|n| n.to_string()).collect();
    want.sort();
    have.sort();
    if want != have {
        let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
        let extra: Vec<&String> = have.iter().filter(|h| !want.contains(h)).collect();
        return Err(Error::file(
            dir,
            format!("tensors do not match the model config of the state (num_layers {}): missing {missing:?}, unexpected {extra:?}", cfg.num_layers),
        ));
    }
    Ok(())
}

/// Restores a trainer (already built with the same configuration) from checkpoint `dir`;
/// returns the checkpoint's lineage.
pub fn load(tr: &mut Trainer, dir: &Path) -> Result<Lineage> {
    let ck = ckpt::open_checkpoint(dir)?;
    let st = &ck.state;
    let cfg = tr.model().cfg().clone();
    check_compatible(st, &cfg, tr).map_err(|e| Error::file(dir, e.to_string()))?;
    check_state(&ck, &cfg)?;
    // every rank reads its part of each tensor (the checkpoint holds whole tensors, whatever the
    // number of ranks that wrote it)
    let (be, p, opt) = (tr.backend(), &tr.model().params, tr.optimizer());
    for gi in 0..p.layout.groups.len() {
        let n = p.layout.groups[gi].numel;
        let sh = p.shard(gi);
        for (name, t) in buffers(tr, gi) {
            let sz = t.dtype.size();
            let (dtype, shape) = ck.info(&name)?;
            if dtype != t.dtype || shape != [n] {
                return Err(Error::file(dir, format!("tensor `{name}`: expected {} x [{n}], the manifest has {dtype} x {shape:?}", t.dtype)));
            }
            let lt = ck.read(&name)?;
            if lt.dtype != t.dtype || lt.data.len() != n * sz {
                return Err(Error::file(
                    dir,
                    format!("tensor `{name}`: expected {} x {n} elements, found {} with {} bytes", t.dtype, lt.dtype, lt.data.len()),
                ));
            }
            be.upload(&t, &lt.data[sh.start * sz..(sh.start + sh.len) * sz])?;
        }
        opt.state_loaded(be, p, gi)?;
    }
    p.gather_weights(be)?;
    tr.model().weights_changed(be)?;
    let num = |k: &str| st.get(k).and_then(|v| v.as_u64()).ok_or_else(|| Error::file(dir, format!("state field `{k}` missing")));
    let spikes = serde_json::from_value(st.get("spikes").cloned().unwrap_or(Value::Null))
        .map_err(|e| Error::file(dir, format!("state field `spikes`: {e}")))?;
    tr.restore_counters(num("step")?, num("updates")?, num("bad_in_a_row")? as u32, spikes);
    let data = st.get("data").ok_or_else(|| Error::file(dir, "state field `data` missing"))?;
    tr.data_mut().restore(data).map_err(|e| Error::file(dir, format!("data position: {e}")))?;
    // a resumed run that does not know its tokenizer keeps the one its checkpoint recorded
    if tr.source().is_none_or(|s| s.tokenizer.is_none()) {
        if let Some(saved) = st.get("source").and_then(|v| serde_json::from_value(v.clone()).ok()) {
            tr.set_source(saved);
        }
    }
    tr.backend().synchronize()?;
    Ok(ck.lineage)
}

/// The model configuration stored in a checkpoint (for export without the original files).
pub fn model_config(dir: &Path) -> Result<(ModelConfig, Vec<Vec<f32>>)> {
    let ck = ckpt::open_checkpoint(dir)?;
    let cfg: ModelConfig = serde_json::from_value(ck.state.get("model").cloned().unwrap_or(Value::Null))
        .map_err(|e| Error::file(dir, format!("state field `model`: {e}")))?;
    cfg.validate().map_err(|e| Error::file(dir, format!("state field `model`: {e}")))?;
    check_state(&ck, &cfg)?;
    let layout = llmq_core::ParamLayout::new(&cfg);
    let mut groups = vec![];
    for g in &layout.groups {
        let t = ck.read(&format!("master.{}", g.name))?;
        // the size is checked before the buffer is allocated: the config is input
        if Some(t.data.len()) != g.numel.checked_mul(t.dtype.size()) {
            return Err(Error::file(dir, format!("tensor `master.{}` has {} bytes, the model config needs {} x {}", g.name, t.data.len(), g.numel, t.dtype)));
        }
        let mut v = vec![0f32; g.numel];
        llmq_core::dtype::decode_into(t.dtype, &t.data, &mut v);
        groups.push(v);
    }
    Ok((cfg, groups))
}
