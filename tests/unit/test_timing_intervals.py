"""Latencies and speed-ups with their noise: the interval of a median from its order statistics,
the speed-up of paired repeats, and how the log's summary and the model card show them."""

from __future__ import annotations

from pathlib import Path

import pytest

from obsdiff.app.shell import summary_table
from obsdiff.artifacts.record import RunIdentity, RunRecord
from obsdiff.eval.efficiency import (
    Efficiency,
    format_speedup,
    median_interval,
    speed_comparison,
)
from obsdiff.eval.harness import Evaluation, with_latency


pytestmark = pytest.mark.unit

# six repeats of a ~1 s generation with a few percent of load noise
JITTER = [1.00, 1.03, 0.98, 1.05, 0.97, 1.02]


def evaluation(efficiency: Efficiency | None = None) -> Evaluation:
    return Evaluation(
        set="toy", prompts={}, num_images=2, seed=0, images_dir="", grid="",
        generation_seconds=1.0, metrics_key="", metrics={"fid": 3.0}, efficiency=efficiency,
    )  # fmt: skip


def test_the_median_interval_reaches_95_percent_from_six_values() -> None:
    assert median_interval([1.0]) is None  # one value: no interval
    three = median_interval([3.0, 1.0, 2.0])
    assert three is not None and (three.low, three.high) == (1.0, 3.0)
    assert three.confidence == pytest.approx(0.75)  # the range of 3 covers the median 75%
    five = median_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    assert five is not None and five.confidence == pytest.approx(1 - 2 / 32)  # still below 95%
    six = median_interval([6.0, 1.0, 5.0, 2.0, 4.0, 3.0])
    assert six is not None and (six.low, six.high) == (1.0, 6.0)
    assert six.confidence == pytest.approx(1 - 2 / 64) and six.confidence >= 0.95
    ten = median_interval([float(v) for v in range(10)])
    # the 2nd and 9th order statistics: 1 - 2 P(B <= 1), B ~ Binomial(10, 1/2)
    assert ten is not None and (ten.low, ten.high) == (1.0, 8.0)
    assert ten.confidence == pytest.approx(1 - 2 * 11 / 1024)


def test_identical_timings_give_a_speedup_within_noise() -> None:
    """Dense and pruned computing the same (an unstructured prune): every ratio near 1, the
    interval contains 1, the speed-up is flagged."""
    pruned = [t * 1.01 for t in reversed(JITTER)]
    speed = speed_comparison(JITTER, pruned, "cpu")
    assert speed.speedup_interval is not None
    assert speed.speedup_interval[0] <= 1.0 <= speed.speedup_interval[1]
    assert speed.flags == ["within noise"] and speed.describe().endswith("(within noise)")
    assert speed.interval_confidence is not None and speed.interval_confidence >= 0.95
    assert speed.dense_seconds == JITTER and speed.pruned_seconds == pruned  # kept to recompute
    same = speed_comparison([1.0] * 6, [1.0] * 6, "cpu")
    assert same.speedup == 1.0 and same.flags == ["within noise"]


def test_a_clear_twofold_speedup_excludes_1() -> None:
    pruned = [t / 2 for t in JITTER[::-1]]
    speed = speed_comparison(JITTER, pruned, "cuda:0")
    ratios = sorted(d / p for d, p in zip(JITTER, pruned, strict=True))
    assert speed.speedup == pytest.approx((ratios[2] + ratios[3]) / 2)  # median of the pairs
    assert speed.speedup_interval == [ratios[0], ratios[-1]] and speed.speedup_interval[0] > 1
    assert speed.flags == [] and "within noise" not in speed.describe()
    assert speed.dense_seconds_per_image == pytest.approx(1.01)  # the median of each side
    assert speed.pruned_seconds_interval == [min(pruned), max(pruned)]
    assert speed.repeats == 6 and speed.device == "cuda:0"


def test_few_repeats_say_their_coverage_and_one_repeat_has_no_interval() -> None:
    three = speed_comparison([2.0, 2.1, 1.9], [1.0, 1.0, 1.0], "cpu")
    assert three.flags == ["75% interval"]
    assert format_speedup(2.0, [1.9, 2.1], 0.75) == "2.000x [1.900, 2.100] (75% interval)"
    one = speed_comparison([2.0], [1.0], "cpu")
    assert one.speedup_interval is None and one.flags == ["no interval"]
    assert one.describe() == "2.000x (no interval)"
    with pytest.raises(ValueError, match="one pair per repeat"):
        speed_comparison([1.0, 2.0], [1.0], "cpu")


def test_the_back_to_back_latency_replaces_the_evaluations_own() -> None:
    own = Efficiency(10, 0.5, 3.0, 0.75, 4.0, 4, "cpu", [3.0, 2.0, 4.0], [2.0, 4.0], 0.75)
    timed = with_latency(evaluation(own), 1.02, JITTER)
    assert timed.efficiency is not None and timed.efficiency.image_seconds == JITTER
    assert timed.efficiency.seconds_per_image_interval == [0.97, 1.05]
    assert timed.efficiency.seconds_per_forward == pytest.approx(1.02 / 4)
    bare = with_latency(evaluation(own), 1.02)  # no times: the other measurement's are dropped
    assert bare.efficiency is not None and bare.efficiency.image_seconds == []
    assert bare.efficiency.seconds_per_image_interval is None


def test_the_summary_table_shows_and_flags_the_speedup() -> None:
    identity = RunIdentity(method="obsdiff", granularity="unstructured", sparsity=0.5)
    efficiency = Efficiency(10, 0.5, 1.01, 0.25, 4.0, 4, "cpu")
    noise = speed_comparison(JITTER, JITTER[::-1], "cpu")
    record = RunRecord(
        "completed", identity, eval=evaluation(efficiency), dense=evaluation(), speed=noise
    )
    line = next(x for x in summary_table(record).splitlines() if x.startswith("speed-up"))
    low, high = noise.speedup_interval  # type: ignore[misc]
    assert f"{noise.speedup:.3f}x [{low:.3f}, {high:.3f}]" in line
    assert "within noise" in line and "6 repeats timed back to back" in line
    latency = next(x for x in summary_table(record).splitlines() if x.startswith("seconds_per"))
    assert "[0.97, 1.05]" in latency  # the pruned latency's interval over its repeats
    record.speed = speed_comparison(JITTER, [t / 2 for t in JITTER], "cpu")
    line = next(x for x in summary_table(record).splitlines() if x.startswith("speed-up"))
    assert "2.000x [2.000, 2.000]" in line and "within noise" not in line


def test_the_model_card_gives_the_speedup_with_its_interval(tmp_path: Path) -> None:
    from obsdiff.artifacts.export import ExportRequest, model_card

    speed = speed_comparison(JITTER, JITTER[::-1], "cpu")
    record = RunRecord("completed", eval=evaluation(), dense=evaluation(), speed=speed)
    manifest = {"model": {"name": "toy"}, "model_config": {}, "method": {"name": "obsdiff"}}
    request = ExportRequest(tmp_path, tmp_path / "out", manifest, record, False, "copy", None)
    card = model_card(request, "load code")
    line = next(x for x in card.splitlines() if x.startswith("Seconds per image"))
    assert f"speed-up dense / pruned {speed.describe()}" in line and "within noise" in line
    assert "medians of 6 repeats" in line and "dense 1.01 [0.97, 1.05]" in line
