"""2:4 sparse kernels on CUDA (run with `make test-gpu`): a 2:4-pruned tiny model's
linears become semi-structured sparse weights where the kernels take their shapes, and the
denoiser's output equals the masked dense model's within fp16 tolerance."""

from __future__ import annotations

import pytest
import torch

import obsdiff
from obsdiff.models.sparse import use_sparse_kernels
from obsdiff.pruning.patterns import NM
from obsdiff.pruning.wanda import wanda_prune


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
        reason="needs a CUDA device of compute capability >= 8.0",
    ),
]


def test_a_two_four_linear_gives_the_masked_dense_output() -> None:
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=True)
    weight, _ = wanda_prune(linear.weight.data, torch.ones(512), NM(2, 4))
    linear.weight.data.copy_(weight)
    linear = linear.half().cuda()
    x = torch.randn(4, 64, 512, generator=g).half().cuda()
    dense = linear(x)
    report = use_sparse_kernels(torch.nn.Sequential(linear), ["0"])
    assert report.converted == ["0"]
    torch.testing.assert_close(linear(x), dense, rtol=1e-2, atol=1e-2)


def test_a_pruned_pipeline_loads_with_sparse_kernels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from obsdiff.models.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline().to(torch.float16)
    sampling = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 77}
    pruned = obsdiff.prune(
        pipe, "magnitude", "semi_2_4", 0.5, prompts=["a red circle"], packages=1,
        sampling=sampling, device="cuda", run_dir=tmp_path / "run",
    )  # fmt: skip
    kwargs = pruned.adapter.call_kwargs()
    kwargs.pop("negative_prompt", None)
    generator = torch.Generator().manual_seed(0)
    dense = pruned.pipeline("a red circle", generator=generator, output_type="latent", **kwargs)
    sparse = obsdiff.load_pruned(tmp_path / "run", pipeline=tiny_sd3_pipeline().to(torch.float16),
                                 sparse_kernels=True, device="cuda")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    out = sparse.pipeline("a red circle", generator=generator, output_type="latent", **kwargs)
    torch.testing.assert_close(out.images.float(), dense.images.float(), rtol=5e-2, atol=5e-2)
