"""The run and evaluate apps end to end on a tiny model: a sweep with a failed job, its report,
the dense cache, W&B offline, evaluation of a saved pruned run, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from app_runner import REPO_ROOT, run_app
from PIL import Image


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


def load(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def test_sweep_records_every_job_with_dense_and_pruned_metrics(sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_dir, output = sweep
    results = {
        (r["method"], r["sparsity"]): r
        for r in (load(p) for p in sorted(sweep_dir.glob("*/results.json")))
    }
    assert len(results) == 6, output[-3000:]
    failed = {k for k, r in results.items() if r["status"] == "failed"}
    assert failed == {("l1", 0.3), ("l1", 0.5)}
    assert all("structured" in results[k]["error"] for k in failed)
    done = [r for k, r in results.items() if k not in failed]
    for r in done:
        assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=1e-3)
        for section in ("eval", "dense"):
            metrics = r[section]
            assert metrics["num_images"] == 3 and 0 <= metrics["clip_score"] <= 1
            assert len(list(Path(metrics["images_dir"]).glob("*.png"))) == 3
            assert metrics["seconds_per_image"] > 0
        assert r["eval"]["fid"] > 0 and "fid" not in r["dense"]  # FID against the dense images
        assert r["eval"]["params"] == r["dense"]["params"]  # unstructured: zeros, same shapes
    # the dense model was evaluated once and shared by every job of the sweep
    assert len({r["dense"]["images_dir"] for r in done}) == 1
    assert output.count("dense evaluation from the cache") == len(done) - 1
    fids = {(r["method"], r["sparsity"]): r["eval"]["fid"] for r in done}
    assert len(set(fids.values())) == 4  # every pruned model has its own images


def test_report_of_the_sweep(sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_dir, _ = sweep
    result = run_app("obsdiff.report", str(sweep_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = sweep_dir / "report"
    rows = list(csv.DictReader((report / "results.csv").open()))
    statuses = sorted((r["method"], r["sparsity"], r["status"]) for r in rows)
    assert ("l1", "0.3", "failed") in statuses and ("l1", "0.5", "failed") in statuses
    assert sum(r["status"] == "completed" and r["method"] != "dense" for r in rows) == 4
    assert sum(r["method"] == "dense" for r in rows) == 1
    markdown = (report / "results.md").read_text()
    assert "Jobs that did not complete" in markdown and markdown.count("l1") >= 2
    assert "**" in markdown  # the best method per sparsity in bold
    for metric in ("fid", "clip_score"):
        assert Image.open(report / "plots" / f"{metric}.png").size[0] > 100
    grid = Image.open(report / "grid.png")
    assert grid.size[0] > grid.size[1] > 64  # 2 methods x (dense + 2 sparsities)


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
    again, first = load(evaluated / "results.json"), load(tmp_path / "pruned" / "results.json")
    assert again["method"] == "obsdiff" and again["sparsity"] == 0.4
    # the saved pruned model, loaded in another process, reproduces the in-memory one's images
    # pixel for pixel (the same arithmetic on weights in allocator memory, obsdiff.utils.memory),
    # hence its scores exactly
    ours, theirs = Path(first["eval"]["images_dir"]), Path(again["eval"]["images_dir"])
    images = sorted(ours.glob("*.png"))
    assert len(images) == 3 and ours != theirs
    for image in images:
        assert Image.open(image).tobytes() == Image.open(theirs / image.name).tobytes()
    assert again["eval"]["clip_score"] == first["eval"]["clip_score"]
    assert again["eval"]["fid"] == first["eval"]["fid"]


def test_bad_eval_settings_fail_before_any_work(tmp_path: Path) -> None:
    result = run_app(
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
    assert len(lines) == 6  # three Table 1 models, each a sweep then a report
    assert all("hydra/launcher=slurm" in line for line in lines[::2])
    assert "+experiment=table1_flux_dev" in lines[0]
