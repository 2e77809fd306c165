//! `import llmq`: Python bindings over the same pieces as `llmq train` — a `Trainer` that holds a
//! `llmq_train::run::Run`, `plan()`, the memory plan without a device, `evaluate()` and
//! `generate()` (`llmq generate` as a function). Options are the CLI's
//! flags in snake_case (`options::Options`); configuration errors raise `ValueError`, every other
//! error `llmq.LlmqError` (a `RuntimeError`), with the CLI's messages. The model runs with the
//! GIL released.

mod feed;
mod generate;
mod options;
mod trainer;

use llmq_core::{Error, Mem, MemCategory, ModelConfig};
use llmq_train::eval::{self, EvalData, EvalShape};
use llmq_train::memory_check;
use llmq_train::plan::{estimate_step_seconds, lifetime, memory_flags, DeviceSpeeds, MemoryPlan};
use llmq_train::TrainConfig;
use options::Options;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt};
use std::path::PathBuf;

create_exception!(llmq, LlmqError, PyRuntimeError, "An llmq error other than a bad option (a file, the device, a non-finite run, out of memory).");

pub(crate) fn to_py(e: Error) -> PyErr {
    match e {
        Error::Config(_) => PyValueError::new_err(e.to_string()),
        e => LlmqError::new_err(e.to_string()),
    }
}

/// A Python keyword value as JSON, for `options::from_json`.
fn to_json(key: &str, v: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    use serde_json::Value;
    if v.is_none() {
        Ok(Value::Null)
    } else if v.is_instance_of::<PyBool>() {
        Ok(Value::Bool(v.extract()?))
    } else if v.is_instance_of::<PyInt>() {
        match (v.extract::<i64>(), v.extract::<u64>()) {
            (Ok(i), _) => Ok(i.into()),
            (_, Ok(u)) => Ok(u.into()),
            _ => Err(PyValueError::new_err(format!("option {key}: expected an integer of at most 64 bits, got {v}"))),
        }
    } else if v.is_instance_of::<PyFloat>() {
        let f: f64 = v.extract()?;
        serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| PyValueError::new_err(format!("option {key}: expected a finite number, got {f}")))
    } else if let Ok(s) = v.extract::<String>() {
        Ok(Value::String(s))
    } else if let Ok(p) = v.extract::<PathBuf>() {
        Ok(Value::String(p.to_string_lossy().into_owned()))
    } else {
        Err(PyValueError::new_err(format!("option {key}: expected a bool, number, string or path, got {}", v.get_type().name()?)))
    }
}

/// The keyword options plus `model` and `from_scratch`, validated by name and type.
pub(crate) fn parse_options(model: Option<PathBuf>, from_scratch: bool, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Options> {
    let mut map = serde_json::Map::new();
    if let Some(kw) = kwargs {
        for (k, v) in kw.iter() {
            let k: String = k.extract()?;
            let v = to_json(&k, &v)?;
            map.insert(k, v);
        }
    }
    let mut o = options::from_json(map).map_err(to_py)?;
    o.model = model.map(|p| p.to_string_lossy().into_owned());
    o.from_scratch = from_scratch;
    Ok(o)
}

/// Device memory the backend holds for itself, for plans.
pub(crate) fn backend_reserve(on_gpu: bool) -> usize {
    if on_gpu {
        llmq_cuda::OWN_DEVICE_BYTES
    } else {
        0
    }
}

/// The memory plan `p` of model `cfg` in a run configured as `tc`, as a dict: bytes per category
/// under "device", "host" and "host_write_combined", the device peak (the backend's own buffers
/// included), the host total, whether it fits `memory_limit`, the memory options as `llmq train`
/// flags, and for a GPU plan the step time estimated on an H200 (as `llmq plan` prints it).
pub(crate) fn plan_dict<'py>(py: Python<'py>, cfg: &ModelConfig, p: &MemoryPlan, tc: &TrainConfig, on_gpu: bool) -> PyResult<Bound<'py, PyDict>> {
    let limit = tc.memory.memory_limit;
    let d = PyDict::new(py);
    for (mem, key) in [(Mem::Device, "device"), (Mem::Host, "host"), (Mem::HostWriteCombined, "host_write_combined")] {
        let cats = PyDict::new(py);
        for (cat, m, bytes) in p.by_category() {
            if m == mem {
                cats.set_item(cat.name(), bytes)?;
            }
        }
        d.set_item(key, cats)?;
    }
    let lifetimes = PyDict::new(py);
    for cat in MemCategory::ALL {
        lifetimes.set_item(cat.name(), lifetime(cat))?;
    }
    d.set_item("lifetime", lifetimes)?;
    d.set_item("backend_reserve", p.backend_reserve)?;
    d.set_item("device_peak", p.device_peak())?;
    d.set_item("host_total", p.host_total())?;
    d.set_item("limit", limit)?;
    d.set_item("fits", p.fits(limit))?;
    d.set_item("memory_flags", memory_flags(tc))?;
    let est = on_gpu.then(|| estimate_step_seconds(cfg, tc, p, DeviceSpeeds::h200_for(tc)));
    d.set_item("estimated_step_s", est)?;
    Ok(d)
}

/// The memory plan of `Trainer(model, from_scratch, **options)` without a device and without
/// reading weights (as `llmq plan`); `device="cpu"` plans the CPU backend, anything else a GPU.
/// With `auto_memory`, the plan `Trainer` would choose within `memory_limit`.
#[pyfunction]
#[pyo3(signature = (model=None, from_scratch=false, **options))]
fn plan<'py>(py: Python<'py>, model: Option<PathBuf>, from_scratch: bool, options: Option<&Bound<'py, PyDict>>) -> PyResult<Bound<'py, PyDict>> {
    let o = parse_options(model, from_scratch, options)?;
    let on_gpu = o.device != "cpu";
    let (p, tc, cfg) = py
        .detach(|| -> llmq_core::Result<_> {
            let m = o.resolve_model()?;
            let mut tc = options::train_config(&o, on_gpu)?;
            let reserve = backend_reserve(on_gpu);
            if o.auto_memory {
                tc = memory_check::auto_memory_plan(&m.cfg, &tc, reserve, "llmq.plan")?.0;
            } else {
                tc.validate(&m.cfg)?;
            }
            tc.default_graphs(&m.cfg, on_gpu);
            Ok((MemoryPlan::new(&m.cfg, &tc, reserve)?, tc, m.cfg))
        })
        .map_err(to_py)?;
    plan_dict(py, &cfg, &p, &tc, on_gpu)
}

/// Loss and perplexity of a model (a checkpoint, model directory or Hugging Face cache name) on
/// token files, as `llmq eval`: `batches` batches of batch_size x seq_len tokens from the start
/// of `eval_file` (default: all the whole batches it holds), with the matmul dtype and device of
/// the options.
#[pyfunction]
#[pyo3(signature = (model=None, eval_file=None, batches=None, from_scratch=false, **options))]
fn evaluate<'py>(
    py: Python<'py>,
    model: Option<PathBuf>,
    eval_file: Option<PathBuf>,
    batches: Option<usize>,
    from_scratch: bool,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut o = parse_options(model, from_scratch, options)?;
    if let Some(f) = eval_file {
        o.eval_file = Some(f.to_string_lossy().into_owned());
    }
    if o.from_scratch {
        return Err(PyValueError::new_err("evaluate(): a model built from scratch has no weights to evaluate"));
    }
    let name = o.model.clone().ok_or_else(|| PyValueError::new_err("evaluate(): model is required"))?;
    let pattern = o.eval_file.clone().ok_or_else(|| PyValueError::new_err("evaluate(): eval_file is required"))?;
    let shape = EvalShape { batch_size: o.batch_size, seq_len: o.seq_len, batches };
    let r = trainer::detached(py, move || {
        let m = eval::resolve_model(&name)?;
        let mut data = EvalData::open(&pattern, &m.cfg, shape, &|l| l.check_all_tokens(&mut |_, _| {}))?;
        let (mut be, on_gpu) = trainer::select_backend(&o.device, &o.backend.options()?)?;
        options::train_config(&o, on_gpu)?; // the options' checks
        let asked = o.matmul_dtype.as_deref().and_then(llmq_core::DType::parse);
        let precision = eval::precision(asked, o.fp8_fast_accumulation, &m, on_gpu);
        eval::evaluate(be.as_mut(), m, precision, &mut data, &mut |_| {})
    })?;
    let d = PyDict::new(py);
    d.set_item("loss", r.loss)?;
    d.set_item("perplexity", r.perplexity())?;
    d.set_item("batches", r.batches)?;
    d.set_item("tokens", r.tokens)?;
    Ok(d)
}

#[pymodule]
fn llmq(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("LlmqError", m.py().get_type::<LlmqError>())?;
    m.add_class::<trainer::PyTrainer>()?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(generate::generate, m)?)?;
    Ok(())
}
