"""The run and evaluate apps end to end on a tiny model: a sweep with a failed job, its report,
the dense cache, W&B offline, evaluation of a saved pruned run, bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
from app_runner import REPO_ROOT, run_app, run_in_process
from PIL import Image

from obsdiff.artifacts.record import RunRecord
from obsdiff.report import main as report_main


pytestmark = pytest.mark.integration

TINY = ["model=tiny_sd3", "calibration=tiny", "eval=tiny"]
FAST = [*TINY, "model.sampling.num_inference_steps=2", "eval.prompts.num_prompts=3", "save=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """obsdiff.run over 3 methods x 2 sparsities: l1 cannot prune unstructured, so 2 jobs fail."""
    root = tmp_path_factory.mktemp("outputs")
    sweep_dir = root / "sweep"
    result = run_app(
        "obsdiff.run",
        "--multirun",
        "method=obsdiff,magnitude,l1",
        "sparsity=0.3,0.5",
        *FAST,
        f"paths.output_root={root}",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=600,
    )
    assert result.returncode == 1  # the sweep says that jobs failed (after running them all)
    return sweep_dir, result.stdout + result.stderr


@pytest.mark.xdist_group("run_sweep")  # the module's sweep runs once, on one worker
def test_sweep_records_every_job_with_dense_and_pruned_metrics(sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_dir, output = sweep
    records = [RunRecord.read(p.parent) for p in sorted(sweep_dir.glob("*/results.json"))]
    results = {(r.identity.method, r.identity.sparsity): r for r in records}
    assert len(results) == 6, output[-3000:]
    failed = {k for k, r in results.items() if r.status == "failed"}
    assert failed == {("l1", 0.3), ("l1", 0.5)}
    assert all("structured" in (results[k].error or "") for k in failed)
    done = [r for k, r in results.items() if k not in failed]
    for r in done:
        assert r.prune is not None and r.eval is not None and r.dense is not None
        assert r.prune.achieved_sparsity == pytest.approx(r.identity.sparsity, abs=1e-3)
        for evaluation in (r.eval, r.dense):
            assert evaluation.num_images == 3 and -1 <= evaluation.metrics["clip_score"] <= 1
            assert len(list(Path(evaluation.images_dir).glob("*.png"))) == 3
            assert evaluation.efficiency is not None and evaluation.efficiency.seconds_per_image > 0
        # FID against the dense images
        assert r.eval.metrics["fid"] > 0 and "fid" not in r.dense.metrics
        # unstructured: zeros, same shapes
        assert r.eval.efficiency.params == r.dense.efficiency.params  # type: ignore[union-attr]
        # dense-relative metrics (pruned only), per-image scores, intervals, the captioned pairs
        relative = {"psnr", "ssim", "lpips", "latent_rel_error"}
        assert relative <= set(r.eval.metrics) and not relative & set(r.dense.metrics)
        per_image = pd.read_csv(r.eval.per_image)
        assert len(per_image) == 3 and relative | {"clip_score"} <= set(per_image.columns)
        assert per_image["psnr"].mean() == pytest.approx(r.eval.metrics["psnr"])
        low, high = r.eval.intervals["clip_score"]
        assert low <= r.eval.metrics["clip_score"] <= high and "fid" in r.eval.intervals
        assert Path(r.eval.comparison).is_file() and Path(r.eval.fid_features).is_file()
        # dense and pruned timed back to back: both latencies and their ratio
        assert r.speed is not None and r.speed.speedup > 0
        assert r.eval.efficiency.seconds_per_image == r.speed.pruned_seconds_per_image  # type: ignore[union-attr]
        assert r.dense.efficiency.seconds_per_image == r.speed.dense_seconds_per_image  # type: ignore[union-attr]
    # the dense model was evaluated once and shared by every job of the sweep
    assert len({r.dense.images_dir for r in done}) == 1  # type: ignore[union-attr]
    assert output.count("dense evaluation from the cache") == len(done) - 1
    fids = {r.eval.metrics["fid"] for r in done}  # type: ignore[union-attr]
    assert len(fids) == 4  # every pruned model has its own images


@pytest.mark.xdist_group("run_sweep")  # the module's sweep runs once, on one worker
def test_report_of_the_sweep(sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_dir, _ = sweep
    assert report_main([str(sweep_dir)]) == 0  # its entry point, in this process
    report = sweep_dir / "report"
    rows = list(csv.DictReader((report / "results.csv").open()))
    statuses = sorted((r["method"], r["sparsity"], r["status"]) for r in rows)
    assert ("l1", "0.3", "failed") in statuses and ("l1", "0.5", "failed") in statuses
    assert sum(r["status"] == "completed" and r["method"] != "dense" for r in rows) == 4
    # the jobs' command-line settings, from their run records, as the CSV's extra columns
    assert {r["model.sampling.num_inference_steps"] for r in rows if r["method"] != "dense"} == {
        "2"
    }
    assert sum(r["method"] == "dense" for r in rows) == 1
    markdown = (report / "results.md").read_text()
    assert "Jobs that did not complete" in markdown and markdown.count("l1") >= 2
    # OBS-Diff paired against the other method (magnitude) at each sparsity, image by image
    assert "Paired differences" in markdown
    differences = list(csv.DictReader((report / "differences.csv").open()))
    pairs = {(d["method"], d["reference_method"], d["metric"]) for d in differences}
    assert ("obsdiff", "magnitude", "psnr") in pairs and ("obsdiff", "magnitude", "fid") in pairs
    assert all(int(d["images"]) == 3 for d in differences)
    assert "**" in markdown  # the best method per sparsity in bold
    for metric in ("fid", "clip_score"):
        assert Image.open(report / "plots" / f"{metric}.png").size[0] > 100
    grid = Image.open(report / "grid.png")
    assert grid.size[0] > grid.size[1] > 64  # 2 methods x (dense + 2 sparsities)

    # the report reads the run records alone: without Hydra's folders it is the same report
    copy = sweep_dir.parent / "without_hydra"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("report"))
    for folder in copy.glob("*/.hydra"):
        shutil.rmtree(folder)
    assert not list(copy.glob("*/.hydra")) and (copy / "0" / "results.json").is_file()
    assert report_main([str(copy)]) == 0
    title = (report / "results.md").read_text().replace(str(sweep_dir), str(copy))
    assert (copy / "report" / "results.md").read_text() == title  # the sweep's name in it
    for name in ("results.csv", "grid.png", "plots/fid.png"):  # images: the records' paths
        assert (copy / "report" / name).read_bytes() == (report / name).read_bytes(), name


@pytest.mark.xdist_group("run_sweep")  # the module's sweep runs once, on one worker
def test_wandb_offline_run_and_evaluate_app(sweep, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sweep_dir, _ = sweep  # its dense cache is reused
    result = run_app(
        "obsdiff.run",
        "sparsity=0.4",
        *FAST[:-1],
        "tracking.mode=offline",
        f"paths.output_root={sweep_dir.parent}",
        f"hydra.run.dir={tmp_path / 'pruned'}",
        env={"WANDB_MODE": None},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "pruned").glob("wandb/offline-run-*/run-*.wandb"))
    assert "dense evaluation from the cache" in result.stdout + result.stderr

    evaluated = tmp_path / "evaluated"
    result = run_app(
        "obsdiff.evaluate",
        f"pruned={tmp_path / 'pruned'}",
        "eval=tiny",
        "eval.prompts.num_prompts=3",
        f"paths.output_root={sweep_dir.parent}",
        f"hydra.run.dir={evaluated}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again, first = RunRecord.read(evaluated), RunRecord.read(tmp_path / "pruned")
    assert again.identity.method == "obsdiff" and again.identity.sparsity == 0.4
    assert again.identity.pruned_run == str(tmp_path / "pruned")
    assert again.prune == first.prune  # the prune run's figures, carried over
    assert again.eval is not None and first.eval is not None
    # the saved pruned model, loaded in another process, reproduces the in-memory one's images
    # pixel for pixel (the same arithmetic on weights in allocator memory, obsdiff.utils.memory),
    # hence its scores exactly
    ours, theirs = Path(first.eval.images_dir), Path(again.eval.images_dir)
    images = sorted(ours.glob("*.png"))
    assert len(images) == 3 and ours != theirs
    for image in images:
        assert Image.open(image).tobytes() == Image.open(theirs / image.name).tobytes()
    assert again.eval.metrics["clip_score"] == first.eval.metrics["clip_score"]
    assert again.eval.metrics["fid"] == first.eval.metrics["fid"]


def test_bad_eval_settings_fail_before_any_work(tmp_path: Path) -> None:
    result = run_in_process(  # stops before any work: the app in this process
        "obsdiff.run",
        *TINY[:2],
        "eval=coco2014_5k",
        f"paths.data_root={tmp_path / 'data'}",
        f"paths.output_root={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "captions_val2014.json" in output and "does not exist" in output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()  # a run refused alone leaves no directory behind
    assert not (tmp_path / "dense").exists()  # nothing was computed


def test_reproduce_prints_one_sweep_and_report_per_recipe() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "experiments/reproduce.py", "table1", "--dry-run", "--launcher", "slurm"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("$ ")]
    assert len(lines) == 8  # four Table 1 models, each a sweep then a report
    assert all("hydra/launcher=slurm" in line for line in lines[::2])
    assert "+experiment=table1_flux_dev" in lines[0]
    assert "+experiment=table1_sd21_base" in lines[2]  # SD 2.1-base: OBS-Diff and baselines
