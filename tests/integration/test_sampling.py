"""Sampling: image i always gets the noise of seed + i, and a run leaves a complete record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from obsdiff.eval.generation import generate, sample_to_dir
from obsdiff.models import SD3Adapter


pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "a green square", "a blue triangle"]


@pytest.fixture(scope="module")
def adapter() -> SD3Adapter:
    sampling = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 77}
    return SD3Adapter(name="tiny_sd3", tiny="sd3", sampling=sampling)


def test_noise_does_not_depend_on_the_batch_size(adapter: SD3Adapter) -> None:
    pipe = adapter.load()
    one_by_one = generate(pipe, adapter, PROMPTS, seed=7, batch_size=1, output_type="latent")
    batched = generate(pipe, adapter, PROMPTS, seed=7, batch_size=2, output_type="latent")
    other_seed = generate(pipe, adapter, PROMPTS[:1], seed=8, batch_size=1, output_type="latent")
    assert len(one_by_one) == len(batched) == len(PROMPTS)
    for a, b in zip(one_by_one, batched, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(one_by_one[0], other_seed[0])


def test_generate_rejects_empty_input(adapter: SD3Adapter) -> None:
    with pytest.raises(ValueError, match="no prompts"):
        generate(adapter.load(), adapter, [], seed=0, batch_size=1)


def test_sample_to_dir_writes_images_grid_and_record(adapter: SD3Adapter, tmp_path: Path) -> None:
    record = sample_to_dir(adapter, PROMPTS, 5, 2, torch.device("cpu"), tmp_path)
    assert [image["seed"] for image in record.images] == [5, 6, 7]
    for image in record.images:
        assert (tmp_path / image["file"]).is_file()
    assert (tmp_path / "grid.png").is_file()
    saved = json.loads((tmp_path / "samples.json").read_text())
    assert saved["model"]["name"] == "tiny_sd3" and saved["model"]["tiny"] == "sd3"
    assert saved["denoiser_parameters"] == record.denoiser_parameters > 0
    assert [image["prompt"] for image in saved["images"]] == PROMPTS
