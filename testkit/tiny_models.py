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
    from demix.separation.model_repo import save_model, write_bag

    sig = f"{name}{seed}"
    save_model(make_tiny_htdemucs(seed), repo, sig)
    write_bag(repo, name, [sig])
    return repo


TINY_DRUMSEP = "tiny_drumsep"
TINY_DRUM_PARTS = ["kick", "snare", "cymbals"]
TINY_VOCALS = "tiny_vocals"

_TINY_ROFORMER_MODEL = {
    "bs_roformer": "  freqs_per_bands: !!python/tuple [16, 16, 32, 65]\n",
    "mel_band_roformer": "  num_bands: 4\n  sample_rate: 44100\n",
}


def tiny_roformer_config(architecture: str, instruments: list[str], target: str = "") -> str:
    """An MSST-format YAML of a tiny RoFormer: windows of 0.1 s, two layers of width 8.
    `target`: a one-source model of it (its complement is the input minus it)."""
    stems = 1 if target else len(instruments)
    return (
        "audio:\n  chunk_size: 4416\n  num_channels: 2\n  sample_rate: 44100\n"
        f"model:\n  dim: 8\n  depth: 1\n  stereo: true\n  num_stems: {stems}\n"
        "  time_transformer_depth: 1\n  freq_transformer_depth: 1\n  dim_head: 8\n  heads: 1\n"
        "  attn_dropout: 0\n  ff_dropout: 0\n  flash_attn: true\n  stft_n_fft: 256\n  stft_hop_length: 64\n"
        "  stft_win_length: 256\n  mask_estimator_depth: 1\n  mlp_expansion_factor: 1\n"
        + _TINY_ROFORMER_MODEL[architecture]
        + f"training:\n  instruments: [{', '.join(instruments)}]\n"
        + (f"  target_instrument: {target}\n" if target else "")
        + "inference:\n  batch_size: 1\n  num_overlap: 2\n")


def write_tiny_roformer(folder: Path, architecture: str, instruments: list[str], target: str = "",
                        seed: int = 0) -> tuple[Path, Path]:
    """A tiny RoFormer's checkpoint (random weights, a bare state_dict as MSST saves it)
    and config in `folder`; returns (checkpoint, config)."""
    import torch

    from demix.separation.roformer import build_model, parse_config

    folder.mkdir(parents=True, exist_ok=True)
    config_text = tiny_roformer_config(architecture, instruments, target)
    torch.manual_seed(seed)
    model = build_model(parse_config(config_text))
    checkpoint, config = folder / f"{architecture}_{seed}.ckpt", folder / f"{architecture}_{seed}.yaml"
    torch.save(model.state_dict(), checkpoint)
    config.write_text(config_text)
    return checkpoint, config
