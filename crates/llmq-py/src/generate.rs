//! `llmq.generate`: `llmq generate` as a function (the same loading, sampling and messages),
//! returning the text and tokens instead of printing them. The model runs with the GIL released.

use crate::trainer::{detached, select_backend};
use llmq_core::{BackendOptions, Error};
use llmq_train::generate::Stop;
use llmq_train::sampling::SamplingOptions;
use llmq_train::textgen::{generate_text, parse_dtype, TextRequest};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// Continues `prompt` with `model` (a model directory, Hugging Face cache name or llmq checkpoint
/// directory) and its tokenizer (or `tokenizer`): greedy at temperature 0, else a seeded draw
/// limited by top_k and top_p. Returns text, tokens, prompt_tokens, stop and the timings.
#[pyfunction]
#[pyo3(signature = (model, prompt="", max_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0, tokenizer=None, dtype="bf16", device="auto"))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn generate<'py>(
    py: Python<'py>,
    model: PathBuf,
    prompt: &str,
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
    tokenizer: Option<PathBuf>,
    dtype: &str,
    device: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let sampling = SamplingOptions { max_tokens, temperature, top_k, top_p, seed };
    let (model, prompt, dtype, device) = (model.to_string_lossy().into_owned(), prompt.to_string(), dtype.to_string(), device.to_string());
    let r = detached(py, move || {
        let req = TextRequest { model, tokenizer, prompt, dtype: parse_dtype(&dtype)?, sampling };
        if !matches!(device.as_str(), "auto" | "cpu" | "cuda" | "gpu") {
            return Err(Error::Config(format!("--device: expected auto, cpu or cuda, got {device:?}")));
        }
        req.sampling.validate()?;
        let (mut be, _) = select_backend(&device, &BackendOptions::default())?;
        generate_text(be.as_mut(), &req, &mut |_| {})
    })?;
    let d = PyDict::new(py);
    d.set_item("text", r.text)?;
    d.set_item("tokens", r.tokens)?;
    d.set_item("prompt_tokens", r.prompt_tokens)?;
    let stop = match r.stop {
        Stop::MaxTokens => "max_tokens",
        Stop::Eos => "eos",
        Stop::Length => "length",
        Stop::Caller => "stopped",
    };
    d.set_item("stop", stop)?;
    d.set_item("prompt_seconds", r.prompt_seconds)?;
    d.set_item("decode_seconds", r.decode_seconds)?;
    Ok(d)
}
