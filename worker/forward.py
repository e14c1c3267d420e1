"""Running the network on a batch of windows: device, precision and batching.

`worker.streaming` calls a `Forward` for every batch of windows it cuts from the mix;
`ModelForward` is the one the engine gives it. fp32 is the model's own forward (exact
to `demucs.apply.apply_model`); bf16 (CPU with bf16 kernels, or CUDA) and fp16 (CUDA)
run under autocast; where a precision is not supported it warns and stays fp32.
"""
from __future__ import annotations

import copy
import threading
import typing as tp
import warnings
import weakref

import torch

Forward = tp.Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
"""forward(model, windows `[batch, channels, time]`) -> `[batch, sources, channels, time]`."""

PRECISIONS = ("fp32", "bf16", "fp16")
"""fp32 reproduces apply_model; bf16 (CPU or CUDA) and fp16 (CUDA) run under autocast."""

CUDA_BATCH_SEGMENTS = 4
"""Segments per forward on a GPU when not set (on CPU, batching only costs memory)."""


def plain_forward(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The model's own forward, in the model's precision and on the windows' device."""
    return model(windows)


def batch_segments(requested: int, device: str) -> int:
    """Segments per forward: `requested` when set (> 0), else 1 on CPU and
    `CUDA_BATCH_SEGMENTS` on CUDA."""
    if requested > 0:
        return requested
    return CUDA_BATCH_SEGMENTS if torch.device(device).type == "cuda" else 1


def autocast_dtype(precision: str, device: str) -> tp.Optional[torch.dtype]:
    """The autocast dtype for `precision` on `device`; None means plain fp32.

    Warns and falls back to fp32 where the precision is not supported.

    Raises:
        ValueError: `precision` is not one of `PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        warnings.warn(f"fp16 is only supported on CUDA, not {device_type}; using fp32")
        return None
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU does not support bf16; using fp32")
        return None
    if precision == "bf16" and device_type == "cpu" and not cpu_supports_bf16():
        warnings.warn("this CPU has no bf16 kernels (oneDNN needs AVX-512 or AMX); torch would "
                      "fall back to reference convolutions about 20x slower than fp32; using fp32")
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (natively or through AVX-512)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class ModelForward:
    """Runs a model on a batch of windows on `device` in `precision`; the model must be
    resident on `device`, the windows come from the CPU.

    bf16 on a CPU runs a bf16 copy of the model's weights (made once per model and
    process, see `cpu_bf16_copy`) under autocast, so the convolutions and the transformer
    run on oneDNN's bf16 kernels without casting every weight on every forward, while
    the STFT/iSTFT, the normalisations and the masking stay fp32 (autocast's CPU policy,
    and type promotion where a bf16 result meets an fp32 one). CUDA runs the fp32 model
    under autocast.
    """

    def __init__(self, device: str, precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = autocast_dtype(precision, device)

    def network(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that runs `model`'s forwards in this precision."""
        if self.dtype == torch.bfloat16 and self.device.type == "cpu":
            return cpu_bf16_copy(model)
        return model

    def __call__(self, model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Pinned memory makes the copy asynchronous, overlapping the previous batch's work.
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        if self.dtype is None:
            return model(windows)
        try:
            with torch.autocast(self.device.type, dtype=self.dtype):
                return self.network(model)(windows).float()
        except RuntimeError as exc:
            warnings.warn(f"{self.precision} failed on {self.device} ({exc}); using fp32")
            self.dtype = None
            return model(windows)


_BF16_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()
_BF16_COPIES_LOCK = threading.Lock()


BF16_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                torch.nn.Linear, torch.nn.MultiheadAttention)
"""Modules whose weights `cpu_bf16_copy` casts: those autocast runs in bf16 anyway.
Norms and embeddings stay fp32 (CPU layer_norm refuses bf16 weights on fp32 input)."""


def cpu_bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the weights of its `BF16_MODULES` cast to bf16, made once and kept as
    long as `model` lives. The fp32 model stays untouched (fp32 jobs and the fallback
    use it)."""
    with _BF16_COPIES_LOCK:
        copy_ = _BF16_COPIES.get(model)
        if copy_ is None:
            copy_ = copy.deepcopy(model).eval()
            for module in copy_.modules():
                if isinstance(module, BF16_MODULES):
                    module.to(torch.bfloat16)
            _BF16_COPIES[model] = copy_
        return copy_


@torch.inference_mode()
def warm_model(model: torch.nn.Module, device: str, precision: str, batch: int = 1) -> None:
    """Run every sub-model of `model` once on a full segment of silence in `precision`,
    as a job would: the one-time costs (the bf16 copy, oneDNN's kernel selection and
    weight layouts, the allocator's first pages) are paid here, not by the first job."""
    forward = ModelForward(device, precision)
    for sub_model in getattr(model, "models", [model]):
        segment = int(sub_model.samplerate * sub_model.segment)
        padded = sub_model.valid_length(segment) if hasattr(sub_model, "valid_length") else segment
        forward(sub_model, torch.zeros(batch, sub_model.audio_channels, padded))
