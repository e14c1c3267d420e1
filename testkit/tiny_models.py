"""Tiny real HT-Demucs models for tests and benchmarks (no side effects on import)."""
from __future__ import annotations

from pathlib import Path

TINY_MODEL = "tiny"
TINY_SOURCES = ["drums", "bass", "other", "vocals"]


def make_tiny_htdemucs(seed: int = 0):
    """The real demucs HTDemucs class at a tiny width (depth stays 4: shallower models
    make the transformer attend over far more positions and need gigabytes)."""
    import torch
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    return HTDemucs(sources=TINY_SOURCES, channels=8, depth=4, t_layers=1, t_heads=2,
                    bottom_channels=0).eval()


def write_tiny_repo(repo: Path, name: str = TINY_MODEL, seed: int = 0) -> Path:
    """A demucs-format model folder holding the bag `name` of one tiny model."""
    from worker.model_repo import save_model, write_bag

    sig = f"{name}{seed}"
    save_model(make_tiny_htdemucs(seed), repo, sig)
    write_bag(repo, name, [sig])
    return repo
