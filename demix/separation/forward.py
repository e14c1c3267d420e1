"""Running the network on a batch of windows: device, precision and batching.

`demix.separation.streaming` calls a `Forward` for every batch of windows it cuts from the mix;
`ModelForward` is the one the engine gives it. fp32 is the model's own forward (exact
to `demucs.apply.apply_model`); bf16 on a CPU with bf16 kernels runs a bf16 copy of the
network's layers (`cpu_bf16_copy`); bf16 and fp16 on CUDA run under autocast; where a
precision is not supported it warns and stays fp32.
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
"""fp32 reproduces apply_model; bf16 runs a bf16 copy of the network (CPU) or autocast
(CUDA); fp16 runs autocast (CUDA)."""

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
        warnings.warn("this CPU has no bf16 kernels in hardware (AVX-512 BF16 or AMX); emulated "
                      "bf16 is slower than fp32 here; using fp32")
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags (Linux `/proc/cpuinfo`) of bf16 arithmetic in hardware."""


def cpu_supports_bf16() -> bool:
    """Whether bf16 pays on this CPU: oneDNN runs it and the CPU computes bf16 natively.

    oneDNN also runs bf16 on plain AVX-512 by emulating it, but then it is slower than
    fp32 (measured on an AVX-512 Xeon without AVX512_BF16: htdemucs 1.3x, a viperx-sized
    BS-RoFormer 4.3x slower), so there bf16 falls back to fp32. Where the CPU's flags
    cannot be read (not Linux), oneDNN's own answer stands.
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = _cpu_flags()
    return flags is None or bool(flags & NATIVE_BF16_FLAGS)


def _cpu_flags() -> tp.Optional[frozenset]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


class ModelForward:
    """Runs a model on a batch of windows on `device` in `precision`; the model must be
    resident on `device`, the windows come from the CPU.

    bf16 on a CPU runs `cpu_bf16_copy(model)`: convolutions, linear layers and attention
    in bf16, with bf16 activations between them, while the model's own STFT/iSTFT, input
    normalisation and masking stay fp32. CUDA runs the fp32 model under autocast.
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
            if self.device.type == "cpu":
                return self.network(model)(windows).float()
            with torch.autocast(self.device.type, dtype=self.dtype):
                return model(windows).float()
        except RuntimeError as exc:
            warnings.warn(f"{self.precision} failed on {self.device} ({exc}); using fp32")
            self.dtype = None
            return model(windows)


BF16_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                torch.nn.Linear, torch.nn.MultiheadAttention)
"""The layers whose weights `cpu_bf16_copy` casts to bf16 and which take bf16 inputs. The
other parameters stay fp32: rounding the norms' weights, the layer scales and the
frequency embedding to bf16 too cost htdemucs 7-10 dB of SNR on `other` and `vocals`
for no measurable speed (the norms take bf16 inputs with fp32 weights)."""

_BF16_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()
_BF16_COPIES_LOCK = threading.Lock()


def cpu_bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of `model` for the CPU, made once and kept as long as `model` lives;
    the fp32 model stays untouched (fp32 jobs and the fallback use it).

    Its `BF16_MODULES` hold bf16 weights and cast their floating inputs to bf16 (a
    forward pre-hook), so the convolutions, linear layers and attention run on oneDNN's
    bf16 kernels and pass bf16 activations on: the norms and activations between them
    stay in bf16 too, without the per-op casts autocast makes and with half the memory
    traffic. Where a bf16 activation meets an fp32 value (the model's own STFT,
    normalisation statistics, masking and iSTFT, the layer scales, the frequency
    embedding) type promotion computes in fp32. Attention runs blockwise
    (`BlockwiseAttention`).
    """
    with _BF16_COPIES_LOCK:
        copy_ = _BF16_COPIES.get(model)
        if copy_ is None:
            copy_ = _make_cpu_bf16_copy(model)
            _BF16_COPIES[model] = copy_
        return copy_


def _make_cpu_bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    copy_ = copy.deepcopy(model).eval()
    for module in list(copy_.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.MultiheadAttention):
                setattr(module, name, BlockwiseAttention(child))
    for module in copy_.modules():
        if isinstance(module, BF16_MODULES):
            module.to(torch.bfloat16)
            module.register_forward_pre_hook(_inputs_to_bf16, with_kwargs=True)
    return copy_


def _to_bf16(value: tp.Any) -> tp.Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.bfloat16:
        return value.to(torch.bfloat16)
    return value


def _inputs_to_bf16(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(_to_bf16(a) for a in args), {k: _to_bf16(v) for k, v in kwargs.items()}


ATTENTION_BLOCK = 512
"""Queries per block in `BlockwiseAttention`. On htdemucs (2688 frequency and 1344 time
tokens, 8 heads) in bf16 on 2 AVX-512 BF16 cores, blocks of 256 to 2688 queries were
within 5% of each other; 512 bounds a block's scores to 22 MB."""


class BlockwiseAttention(torch.nn.Module):
    """`nn.MultiheadAttention` for inference in bf16 on a CPU, computing
    softmax(QKᵀ/√d)·V one block of queries at a time with plain matrix products.

    torch's fused CPU attention kernel is no faster in bf16 than in fp32 on a CPU without
    AMX (it was 39% of an htdemucs bf16 forward), while bf16 matrix products run on the
    AVX-512 BF16 kernels at about 3× their fp32 speed; blocks of queries bound the
    score matrix's memory. Calls this does not cover (masks, attention weights asked
    for, sequence-first layout, training with dropout) go to the wrapped module unchanged.
    """

    def __init__(self, attention: torch.nn.MultiheadAttention, block: int = ATTENTION_BLOCK):
        super().__init__()
        self.attention = attention
        self.block = block
        self.covered = (attention.batch_first and attention._qkv_same_embed_dim and attention.bias_k is None
                        and attention.in_proj_bias is not None)
        self.train(attention.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: tp.Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: tp.Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        if (not self.covered or self.training or need_weights or attn_mask is not None
                or key_padding_mask is not None or is_causal or query.dim() != 3):
            return self.attention(query, key, value, key_padding_mask=key_padding_mask,
                                  need_weights=need_weights, attn_mask=attn_mask,
                                  average_attn_weights=average_attn_weights, is_causal=is_causal)
        attention = self.attention
        weight = attention.in_proj_weight
        batch, length, width = query.shape
        heads = attention.num_heads
        head_width = width // heads
        scale = head_width ** -0.5
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

        def heads_of(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            projected = torch.nn.functional.linear(x.to(weight.dtype), w, b)
            return projected.view(batch, -1, heads, head_width).transpose(1, 2)

        queries = heads_of(query, w_q * scale, b_q * scale)
        keys_t = heads_of(key, w_k, b_k).transpose(-1, -2).contiguous()  # once, not per block
        values = heads_of(value, w_v, b_v)
        mixed = torch.empty_like(queries)
        for start in range(0, length, self.block):
            block = slice(start, start + self.block)
            mixed[:, :, block] = torch.softmax(queries[:, :, block] @ keys_t, dim=-1) @ values
        return attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, width)), None


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
