"""Offload on a CUDA device (run with `make test-gpu`): statistics accumulated in
pinned CPU memory from CUDA activations, and the text encoders and VAE off the device while
pruning, give the weights of the on-device run bit for bit, and hold less on the device."""

from __future__ import annotations

import pytest
import torch

import obsdiff
from obsdiff.models.tiny import tiny_sd3_pipeline


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star"]
SAMPLING = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 77}


@pytest.mark.parametrize("method", ["obsdiff", "wanda"])
def test_offload_on_cuda_prunes_the_same_weights(method: str) -> None:
    weights, peaks = [], []
    for offload in (False, True):
        pipe = tiny_sd3_pipeline()
        torch.cuda.reset_peak_memory_stats()
        pruned = obsdiff.prune(
            pipe, method, "unstructured", 0.5, prompts=PROMPTS, packages=1, sampling=SAMPLING,
            batch_size=2, device="cuda", offload_statistics=offload, offload_components=offload,
        )  # fmt: skip
        peaks.append(torch.cuda.max_memory_allocated())
        assert pipe.text_encoder.device.type == "cuda"  # put back for evaluation
        assert pruned.result.statistics_bytes > 0
        weights.append({k: v.cpu() for k, v in pipe.transformer.state_dict().items()})
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    assert peaks[1] < peaks[0]
