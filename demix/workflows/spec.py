"""The workflow JSON: what a chain or ensemble of models asks for, and every check made on it
at submission, before anything is stored or enqueued.

    {"steps": [
       {"name": "voc",  "input": "mix",           "models": ["mel_band_roformer_kim", "bs_roformer_viperx"],
        "ensemble": "avg_wave", "weights": [1, 1]},
       {"name": "band", "input": "voc/no_vocals", "models": ["htdemucs"]}],
     "outputs": {"vocals": "voc/vocals", "drums": "band/drums", "bass": "band/bass", "other": "band/other"}}

A step runs each of its models on its input (`mix`, the job's input, or `step/stem`, a stem
of another step). Its stems are the sources its models share and, for each, `no_<source>`:
the step's input minus that source. With several models each source is their ensemble
(`ENSEMBLE_ALGORITHMS`, MSST's eight, optionally weighted). `outputs` names the job's stems
(default: the last step's, as a plain job with `stems=all` of its model would give them).

Every refusal is a `BadRequest` (`invalid_workflow`) whose `field` detail is the path of the
bad value (`workflow.steps[1].input`), repeated at the start of its message.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing as tp

from demix.catalogue import check_model, describe_model
from demix.config import Settings
from demix.errors import BadRequest, DemixError, shown
from demix.stems import ALL, SOURCES, output_names

MIX = "mix"
"""The `input` naming the job's own input."""

ENSEMBLE_ALGORITHMS = ("avg_wave", "median_wave", "min_wave", "max_wave",
                       "avg_fft", "median_fft", "min_fft", "max_fft")
"""MSST's `ensemble.py` algorithms: the mean, median, or the sample (spectral bin) of least or
greatest magnitude, of the models' waveforms (`_wave`) or spectra (`_fft`)."""

DEFAULT_ENSEMBLE = "avg_wave"

MAX_WORKFLOW_CHARS = 20_000
"""Longest workflow JSON accepted (far beyond any useful chain)."""

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_STEP_KEYS = frozenset({"name", "input", "models", "ensemble", "weights"})
_WORKFLOW_KEYS = frozenset({"steps", "outputs"})


def refused(field: str, message: str) -> BadRequest:
    """The error for a bad value at `field` (a path below `workflow`)."""
    return BadRequest(f"{field}: {message}", code="invalid_workflow", details={"field": field})


def key_in_path(key: str) -> str:
    """A user's key as a path's part, cut so that a long one cannot swamp the message."""
    return key if len(key) <= 40 else f"{key[:40]}…"


@dataclasses.dataclass(frozen=True)
class StemRef:
    """A stem of a step (`step/stem`), or the job's input (`mix`: step and stem empty)."""
    step: str = ""
    stem: str = ""

    @property
    def is_mix(self) -> bool:
        return not self.step

    def __str__(self) -> str:
        return MIX if self.is_mix else f"{self.step}/{self.stem}"

    @classmethod
    def parse(cls, text: tp.Any, field: str, allow_mix: bool = True) -> StemRef:
        expected = '"step/stem" or "mix"' if allow_mix else '"step/stem"'
        if not isinstance(text, str):
            raise refused(field, f"expected a string, {expected}")
        if text == MIX and allow_mix:
            return cls()
        step, slash, stem = text.partition("/")
        if not slash or not step or not stem:
            raise refused(field, f"{shown(text)} is not {expected}")
        return cls(step, stem)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    input: StemRef
    models: tuple[str, ...]
    sources: tuple[str, ...]
    """The sources all its models separate, in its first model's order."""
    ensemble: tp.Optional[str] = None
    """How several models' stems are combined (None for a single model)."""
    weights: tp.Optional[tuple[float, ...]] = None

    @property
    def stems(self) -> tuple[str, ...]:
        """Every stem the step can give: its sources, then each one's complement."""
        return self.sources + tuple(f"no_{source}" for source in self.sources)

    def to_dict(self) -> dict:
        return {"name": self.name, "input": str(self.input), "models": list(self.models),
                "sources": list(self.sources), "ensemble": self.ensemble,
                "weights": list(self.weights) if self.weights is not None else None}

    @classmethod
    def from_dict(cls, data: tp.Mapping[str, tp.Any]) -> Step:
        return cls(name=data["name"], input=StemRef.parse(data["input"], "input"),
                   models=tuple(data["models"]), sources=tuple(data["sources"]),
                   ensemble=data.get("ensemble"),
                   weights=tuple(data["weights"]) if data.get("weights") is not None else None)


@dataclasses.dataclass(frozen=True)
class Workflow:
    """A checked workflow; `steps` are in an order where each comes after the step it reads."""
    steps: tuple[Step, ...]
    outputs: tp.Mapping[str, StemRef]

    def step(self, name: str) -> Step:
        return next(step for step in self.steps if step.name == name)

    @property
    def models(self) -> tuple[str, ...]:
        """Every model the workflow runs, once each, in order of first use."""
        return tuple(dict.fromkeys(model for step in self.steps for model in step.models))

    @property
    def runs(self) -> int:
        return sum(len(step.models) for step in self.steps)

    def needed_stems(self, step: str) -> tuple[str, ...]:
        """The stems of `step` another step reads or the job returns, in the step's order."""
        wanted = {ref.stem for ref in self._references() if ref.step == step}
        return tuple(stem for stem in self.step(step).stems if stem in wanted)

    def _references(self) -> tp.Iterator[StemRef]:
        yield from (step.input for step in self.steps)
        yield from self.outputs.values()

    def to_dict(self) -> dict:
        return {"steps": [step.to_dict() for step in self.steps],
                "outputs": {name: str(ref) for name, ref in self.outputs.items()}}

    @classmethod
    def from_dict(cls, data: tp.Mapping[str, tp.Any]) -> Workflow:
        """A workflow stored by `to_dict` (already checked)."""
        return cls(steps=tuple(Step.from_dict(step) for step in data["steps"]),
                   outputs={name: StemRef.parse(ref, "outputs") for name, ref in data["outputs"].items()})


def parse_workflow(value: tp.Any, settings: Settings,
                   reported: tp.Mapping[str, tp.Mapping[str, tp.Any]] = {}) -> Workflow:
    """Check a workflow (its JSON text, or the decoded object) against the served models.

    `reported`: per model, what a warm worker said of it (its sources), as for plain jobs.

    Raises:
        BadRequest: (`invalid_workflow`) the first problem found, its `field` detail the path
            of the bad value: malformed JSON, an unknown key, model, step or stem, a cycle,
            ensembled models sharing no source, bad weights, more than
            `DEMIX_WORKFLOW_MAX_RUNS` model runs.
    """
    data = _decoded(value)
    unknown = sorted(set(data) - _WORKFLOW_KEYS)
    if unknown:
        raise refused(f"workflow.{key_in_path(str(unknown[0]))}",
                      f"unknown key; a workflow has {', '.join(sorted(_WORKFLOW_KEYS))}")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise refused("workflow.steps", "expected a non-empty list of steps")
    steps = [_step(raw, f"workflow.steps[{index}]", settings, reported) for index, raw in enumerate(raw_steps)]
    names = [step.name for step in steps]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise refused(f"workflow.steps[{index}].name", f"step {name!r} is named twice")
    runs = sum(len(step.models) for step in steps)
    if runs > settings.workflow_max_runs:
        raise refused("workflow.steps", f"{runs} model runs; at most {settings.workflow_max_runs} "
                                        "(DEMIX_WORKFLOW_MAX_RUNS) per workflow")
    by_name = {step.name: step for step in steps}
    for index, step in enumerate(steps):
        _check_ref(step.input, f"workflow.steps[{index}].input", by_name)
    ordered = _in_order(steps, {step.name: f"workflow.steps[{index}].input" for index, step in enumerate(steps)})
    outputs = _outputs(data.get("outputs"), ordered, by_name)
    return Workflow(steps=tuple(ordered), outputs=outputs)


def _decoded(value: tp.Any) -> dict:
    if isinstance(value, str):
        if len(value) > MAX_WORKFLOW_CHARS:
            raise refused("workflow", f"{len(value)} characters; at most {MAX_WORKFLOW_CHARS}")
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise refused("workflow", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise refused("workflow", "expected a JSON object with \"steps\" (and optionally \"outputs\")")
    return value


def _step(raw: tp.Any, field: str, settings: Settings, reported: tp.Mapping[str, tp.Mapping[str, tp.Any]]) -> Step:
    if not isinstance(raw, dict):
        raise refused(field, "expected an object with name, input and models")
    unknown = sorted(set(raw) - _STEP_KEYS)
    if unknown:
        raise refused(f"{field}.{key_in_path(str(unknown[0]))}", f"unknown key; a step has {', '.join(sorted(_STEP_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name == MIX:
        raise refused(f"{field}.name", "expected a name of 1-32 lower-case letters, digits, _ or -, "
                                       f"starting with a letter, other than {MIX!r}")
    step_input = StemRef.parse(raw.get("input", MIX), f"{field}.input")
    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(model, str) for model in models):
        raise refused(f"{field}.models", "expected a non-empty list of model names")
    sources_by_model = {}
    for index, model in enumerate(models):
        if model in models[:index]:
            raise refused(f"{field}.models[{index}]", f"model {model!r} is listed twice")
        try:
            check_model(settings, model)
        except DemixError as exc:
            raise refused(f"{field}.models[{index}]", exc.message) from None
        sources_by_model[model] = describe_model(settings, model, reported.get(model)).sources or SOURCES
    first = sources_by_model[models[0]]
    sources = tuple(source for source in first if all(source in theirs for theirs in sources_by_model.values()))
    if not sources:
        said = "; ".join(f"{model} separates {', '.join(theirs)}" for model, theirs in sources_by_model.items())
        raise refused(f"{field}.models", f"ensembled models must share a source, and these share none: {said}")
    ensemble, weights = _ensemble(raw, field, len(models))
    return Step(name=name, input=step_input, models=tuple(models), sources=sources, ensemble=ensemble,
                weights=weights)


def _ensemble(raw: dict, field: str, models: int) -> tuple[tp.Optional[str], tp.Optional[tuple[float, ...]]]:
    algorithm = raw.get("ensemble")
    if algorithm is not None and algorithm not in ENSEMBLE_ALGORITHMS:
        raise refused(f"{field}.ensemble", f"unknown algorithm {shown(str(algorithm))}; expected one of "
                                           f"{', '.join(ENSEMBLE_ALGORITHMS)}")
    weights = raw.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != models or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                for w in weights) or not any(weights):
            raise refused(f"{field}.weights", f"expected {models} finite non-negative numbers, one per model, "
                                              "not all zero")
    if models == 1:
        return None, None
    return algorithm or DEFAULT_ENSEMBLE, tuple(float(w) for w in weights) if weights is not None else None


def _check_ref(ref: StemRef, field: str, steps: tp.Mapping[str, Step]) -> None:
    if ref.is_mix:
        return
    if ref.step not in steps:
        raise refused(field, f"no step is named {shown(ref.step)}; the steps are {', '.join(steps)}")
    made = steps[ref.step].stems
    if ref.stem not in made:
        raise refused(field, f"step {ref.step!r} makes no stem {shown(ref.stem)}; it makes {', '.join(made)}")


def _in_order(steps: list[Step], fields: tp.Mapping[str, str]) -> list[Step]:
    """The steps ordered so each comes after the one whose stem it reads (stable otherwise)."""
    by_name = {step.name: step for step in steps}
    ordered: list[Step] = []
    for step in steps:
        chain: list[str] = []
        current: tp.Optional[Step] = step
        while current is not None and current not in ordered:
            if current.name in chain:
                cycle = chain[chain.index(current.name):] + [current.name]
                raise refused(fields[current.name], f"the steps {' -> '.join(cycle)} read each other's stems "
                                                    "(a cycle)")
            chain.append(current.name)
            current = None if by_name[chain[-1]].input.is_mix else by_name[by_name[chain[-1]].input.step]
        for name in reversed(chain):
            ordered.append(by_name[name])
    return ordered


def _outputs(raw: tp.Any, steps: list[Step], by_name: tp.Mapping[str, Step]) -> dict[str, StemRef]:
    if raw is None:
        last = steps[-1]
        return {name: StemRef(last.name, name) for name in output_names(ALL, last.sources)}
    if not isinstance(raw, dict) or not raw:
        raise refused("workflow.outputs", "expected an object of stem names to \"step/stem\"")
    outputs = {}
    for name, text in raw.items():
        field = f"workflow.outputs.{key_in_path(str(name))}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise refused(field, "a stem name is 1-32 lower-case letters, digits, _ or -, starting with a letter")
        ref = StemRef.parse(text, field, allow_mix=False)
        _check_ref(ref, field, by_name)
        outputs[name] = ref
    return outputs
