"""Make the RoFormer reference fixtures from MSST's own code (run once; the outputs are
committed, MSST is not).

MSST is github.com/ZFTurbo/Music-Source-Separation-Training; these fixtures came from
commit ccc011abf7f89dd7922bb2888d48493b575c0289. Its requirements are not the
project's, so run this in a scratch venv:

    python3 -m venv /tmp/msst/venv
    /tmp/msst/venv/bin/pip install torch==2.13.0
    /tmp/msst/venv/bin/pip install rotary-embedding-torch==0.9.1 beartype==0.23.1 einops==0.8.2 \
        librosa==0.11.0 ml_collections tqdm packaging soundfile pyyaml
    git clone https://github.com/ZFTurbo/Music-Source-Separation-Training /tmp/msst/src
    git -C /tmp/msst/src checkout ccc011abf7f89dd7922bb2888d48493b575c0289
    /tmp/msst/venv/bin/python tests/data/roformer/make_fixtures.py --msst /tmp/msst/src

For each small config here (`<arch>_small.yaml`) it writes `<arch>_small.pt`, MSST's
network with seeded random weights (its state_dict), and `<arch>_small.npz`:

- `network_input`, `network_output`: one forward of MSST's network (eval mode);
- `demix_<case>_input`, `demix_<case>_output`: `utils.model_utils.demix` in generic mode
  (batch_size 1, as in the config) on seeded music-like signals of several lengths,
  `output` stacked in the config's source order.

and `<arch>_small_lengths.npz`, the same network and `demix` with the window shortened to
`LENGTHS_CHUNK_SIZE` frames (so that every length class stays a few thousand frames) and
the config's `num_overlap`, for each of `LENGTH_CASES` and each of `BATCH_SIZES`:

- `chunk_size`, `num_overlap`: the window settings used;
- `input_<case>`: the mix; `output_<case>_batch<B>`: `demix` with `inference.batch_size` B,
  stacked in the config's source order.

`msst_state_dict_shapes.json` lists, for MSST's own configs in `msst_configs/`, every
state_dict key and shape of MSST's network built from them, and `mel_bands.npz` the mel
band membership (`freqs_per_band`) MSST computes with librosa for a few settings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
SEED = 20261203

DEMIX_LENGTHS = {
    "long": 30000 + 123,  # reflect-padded at both ends, several windows
    "short": 9000,  # no end padding (too short for it); the one window is reflect-padded
    "tiny": 3000,  # the one window zero-padded (less than half a window)
}

LENGTHS_CHUNK_SIZE = 1408  # 22 hops of 64
"""The window of the length-class fixtures. BS-RoFormer's num_overlap 4 makes its step 352
and its border 1056; Mel-Band's num_overlap 2 makes both 704."""

LENGTH_CASES = {
    "under_half_window": 500,  # one window, zero-padded (BS: two, the second zero-padded too)
    "under_window": 1200,  # the last window reflect-padded; Mel-Band: between one and two borders
    "one_window": 1408,  # exactly one window; Mel-Band: exactly two borders, so no end padding
    "between_borders": 1800,  # BS: over a window, under two borders (no end padding); Mel-Band: padded
    "two_borders": 2112,  # BS: exactly two borders, so still no end padding
    "long": 4000,  # reflect-padded at both ends; with batches of 4, BS ends on a batch of 2, Mel-Band on a full one
}

BATCH_SIZES = (1, 4)
"""`inference.batch_size` values: 1 (the small configs') and 4 (MSST's published RoFormer
configs')."""

MEL_BAND_SETTINGS = [(44100, 2048, 60), (44100, 2048, 64), (48000, 2048, 60), (44100, 256, 8)]
"""(sample_rate, n_fft, num_bands) whose band membership is recorded."""


def music_like(frames: int, seed: int) -> np.ndarray:
    """A `[2, frames]` float32 signal with a bass line, a melody, clicks and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / 44100
    signal = 0.2 * np.sin(2 * np.pi * 55 * t) + 0.12 * np.sin(2 * np.pi * 440 * t)
    signal[::11025] += 0.3
    return np.stack([signal + 0.03 * rng.standard_normal(frames) for _ in range(2)]).astype(np.float32)


def msst_network(architecture: str, model_kwargs: dict) -> torch.nn.Module:
    from models.bs_roformer import BSRoformer, MelBandRoformer
    return {"bs_roformer": BSRoformer, "mel_band_roformer": MelBandRoformer}[architecture](**model_kwargs)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter but the rotary frequencies (constants)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("rotary_embed.freqs"):
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1 and name.endswith("gamma"):
                parameter.copy_(1 + 0.2 * noise)
            elif parameter.dim() >= 2:
                parameter.copy_(noise / parameter.shape[-1] ** 0.5)
            else:
                parameter.copy_(0.1 * noise)


def small_fixtures(architecture: str) -> None:
    from ml_collections import ConfigDict
    from utils.model_utils import demix

    config_path = HERE / f"{architecture}_small.yaml"
    config = ConfigDict(yaml.load(config_path.read_text(), Loader=yaml.FullLoader))  # MSST's way
    torch.manual_seed(SEED)
    model = msst_network(architecture, dict(config.model)).eval()
    randomise(model, SEED)
    torch.save(model.state_dict(), HERE / f"{architecture}_small.pt")

    arrays = {}
    generator = torch.Generator().manual_seed(SEED + 1)
    network_input = 0.3 * torch.randn(1, 2, config.audio.chunk_size, generator=generator)
    with torch.inference_mode():
        arrays["network_input"] = network_input.numpy()
        arrays["network_output"] = model(network_input).numpy()
    for case, frames in DEMIX_LENGTHS.items():
        mix = music_like(frames, seed=frames)
        estimates = demix(config, model, mix, torch.device("cpu"), architecture)
        arrays[f"demix_{case}_input"] = mix
        arrays[f"demix_{case}_output"] = np.stack([estimates[name] for name in estimates])
        print(architecture, case, "sources", list(estimates), arrays[f"demix_{case}_output"].shape)
    np.savez_compressed(HERE / f"{architecture}_small.npz", **arrays)
    length_fixtures(architecture, config, model)


def length_fixtures(architecture: str, config, model: torch.nn.Module) -> None:
    from ml_collections import ConfigDict
    from utils.model_utils import demix

    config = ConfigDict(config.to_dict())  # a copy: the window changes
    config.audio.chunk_size = LENGTHS_CHUNK_SIZE
    arrays = {"chunk_size": np.array(LENGTHS_CHUNK_SIZE), "num_overlap": np.array(config.inference.num_overlap)}
    for case, frames in LENGTH_CASES.items():
        mix = music_like(frames, seed=frames)
        arrays[f"input_{case}"] = mix
        for batch_size in BATCH_SIZES:
            config.inference.batch_size = batch_size
            estimates = demix(config, model, mix, torch.device("cpu"), architecture)
            arrays[f"output_{case}_batch{batch_size}"] = np.stack([estimates[name] for name in estimates])
        print(architecture, case, frames, "frames: batch sizes", BATCH_SIZES)
    np.savez_compressed(HERE / f"{architecture}_small_lengths.npz", **arrays)


def msst_config_shapes() -> None:
    shapes = {}
    for path in sorted((HERE / "msst_configs").glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=yaml.FullLoader)
        architecture = "mel_band_roformer" if "num_bands" in config["model"] else "bs_roformer"
        model = msst_network(architecture, dict(config["model"]))
        shapes[path.name] = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
        print(path.name, len(shapes[path.name]), "tensors")
    (HERE / "msst_state_dict_shapes.json").write_text(json.dumps(shapes, indent=0, sort_keys=True) + "\n")


def mel_bands() -> None:
    arrays = {}
    for samplerate, n_fft, bands in MEL_BAND_SETTINGS:
        model = msst_network("mel_band_roformer", dict(
            dim=8, depth=1, stereo=True, num_bands=bands, sample_rate=samplerate, stft_n_fft=n_fft,
            stft_win_length=n_fft, stft_hop_length=n_fft // 4, dim_head=8, heads=1))
        arrays[f"sr{samplerate}_nfft{n_fft}_bands{bands}"] = model.freqs_per_band.numpy()
    np.savez_compressed(HERE / "mel_bands.npz", **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msst", type=Path, required=True, help="a checkout of MSST")
    args = parser.parse_args()
    sys.path.insert(0, str(args.msst.resolve()))
    torch.set_num_threads(1)  # deterministic reductions
    for architecture in ("bs_roformer", "mel_band_roformer"):
        small_fixtures(architecture)
    msst_config_shapes()
    mel_bands()


if __name__ == "__main__":
    main()
