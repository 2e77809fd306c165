"""Train LLaMA-family models with llmq (CPU reference and CUDA backends).

Options are the `llmq train` flags in snake_case, with the same defaults (batch_size=16,
seq_len=128, steps=250, learning_rate=3e-3, matmul_dtype, recompute_block, offload_opt_m,
memory_limit="16GiB", train_file/train_files, eval_file, log_file, ckpt_dir, export,
device="auto", ...).
Bad options raise ValueError; other errors raise LlmqError. The model runs with the GIL released.
"""

import os
import pathlib
from typing import Any, List, Optional, TypedDict, Union, final

import numpy as np
import numpy.typing as npt

__all__ = ["LlmqError", "Trainer", "plan", "evaluate", "generate"]

_Path = Union[str, "os.PathLike[str]"]

class LlmqError(RuntimeError):
    """An llmq error other than a bad option (a file, the device, a non-finite run, out of memory)."""

class _StepResult(TypedDict, total=False):
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_s: float
    ms: float
    skipped: bool
    eval_loss: float
    checkpoint: pathlib.Path

class _MemoryPlan(TypedDict):
    device: dict[str, int]
    host: dict[str, int]
    host_write_combined: dict[str, int]
    lifetime: dict[str, str]
    backend_reserve: int
    device_peak: int
    host_total: int
    limit: Optional[int]
    fits: bool
    memory_flags: str
    estimated_step_s: Optional[float]

def plan(model: Optional[_Path] = None, from_scratch: bool = False, **options: Any) -> _MemoryPlan:
    """The memory plan of Trainer(model, from_scratch, **options), without a device or weights."""

class _EvalResult(TypedDict):
    loss: float
    perplexity: float
    batches: int
    tokens: int

def evaluate(
    model: Optional[_Path] = None,
    eval_file: Optional[_Path] = None,
    batches: Optional[int] = None,
    from_scratch: bool = False,
    **options: Any,
) -> _EvalResult:
    """Loss and perplexity of a model (a checkpoint, model directory or Hugging Face cache name)
    on the first `batches` batches of eval_file (default: all the whole batches it holds), as
    `llmq eval`; from_scratch=True is refused (no weights)."""

class _GenerateResult(TypedDict):
    text: str
    tokens: List[int]
    prompt_tokens: int
    stop: str
    prompt_seconds: float
    decode_seconds: float

def generate(
    model: _Path,
    prompt: str = "",
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer: Optional[_Path] = None,
    dtype: str = "bf16",
    device: str = "auto",
) -> _GenerateResult:
    """Continues prompt with a model directory, Hugging Face cache name or llmq checkpoint and
    its tokenizer (or `tokenizer`), as `llmq generate`: greedy at temperature 0, else a seeded
    draw limited to the top_k tokens and to the top_p probability mass. `text` is the
    continuation alone; `stop` is "max_tokens", "eos" (the end-of-sequence token, not included)
    or "length"."""

@final
class Trainer:
    def __new__(cls, model: Optional[_Path] = None, from_scratch: bool = False, **options: Any) -> "Trainer":
        """model: a built-in shape (with from_scratch=True), a directory with config.json and
        safetensors, or a name in the Hugging Face cache; None: the embedded tiny model."""
    def step(self, tokens: Optional[npt.NDArray[np.int32]] = None) -> float:
        """Forward + backward of one optimizer step; tokens: int32 [batch_size *
        grad_accumulation, seq_len + 1], else the configured data. Returns the mean loss."""
    def update(self) -> _StepResult:
        """Applies the last step's gradients (norm, clipping, AdamW)."""
    def train_step(self, tokens: Optional[npt.NDArray[np.int32]] = None) -> _StepResult:
        """step() + update(), then the evaluation and checkpoint due."""
    def validate(self, tokens: Optional[npt.NDArray[np.int32]] = None) -> Optional[float]:
        """Mean loss over tokens (rows a multiple of batch_size) or the evaluation data."""
    def save_checkpoint(self, dir: _Path) -> pathlib.Path:
        """Writes dir/step_NNNNNNNN/ and returns its path."""
    def load_checkpoint(self, path: _Path) -> pathlib.Path:
        """Restores a step_N directory, or the newest complete checkpoint under path."""
    def export(self, dir: _Path, dtype: str = "bf16") -> None: ...
    def finish(self) -> None:
        """The final checkpoint (with ckpt_dir) and export (with export=)."""
    def memory_plan(self) -> _MemoryPlan: ...
    def model_config(self) -> dict[str, Any]: ...
    @property
    def done(self) -> bool: ...
    @property
    def step_count(self) -> int: ...
