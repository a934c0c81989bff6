"""The tiny pipelines on a CUDA device (run with `make test-gpu` where a GPU is available)."""

from __future__ import annotations

import pytest
import torch

from obsdiff.eval.generation import generate
from obsdiff.models import SD3Adapter


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_sd3_on_cuda_matches_cpu_noise(dtype: str) -> None:
    sampling = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 77}
    adapter = SD3Adapter(name="tiny_sd3", tiny="sd3", dtype=dtype, sampling=sampling)
    prompts = ["a red circle", "a blue square"]
    cpu = generate(adapter.load(), adapter, prompts, seed=0, batch_size=2, output_type="latent")
    gpu_pipe = adapter.load().to("cuda")
    gpu = generate(gpu_pipe, adapter, prompts, seed=0, batch_size=2, output_type="latent")
    tolerance = 1e-3 if dtype == "float32" else 1e-1
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.isfinite(b).all()
        assert torch.allclose(a.float(), b.float().cpu(), atol=tolerance)
