"""Low-rank modulation (`modulation=low_rank`) on the tiny models: exact where the modulation
reads the timestep alone, combined with a method in one run, physically smaller, saved and
loaded back, in half precision too, and its bad settings refused before loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from app_runner import TINY_PRUNE, run_in_process
from diffusers import DiffusionPipeline

import obsdiff
from obsdiff.artifacts.pruned import PrunedModel
from obsdiff.artifacts.record import RunRecord
from obsdiff.models.sd3 import SD3Adapter
from obsdiff.models.surgery import LowRankLinear
from obsdiff.models.tiny import (
    tiny_pixart_pipeline,
    tiny_qwen_image_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)
from obsdiff.oneshot.job import JobError


pytestmark = pytest.mark.integration

STEPS = 4
SAMPLING = {"num_inference_steps": STEPS, "guidance_scale": 4.0, "height": 32, "width": 32}
PROMPTS = ["a red circle", "a blue square on green", "two yellow triangles", "a white star"]


def latents(pipe: DiffusionPipeline) -> torch.Tensor:
    call = {key: value for key, value in SAMPLING.items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPTS[:2], generator=generator, output_type="latent", **call).images


def saved_parameters(model: PrunedModel) -> int:
    """The parameters the manifest's low-rank records say the factorisation removes."""
    records = [r for r in model.manifest["records"] if r["type"] == "low_rank"]
    return sum(
        r["shape"][0] * r["shape"][1] - r["rank"] * (r["shape"][0] + r["shape"][1])
        for r in records
        if r["rank"] < min(r["shape"])
    )


def parameters(pipe: DiffusionPipeline, model: PrunedModel) -> int:
    return sum(p.numel() for p in model.adapter.denoiser(pipe).parameters())


@pytest.mark.parametrize(
    "build", [tiny_pixart_pipeline, tiny_sd_pipeline, tiny_qwen_image_pipeline]
)
def test_a_timestep_only_modulation_is_exact_at_the_rank_of_its_steps(
    build: Callable[[], DiffusionPipeline],
) -> None:
    """PixArt-Sigma's adaln_single, the UNets' time_emb_proj and Qwen-Image's img_mod/txt_mod
    read the timestep embedding alone: 4 sampling steps are at most 4 distinct inputs, so rank 4
    keeps all of their weighted energy and the images are the dense ones to float round-off; the
    denoiser is smaller by exactly what the records predict."""
    dense = build()
    model = obsdiff.prune(
        build(), "dense", "unstructured", 0.0, prompts=PROMPTS, sampling=SAMPLING,
        modulation={"rank": STEPS},
    )  # fmt: skip
    records = [r for r in model.manifest["records"] if r["type"] == "low_rank"]
    assert records and all(r["rank"] == STEPS for r in records)
    assert all(r["energy"] == pytest.approx(1.0, abs=1e-5) for r in records)  # float32 sums
    low = [m for m in model.denoiser.modules() if isinstance(m, LowRankLinear)]
    assert len(low) == len(records)
    assert parameters(dense, model) - parameters(model.pipeline, model) == saved_parameters(model)
    assert saved_parameters(model) > 0
    expected = latents(dense)
    torch.testing.assert_close(
        latents(model.pipeline), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
    )


def test_with_obs_diff_in_one_run_saved_and_loaded_back(tmp_path: Path) -> None:
    """OBS-Diff 50% unstructured with the modulation at 99% of its energy: the same sparsity of
    the target linears as without it, the modulation linears factorised (SD3's pooled text makes
    them inexact), the run saved, loaded back to the same images; in bfloat16 too."""
    plain = obsdiff.prune(tiny_sd3_pipeline(), prompts=PROMPTS, sampling=SAMPLING)
    run = tmp_path / "run"
    model = obsdiff.prune(
        tiny_sd3_pipeline(), prompts=PROMPTS, sampling=SAMPLING, run_dir=run,
        modulation={"energy": 0.99},
    )  # fmt: skip
    assert model.result is not None and plain.result is not None
    assert model.result.achieved_sparsity == plain.result.achieved_sparsity == 0.5
    names = SD3Adapter.modulation_patterns
    assert model.manifest["modulation"] == {"name": "low_rank", "energy": 0.99}
    records = [r for r in model.manifest["records"] if r["type"] == "low_rank"]
    assert len(records) == len(model.adapter.modulation_linears(plain.denoiser)) > 0 and names
    assert all(0.99 <= r["energy"] <= 1.0 for r in records)
    assert model.result.params_before - model.result.params_after == saved_parameters(model)
    loaded = obsdiff.load_pruned(run, pipeline=tiny_sd3_pipeline())
    torch.testing.assert_close(latents(loaded.pipeline), latents(model.pipeline), rtol=0, atol=0)

    half = obsdiff.prune(
        tiny_sd3_pipeline().to(torch.bfloat16), "magnitude", prompts=PROMPTS, sampling=SAMPLING,
        modulation={"rank": 2},
    )  # fmt: skip
    low = [m for m in half.denoiser.modules() if isinstance(m, LowRankLinear)]
    assert low and all(m.up.weight.dtype == torch.bfloat16 for m in low)
    assert torch.isfinite(latents(half.pipeline)).all()


def test_the_prune_app_factorises_the_modulation(tmp_path: Path) -> None:
    """`python -m obsdiff.prune modulation=low_rank modulation.rank=2`: the run's parameters
    drop by what its records predict, and it loads back."""
    run = tmp_path / "run"
    result = run_in_process(
        "obsdiff.prune", *TINY_PRUNE, "modulation=low_rank", "modulation.rank=2",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    record = RunRecord.read(run)
    assert record.prune is not None
    loaded = obsdiff.load_pruned(run)
    assert record.prune.params_before - record.prune.params_after == saved_parameters(loaded)
    assert parameters(loaded.pipeline, loaded) == record.prune.params_after
    assert all(r["rank"] == 2 for r in loaded.manifest["records"] if r["type"] == "low_rank")


def test_a_family_without_a_modulation_table_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SD3Adapter, "modulation_patterns", ())
    with pytest.raises(JobError, match="the sd3 family has no table of modulation linears"):
        obsdiff.prune(tiny_sd3_pipeline(), prompts=PROMPTS, modulation={"rank": 2})


def test_a_low_rank_model_recovers_with_lora_its_factors_left_as_they_are() -> None:
    """LoRA adapts the blocks' full linears, not the two halves of a rank-2 modulation linear
    (narrower than the LoRA rank): the recovery runs, and the factors stay rank 2."""
    model = obsdiff.prune(
        tiny_sd3_pipeline(), "magnitude", prompts=PROMPTS, sampling=SAMPLING,
        modulation={"rank": 2},
    )  # fmt: skip
    before = {n: m.up.weight.clone() for n, m in model.denoiser.named_modules()
              if isinstance(m, LowRankLinear)}  # fmt: skip
    recovered = obsdiff.recover(
        model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), steps=2, lr=1e-3, lora_rank=4
    )
    after = dict(recovered.denoiser.named_modules())
    assert before and all(isinstance(after[n], LowRankLinear) for n in before)
    assert all(torch.equal(after[n].up.weight, w) for n, w in before.items())  # frozen
