"""The torch engine: models, their weights, streaming separation of a mix into stems.
Imports no Redis, Celery or Flask, and nothing from demix.jobs, demix.intake or the edges.

This module is its front door: the worker imports the engine from here, never from its
modules (tests/test_layers.py checks it), so what the engine offers is this list.
"""
from .allocator import keep_freed_memory_for_reuse
from .engine import MODEL_SHARE, STATS_SHARE, SeparationOptions, StemLayout, separate_file, stem_layout
from .forward import batch_segments, warm_model
from .models import ModelCache, ModelSpec, model_digest, resolve_device
from .roformer import is_roformer
from .split import SplitPlan, merge_split, part_windows_total, prepare_split, run_part, single_pass
from .stem_files import JobStemSink
from .step_stems import encode_stems, write_cached_stems, write_step_stems

__all__ = ["JobStemSink", "MODEL_SHARE", "ModelCache", "ModelSpec", "STATS_SHARE", "SeparationOptions",
           "SplitPlan", "StemLayout", "batch_segments", "encode_stems", "is_roformer", "keep_freed_memory_for_reuse",
           "merge_split", "model_digest", "part_windows_total", "prepare_split", "resolve_device", "run_part",
           "separate_file", "single_pass", "stem_layout", "warm_model", "write_cached_stems",
           "write_step_stems"]
