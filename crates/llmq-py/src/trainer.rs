//! `llmq.Trainer`: a `Run` (the CLI's run object) built from the same options as `llmq train`,
//! with the trainer's halves exposed as in the reference system's bindings: `step` (forward and
//! backward of one optimizer step's micro-batches) and `update` (norm, clipping, AdamW), or
//! `train_step` (one `Run::step`: both, then the evaluation and checkpoint due).

use crate::feed::{batches_from_tokens, Feed, Queue};
use crate::options::{self, Options};
use crate::{backend_reserve, parse_options, plan_dict, to_py, LlmqError};
use llmq_core::cpu::CpuBackend;
use llmq_core::{Backend, BackendOptions, Error, ModelConfig, Result};
use llmq_io::{ckpt, hf};
use llmq_train::memory_check;
use llmq_train::plan::MemoryPlan;
use llmq_train::run::{Run, RunEvent};
use llmq_train::log::JsonLog;
use llmq_train::{checkpoint, StepStats, Trainer};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Carries a value that is not `Send` (the backend) through `Python::detach`. Sound because
/// `detach` runs its closure on the calling thread (its `Send` bound only keeps GIL-bound Python
/// objects out, and none is carried), and `PyTrainer` is `unsendable`, borrowed mutably for the
/// whole call.
struct AssertSend<T>(T);
unsafe impl<T> Send for AssertSend<T> {}

/// Runs `f` with the GIL released.
pub(crate) fn detached<R>(py: Python<'_>, f: impl FnOnce() -> Result<R> + Send) -> PyResult<R> {
    py.detach(move || AssertSend(f())).0.map_err(to_py)
}

/// The backend for `device` (auto, cpu, cuda or gpu: checked by `options::from_json`), as
/// `llmq train --device` selects it.
pub(crate) fn select_backend(device: &str, opts: &BackendOptions) -> Result<(Box<dyn Backend>, bool)> {
    if device == "cpu" {
        return Ok((Box::new(CpuBackend::new()), false));
    }
    match llmq_cuda::cuda_available() {
        Ok(()) => Ok((Box::new(llmq_cuda::CudaBackend::new(0, opts)?), true)),
        Err(reason) if device == "auto" => {
            eprintln!("llmq: no usable GPU ({reason}); running on the CPU backend");
            Ok((Box::new(CpuBackend::new()), false))
        }
        Err(reason) => Err(Error::Backend(format!("--device {device}: {reason}"))),
    }
}

#[pyclass(unsendable, module = "llmq", name = "Trainer")]
pub struct PyTrainer {
    run: Run,
    /// Batches passed as arrays, read by the trainer's `Feed` before its configured source.
    queue: Queue,
    /// The model directory weights came from (tokenizer files are copied from it on export).
    source_dir: Option<PathBuf>,
    on_gpu: bool,
    /// The loss and start time of a `step` whose `update` has not run yet.
    pending: Option<(f64, Instant)>,
    /// The run's line of checkpoints: fresh, or continuing the last one loaded.
    lineage: ckpt::Lineage,
}

impl PyTrainer {
    pub(crate) fn build(o: Options) -> Result<PyTrainer> {
        let m = o.resolve_model()?;
        // first: it takes the checkpoint directory's lock, before anything is allocated
        let run_options = options::run_options(&o, m.dir.clone())?;
        let (mut be, on_gpu) = select_backend(&o.device, &o.backend.options()?)?;
        let mut tc = options::train_config(&o, on_gpu)?;
        if !o.auto_memory {
            tc.validate(&m.cfg)?; // auto_memory validates what it chooses
        }
        if let Some(limit) = tc.memory.memory_limit {
            be.limit_device_memory(limit as usize);
        }
        if o.auto_memory {
            let (chosen, lines) = memory_check::auto_memory_for(&m.cfg, &tc, be.as_ref())?;
            lines.iter().for_each(|l| println!("llmq: {l}"));
            tc = chosen;
        }
        tc.default_graphs(&m.cfg, on_gpu);
        memory_check::check_run_fits(&m.cfg, &tc, be.as_ref(), on_gpu)?;
        let (source, eval) = options::resolve_data(&o, &m.cfg, &tc)?;
        let queue = Queue::default();
        let feed = Feed { queue: queue.clone(), source };
        let mut tr = Trainer::new(be, &m.cfg, tc, Box::new(feed), eval)?;
        tr.set_source(m.source());
        match &m.dir {
            Some(dir) if !o.from_scratch => tr.set_weights(&hf::load_weights(dir, &m.cfg)?)?,
            _ => tr.init_from_scratch()?,
        }
        let lineage = ckpt::Lineage::fresh();
        if let Some(path) = &o.log_file {
            // the records `llmq train --log-file` starts with; the run adds steps, evals, checkpoints
            let mut log = JsonLog::open(path)?;
            log.set_run(&lineage);
            log.write(&serde_json::json!({"type": "options", "model": m.cfg, "train": tr.config(), "device": tr.backend().name()}));
            log.write(&serde_json::json!({"type": "dataset", "train": tr.data().describe()}));
            tr.set_log(log);
        }
        // no stop flag to raise: Python ends a run by not calling train_step() again (Ctrl-C
        // raises KeyboardInterrupt when the step in progress returns)
        let run = Run::new(tr, run_options, Arc::new(AtomicBool::new(false)));
        Ok(PyTrainer { run, queue, source_dir: m.dir, on_gpu, pending: None, lineage })
    }

    pub(crate) fn trainer(&mut self) -> &mut Trainer {
        self.run.trainer_mut()
    }

    fn cfg(&self) -> &ModelConfig {
        self.run.trainer().model().cfg()
    }

    /// Queues `tokens` ([N, T+1] int32, N = batch_size * grad_accumulation) as the next step's
    /// micro-batches.
    fn enqueue_step(&mut self, tokens: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.queue.lock().expect("queue").clear();
        let Some(tokens) = tokens else { return Ok(()) };
        let tc = self.run.trainer().config();
        let rows = tc.batch_size * tc.grad_accumulation;
        let batches = self.batches(tokens)?;
        if batches.len() * tc.batch_size != rows {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "tokens: expected batch_size * grad_accumulation = {rows} rows, got {}",
                batches.len() * tc.batch_size
            )));
        }
        self.queue.lock().expect("queue").extend(batches);
        Ok(())
    }

    fn batches(&self, tokens: &Bound<'_, PyAny>) -> PyResult<Vec<llmq_io::data::Batch>> {
        let tc = self.run.trainer().config();
        let (b, t) = (tc.batch_size, tc.seq_len);
        let (n, data) = token_array(tokens, t)?;
        batches_from_tokens(&data, n, t, b, self.cfg().vocab_size).map_err(to_py)
    }
}

/// The values of a C-order int32 numpy array of shape [N, t+1], and N.
fn token_array(tokens: &Bound<'_, PyAny>, t: usize) -> PyResult<(usize, Vec<i32>)> {
    let dtype: String = tokens.getattr("dtype").and_then(|d| d.getattr("str")).and_then(|s| s.extract()).unwrap_or_default();
    let shape: Vec<usize> = tokens.getattr("shape").and_then(|s| s.extract()).unwrap_or_default();
    let ok_dtype = dtype == if cfg!(target_endian = "little") { "<i4" } else { ">i4" };
    if !ok_dtype || shape.len() != 2 || shape[1] != t + 1 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "tokens: expected a numpy int32 array of shape [N, seq_len + 1 = {}], got {} with dtype {dtype:?} and shape {shape:?}",
            t + 1,
            tokens.get_type().name()?
        )));
    }
    let bytes: Vec<u8> = tokens.call_method0("tobytes")?.extract()?;
    let data = bytes.chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((shape[0], data))
}

fn stats_dict<'py>(py: Python<'py>, st: &StepStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("step", st.step)?;
    d.set_item("loss", st.loss)?;
    d.set_item("grad_norm", st.grad_norm)?;
    d.set_item("lr", st.lr)?;
    d.set_item("tokens", st.tokens)?;
    d.set_item("tokens_per_s", st.tokens as f64 / st.seconds)?;
    d.set_item("ms", st.seconds * 1e3)?;
    d.set_item("skipped", st.skipped)?;
    Ok(d)
}

#[pymethods]
impl PyTrainer {
    /// Builds the model on the device and loads pretrained weights (a model directory or a name
    /// in the Hugging Face cache) or initialises them (`from_scratch`, built-in shapes).
    #[new]
    #[pyo3(signature = (model=None, from_scratch=false, **options))]
    fn new(py: Python<'_>, model: Option<PathBuf>, from_scratch: bool, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let o = parse_options(model, from_scratch, options)?;
        detached(py, move || PyTrainer::build(o))
    }

    /// Forward and backward passes of one optimizer step (`grad_accumulation` micro-batches of
    /// `batch_size` rows) into the gradients; returns the mean loss. `tokens`: int32 [N, seq_len
    /// + 1] with N = batch_size * grad_accumulation; without it, the next batches of the
    /// configured data. `update()` applies the step.
    #[pyo3(signature = (tokens=None))]
    fn step(&mut self, py: Python<'_>, tokens: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
        if self.pending.is_some() {
            return Err(LlmqError::new_err("step(): the previous step's gradients are not applied yet: call update() first"));
        }
        self.enqueue_step(tokens)?;
        let t0 = Instant::now();
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`; `self` is not used until `detached` returns.
        let loss = detached(py, move || {
            let this = this;
            unsafe { &mut *this.0 }.trainer().accumulate_gradients().map(|(loss, _)| loss)
        })?;
        self.pending = Some((loss, t0));
        Ok(loss)
    }

    /// Applies the gradients of the last `step()`: gradient norm, clipping, AdamW at the
    /// scheduled learning rate. Returns loss, grad_norm, lr, tokens_per_s, step, ms, skipped.
    fn update<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (loss, t0) = self.pending.take().ok_or_else(|| LlmqError::new_err("update(): no gradients to apply: call step() first"))?;
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        let st = detached(py, move || {
            let this = this;
            unsafe { &mut *this.0 }.trainer().finish_step(loss, t0)
        })?;
        stats_dict(py, &st)
    }

    /// `step()` and `update()` as one step of the run: then the evaluation (every eval_every
    /// steps and at the last) and the checkpoint (every ckpt_interval steps into ckpt_dir) that
    /// are due. Returns update()'s dict, plus eval_loss and checkpoint where they happened.
    #[pyo3(signature = (tokens=None))]
    fn train_step<'py>(&mut self, py: Python<'py>, tokens: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
        if self.pending.is_some() {
            return Err(LlmqError::new_err("train_step(): a step() is waiting for its update(): call update() first"));
        }
        self.enqueue_step(tokens)?;
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        let events = detached(py, move || {
            let this = this;
            unsafe { &mut *this.0 }.run.step()
        })?;
        let mut out = None;
        let mut extra = vec![];
        for ev in events {
            match ev {
                RunEvent::Step { stats, .. } => out = Some(stats_dict(py, &stats)?),
                RunEvent::Eval { loss, .. } => extra.push(("eval_loss", loss.into_pyobject(py)?.into_any())),
                RunEvent::Checkpoint { path, .. } => extra.push(("checkpoint", path.into_pyobject(py)?.into_any())),
                _ => {}
            }
        }
        let d = out.ok_or_else(|| LlmqError::new_err("train_step(): the run did not step"))?;
        for (k, v) in extra {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// True once the configured `steps` (or `stop_at`) are done.
    #[getter]
    fn done(&self) -> bool {
        self.run.done()
    }

    /// Optimizer steps done so far.
    #[getter]
    fn step_count(&self) -> u64 {
        self.run.trainer().steps_done()
    }

    /// Mean loss without a backward pass: over `tokens` (int32 [N, seq_len + 1], N a multiple of
    /// batch_size), else over eval_batches batches of the evaluation data (eval_file, or the
    /// synthetic corpus's held-out stream). None when there is no evaluation data.
    #[pyo3(signature = (tokens=None))]
    fn validate(&mut self, py: Python<'_>, tokens: Option<&Bound<'_, PyAny>>) -> PyResult<Option<f64>> {
        if self.pending.is_some() {
            return Err(LlmqError::new_err("validate(): a step() is waiting for its update() (its activations would be overwritten)"));
        }
        let batches = tokens.map(|t| self.batches(t)).transpose()?;
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        detached(py, move || {
            let this = this;
            let tr = unsafe { &mut *this.0 }.trainer();
            let Some(batches) = batches else { return tr.evaluate() };
            let be = tr.backend();
            let (mut sum, mut count) = (0.0, 0usize);
            for batch in &batches {
                tr.model().set_batch(be, batch)?;
                tr.model().forward(be, None)?;
                sum += tr.model().loss_sum(be)?;
                count += batch.valid_targets();
            }
            Ok(Some(sum / count as f64))
        })
    }

    /// Writes a checkpoint of the current state under `dir` (as `step_NNNNNNNN/`); returns its path.
    fn save_checkpoint(&mut self, py: Python<'_>, dir: PathBuf) -> PyResult<PathBuf> {
        if self.pending.is_some() {
            return Err(LlmqError::new_err("save_checkpoint(): a step() is waiting for its update(): call update() first"));
        }
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        detached(py, move || {
            let this = this;
            let t = unsafe { &mut *this.0 };
            checkpoint::save(t.run.trainer(), &dir, &t.lineage).and_then(|p| p.ok_or_else(|| llmq_core::Error::Backend("only rank 0 writes checkpoints".into())))
        })
    }

    /// Restores a checkpoint: a `step_N` directory, or the newest complete one under `path`.
    /// The trainer must have the checkpoint's model and numeric options.
    fn load_checkpoint(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<PathBuf> {
        self.pending = None;
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        detached(py, move || {
            let this = this;
            let dir = if ckpt::verify_checkpoint(&path).is_ok() { path } else { ckpt::resolve_continue(&path, None)? };
            let t = unsafe { &mut *this.0 };
            let parent = checkpoint::load(t.trainer(), &dir)?;
            t.lineage = ckpt::Lineage::resumed_from(&parent, t.run.trainer().steps_done());
            let lineage = t.lineage.clone();
            t.trainer().set_log_lineage(&lineage);
            Ok(dir)
        })
    }

    /// Writes the model as a Hugging Face directory (config.json + model.safetensors, and the
    /// tokenizer files of the model directory it was loaded from). dtype: "bf16" or "fp32".
    #[pyo3(signature = (dir, dtype="bf16"))]
    fn export(&mut self, py: Python<'_>, dir: PathBuf, dtype: &str) -> PyResult<()> {
        let dtype = options::export_dtype("export(dtype)", dtype).map_err(to_py)?;
        let source = self.source_dir.clone();
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        detached(py, move || {
            let this = this;
            let tr = unsafe { &mut *this.0 }.trainer();
            let groups = tr.master_weights()?;
            hf::export_model(&dir, tr.model().cfg(), &groups, dtype, source.as_deref())
        })
    }

    /// The end of the run: the final checkpoint (with ckpt_dir) and the export (with export=).
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let this = AssertSend(&mut *self as *mut PyTrainer);
        // SAFETY: see `AssertSend`.
        detached(py, move || {
            let this = this;
            unsafe { &mut *this.0 }.run.finish().map(|_| ())
        })
    }

    /// This run's memory plan (as `llmq.plan` with the same options).
    fn memory_plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let tc = self.run.trainer().config();
        let p = MemoryPlan::new(self.cfg(), tc, backend_reserve(self.on_gpu)).map_err(to_py)?;
        plan_dict(py, self.cfg(), &p, tc, self.on_gpu)
    }

    /// The model configuration (config.json fields) as a dict.
    fn model_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = serde_json::to_string(self.cfg()).map_err(|e| LlmqError::new_err(e.to_string()))?;
        py.import("json")?.call_method1("loads", (s,))
    }
}
