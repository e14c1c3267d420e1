"""How well a model separates the user's own songs: a folder of tracks with their reference
stems, each mixture separated (by the engine in this process, or by a running service: the
command line's `demix eval`), each estimate scored against its reference.

The score is MSST's (`utils/metrics.py`'s `sdr` in ZFTurbo/Music-Source-Separation-Training),
so figures compare with the ones published for its checkpoints:

    SDR = 10 · log10((Σ s² + ε) / (Σ (s − ŝ)² + ε)),   ε = 1e-8 added to both sums,

each sum running over every channel and sample of the stem at once (MSST does not score the
channels apart and average them), here in float64; the reference and estimate are first cut
to the shorter of the two, as MSST's `get_metrics` does. A silent reference scored against a
silent estimate is 0 dB; an estimate equal to its reference scores very high, bounded by ε.

Beside it, the way museval (SiSEC, MUSDB18) reads a song: the same ratio over windows of one
second (`window_s` · samplerate frames, the last partial window dropped, a song shorter than
a window is one window), and the median over windows. As museval does, windows whose
reference is silent (all zero) are left out of the median; unlike museval, a window whose
estimate is silent is kept (it scores 0 dB against the reference: the model missed it), and
one stem's silent window does not void the other stems' window. museval's own SDR is
BSS Eval's (a distortion filter fitted per window), not this ratio: the figures are close in
spirit, not equal.

A track is a folder holding `mixture.<ext>` and `<stem>.<ext>` for each reference (MUSDB18's
layout); `<ext>` is any format the service reads (WAV, FLAC, MP3, Ogg, AIFF, M4A, ...), each
decoded as the service decodes its uploads. A stem is scored when the track has its reference
and the model produced it; the others are left out.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

import numpy as np

from demix.audio.decoders import decode_to_wav, sniff_container
from demix.audio.io import AudioWriter, read_audio
from demix.audio.output_formats import resolve_output
from demix.config import Settings
from demix.errors import DemixError, InvalidAudio
from demix.intake.inspection import inspect_upload

EPS = 1e-8
"""Added to both sums of the SDR (MSST's value): bounds a perfect estimate's score and makes
a silent reference against a silent estimate 0 dB."""

WINDOW_S = 1.0
"""Window of the chunked SDR, in seconds (museval's `win` for MUSDB18)."""

MIXTURE = "mixture"
"""The file name (without its extension) of a track's mix; every other audio file is a reference."""

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aif", ".aiff", ".aifc", ".m4a", ".mp4",
                    ".mka", ".webm")
"""Extensions of the files taken as audio in a track's folder: the formats the service decodes."""

ESTIMATE_OUTPUT = {"format": "wav", "sample_format": "float32"}
"""The estimates' format: float WAV at the mix's rate and channels, so the score measures the
model, not a quantizer."""

BLOCK_FRAMES = 1 << 16
"""Frames summed at a time in float64 (4 MiB for a stereo block)."""

ProgressFn = tp.Callable[[float], None]


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """MSST's SDR in dB of `estimate` against `reference`, arrays of the same shape (any
    layout: the sums run over every element).

    Raises:
        ValueError: the shapes differ.
    """
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} differ in shape")
    signal = error = 0.0
    for start in range(0, len(reference), BLOCK_FRAMES):  # float64 a block at a time, not a whole song
        block = np.asarray(reference[start:start + BLOCK_FRAMES], dtype=np.float64)
        signal += float(np.sum(np.square(block)))
        error += float(np.sum(np.square(block - estimate[start:start + BLOCK_FRAMES])))
    return float(10 * np.log10((signal + EPS) / (error + EPS)))


def window_sdrs(reference: np.ndarray, estimate: np.ndarray, samplerate: int,
                window_s: float = WINDOW_S) -> np.ndarray:
    """The SDR of each `window_s` window of `[frames, channels]` arrays of the same shape;
    NaN where the reference is silent (museval's framing: whole windows only, or the whole
    signal when it is shorter than one)."""
    if reference.shape != estimate.shape:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} differ in shape")
    frames = len(reference)
    window = max(1, int(window_s * samplerate))
    count = frames // window if window < frames else 1
    scores = np.full(count, np.nan)
    for index in range(count):
        part = slice(index * window, min((index + 1) * window, frames))
        if np.any(reference[part]):
            scores[index] = sdr(reference[part], estimate[part])
    return scores


def chunked_median_sdr(reference: np.ndarray, estimate: np.ndarray, samplerate: int,
                       window_s: float = WINDOW_S) -> float:
    """The median SDR over `window_s` windows, silent reference windows left out (museval's
    per-track figure, with MSST's ratio); NaN when every window of the reference is silent."""
    scores = window_sdrs(reference, estimate, samplerate, window_s)
    scores = scores[~np.isnan(scores)]
    return float(np.median(scores)) if len(scores) else math.nan


# -- tracks ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Track:
    """One song to score: its mix and its reference stems (stem name -> file)."""
    name: str  # its folder, relative to the folder searched ("test/Song" in MUSDB18)
    mixture: Path
    references: tp.Mapping[str, Path]


def find_tracks(folder: Path) -> list[Track]:
    """Every track under `folder` (itself included), by name: each folder holding a
    `mixture.<ext>`, with its other audio files as references.

    Raises:
        InvalidAudio: a track has two mixtures, or two files for one stem (`code`
            `ambiguous_track`).
    """
    folder = Path(folder)
    tracks = []
    for directory in sorted({path.parent for path in folder.rglob(f"{MIXTURE}.*")}):
        audio = sorted(path for path in directory.iterdir()
                       if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS)
        by_stem: dict[str, list[Path]] = {}
        for path in audio:
            by_stem.setdefault(path.stem, []).append(path)
        name = directory.relative_to(folder).as_posix() if directory != folder else folder.name
        for stem, paths in by_stem.items():
            if len(paths) > 1:
                raise InvalidAudio(f"track {name!r} has {len(paths)} files for {stem!r} "
                                   f"({', '.join(path.name for path in paths)}); keep one",
                                   code="ambiguous_track")
        if MIXTURE not in by_stem:
            continue  # mixture.* matched no audio file (mixture.txt)
        references = {stem: paths[0] for stem, paths in by_stem.items() if stem != MIXTURE}
        tracks.append(Track(name, by_stem[MIXTURE][0], references))
    return tracks


def read_track_audio(path: Path, settings: Settings, scratch: Path) -> tuple[np.ndarray, int]:
    """A file of a track as float32 `[frames, channels]` and its rate: a WAV read as it is,
    any other format decoded as the service decodes an upload (a copy in `scratch`)."""
    container = sniff_container(path)
    if container is None:
        return read_audio(path)
    handle, name = tempfile.mkstemp(dir=scratch, suffix=path.suffix)
    os.close(handle)
    copy = Path(name)
    try:
        shutil.copyfile(path, copy)
        decode_to_wav(copy, container, settings)
        return read_audio(copy)
    finally:
        copy.unlink(missing_ok=True)


# -- scores ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StemScore:
    """One stem of one track: MSST's SDR over the whole stem, and museval's median of 1-s
    windows (NaN when the reference is silent throughout)."""
    sdr: float
    chunked_median_sdr: float


def score_stems(references: tp.Mapping[str, np.ndarray], estimates: tp.Mapping[str, np.ndarray],
                samplerate: int, window_s: float = WINDOW_S) -> dict[str, StemScore]:
    """Score each stem present in both mappings of `[frames, channels]` arrays, each pair cut
    to the shorter; stems in one mapping only are left out.

    Raises:
        ValueError: a reference and its estimate differ in channel count.
    """
    return {stem: score_stem(references[stem], estimates[stem], samplerate, window_s, stem)
            for stem in references if stem in estimates}


def score_stem(reference: np.ndarray, estimate: np.ndarray, samplerate: int, window_s: float = WINDOW_S,
               stem: str = "stem") -> StemScore:
    """Score one `[frames, channels]` estimate against its reference, both cut to the shorter.

    Raises:
        ValueError: they differ in channel count.
    """
    if reference.shape[1:] != estimate.shape[1:]:
        raise ValueError(f"{stem}: the reference has {reference.shape[1]} channels and the estimate "
                         f"{estimate.shape[1]}")
    frames = min(len(reference), len(estimate))
    reference, estimate = reference[:frames], estimate[:frames]
    return StemScore(sdr(reference, estimate), chunked_median_sdr(reference, estimate, samplerate, window_s))


def score_track(track: Track, estimates: tp.Mapping[str, Path], settings: Settings, scratch: Path,
                stems: tp.Optional[tp.Collection[str]] = None) -> dict[str, StemScore]:
    """Score the estimate files of `track` (stem name -> file) against its references: the stems
    in both (and in `stems`, when given), in the estimates' order (the model's sources').

    Raises:
        InvalidAudio: a reference and its estimate differ in rate or channel count (`code`
            `reference_mismatch`), or a reference cannot be decoded.
    """
    scores = {}
    for stem in (name for name in estimates if name in track.references and (stems is None or name in stems)):
        # one stem in memory at a time: a long song's four references and estimates would not fit
        reference, reference_rate = read_track_audio(track.references[stem], settings, scratch)
        estimate, rate = read_audio(estimates[stem])
        if reference_rate != rate:
            raise InvalidAudio(f"track {track.name!r}: {track.references[stem].name} is at {reference_rate} Hz "
                               f"and the estimate (at the mixture's rate) at {rate} Hz",
                               code="reference_mismatch")
        try:
            scores[stem] = score_stem(reference, estimate, rate, stem=stem)
        except ValueError as exc:
            raise InvalidAudio(f"track {track.name!r}: {exc}", code="reference_mismatch") from exc
    return scores


# -- running the evaluation ---------------------------------------------------------------------

class Separator(tp.Protocol):
    """What separates a mixture for the evaluation: writes its estimates into `folder` and
    returns them (stem name -> file), reporting progress from 0 to 1.

    Raises:
        DemixError: the mixture could not be separated (the track is reported failed).
    """

    def __call__(self, mixture: Path, folder: Path, progress: ProgressFn) -> dict[str, Path]: ...


def evaluation_job(model: tp.Optional[str] = None, workflow: tp.Optional[str] = None,
                   preset: tp.Optional[str] = None) -> dict[str, str]:
    """The fields of the job that separates each mixture, as `POST /v1/jobs` takes them: every
    source of `model` (None: the default), or the stems of a `workflow` (JSON text) or
    `preset`, as float WAV. Both ways of running the evaluation build their job here, the
    engine's by reading the same fields as the API (a workflow runs on the service only)."""
    if workflow:
        return {"workflow": workflow, **ESTIMATE_OUTPUT}
    if preset:
        return {"preset": preset, **ESTIMATE_OUTPUT}
    fields = {"stems": "all", **ESTIMATE_OUTPUT}
    if model:
        fields["model"] = model
    return fields


class EngineSeparator:
    """The separation engine in this process, with the model loaded once as a worker loads it
    (the settings' model folders, device, precision, shifts and overlap).

    Raises:
        ModelUnavailable: the model cannot be loaded (on construction).
    """

    def __init__(self, settings: Settings, job: tp.Mapping[str, str]):
        from demix.separation import ModelCache, resolve_device
        from demix.worker.attempt import model_spec, separation_options

        device = resolve_device(settings.device)
        self.settings, self.job = settings, dict(job)
        self.model = ModelCache().get(model_spec(settings, device, self.job.get("model")))
        self.options = separation_options(settings, device)

    def __call__(self, mixture: Path, folder: Path, progress: ProgressFn) -> dict[str, Path]:
        from demix.separation import separate_file

        upload = folder / f"{MIXTURE}{mixture.suffix.lower()}"
        shutil.copyfile(mixture, upload)  # the intake decodes it in place, as an upload
        info = inspect_upload(upload, self.settings)
        output = resolve_output(self.job, info)
        sink = _FolderSink(folder)
        names = separate_file(self.model, upload, self.job["stems"], sink, self.options, progress, output)
        upload.unlink()
        return {name: sink.paths[name] for name in names}


class _FolderSink:
    """The engine's stems written straight into a folder as `<stem>.wav`."""

    def __init__(self, folder: Path):
        self.folder, self.paths = folder, {}

    def open_stem(self, name: str, samplerate: int, channels: int, subtype: str, frames: int) -> AudioWriter:
        self.paths[name] = self.folder / f"{name}.wav"
        return AudioWriter(self.paths[name], samplerate, channels, subtype, frames)

    def publish(self, name: str) -> None:
        pass  # the evaluation reads the stems only once separate_file returns


@dataclasses.dataclass
class TrackResult:
    """One track's scores (stem -> score), or why it has none."""
    name: str
    scores: dict[str, StemScore] = dataclasses.field(default_factory=dict)
    error: str = ""


@dataclasses.dataclass
class Report:
    """The scores of every track, and their means per stem."""
    tracks: list[TrackResult]

    @property
    def stems(self) -> list[str]:
        """Every stem scored in some track, in a stable order (first seen)."""
        return list(dict.fromkeys(stem for track in self.tracks for stem in track.scores))

    def means(self) -> dict[str, StemScore]:
        """Per stem, the mean over the tracks that scored it (chunked: over those with a
        non-silent reference)."""
        means = {}
        for stem in self.stems:
            scores = [track.scores[stem] for track in self.tracks if stem in track.scores]
            chunked = [score.chunked_median_sdr for score in scores if not math.isnan(score.chunked_median_sdr)]
            means[stem] = StemScore(float(np.mean([score.sdr for score in scores])),
                                    float(np.mean(chunked)) if chunked else math.nan)
        return means

    def to_dict(self) -> dict:
        """The report as JSON-able data (a NaN becomes None)."""
        def stem_dict(score: StemScore) -> dict:
            return {"sdr": _number(score.sdr), "chunked_median_sdr": _number(score.chunked_median_sdr)}

        return {
            "metric": {"sdr": "MSST: 10*log10((sum(s^2)+1e-8) / (sum((s-s_hat)^2)+1e-8)), over all "
                              "channels and samples",
                       "chunked_median_sdr": f"median of the same over {WINDOW_S:g}-s windows, silent "
                                             "reference windows left out"},
            "tracks": [{"name": track.name, "stems": {stem: stem_dict(score) for stem, score in track.scores.items()},
                        **({"error": track.error} if track.error else {})} for track in self.tracks],
            "mean": {stem: stem_dict(score) for stem, score in self.means().items()},
        }

    def table(self) -> str:
        """A text table: a row per track and the mean, two columns per stem (SDR, chunked
        median SDR), in dB; a failed track's row says why instead."""
        stems = self.stems

        def cells(scores: tp.Mapping[str, StemScore]) -> list[str]:
            return [f"{value:.2f}" if not math.isnan(value) else "-"
                    for stem in stems for value in _pair(scores.get(stem))]

        header = ["track"] + [f"{stem} {kind}" for stem in stems for kind in ("sdr", "median")]
        rows = [[track.name] + cells(track.scores) for track in self.tracks] + [["mean"] + cells(self.means())]
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        lines = ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
                 for row in [header] + rows]
        for index, track in enumerate(self.tracks, start=1):
            if track.error:  # its message runs across the stems' columns
                lines[index] = f"{track.name.ljust(widths[0])}  failed: {track.error}"
        return "\n".join(line.rstrip() for line in lines)


def _pair(score: tp.Optional[StemScore]) -> tuple[float, float]:
    return (score.sdr, score.chunked_median_sdr) if score else (math.nan, math.nan)


def _number(value: float) -> tp.Optional[float]:
    return None if math.isnan(value) else round(value, 4)


def evaluate(tracks: tp.Sequence[Track], separate: Separator, settings: Settings,
             stems: tp.Optional[tp.Collection[str]] = None,
             progress: tp.Optional[tp.Callable[[int, Track, float], None]] = None) -> Report:
    """Separate and score every track in turn; a track that fails is reported with its error
    and the others go on. `progress(index, track, fraction)` follows each separation."""
    report = Report([])
    for index, track in enumerate(tracks):
        def on_progress(fraction: float, index: int = index, track: Track = track) -> None:
            if progress is not None:
                progress(index, track, fraction)

        with tempfile.TemporaryDirectory(prefix="demix-eval-") as scratch:
            try:
                estimates = separate(track.mixture, Path(scratch), on_progress)
                scores = score_track(track, estimates, settings, Path(scratch), stems)
            except DemixError as exc:
                report.tracks.append(TrackResult(track.name, error=exc.message))
            else:
                report.tracks.append(TrackResult(track.name, scores))
        on_progress(1.0)
    return report
