"""Quantization on CUDA (run with `make test-gpu`): the GPU schemes on a 2:4-pruned tiny model,
every pruned zero kept by float8 (symmetric), int4's near-zeros counted, outputs close to the
unquantized model's."""

from __future__ import annotations

import pytest
import torch

import obsdiff
from obsdiff.models.tiny import tiny_sd3_pipeline


CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CAPABILITY < (8, 0), reason="needs a CUDA device of capability >= 8.0"),
]
PROMPTS = ["a red circle"]


def pruned_tiny() -> obsdiff.api.PrunedModel:
    pipe = tiny_sd3_pipeline(seed=0).to(torch.bfloat16)
    sampling = {"num_inference_steps": 2}
    return obsdiff.prune(pipe, "magnitude", "semi_2_4", 0.5, prompts=PROMPTS, sampling=sampling)


def latents(pruned: obsdiff.api.PrunedModel) -> torch.Tensor:
    generator = torch.Generator("cuda").manual_seed(0)
    out = pruned.pipeline(PROMPTS, generator=generator, output_type="latent",
                          num_inference_steps=2, height=64, width=64)  # fmt: skip
    return out.images.float()


@pytest.mark.skipif(CAPABILITY < (8, 9), reason="float8 needs compute capability >= 8.9")
@pytest.mark.parametrize("scheme", ["float8_weight_only", "float8_dynamic"])
def test_float8_keeps_every_pruned_zero(scheme: str) -> None:
    pruned = pruned_tiny()
    pruned.pipeline.to("cuda")
    before = latents(pruned)
    result = obsdiff.quantize(pruned, scheme, device="cuda").quantization
    assert result is not None and result.zeros_kept == result.zeros_before > 0
    assert result.weight_bytes_after < result.weight_bytes_before
    after = latents(pruned)
    assert float((after - before).norm() / before.norm()) < 0.2


def test_int4_runs_and_counts_the_zeros_it_keeps() -> None:
    pruned = pruned_tiny()
    pruned.pipeline.to("cuda")
    result = obsdiff.quantize(pruned, "int4_weight_only", group_size=32, device="cuda").quantization
    assert result is not None and 0 <= result.zeros_kept <= result.zeros_before
    assert torch.isfinite(latents(pruned)).all()
