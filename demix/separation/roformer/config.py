"""RoFormer configs: an MSST-format YAML read safely into a frozen `RoformerConfig`.

MSST (github ZFTurbo/Music-Source-Separation-Training) ships each checkpoint with a
YAML whose `model:` section is the network's constructor keywords, `audio:` its sample
rate and chunk size, `training:` its instruments and `inference:` the overlap and the
batch size (how many windows MSST runs per forward, which also decides its fades). Those
files write tuples as `!!python/tuple`, which `yaml.safe_load` refuses; MSST reads
them with `yaml.FullLoader`, which also builds arbitrary Python objects. An operator's
file is read here by `SafeLoader` plus that one tag, and nothing else.
"""
from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

import yaml

BS_ROFORMER = "bs_roformer"
MEL_BAND_ROFORMER = "mel_band_roformer"
ARCHITECTURES = (BS_ROFORMER, MEL_BAND_ROFORMER)
"""The architectures this package builds, named as MSST's `--model_type`."""

DEFAULT_SAMPLERATE = 44100
"""Hz; MSST's default when a config's `audio:` section has no `sample_rate`."""

DEFAULT_BATCH_SIZE = 1
"""Windows per batch when a config's `inference:` section has no `batch_size` (MSST
requires one)."""


class RoformerConfigError(ValueError):
    """A RoFormer config is unreadable or asks for something this package cannot build."""


class _TupleSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `!!python/tuple` (as a tuple); every other
    `!!python/...` tag stays an error."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    if not isinstance(node, yaml.SequenceNode):
        raise yaml.constructor.ConstructorError(None, None, "!!python/tuple must tag a sequence",
                                                node.start_mark)
    return tuple(loader.construct_sequence(node, deep=True))


_TupleSafeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def load_yaml(text: str) -> tp.Any:
    """Parse YAML `text` with the safe loader that understands `!!python/tuple`.

    Raises:
        RoformerConfigError: the text is not YAML, or uses another Python tag.
    """
    try:
        return yaml.load(text, Loader=_TupleSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RoformerConfigError(f"config is not plain YAML: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class RoformerConfig:
    """What the service needs from an MSST config to build and run a RoFormer."""
    architecture: str  # one of ARCHITECTURES
    model: tp.Mapping[str, tp.Any]  # the network's constructor keywords (MSST's `model:`)
    sources: tuple[str, ...]  # the network's outputs, in order
    samplerate: int  # Hz
    chunk_size: int  # frames per window (MSST's `inference.chunk_size` or `audio.chunk_size`)
    num_overlap: int  # windows covering each frame; the step is chunk_size // num_overlap
    batch_size: int = DEFAULT_BATCH_SIZE  # windows per batch (MSST's `inference.batch_size`): decides the fades

    def model_kwargs(self) -> dict[str, tp.Any]:
        """A fresh copy of the constructor keywords."""
        return dict(self.model)


def read_config(path: Path, architecture: tp.Optional[str] = None) -> RoformerConfig:
    """Read the MSST YAML config at `path` (see `parse_config`)."""
    return parse_config(Path(path).read_text(encoding="utf-8"), architecture)


def parse_config(text: str, architecture: tp.Optional[str] = None) -> RoformerConfig:
    """Parse an MSST YAML config. `architecture` (one of `ARCHITECTURES`) is inferred
    from the `model:` keys when not given: `num_bands` means Mel-Band, `freqs_per_bands`
    means BS-RoFormer.

    Raises:
        RoformerConfigError: the YAML is unsafe or malformed, a section or key is
            missing, or the architecture cannot be told.
    """
    document = load_yaml(text)
    if not isinstance(document, dict):
        raise RoformerConfigError("config must be a YAML mapping with model, audio, training "
                                  "and inference sections")
    model = _section(document, "model")
    audio = _section(document, "audio", required=False)
    training = _section(document, "training")
    inference = _section(document, "inference")
    architecture = architecture or _infer_architecture(model)
    if architecture not in ARCHITECTURES:
        raise RoformerConfigError(f"unknown architecture {architecture!r}; expected one of "
                                  f"{', '.join(ARCHITECTURES)}")
    chunk_size = inference.get("chunk_size", audio.get("chunk_size"))
    if chunk_size is None:
        raise RoformerConfigError("config has no chunk_size (in inference: or audio:)")
    if "num_overlap" not in inference:
        raise RoformerConfigError("config has no inference.num_overlap")
    target = training.get("target_instrument")
    instruments = training.get("instruments")
    sources = (target,) if target else tuple(instruments or ())
    if not sources or not all(isinstance(name, str) and name for name in sources):
        raise RoformerConfigError("config names no sources (training.target_instrument or "
                                  "training.instruments)")
    num_stems = model.get("num_stems", 1)
    if num_stems != len(sources):
        raise RoformerConfigError(f"model.num_stems is {num_stems} but the config names "
                                  f"{len(sources)} sources ({', '.join(sources)})")
    config = RoformerConfig(
        architecture=architecture, model=dict(model), sources=sources,
        samplerate=_positive_int(audio.get("sample_rate", DEFAULT_SAMPLERATE), "audio.sample_rate"),
        chunk_size=_positive_int(chunk_size, "chunk_size"),
        num_overlap=_positive_int(inference["num_overlap"], "inference.num_overlap"),
        batch_size=_positive_int(inference.get("batch_size", DEFAULT_BATCH_SIZE), "inference.batch_size"))
    if config.chunk_size < 10 or config.chunk_size // config.num_overlap < 1:
        raise RoformerConfigError(f"chunk_size {config.chunk_size} is too short for "
                                  f"num_overlap {config.num_overlap}")
    return config


def _section(document: dict, name: str, required: bool = True) -> dict:
    section = document.get(name)
    if section is None and not required:
        return {}
    if not isinstance(section, dict):
        raise RoformerConfigError(f"config has no {name}: section")
    return section


def _infer_architecture(model: dict) -> str:
    if "num_bands" in model and "freqs_per_bands" not in model:
        return MEL_BAND_ROFORMER
    if "freqs_per_bands" in model and "num_bands" not in model:
        return BS_ROFORMER
    raise RoformerConfigError("cannot tell BS-RoFormer from Mel-Band RoFormer by the model: keys "
                              f"(expected freqs_per_bands or num_bands); say which: {', '.join(ARCHITECTURES)}")


def _positive_int(value: tp.Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RoformerConfigError(f"{name} must be a positive integer, not {value!r}")
    return value
