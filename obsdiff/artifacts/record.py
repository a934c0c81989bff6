"""The run record: one schema for `results.json`, written by the app shell and read by the
summary, the W&B logging, the sweep status and the report (which needs nothing else).

    {"format": 2, "status": "completed", "error": null,
     "identity": {"model": "toy", "method": "obsdiff", "granularity": "unstructured", ...},
     "overrides": {"method.cycles": "10"},      # the job's command-line settings (sweep axes)
     "prune": {"achieved_sparsity": 0.5, "params_before": ..., ...},
     "eval": {...Evaluation...}, "dense": {...Evaluation...}, "images": null,
     "speed": {"dense_seconds_per_image": ..., "speedup": ..., "speedup_interval": [low, high],
               "dense_seconds": [...], "pruned_seconds": [...], ...},  # timed back to back
     "recover": {"steps": 100, "first_loss": ..., "last_loss": ..., ...},  # after pruning
     "quantize": {"scheme": "int8_weight_only", "weight_bytes_after": ..., ...},  # on top
     "gate": [{"limit": "lpips<=0.15", "measured": 0.08, "passed": true, ...}]}

Records of the previous version (format 1: identity and prune figures at the top level) are
read as well, and so are records written before the timings kept their per-repeat times and
intervals (they read without them); anything else is one `RecordError` saying what the file is
and what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from obsdiff.eval.efficiency import SpeedComparison
from obsdiff.eval.gate import GateCheck
from obsdiff.eval.harness import Evaluation
from obsdiff.quantization.apply import QuantizeResult
from obsdiff.utils.io import write_json


RESULTS = "results.json"
FORMAT = 2
STATUSES = ("running", "completed", "failed", "interrupted")


class RecordError(ValueError):
    """A results.json that is not a run record of this or the previous version."""


@dataclass
class RunIdentity:
    """What names a run in a sweep; what an app did not choose stays None."""

    model: str | None = None
    method: str | None = None
    granularity: str | None = None
    sparsity: float | None = None
    weighting: str | None = None
    packages: int | None = None
    eval_set: str | None = None
    pruned_run: str | None = None  # evaluate app: the prune run it evaluated
    recover: str | None = None  # the recovery's option (run and recover apps), None: none
    modulation: str | None = None  # the modulation's option (low_rank), None: none
    quantize: str | None = None  # the weight quantization on top (its scheme), None: none

    def tags(self) -> dict[str, Any]:
        """The set fields (W&B tags, summary titles)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PruneResult:
    """What one prune run achieved and cost."""

    achieved_sparsity: float  # pruned weights (or heads and neurons) of the target layers
    packages: int
    params_before: int
    params_after: int
    tflops_before: float  # per denoiser forward, per sample
    tflops_after: float
    calibration_seconds: float
    solve_seconds: float
    wall_seconds: float
    peak_memory_bytes: int
    device: str
    world_size: int = 1
    target_modules: int | None = None  # unstructured and N:M: the pruned linears
    target_parameters: int | None = None  # their weights
    target_nonzero: int | None = None  # their non-zero weights after pruning
    layer_loss: float | None = None  # summed layer-wise reconstruction losses (OBS methods)
    # calibration statistics held at once (the largest package's), from the layer shapes
    statistics_bytes: int | None = None


@dataclass
class RecoveryResult:
    """What a recovery (distillation after pruning) did and cost."""

    steps: int  # optimizer steps
    seconds: float  # wall time, the teacher's trajectories included
    first_loss: float  # the loss of the first and of the last optimizer step
    last_loss: float
    peak_memory_bytes: int  # the process (CPU) or the device (CUDA)
    calls_recorded: int  # teacher denoiser calls the training inputs were drawn from
    images: int = 0  # with recover.images: the images they were drawn from instead
    world_size: int = 1  # processes that trained it (runner=ddp or fsdp)
    sharded: bool = False  # its training state sharded over them (runner=fsdp)


@dataclass
class RunRecord:
    status: str
    identity: RunIdentity = field(default_factory=RunIdentity)
    overrides: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    prune: PruneResult | None = None
    eval: Evaluation | None = None  # the pruned (or, evaluating a dense model, the dense) model
    dense: Evaluation | None = None  # the dense reference of a pruned model
    images: int | None = None  # sample app: images written (listed in samples.json)
    speed: SpeedComparison | None = None  # dense and pruned timed back to back (both latencies)
    recover: RecoveryResult | None = None  # the recovery after pruning, when there was one
    quantize: QuantizeResult | None = None  # the weight quantization on top, when there was one
    gate: list[GateCheck] | None = None  # the limits on the evaluation, each checked

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise RecordError(f"status={self.status!r}; a run record's status is one of {STATUSES}")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "status": self.status,
            "error": self.error,
            "identity": asdict(self.identity),
            "overrides": dict(self.overrides),
            "prune": None if self.prune is None else asdict(self.prune),
            "eval": None if self.eval is None else self.eval.as_dict(),
            "dense": None if self.dense is None else self.dense.as_dict(),
            "images": self.images,
            "speed": None if self.speed is None else asdict(self.speed),
            "recover": None if self.recover is None else asdict(self.recover),
            "quantize": None if self.quantize is None else self.quantize.as_dict(),
            "gate": None if self.gate is None else [asdict(check) for check in self.gate],
        }

    def write(self, run_dir: Path) -> None:
        write_json(run_dir / RESULTS, self.as_dict())

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        if not isinstance(data, dict):
            raise RecordError("not a JSON object")
        if "format" not in data:
            return _from_format_1(data)
        if data["format"] != FORMAT:
            raise RecordError(
                f"format {data['format']}, written by another version of obsdiff (this one reads "
                f"formats 1 and {FORMAT}); report it with that version"
            )
        try:
            prune, quantize, gate = data.get("prune"), data.get("quantize"), data.get("gate")
            return cls(
                status=data["status"],
                identity=RunIdentity(**data.get("identity") or {}),
                overrides={str(k): str(v) for k, v in (data.get("overrides") or {}).items()},
                error=data.get("error"),
                prune=None if prune is None else PruneResult(**prune),
                eval=_evaluation(data.get("eval")),
                dense=_evaluation(data.get("dense")),
                images=data.get("images"),
                speed=None if data.get("speed") is None else SpeedComparison(**data["speed"]),
                recover=None if data.get("recover") is None else RecoveryResult(**data["recover"]),
                quantize=None if quantize is None else QuantizeResult(**quantize),
                gate=None if gate is None else [GateCheck(**check) for check in gate],
            )
        except (KeyError, TypeError) as err:
            raise RecordError(f"not a run record ({type(err).__name__}: {err})") from None

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        """The record of `run_dir`; RecordError (naming the file) when it is missing or bad."""
        path = run_dir / RESULTS
        if not path.is_file():
            raise RecordError(f"{path} does not exist (killed, out of memory, or still running)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as err:  # RecordError is a ValueError
            raise RecordError(f"{path}: unreadable run record: {err}") from None

    def flat_metrics(self) -> dict[str, float]:
        """Every number of the record as `prune/<key>`, `eval/<key>`, `dense/<key>`, `speed/<key>`
        (W&B), the intervals as `<section>/<name>_ci_low` and `_ci_high`."""
        flat: dict[str, float] = {}
        if self.prune is not None:
            flat.update({f"prune/{k}": v for k, v in asdict(self.prune).items() if _number(v)})
        if self.recover is not None:
            flat.update({f"recover/{k}": v for k, v in asdict(self.recover).items() if _number(v)})
        if self.quantize is not None:
            figures = asdict(self.quantize)
            flat.update({f"quantize/{k}": v for k, v in figures.items() if _number(v)})
        for check in self.gate or []:
            flat[f"gate/{check.limit}"] = float(check.passed)
        if self.speed is not None:
            flat.update({f"speed/{k}": v for k, v in asdict(self.speed).items() if _number(v)})
            speed_intervals = {
                "speedup": self.speed.speedup_interval,
                "dense_seconds_per_image": self.speed.dense_seconds_interval,
                "pruned_seconds_per_image": self.speed.pruned_seconds_interval,
            }
            flat.update(_interval_keys("speed", speed_intervals))
        for section, evaluation in (("eval", self.eval), ("dense", self.dense)):
            if evaluation is not None:
                flat.update(
                    {f"{section}/{k}": v for k, v in evaluation_numbers(evaluation).items()}
                )
                flat.update(_interval_keys(section, evaluation_intervals(evaluation)))
        return flat


def evaluation_numbers(evaluation: Evaluation) -> dict[str, float]:
    """The numbers of an evaluation: its scores, efficiency and counts, by their flat names."""
    values: dict[str, Any] = {
        "num_images": evaluation.num_images,
        "seed": evaluation.seed,
        "generation_seconds": evaluation.generation_seconds,
        **evaluation.metrics,
    }
    if evaluation.efficiency is not None:
        figures = asdict(evaluation.efficiency)
        figures.pop("interval_confidence")  # a property of an interval, not a figure
        values.update(figures)
    return {k: v for k, v in values.items() if _number(v) and math.isfinite(v)}


def evaluation_intervals(evaluation: Evaluation) -> dict[str, list[float]]:
    """The intervals of an evaluation's figures: the metrics' over prompts, and the seconds per
    image's over its timed repeats."""
    intervals = dict(evaluation.intervals)
    efficiency = evaluation.efficiency
    if efficiency is not None and efficiency.seconds_per_image_interval is not None:
        intervals["seconds_per_image"] = efficiency.seconds_per_image_interval
    return intervals


def _interval_keys(
    section: str, intervals: Mapping[str, Sequence[float] | None]
) -> dict[str, float]:
    """`<section>/<name>_ci_low` and `_ci_high` of every interval that is set."""
    flat = {}
    for name, interval in intervals.items():
        if interval is not None:
            flat[f"{section}/{name}_ci_low"] = interval[0]
            flat[f"{section}/{name}_ci_high"] = interval[1]
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _evaluation(data: Any) -> Evaluation | None:
    return None if data is None else Evaluation.from_dict(data)


def _from_format_1(data: dict[str, Any]) -> RunRecord:
    """The previous version's flat record: identity and prune figures beside `eval`/`dense`."""
    identity_keys = {f.name for f in fields(RunIdentity)}
    prune_keys = {f.name for f in fields(PruneResult)}
    prune = {k: v for k, v in data.items() if k in prune_keys}
    complete = all(f.name in prune for f in fields(PruneResult) if f.default is MISSING)
    try:
        return RunRecord(
            status=data.get("status", "completed"),
            identity=RunIdentity(**{k: v for k, v in data.items() if k in identity_keys}),
            error=data.get("error"),
            prune=PruneResult(**prune) if complete else None,
            eval=_evaluation(data.get("eval")),
            dense=_evaluation(data.get("dense")),
            images=data.get("images") if isinstance(data.get("images"), int) else None,
        )
    except (KeyError, TypeError) as err:
        raise RecordError(f"not a run record ({type(err).__name__}: {err})") from None
