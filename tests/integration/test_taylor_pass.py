"""Diff-Pruning's Taylor pass on every image family's tiny model: the dense model's own samples
as clean latents, its own training loss walked from the low-noise end, a score for every
weight of every pruning target (a video family's from its videos)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from registry import TINY_BY_ADAPTER, tiny_adapter
from torch import nn

from obsdiff.calibration.packages import list_units
from obsdiff.calibration.taylor import level_fraction, training_loss
from obsdiff.models import ModelAdapter
from obsdiff.models.training import is_flow_matching, training_schedule
from obsdiff.pruning.taylor import taylor_scores


pytestmark = pytest.mark.integration

FAMILIES = [models[0] for models in TINY_BY_ADAPTER.values()]
PROMPTS = ["a red circle", "a blue square on green"]


def setup(model: str) -> tuple[ModelAdapter, Any, nn.Module, dict[str, nn.Module]]:
    """The tiny model's adapter, pipeline, denoiser and its pruning targets (every block)."""
    adapter = tiny_adapter(model, sampling={"num_inference_steps": 2})
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    denoiser = adapter.denoiser(pipe)
    blocks = (0, len(adapter.blocks(denoiser)))
    names = [n for ref in list_units(adapter, denoiser, blocks) for n in ref.module_names]
    return adapter, pipe, denoiser, {name: denoiser.get_submodule(name) for name in names}


@pytest.mark.parametrize("model", FAMILIES)
def test_every_target_weight_gets_a_score_from_the_low_noise_end(model: str) -> None:
    adapter, pipe, denoiser, targets = setup(model)
    before = {name: linear.weight.detach().clone() for name, linear in targets.items()}
    scores = taylor_scores(
        denoiser, targets, training_loss(adapter, pipe, PROMPTS, levels=4), threshold=1e-9,
        levels=4,
    )  # type: ignore[arg-type]  # fmt: skip
    assert scores.levels == [0, 1, 2, 3] and all(loss > 0 for loss in scores.losses)
    for name, score in scores.weights.items():
        assert score.shape == targets[name].weight.shape and torch.isfinite(score).all(), name
        assert (score >= 0).all(), name
        assert torch.equal(targets[name].weight, before[name])  # scored, not changed
    # a weight whose output nothing reads has no gradient: only the text stream of an MMDiT's
    # last joint block, whose text output the model drops (SD3's text queries, Qwen-Image's
    # whole text side), which Diff-Pruning cuts first
    last = adapter.blocks(denoiser)[-1][0]
    text = ("add_q_proj", "to_add_out", "txt_mlp", "ff_context")
    unread = [name for name, score in scores.weights.items() if score.sum() == 0]
    assert all(n.startswith(last) and any(t in n for t in text) for n in unread), unread
    assert len(unread) < len(targets) / 4
    assert all(p.grad is None for p in denoiser.parameters())

    schedule = training_schedule(pipe)  # the walk starts at the least noise
    first, second = (level_fraction(schedule, level, 4) for level in (0, 1))
    assert (first > second) if is_flow_matching(schedule) else (first < second)


def test_each_timestep_expert_is_scored_on_its_own_levels() -> None:
    """Wan 2.2-A14B: a level at or above the boundary (t >= 875) reaches the high-noise expert
    alone, a level below it the low-noise one: walked from the low-noise end, the first levels
    score only `transformer_2`, the whole walk both."""
    adapter, pipe, denoiser, targets = setup("tiny_wan_a14b")

    def totals(levels: int) -> dict[str, float]:
        loss = training_loss(adapter, pipe, PROMPTS, levels=8)
        scores = taylor_scores(denoiser, targets, loss, threshold=1e-9, levels=levels)
        by_expert = {"transformer": 0.0, "transformer_2": 0.0}
        for name, score in scores.weights.items():
            by_expert[name.split(".")[0]] += float(score.sum())
        return by_expert

    first = totals(2)  # sigmas 1/16 and 3/16 of the way: the low-noise expert's steps
    assert first["transformer"] == 0 and first["transformer_2"] > 0
    every = totals(8)
    assert every["transformer"] > 0 and every["transformer_2"] > 0


def test_an_image_folder_gives_the_clean_latents_and_conditioning(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`method.images`: the folder's first images (resized and cropped to the sampling size,
    encoded by the VAE) with their captions' conditioning feed the loss, in place of the model's
    own samples of the prompts: other losses, other scores; the prune records the folder."""
    from images import image_folder

    import obsdiff
    from obsdiff.calibration.taylor import folder_samples
    from obsdiff.models.tiny import tiny_sd3_pipeline
    from obsdiff.prompts.image_folder import read_image_folder

    folder = image_folder(tmp_path / "images", 3)
    adapter, pipe, denoiser, targets = setup("tiny_sd3")
    pairs = read_image_folder(folder, "method.images")[:2]
    (args, kwargs), latents = folder_samples(adapter, pipe, pairs)
    assert latents.shape[0] == 2 and latents.shape[1:] == adapter.latent_shape(pipe.components)
    own = taylor_scores(denoiser, targets, training_loss(adapter, pipe, PROMPTS, 4), 1e-9, 2)
    real = training_loss(adapter, pipe, PROMPTS, 4, images=pairs)
    scores = taylor_scores(denoiser, targets, real, 1e-9, 2)
    assert scores.losses != own.losses
    name = next(iter(targets))
    assert not torch.equal(scores.weights[name], own.weights[name])
    sampling = {"num_inference_steps": 2, "guidance_scale": 4.0, "height": 32, "width": 32}
    model = obsdiff.prune(
        tiny_sd3_pipeline(), "diff_pruning", "unstructured", 0.5, prompts=PROMPTS,
        sampling=sampling, levels=2, images=str(folder),
    )  # fmt: skip
    assert model.manifest["method"]["images"] == str(folder)
    assert model.manifest["taylor"]["levels"] == [0, 1]


def test_an_image_folder_for_a_video_model_is_refused_before_loading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app_runner import TINY_PRUNE, run_in_process
    from images import image_folder

    folder = image_folder(tmp_path / "images", 2)
    result = run_in_process(
        "obsdiff.prune", *TINY_PRUNE, "model=tiny_wan", "method=diff_pruning",
        f"method.images={folder}", f"paths.output_root={tmp_path / 'runs'}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1
    assert "makes videos, whose clean latents an image folder cannot give" in output
    runs = tmp_path / "runs"
    assert "loaded model" not in output and not (runs.exists() and any(runs.iterdir()))
