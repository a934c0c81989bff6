"""Calibrate once for a sweep: the first package's statistics are reused by every job that shares
them, give the same weights as a fresh pass, and are never reused where anything they depend on
differs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from obsdiff.app.config import CONF_DIR
from obsdiff.app.settings import build_prune_job
from obsdiff.calibration import sequential
from obsdiff.calibration.cache import cache_key
from obsdiff.oneshot.job import PruneJob, plan_packages
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline


pytestmark = pytest.mark.integration

FAST = ["model=tiny_sd3", "calibration=tiny", "model.sampling.num_inference_steps=2"]
FAST += ["calibration.num_prompts=2"]


@pytest.fixture
def job_for() -> Iterator[Callable[..., PruneJob]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _job(*overrides: str) -> PruneJob:
            cfg: DictConfig = compose(config_name="prune", overrides=[*FAST, *overrides])
            return build_prune_job(cfg)

        yield _job


def denoiser_weights(job: PruneJob, root: Path) -> dict[str, torch.Tensor]:
    run_dir = root / str(len(list(root.glob("*"))) if root.exists() else 0)  # a fresh one
    pruned = prune_pipeline(replace(job, save=False), run_dir)
    return {k: v.clone() for k, v in job.model.denoiser(pruned.pipeline).state_dict().items()}


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calibration passes run, by package index (hooks attached)."""
    found: list[int] = []
    real = sequential.StatisticsHooks

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        found.append(len(found))
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "StatisticsHooks", counting)
    return found


def test_one_calibration_serves_every_method_with_the_same_weights(
    job_for, passes: list[int], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cache = f"statistics_cache={tmp_path / 'cache'}"
    first = denoiser_weights(job_for("packages=1", cache), tmp_path / "a")
    assert len(passes) == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    for overrides in (
        ["method=wanda", "granularity=semi_2_4"],
        ["method=dsnot", "sparsity=0.3"],
        ["method=obsdiff", "sparsity=0.7"],
    ):
        passes.clear()
        cached = denoiser_weights(job_for("packages=1", cache, *overrides), tmp_path / "b")
        assert passes == [], overrides  # no calibration pass: read from the cache
        fresh = denoiser_weights(job_for("packages=1", *overrides), tmp_path / "c")
        assert passes == [0], overrides
        assert cached.keys() == fresh.keys()
        for name in fresh:
            assert torch.equal(cached[name], fresh[name]), (overrides, name)
    same = denoiser_weights(job_for("packages=1", cache), tmp_path / "d")  # OBS-Diff again
    assert all(torch.equal(same[name], first[name]) for name in first)


def test_with_packages_only_the_first_is_reused(job_for, passes: list[int], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = f"statistics_cache={tmp_path / 'cache'}"
    job = job_for("packages=3", cache)
    denoiser_weights(job, tmp_path / "a")
    assert len(passes) == 3
    passes.clear()
    wanda = replace(job_for("packages=3", cache, "method=wanda"), save=False)
    result = prune_pipeline(wanda, tmp_path / "b").result
    assert len(passes) == 2  # packages 2 and 3 see pruned earlier ones: calibrated
    plan = memory_plan(wanda)  # the first package holds both kinds, the others moments only
    assert result.statistics_bytes == plan.statistics_peak_bytes == plan.package_statistics[0]
    assert (
        plan.package_statistics[0]
        > memory_plan(replace(wanda, statistics_cache=None)).statistics_peak_bytes
    )


def test_anything_the_statistics_depend_on_changes_the_key(job_for) -> None:  # type: ignore[no-untyped-def]
    def key(*overrides: str) -> str:
        job = job_for("packages=2", *overrides)
        packages, _ = plan_packages(job, job.model.denoiser_skeleton())
        return cache_key(job.first_package_identity(packages[0], world_size=1))

    base = key()
    for same in ("method=wanda", "sparsity=0.3", "granularity=semi_2_4", "device=cpu"):
        assert key(same) == base, same
    changed = [
        "calibration.seed=1",
        "calibration.num_prompts=1",
        "calibration.batch_size=1",
        "calibration.include_uncond=false",
        "calibration.hessian_precision=bfloat16",
        "weighting=uniform",
        "model.sampling.num_inference_steps=3",
        "model.sampling.guidance_scale=3.0",
        "model.dtype=bfloat16",
        "model.seed=1",  # other tiny weights
        "blocks=[1,4]",
        "packages=1",  # the first package holds other layers
        "granularity=structured",
        "method.token_weighting=cfg_response",  # weighted Hessians
    ]
    keys = {override: key(override) for override in changed}
    for override, found in keys.items():
        assert found != base, override
    assert len(set(keys.values())) == len(changed)
    job = job_for("packages=2")
    packages, _ = plan_packages(job, job.model.denoiser_skeleton())
    identity = job.first_package_identity(packages[0], world_size=1)
    assert cache_key(job.first_package_identity(packages[0], world_size=2)) != base
    assert cache_key({**identity, "weights": "another checkpoint"}) != base
