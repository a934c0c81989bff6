"""Wan 2.2-A14B's two timestep experts, pruned as one run: each expert's statistics are fed by the
steps it runs alone, weighted by the scheme over its own steps, and the run records which; the
video model evaluated frame by frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from app_runner import run_in_process
from PIL import Image
from registry import tiny_adapter

import obsdiff
from obsdiff.calibration import sequential
from obsdiff.models.experts import Experts
from obsdiff.oneshot.job import JobError
from obsdiff.pruning import log_decrease


pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "a blue square on green"]


def test_each_expert_is_calibrated_on_its_own_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 steps (timesteps 999, 900, 750, 500; boundary 875): the high-noise `transformer` runs
    steps 0-1, `transformer_2` steps 2-3. Every statistics update of a `transformer` linear
    happens at steps 0-1 with log-decrease over 2 steps, of a `transformer_2` linear at steps
    2-3 with the same two weights; both experts are pruned to 50%, and the run reloads."""
    adapter = tiny_adapter("tiny_wan_a14b", sampling={"num_inference_steps": 4})
    pipe = adapter.load()
    denoiser = adapter.denoiser(pipe)
    assert isinstance(denoiser, Experts)
    names = {id(m): n for n, m in denoiser.named_modules()}
    fed: dict[str, list[tuple[int, float]]] = {"transformer": [], "transformer_2": []}
    real = sequential.StatisticsHooks._feed

    def spying(self, stats, weights):  # type: ignore[no-untyped-def]
        hook = real(self, stats, weights)

        def spy(module, args):  # type: ignore[no-untyped-def]
            step = self.tracker.step
            fed[names[id(module)].split(".")[0]].append((step, float(weights[step])))
            return hook(module, args)

        return spy

    monkeypatch.setattr(sequential.StatisticsHooks, "_feed", spying)
    run = tmp_path / "run"
    pruned = obsdiff.prune(
        pipe, "obsdiff", "unstructured", 0.5, prompts=PROMPTS, packages=1, run_dir=run,
        sampling={"num_inference_steps": 4, "num_frames": 9, "height": 64, "width": 64,
                  "guidance_scale": 4.0, "guidance_scale_2": 3.0, "negative_prompt": ""},
    )  # fmt: skip
    alpha = [float(w) for w in log_decrease(2)]
    assert {step for step, _ in fed["transformer"]} == {0, 1}
    assert {step for step, _ in fed["transformer_2"]} == {2, 3}
    assert set(fed["transformer"]) == {(0, alpha[0]), (1, alpha[1])}
    assert set(fed["transformer_2"]) == {(2, alpha[0]), (3, alpha[1])}
    assert pruned.manifest["experts"] == {
        "transformer": {"steps": [0, 1], "weights": [round(a, 6) for a in alpha]},
        "transformer_2": {"steps": [2, 3], "weights": [round(a, 6) for a in alpha]},
    }
    layers = [r["name"] for r in pruned.manifest["records"] if r["type"] == "layer"]
    experts = {name.split(".")[0] for name in layers}
    assert experts == {"transformer", "transformer_2"}  # what was pruned, per expert
    for name, module in pruned.denoiser.named_children():
        zeros = sum(int((m.weight == 0).sum()) for n, m in module.named_modules()
                    if f"{name}.{n}" in layers)  # fmt: skip
        total = sum(m.weight.numel() for n, m in module.named_modules() if f"{name}.{n}" in layers)
        assert zeros == total // 2, name
    loaded = obsdiff.load_pruned(run, pipeline=tiny_adapter("tiny_wan_a14b").load())
    for (_, a), (_, b) in zip(
        pruned.denoiser.named_children(), loaded.denoiser.named_children(), strict=True
    ):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_depth_pruning_of_experts_is_refused_before_calibration() -> None:
    pipe = tiny_adapter("tiny_wan_a14b").load()
    with pytest.raises(JobError, match="2 timestep experts, each run on its own steps"):
        obsdiff.prune(pipe, "block_cosine", "depth", 0.3, prompts=PROMPTS)


def test_a_video_model_is_evaluated_frame_by_frame(tmp_path: Path) -> None:
    """`python -m obsdiff.run model=tiny_wan_a14b eval=tiny_video`: each video's frames and
    animated preview on disk; every frame scored against its prompt and the dense model's frame
    (per_frame.csv); a video's score the mean of its frames'."""
    result = run_in_process(
        "obsdiff.run", "model=tiny_wan_a14b", "eval=tiny_video", "calibration=tiny",
        "model.sampling.num_inference_steps=4", f"hydra.run.dir={tmp_path}",
        f"paths.output_root={tmp_path / 'outputs'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    frames = pd.read_csv(tmp_path / "eval" / "per_frame.csv")
    videos = pd.read_csv(tmp_path / "eval" / "per_image.csv")
    assert len(videos) == 2 and len(frames) == 2 * 9  # 9 frames a video
    for name in ("clip_score", "psnr", "ssim", "lpips"):
        means = frames.groupby("id")[name].mean()
        assert np.allclose(videos.set_index("id")[name].loc[means.index], means), name
    for file in videos["file"]:
        preview = tmp_path / "eval" / file
        assert Image.open(preview).n_frames == 9
        assert len(list(preview.with_suffix("").glob("*.png"))) == 9
