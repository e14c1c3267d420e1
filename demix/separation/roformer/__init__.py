"""BS-RoFormer and Mel-Band RoFormer: networks that load MSST checkpoints, and their
windowed inference (MSST's generic `demix`, streamed)."""
from demix.separation.roformer.bs_roformer import BSRoformer
from demix.separation.roformer.config import (ARCHITECTURES, RoformerConfig, RoformerConfigError, parse_config,
                                              read_config)
from demix.separation.roformer.loading import RoformerCheckpointError, build_model, load_model
from demix.separation.roformer.mel_band_roformer import MelBandRoformer
from demix.separation.roformer.network import RoformerNetwork


def is_roformer(model: object) -> bool:
    """Whether `model` is one of this package's networks (else: a Demucs model)."""
    return isinstance(model, RoformerNetwork)


__all__ = ["ARCHITECTURES", "BSRoformer", "MelBandRoformer", "RoformerCheckpointError", "RoformerConfig",
           "RoformerConfigError", "RoformerNetwork", "build_model", "is_roformer", "load_model",
           "parse_config", "read_config"]
