"""Every family (one tiny model each, from the registry) through the options of a prune run:
module packages, statistics offloaded and cached, low-rank modulation and depth pruning where the
family has them, the run saved and loaded back, exported as a plain diffusers folder, resumed
after a failure; every family through a sweep of the run app and its report."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from app_runner import run_in_process
from diffusers import DiffusionPipeline
from registry import TINY_BY_ADAPTER, tiny_adapter

import obsdiff
from obsdiff.artifacts.record import RunRecord
from obsdiff.calibration import sequential
from obsdiff.calibration.packages import list_units
from obsdiff.models import ModelAdapter
from obsdiff.report import main as report_main


pytestmark = pytest.mark.integration

FAMILIES = [models[0] for models in TINY_BY_ADAPTER.values()]  # one tiny model a family
PROMPTS = ["a red circle", "a blue square on green", "two yellow triangles"]


def setup(model: str) -> tuple[ModelAdapter, dict[str, object]]:
    adapter = tiny_adapter(model, sampling={"num_inference_steps": 2})
    return adapter, asdict(adapter.sampling)


def latents(pipe: DiffusionPipeline, adapter: ModelAdapter) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        call = adapter.call_kwargs()
        out = pipe(prompt=PROMPTS[:2], generator=generator, output_type="latent", **call)
        return adapter.outputs(out)


@pytest.mark.parametrize("model", FAMILIES)
def test_packages_offload_cache_modulation_save_load_export(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OBS-Diff 50% in 2 packages, statistics offloaded and cached, the modulation low rank
    where the family has a table: the run reloads and its plain diffusers export loads to the
    same latents; Wanda then reads the cached first package (no calibration pass for it)."""
    adapter, sampling = setup(model)
    run, cache = tmp_path / "run", tmp_path / "cache"
    modulation = {"energy": 0.99} if adapter.modulation_patterns else None
    options = {
        "prompts": PROMPTS, "sampling": sampling, "packages": 2, "offload_statistics": True,
        "statistics_cache": cache,
    }  # fmt: skip
    pruned = obsdiff.prune(
        adapter.load(), "obsdiff", "unstructured", 0.5, run_dir=run, modulation=modulation,
        **options,
    )  # fmt: skip
    assert pruned.result is not None and pruned.result.achieved_sparsity == 0.5
    expected = latents(pruned.pipeline, adapter)
    loaded = obsdiff.load_pruned(run, pipeline=adapter.load())
    assert torch.equal(latents(loaded.pipeline, adapter), expected)
    exported = obsdiff.export(
        run, tmp_path / "export", pipeline=adapter.load(), expand_low_rank=modulation is not None
    )
    plain = DiffusionPipeline.from_pretrained(exported)  # diffusers alone (weights own memory
    plain.set_progress_bar_config(disable=True)  # as loaded: allclose, not bit-equal)
    scale = float(expected.abs().max())
    torch.testing.assert_close(latents(plain, adapter), expected, rtol=1e-3, atol=1e-3 * scale)

    passes: list[int] = []
    real = sequential.StatisticsHooks.attached

    def counting(self):  # type: ignore[no-untyped-def]
        passes.append(len(self.groups))
        return real(self)

    monkeypatch.setattr(sequential.StatisticsHooks, "attached", counting)
    again = obsdiff.prune(adapter.load(), "wanda", "unstructured", 0.5, **options)
    assert again.result is not None and again.result.achieved_sparsity == 0.5
    assert len(passes) == 1  # the second package only: the first came from the cache


@pytest.mark.parametrize(
    "model", [m for m in FAMILIES if tiny_adapter(m).depth_lists]
)  # the UNets' blocks cannot be removed
def test_depth_pruning_removes_blocks_that_load_back(model: str, tmp_path: Path) -> None:
    adapter, sampling = setup(model)
    run = tmp_path / "run"
    pruned = obsdiff.prune(
        adapter.load(), "block_cosine", "depth", 0.3, prompts=PROMPTS, sampling=sampling,
        run_dir=run,
    )  # fmt: skip
    removed = [r for r in pruned.manifest["records"] if r["type"] == "block"]
    assert removed and pruned.result is not None
    assert pruned.result.params_after < pruned.result.params_before
    loaded = obsdiff.load_pruned(run, pipeline=adapter.load())
    assert torch.equal(latents(loaded.pipeline, adapter), latents(pruned.pipeline, adapter))


@pytest.mark.parametrize("model", FAMILIES)
def test_structured_resume_after_a_failure_gives_the_same_weights(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OBS-Diff structured 25% over every block in up to 4 packages, stopped by a failure in
    the last package and run again: every other package's cut is restored from the checkpoint
    (widths, head counts, FLUX.2's fused widths, Wan's q/k norms) and the result equals an
    uninterrupted run's."""
    adapter, sampling = setup(model)
    skeleton = adapter.denoiser_skeleton()
    blocks = (0, len(adapter.blocks(skeleton)))
    count = min(4, len(list_units(adapter, skeleton, blocks, structured=True)))
    options = {"prompts": PROMPTS[:2], "sampling": sampling, "packages": count, "blocks": blocks}
    whole = obsdiff.prune(adapter.load(), "obsdiff", "structured", 0.25, **options)
    real, calls = sequential.build_package, {"n": 0}

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == count:
            raise RuntimeError("injected failure in the last package")
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(sequential, "build_package", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        obsdiff.prune(adapter.load(), "obsdiff", "structured", 0.25, run_dir=run, **options)
    monkeypatch.setattr(sequential, "build_package", real)
    resumed = obsdiff.prune(adapter.load(), "obsdiff", "structured", 0.25, run_dir=run, **options)
    expected = whole.denoiser.state_dict()
    assert resumed.denoiser.state_dict().keys() == expected.keys()
    for name, tensor in resumed.denoiser.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert latents(resumed.pipeline, adapter).equal(latents(whole.pipeline, adapter))


@pytest.mark.slow
def test_every_family_through_a_sweep_of_the_run_app_and_its_report(tmp_path: Path) -> None:
    """One sweep of `obsdiff.run` over every family's tiny model (the image models with
    eval=tiny, the video models with eval=tiny_video, two sweeps under one folder), then the
    report over both: each job pruned, evaluated against its dense model and in the report."""
    video = [m for m in FAMILIES if tiny_adapter(m).video]
    images = [m for m in FAMILIES if m not in video]
    common = [
        "calibration=tiny", "calibration.num_prompts=2", "model.sampling.num_inference_steps=2",
        "eval.prompts.num_prompts=2", "save=false", f"paths.output_root={tmp_path}",
    ]  # fmt: skip
    for models, evaluation in ((images, "tiny"), (video, "tiny_video")):
        result = run_in_process(
            "obsdiff.run", "--multirun", f"model={','.join(models)}", f"eval={evaluation}",
            *common, f"hydra.sweep.dir={tmp_path / 'sweep' / evaluation}",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:]
    records = [RunRecord.read(p.parent) for p in (tmp_path / "sweep").glob("*/*/results.json")]
    assert sorted(r.identity.model for r in records) == sorted(FAMILIES)  # type: ignore[type-var]
    for record in records:
        assert record.completed and record.prune is not None and record.eval is not None
        assert record.prune.achieved_sparsity == pytest.approx(0.5)
        assert record.dense is not None and {"psnr", "ssim", "lpips"} <= set(record.eval.metrics)
        frames = record.identity.model in video
        assert record.eval.set == ("tiny_video" if frames else "tiny")
        assert (Path(record.eval.per_image).parent / "per_frame.csv").is_file() == frames

    assert report_main([str(tmp_path / "sweep")]) == 0
    rows = pd.read_csv(tmp_path / "sweep" / "report" / "results.csv")
    pruned = rows[rows["method"] == "obsdiff"]
    assert sorted(pruned["model"]) == sorted(FAMILIES) and set(pruned["status"]) == {"completed"}
    assert pruned["psnr"].notna().all() and pruned["clip_score"].notna().all()
    assert set(rows.loc[rows["method"] == "dense", "model"]) == set(FAMILIES)
