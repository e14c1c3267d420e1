"""Channel layouts: how more than two channels are separated, and the stereo downmix.

The models separate stereo. A multichannel input is separated by channel pair —
(1, 2), (3, 4), ... with a last odd channel on its own as mono — so every stem keeps the
input's channel count and order and `X + no_X` still reconstructs the input. With
`channels=stereo` the input is first folded to stereo with the ITU-R BS.775 downmix.
"""
from __future__ import annotations

import numpy as np

SQRT_HALF = 0.7071067811865476
"""-3 dB: the BS.775 weight of the centre and surround channels in a stereo downmix."""

# WAV's default speaker order for each channel count (WAVE_FORMAT_EXTENSIBLE masks as
# written by ffmpeg and DAWs): L R C LFE then surrounds.
DEFAULT_LAYOUTS = {
    1: ("C",),
    2: ("L", "R"),
    3: ("L", "R", "C"),
    4: ("L", "R", "Ls", "Rs"),
    5: ("L", "R", "C", "Ls", "Rs"),
    6: ("L", "R", "C", "LFE", "Ls", "Rs"),
    7: ("L", "R", "C", "LFE", "Cs", "Ls", "Rs"),
    8: ("L", "R", "C", "LFE", "Ls", "Rs", "Lb", "Rb"),
}

_DOWNMIX_WEIGHTS = {  # speaker -> (weight in left, weight in right); LFE is left out, as BS.775 does
    "L": (1.0, 0.0), "R": (0.0, 1.0), "C": (SQRT_HALF, SQRT_HALF), "LFE": (0.0, 0.0),
    "Ls": (SQRT_HALF, 0.0), "Rs": (0.0, SQRT_HALF), "Lb": (SQRT_HALF, 0.0), "Rb": (0.0, SQRT_HALF),
    "Cs": (0.5, 0.5),
}


def channel_groups(channels: int) -> list[list[int]]:
    """The channel indices separated together: pairs, and a last odd channel alone."""
    return [list(range(start, min(start + 2, channels))) for start in range(0, channels, 2)]


def downmix_matrix(channels: int) -> np.ndarray:
    """`[channels, 2]` float32 matrix folding this many channels to stereo (mono: to both)."""
    if channels == 1:
        return np.ones((1, 2), dtype=np.float32)
    layout = DEFAULT_LAYOUTS.get(channels)
    if layout is None:
        raise ValueError(f"no standard layout for {channels} channels")
    return np.array([_DOWNMIX_WEIGHTS[speaker] for speaker in layout], dtype=np.float32)
