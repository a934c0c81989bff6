"""The sweep report: CSV, Markdown, plots and image grid from a synthetic Hydra multirun."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from obsdiff import report
from obsdiff.artifacts.record import PruneResult, RunIdentity, RunRecord
from obsdiff.eval.efficiency import speed_comparison
from obsdiff.eval.harness import Evaluation
from obsdiff.reporting import collect as collected
from obsdiff.reporting import figures, tables


pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[1] / "data"

DENSE_COLOUR = (10, 10, 10)
DENSE_EVAL = {"fid": 5.0, "clip_score": 0.33, "sharpness": 2.0, "params": 2_030_000_000}
# (method, sparsity, colour of its images, prompt ids it has, eval metrics or a failure)
JOBS: list[tuple[str, float, tuple[int, int, int], tuple[int, ...], dict[str, Any] | str]] = [
    ("obsdiff", 0.3, (200, 30, 30), (1, 2), {"fid": 10.0, "clip_score": 0.30, "sharpness": 1.0}),
    ("wanda", 0.3, (30, 200, 30), (0, 1, 2), {"fid": 12.0, "clip_score": 0.31, "sharpness": 1.5}),
    ("obsdiff", 0.5, (30, 30, 200), (0, 1, 2), {"fid": 20.0, "clip_score": 0.25, "sharpness": 0.5}),
    ("wanda", 0.5, (200, 200, 30), (0, 1, 2), {"fid": 15.0, "clip_score": 0.20, "sharpness": 0.7}),
    ("magnitude", 0.3, (0, 0, 0), (), "RuntimeError('CUDA out of memory')"),
    ("magnitude", 0.5, (0, 0, 0), (), "killed"),
]


# back-to-back timings of the jobs that have them: six repeats, a few percent of load noise;
# OBS-Diff at 0.3 computes what the dense model does (within noise), at 0.5 twice as fast
JITTER = [1.00, 1.03, 0.98, 1.05, 0.97, 1.02]
SPEEDS = {
    ("obsdiff", 0.3): speed_comparison(JITTER, JITTER[::-1], "cpu"),
    ("obsdiff", 0.5): speed_comparison(JITTER, [t / 2 for t in JITTER[::-1]], "cpu"),
}


def write_images(folder: Path, colour: tuple[int, int, int], ids: tuple[int, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (16, 16), colour).save(folder / f"{i:07d}.png")


PROMPTS = 30  # per-image scores of 30 prompts, one image each
DIFFICULTY = np.random.default_rng(0).normal(scale=0.05, size=PROMPTS)  # shared by every model
NOISE = {"obsdiff": 0.002, "wanda": 0.002, "dense": 0.0}  # per-image noise of each method


def evaluation(images_dir: str, metrics: dict[str, Any], per_image: str = "") -> Evaluation:
    return Evaluation(
        set="tiny", prompts={}, num_images=3, seed=0, images_dir=images_dir, grid="",
        generation_seconds=1.0, metrics_key="", metrics=metrics, per_image=per_image,
    )  # fmt: skip


def write_per_image(path: Path, method: str, clip_score: float, seed: int) -> str:
    """CLIP scores of PROMPTS images: clip_score + the prompts' shared difficulty + noise (the
    mean is exactly clip_score); what the report pairs image by image."""
    noise = np.random.default_rng(seed).normal(scale=NOISE[method], size=PROMPTS)
    values = clip_score + DIFFICULTY - DIFFICULTY.mean() + noise - noise.mean()
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {"id": range(PROMPTS), "prompt": [f"p{i}" for i in range(PROMPTS)],
         "seed": range(PROMPTS), "file": "", "clip_score": values}
    ).to_csv(path, index=False)  # fmt: skip
    return str(path)


def make_sweep(root: Path) -> Path:
    """`root/sweep/<n>/` for JOBS (run records only: no Hydra folders), the dense images in a
    shared cache outside the sweep."""
    sweep = root / "sweep"
    dense_images = root / "dense_cache" / "images"
    write_images(dense_images, DENSE_COLOUR, (0, 1, 2))
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for n, (method, sparsity, colour, ids, outcome) in enumerate(JOBS):
        job = sweep / str(n)
        job.mkdir()
        names = RunIdentity("tiny_sd3", method, "unstructured", sparsity, "log_decrease", 4)
        overrides = {"method": method, "sparsity": str(sparsity)}
        if outcome == "killed":  # the shell's first record, never replaced
            record = RunRecord("running", names, overrides)
        elif isinstance(outcome, str):
            record = RunRecord("failed", names, overrides, error=outcome)
        else:
            write_images(job / "eval/pruned/images", colour, ids)
            pruned = {**outcome, "params": 1_000_000, "seconds_per_image": 0.5}
            scores = write_per_image(job / "eval/per_image.csv", method, outcome["clip_score"], n)
            dense_scores = write_per_image(
                root / "dense_cache" / "per_image.csv", "dense", DENSE_EVAL["clip_score"], 99
            )
            record = RunRecord(
                "completed", names, overrides,
                prune=PruneResult(sparsity, 4, 10, 10, 1.0, 1.0, 1.0, 1.0, 3.0, 1, "cpu"),
                eval=evaluation("eval/pruned/images", pruned, scores),
                dense=evaluation(str(dense_images), DENSE_EVAL, dense_scores),
                speed=SPEEDS.get((method, sparsity)),
            )  # fmt: skip
            record.eval.intervals = {
                "clip_score": [outcome["clip_score"] - 0.01, outcome["clip_score"] + 0.01]
            }  # type: ignore[union-attr]
        record.write(job)
    return sweep


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


def table_cells(markdown: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of the first table of the Markdown."""
    return all_tables(markdown)[0]


def all_tables(markdown: str) -> list[tuple[list[str], list[dict[str, str]]]]:
    """Header and rows of every table of the Markdown, in order."""
    tables_, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split(" | ")])
        elif current:
            header = current[0]
            tables_.append((header, [dict(zip(header, c, strict=True)) for c in current[2:]]))
            current = []
    return tables_


def test_collect_and_csv(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        jobs = collected.read_jobs(sweep)
    assert [j.job for j in jobs] == [str(n) for n in range(len(JOBS))]
    assert [j.status for j in jobs] == ["completed"] * 4 + ["failed"] * 2
    assert jobs[5].method == "magnitude" and jobs[5].sparsity == 0.5  # its "running" record
    assert "CUDA out of memory" in caplog.text and "incomplete (running)" in caplog.text

    frame = report.collect(sweep)  # the public DataFrame: what results.csv holds
    frame.to_csv(sweep / "results.csv", index=False)
    with (sweep / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:11] == [
        "job", "status", "error", "model", "method", "granularity", "sparsity", "weighting",
        "packages", "achieved_sparsity", "short_of_target",
    ]  # fmt: skip
    assert [(r["job"], r["method"], r["status"]) for r in rows] == [
        ("0/dense", "dense", "completed"),
        *((str(n), job[0], "completed" if n < 4 else "failed") for n, job in enumerate(JOBS)),
    ]
    assert float(rows[0]["sparsity"]) == 0.0 and float(rows[0]["fid"]) == 5.0
    assert float(rows[1]["fid"]) == 10.0 and float(rows[1]["sharpness"]) == 1.0
    assert float(rows[1]["clip_score_low"]) == pytest.approx(0.29)  # the interval's columns
    assert float(rows[1]["wall_seconds"]) == 3.0 and rows[1]["num_images"] == "3"
    assert rows[5]["error"] == "RuntimeError('CUDA out of memory')"
    assert rows[6]["error"].startswith("incomplete (running)") and rows[6]["sparsity"] == "0.5"
    images = report.per_image(sweep)  # every image of every job, the dense reference first
    assert len(images) == 5 * PROMPTS and set(images["job"]) == {"0/dense", "0", "1", "2", "3"}
    by_job = images.groupby("job")["clip_score"].mean()
    assert by_job["2"] == pytest.approx(0.25) and by_job["0/dense"] == pytest.approx(0.33)


def test_markdown_bold_only_where_the_paired_difference_excludes_zero(sweep: Path) -> None:
    """At 0.5 OBS-Diff leads Wanda by 0.05 in CLIP score with per-image noise 0.002: bold; at
    0.3 Wanda leads by 0.01, also beyond the noise: bold. FID has no per-image data here: its
    best value is not bold (nothing was tested)."""
    text = tables.markdown_report(collected.read_jobs(sweep), "sweep")
    (header, rows), (diff_header, diff_rows) = all_tables(text)[:2]
    assert header == [
        "method", "sparsity", "achieved", "FID ↓", "CLIP score ↑", "sharpness", "params",
        "s / image", "generation s", "speed-up",
    ]  # fmt: skip
    assert rows[0]["method"] == "dense" and "**" not in "".join(rows[0].values())
    assert rows[0]["params"] == "2.03B" and rows[1]["params"] == "1M"
    assert [(r["method"], r["sparsity"]) for r in rows[1:]] == [
        ("obsdiff", "0.3"), ("obsdiff", "0.5"), ("wanda", "0.3"), ("wanda", "0.5"),
    ]  # fmt: skip
    cell = {(r["method"], r["sparsity"]): r for r in rows[1:]}
    assert cell["obsdiff", "0.5"]["CLIP score ↑"] == "**0.2500** [0.2400, 0.2600]"
    assert cell["wanda", "0.3"]["CLIP score ↑"].startswith("**0.3100**")
    assert not cell["obsdiff", "0.3"]["CLIP score ↑"].startswith("**")
    assert "**" not in "".join(r["FID ↓"] + r["sharpness"] for r in rows)
    assert cell["obsdiff", "0.3"]["achieved"] == "0.300"
    # the paired differences: OBS-Diff against the best other method (Wanda) at each sparsity
    assert diff_header[:3] == ["method", "sparsity", "against"]
    diffs = {(r["method"], r["sparsity"]): r for r in diff_rows}
    assert set(diffs) == {("obsdiff", "0.3"), ("obsdiff", "0.5")}
    assert diffs["obsdiff", "0.5"]["Δ CLIP score ↑"].startswith("+0.0500 [")
    assert diffs["obsdiff", "0.5"]["Δ CLIP score ↑"].endswith(" *")
    failed = text.split("## Jobs that did not complete", 1)[1]
    assert "| 4 | tiny_sd3 | magnitude | 0.3 | RuntimeError('CUDA out of memory') |" in failed
    assert "| 5 | tiny_sd3 | magnitude | 0.5 | incomplete (running)" in failed


def test_no_bold_when_the_lead_is_within_the_noise(tmp_path: Path) -> None:
    NOISE["wanda"] = NOISE["obsdiff"] = 0.2  # per-image noise far above the 0.01 lead at 0.3
    try:
        sweep = make_sweep(tmp_path)
    finally:
        NOISE["wanda"] = NOISE["obsdiff"] = 0.002
    rows = table_cells(tables.markdown_report(collected.read_jobs(sweep), "sweep"))[1]
    cell = {(r["method"], r["sparsity"]): r for r in rows[1:]}
    assert not cell["wanda", "0.3"]["CLIP score ↑"].startswith("**")


def test_a_prune_only_sweep_shows_what_pruning_achieved(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for n, (method, achieved) in enumerate([("obsdiff", 0.3), ("wanda", 0.294)]):
        names = RunIdentity("toy", method, "unstructured", 0.3, "log_decrease", 4)
        result = PruneResult(achieved, 4, 10, 10, 1.0, 1.0, 2.0, 0.5, 3.0, 1, "cpu")
        result.target_nonzero = 700
        result.layer_loss = 0.25 if method == "obsdiff" else None
        (sweep / str(n)).mkdir(parents=True)
        RunRecord("completed", names, prune=result).write(sweep / str(n))
    text = tables.markdown_report(collected.read_jobs(sweep), "sweep")
    assert "Prune runs without evaluation" in text and "**" not in text
    header, rows = table_cells(text)
    assert header == [
        "method", "sparsity", "achieved", "non-zero", "layer loss", "calibration s", "solve s",
        "wall s", "peak memory",
    ]  # fmt: skip
    assert rows[0]["achieved"] == "0.300" and rows[1]["achieved"] == "0.294 ⚠"
    assert rows[0]["layer loss"] == "0.2500" and rows[1]["layer loss"] == "–"


def test_app_writes_everything(sweep: Path) -> None:
    assert report.main([str(sweep)]) == 0
    out = sweep / "report"
    summary = json.loads((out / "report.json").read_text())
    assert (summary["completed"], summary["failed"]) == (4, 2)
    for metric in ("fid", "clip_score", "sharpness", "params", "speedup"):
        path = out / "plots" / f"{metric}.png"
        assert f"plots/{metric}.png" in summary["files"]
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100
    assert {"results.csv", "results.md", "grid.png"} <= set(summary["files"])
    # timings each job took in its own process are not plotted against each other
    for timing in ("seconds_per_image", "seconds_per_forward", "generation_seconds"):
        assert f"plots/{timing}.png" not in summary["files"]
        assert not (out / "plots" / f"{timing}.png").exists()

    with Image.open(out / "grid.png") as opened:
        grid = opened.convert("RGB")
    methods, sparsities = ["obsdiff", "magnitude", "wanda"], [0.3, 0.5]  # obsdiff first
    assert grid.size == figures.cell_origin(len(methods), 1 + len(sparsities))
    assert grid.size == (
        figures.LEFT + 3 * (figures.CELL + figures.GAP),
        figures.TOP + 3 * (figures.CELL + figures.GAP),
    )

    def centre(row: int, col: int) -> tuple[int, int, int]:
        x, y = figures.cell_origin(row, col)
        return grid.getpixel((x + figures.CELL // 2, y + figures.CELL // 2))  # type: ignore[return-value]

    for method, sparsity, colour, _, outcome in JOBS:
        expected = colour if isinstance(outcome, dict) else figures.PLACEHOLDER
        assert centre(methods.index(method), 1 + sparsities.index(sparsity)) == expected
    assert all(centre(row, 0) == DENSE_COLOUR for row in range(len(methods)))


def test_prompt_id_and_placeholder(sweep: Path) -> None:
    jobs = collected.read_jobs(sweep)
    reference = collected.references(jobs)["tiny_sd3"]
    assert figures.default_prompt_id([reference.images_dir, *(j.images_dir for j in jobs)]) == 1
    grid = figures.comparison_grid(jobs, reference, prompt_id=0)
    assert grid is not None
    x, y = figures.cell_origin(0, 1)  # obsdiff at 0.3 has no image 0
    assert grid.getpixel((x + figures.CELL // 2, y + figures.CELL // 2)) == figures.PLACEHOLDER
    assert figures.comparison_grid(jobs[4:], None) is None  # no images at all


def test_varying_settings_become_columns(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    record = RunRecord.read(sweep / "3")
    record.identity.packages = 8
    record.write(sweep / "3")
    jobs = collected.read_jobs(sweep)
    assert collected.varying_keys(jobs) == ["packages"]
    header, rows = table_cells(tables.markdown_report(jobs, "sweep"))
    assert header[:3] == ["method", "sparsity", "packages"] and rows[-1]["packages"] == "8"


def test_run_dir_and_sweep_of_sweeps(sweep: Path, tmp_path: Path) -> None:
    assert report.main([str(sweep / "2"), "--out", str(tmp_path / "one")]) == 0
    summary = json.loads((tmp_path / "one/report.json").read_text())
    assert (summary["completed"], summary["failed"]) == (1, 0)
    outer = tmp_path / "outer"
    outer.mkdir()
    sweep.rename(outer / "a")
    assert [j.job for j in collected.read_jobs(outer)][:2] == ["a/0", "a/1"]


def test_missing_or_empty_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in caplog.text
    assert report.main([str(tmp_path)]) == 2
    assert "holds no run directories" in caplog.text


def test_a_job_killed_before_its_first_record_and_an_older_record(tmp_path: Path) -> None:
    """A job folder without results.json is listed (nothing else is read about it); a run
    record of the previous version (format 1, flat) reads as the same job."""
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "1").mkdir()
    (sweep / "1" / "results.json").write_text((DATA / "results_format1.json").read_text())
    jobs = collected.read_jobs(sweep)
    assert (jobs[0].status, jobs[0].method) == ("failed", "?")
    assert jobs[0].error.startswith("no results.json") or "does not exist" in jobs[0].error
    old = jobs[1]
    assert old.completed and (old.method, old.sparsity, old.model) == ("obsdiff", 0.5, "toy")
    assert old.metrics["prompt_fidelity"] == pytest.approx(0.9638888888888889)
    assert old.metrics["params"] == 1977040 and old.run["achieved_sparsity"] == 0.5
    assert old.dense is not None and old.dense.metrics["prompt_fidelity"] > 0.96
    (sweep / "1" / "results.json").write_text(json.dumps({"format": 99, "status": "completed"}))
    assert "format 99, written by another version" in collected.read_jobs(sweep)[1].error


def test_jobs_evaluated_at_other_settings_are_not_compared(tmp_path: Path) -> None:
    """Robustness sweeps: the same method and sparsity at two evaluation settings are two cells
    (their images differ: pairing them image by image would be meaningless)."""
    from obsdiff.reporting.compare import cells

    jobs = [
        collected.JobResult(str(n), tmp_path, "completed", settings=settings)
        for n, settings in enumerate(
            [
                {"method": "obsdiff", "sparsity": 0.5, "eval.sampling.guidance_scale": 3.0},
                {"method": "wanda", "sparsity": 0.5, "eval.sampling.guidance_scale": 3.0},
                {"method": "obsdiff", "sparsity": 0.5, "eval.sampling.guidance_scale": 5.0},
                {"method": "obsdiff", "sparsity": 0.5, "weighting": "uniform"},
            ]
        )
    ]
    found = sorted(sorted(j.job for j in members) for members in cells(jobs).values())
    assert found == [["0", "1"], ["2"], ["3"]]
    for job, scale in zip(jobs[:3], (3.0, 3.0, 5.0), strict=True):  # each with its dense model
        job.dense = collected.JobResult(f"{job.job}/dense", tmp_path, "completed", settings={})
        job.dense.metrics = {"fid": scale}
    denses = tables.dense_rows(jobs, None)  # one dense row per evaluation setting
    assert [d.settings["eval.sampling.guidance_scale"] for d in denses] == [3.0, 5.0]
    assert tables.dense_rows(jobs[:2], jobs[3]) == [jobs[3]]  # one setting: the reference


def test_the_speedup_carries_its_interval_and_is_flagged_within_noise(sweep: Path) -> None:
    """The back-to-back speed-up: its interval beside it, `within noise` where that contains 1
    (OBS-Diff at 0.3), none for jobs that timed nothing (Wanda); the CSV has the same."""
    text = tables.markdown_report(collected.read_jobs(sweep), "sweep")
    rows = table_cells(text)[1]
    cell = {(r["method"], r["sparsity"]): r["speed-up"] for r in rows[1:]}
    noise, twice = SPEEDS["obsdiff", 0.3], SPEEDS["obsdiff", 0.5]
    assert cell["obsdiff", "0.3"] == noise.describe() and cell["obsdiff", "0.3"].endswith(
        "(within noise)"
    )
    low, high = twice.speedup_interval  # type: ignore[misc]
    assert cell["obsdiff", "0.5"] == f"{twice.speedup:.3f}x [{low:.3f}, {high:.3f}]" and low > 1
    assert cell["wanda", "0.3"] == "–" and rows[0]["speed-up"] == "–"  # dense: nothing timed
    assert "timed back to back within each job" in text and "do not compare across jobs" in text
    frame = report.collect(sweep).set_index("job")
    assert bool(frame.loc["0", "speedup_within_noise"]) and frame.loc["0", "speedup_low"] < 1
    assert not bool(frame.loc["2", "speedup_within_noise"])
    assert frame.loc["2", "speedup_low"] == pytest.approx(low)
    assert frame.loc["2", "speedup_confidence"] == pytest.approx(1 - 2 / 64)
    assert pd.isna(frame.loc["1", "speedup_within_noise"])  # wanda: no speed-up timed


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_out_that_cannot_take_the_report_is_refused_before_any_work(
    where: str, sweep: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    out = existing if where == "file" else existing / "report"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with caplog.at_level(logging.INFO):
        assert report.main([str(sweep), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"--out {out}: ")
    assert f"{existing} is a file" in errors[0]
    assert "read job" not in caplog.text  # refused before reading the sweep
    assert existing.read_text() == "mine"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_report_logs_each_job_and_each_stage(
    sweep: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        assert report.main([str(sweep)]) == 0
    text = caplog.text
    for number in range(1, len(JOBS) + 1):
        assert f"read job {number}/{len(JOBS)} " in text
    for stage in ("results.csv", "paired differences", "differences.csv", "results.md", "plots:"):
        assert stage in text, stage
    assert "grid.png" in text
    stages = [r.getMessage() for r in caplog.records if r.name.startswith("obsdiff.report")]
    assert stages[0].endswith("6 job directories") and "completed jobs" in stages[-1]


def test_the_grids_caption_sits_above_the_column_headers(sweep: Path) -> None:
    """A long prompt wraps over at most two lines above the column headers, never through
    them: the band between the caption and the headers stays white."""
    jobs = collected.read_jobs(sweep)
    reference = collected.references(jobs)["tiny_sd3"]
    prompt = " ".join(["a very long prompt about a small red circle on a gray background"] * 4)
    listing = {"images": [{"id": 1, "prompt": prompt}]}
    images_dir = jobs[0].images_dir
    assert images_dir is not None
    (images_dir.parent / "images.json").write_text(json.dumps(listing))
    grid = figures.comparison_grid(jobs, reference, prompt_id=1)
    assert grid is not None
    pixels = np.asarray(grid.convert("L"))  # (height, width)
    caption_bottom = 4 + figures.CAPTION_LINES * figures.LINE
    assert (pixels[4:caption_bottom] < 128).any(axis=1).sum() > figures.LINE  # two lines used
    assert (pixels[caption_bottom + 1 : figures.HEADER_Y - 1] == 255).all()  # a white band
    assert (pixels[figures.HEADER_Y : figures.TOP - 2] < 128).any()  # the headers below it
    assert (pixels[figures.TOP - 4 : figures.TOP] == 255).all()  # clear of the images
    text = figures.wrap_caption(ImageDraw.Draw(grid), f"prompt 1: {prompt}", grid.width - 8)
    assert len(text) == 2 and text[-1].endswith("...")
