"""The run record (results.json) and the method records: one schema, read back as written; the
previous version's records read too; anything else one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obsdiff.artifacts.record import (
    PruneResult,
    RecordError,
    RunIdentity,
    RunRecord,
    evaluation_numbers,
)
from obsdiff.eval.efficiency import Efficiency, speed_comparison
from obsdiff.eval.harness import Evaluation
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.package import (
    LayerRecord,
    Structured,
    StructuredRecord,
    achieved_sparsity,
    record_from_dict,
)
from obsdiff.pruning.patterns import NM, Unstructured


pytestmark = pytest.mark.unit

DATA = Path(__file__).parents[1] / "data"


def evaluation(**more: object) -> Evaluation:
    return Evaluation(
        set="toy", prompts={"num_prompts": 2}, num_images=2, seed=0, images_dir="/x/images",
        grid="/x/grid.png", generation_seconds=1.25, metrics_key="k", grid_prompts=["a"],
        metrics={"fid": 3.5, "fid_mode": "clean"}, **more,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_record_reads_back_as_written(tmp_path: Path) -> None:
    record = RunRecord(
        "completed",
        RunIdentity("toy", "obsdiff", "unstructured", 0.5, "log_decrease", 4, "toy"),
        {"method.percdamp": "0.02"},
        prune=PruneResult(0.5, 4, 10, 10, 1.0, 1.0, 2.0, 3.0, 5.0, 99, "cpu", 1, 3, 8),
        eval=evaluation(efficiency=Efficiency(10, 0.5, 2.0, 0.25, 8.0, 8, "cpu")),
        dense=evaluation(),
    )
    record.write(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["format"] == 2 and data["identity"]["method"] == "obsdiff"
    assert RunRecord.read(tmp_path) == record
    record.eval.intervals = {"fid": [3.0, 4.0]}  # type: ignore[union-attr]
    flat = record.flat_metrics()  # W&B: the intervals beside the values
    assert flat["eval/fid"] == 3.5 and flat["eval/fid_ci_low"] == 3.0
    assert flat["eval/fid_ci_high"] == 4.0 and "dense/fid_ci_low" not in flat
    numbers = evaluation_numbers(record.eval)  # type: ignore[arg-type]
    assert numbers["fid"] == 3.5 and numbers["params"] == 10 and "fid_mode" not in numbers
    assert "latency_device" not in numbers and numbers["generation_seconds"] == 1.25


def test_timings_keep_their_repeats_and_intervals_and_older_records_read(
    tmp_path: Path,
) -> None:
    """The speed section and the efficiency keep every per-repeat time and the intervals, and
    read back as written; a record written before they had them reads without them."""
    efficiency = Efficiency(
        10, 0.5, 2.0, 0.25, 8.0, 8, "cpu", [2.1, 1.9, 2.0], [1.9, 2.1], 0.75
    )  # fmt: skip
    speed = speed_comparison([4.0, 4.2, 3.8], [2.1, 1.9, 2.0], "cpu")
    record = RunRecord("completed", eval=evaluation(efficiency=efficiency), speed=speed)
    record.write(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["speed"]["dense_seconds"] == [4.0, 4.2, 3.8]
    assert data["speed"]["speedup_interval"] == speed.speedup_interval
    assert data["eval"]["efficiency"]["image_seconds"] == [2.1, 1.9, 2.0]
    assert RunRecord.read(tmp_path) == record
    flat = record.flat_metrics()
    assert flat["speed/speedup_ci_low"] == speed.speedup_interval[0]  # type: ignore[index]
    assert flat["eval/seconds_per_image_ci_high"] == 2.1 and "speed/dense_seconds" not in flat
    assert "interval_confidence" not in evaluation_numbers(record.eval)  # type: ignore[arg-type]
    for key in ("speedup_interval", "dense_seconds_interval", "pruned_seconds_interval",
                "interval_confidence", "dense_seconds", "pruned_seconds"):  # fmt: skip
        del data["speed"][key]
    for key in ("image_seconds", "seconds_per_image_interval", "interval_confidence"):
        del data["eval"]["efficiency"][key]
    older = RunRecord.from_dict(data)
    assert older.speed is not None and older.speed.speedup == speed.speedup
    assert older.speed.speedup_interval is None and older.speed.flags == ["no interval"]
    assert older.eval is not None and older.eval.efficiency is not None
    assert older.eval.efficiency.image_seconds == []
    assert older.eval.efficiency.seconds_per_image_interval is None


def test_the_previous_versions_flat_record_reads() -> None:
    data = json.loads((DATA / "results_format1.json").read_text())
    record = RunRecord.from_dict(data)
    assert record.completed and record.identity.model == "toy" and record.identity.packages == 4
    assert record.prune is not None and record.prune.target_modules == data["target_modules"]
    assert record.eval is not None and record.eval.metrics["fid"] == data["eval"]["fid"]
    assert record.eval.efficiency is not None
    assert record.eval.efficiency.seconds_per_image == data["eval"]["seconds_per_image"]
    assert record.overrides == {}  # format 1 recorded none
    failed = RunRecord.from_dict({"status": "failed", "error": "boom", "model": "toy"})
    assert failed.error == "boom" and failed.prune is None and failed.identity.model == "toy"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": 3, "status": "completed"}', "format 3, written by another version"),
        ('{"format": 2, "status": "done"}', "status='done'"),
        ('{"format": 2}', "not a run record"),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "unreadable run record"),
    ],
)
def test_anything_else_is_one_clear_error(content: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(RecordError, match=message):
        RunRecord.read(tmp_path)
    with pytest.raises(RecordError, match="does not exist"):
        RunRecord.read(tmp_path / "elsewhere")


def test_method_records_round_trip_and_give_the_achieved_sparsity() -> None:
    layer = LayerRecord("blocks.0.attn.to_q", (4, 8), 16, 0.25)
    heads = StructuredRecord("blocks.0", "attn", "heads", 4, [1, 3])
    for record in (layer, heads):
        assert record_from_dict(record.as_dict()) == record
    # checkpoints of the previous version wrote no "type"
    assert record_from_dict({k: v for k, v in heads.as_dict().items() if k != "type"}) == heads
    assert achieved_sparsity([layer, LayerRecord("b", (4, 8), 0)]) == 16 / 64
    assert (
        achieved_sparsity([heads, StructuredRecord("b", "ff.net.2", "neurons", 8, [0])]) == 3 / 12
    )
    assert achieved_sparsity([]) == 0.0


def test_granularities_by_name_give_their_targets() -> None:
    assert Granularity.from_name("unstructured").target(0.3) == Unstructured(0.3)
    assert Granularity.from_name("semi_2_4").target(0.5) == NM(2, 4)
    assert Granularity.from_name("semi_4_8").target(0.5) == NM(4, 8)
    assert Granularity.from_name("structured").target(0.25) == Structured(0.25)
    with pytest.raises(ValueError, match="2:4 semi-structured pruning means sparsity 0.5"):
        Granularity.from_name("semi_2_4").target(0.3)
    with pytest.raises(ValueError, match="must lie in"):
        Granularity.from_name("structured").target(1.0)
