"""BS-RoFormer and Mel-Band RoFormer: networks that load MSST checkpoints, and their
windowed inference (MSST's generic `demix`, streamed)."""
from .bs_roformer import BSRoformer
from .config import ARCHITECTURES, RoformerConfig, RoformerConfigError, parse_config, read_config
from .loading import RoformerCheckpointError, build_model, load_model
from .mel_band_roformer import MelBandRoformer
from .network import RoformerNetwork


def is_roformer(model: object) -> bool:
    """Whether `model` is one of this package's networks (else: a Demucs model)."""
    return isinstance(model, RoformerNetwork)


__all__ = ["ARCHITECTURES", "BSRoformer", "MelBandRoformer", "RoformerCheckpointError", "RoformerConfig",
           "RoformerConfigError", "RoformerNetwork", "build_model", "is_roformer", "load_model",
           "parse_config", "read_config"]
