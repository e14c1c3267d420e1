"""Running the reference: `python -m demucs.separate`, as its users do."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf


def demucs_separate(wav: Path, repo: Path, name: str, out: Path, two_stems: str | None = None) -> dict[str, np.ndarray]:
    """Stems written by `demucs.separate --shifts 0 --overlap 0.25 --float32 --clip-mode none`.

    With `two_stems=X`, `no_X` is demucs' `--other-method minus` (the mix minus X, its
    `minus_X` file), which is how the service defines it.
    """
    args = [sys.executable, "-m", "demucs.separate", "--repo", str(repo), "-n", name,
            "--shifts", "0", "--overlap", "0.25", "--float32", "--clip-mode", "none",
            "-d", "cpu", "-o", str(out), str(wav)]
    if two_stems:
        args[-1:-1] = ["--two-stems", two_stems, "--other-method", "minus"]
    subprocess.run(args, check=True, capture_output=True, timeout=1800)
    folder = out / name / wav.stem
    return {path.stem.replace("minus_", "no_"): sf.read(str(path), dtype="float64", always_2d=True)[0]
            for path in sorted(folder.glob("*.wav"))}
