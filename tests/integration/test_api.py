"""The Python API prunes a pipeline in memory exactly as the prune app does."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from app_runner import run_app
from diffusers import DiffusionPipeline

from obsdiff.api import prune
from obsdiff.calibration.prompts import load_prompts
from obsdiff.config import DATA_DIR
from obsdiff.models import ModelConfigError
from obsdiff.models.tiny import tiny_sd3_pipeline


pytestmark = pytest.mark.slow

TOY = DATA_DIR / "toy" / "pipeline"
SAMPLING = {"num_inference_steps": 4, "guidance_scale": 4.0, "height": 32, "width": 32}
SAMPLING |= {"max_sequence_length": 4}  # as conf/model/toy.yaml, at 4 steps
CLI = ["model=toy", "calibration=toy", "model.sampling.num_inference_steps=4"]
CLI += ["calibration.num_prompts=8", "packages=2"]


@pytest.mark.parametrize(
    ("granularity", "sparsity"), [("unstructured", 0.5), ("semi_2_4", 0.5), ("structured", 0.2)]
)
def test_prune_in_memory_equals_the_prune_app(
    granularity: str, sparsity: float, tmp_path: Path
) -> None:
    result = run_app(
        "obsdiff.prune", *CLI, f"granularity={granularity}", f"sparsity={sparsity}",
        f"hydra.run.dir={tmp_path / 'cli'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = safetensors.torch.load_file(str(tmp_path / "cli" / "denoiser.safetensors"))

    # plain diffusers; an SD3 pipeline saved without T5 needs both components passed as None
    pipe = DiffusionPipeline.from_pretrained(str(TOY), text_encoder_3=None, tokenizer_3=None)
    prompts = load_prompts(DATA_DIR / "toy" / "calibration_prompts.txt", num_prompts=8)
    results = prune(
        pipe, "obsdiff", granularity, sparsity, prompts=prompts.prompts, packages=2,
        sampling=SAMPLING, batch_size=16, device="cpu",
    )  # fmt: skip
    state = pipe.transformer.state_dict()  # pruned in place
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert results["granularity"] == granularity and results["achieved_sparsity"] > 0


def test_a_run_of_a_pipeline_in_memory_loads_back_into_its_base(tmp_path: Path) -> None:
    from obsdiff.pruned import load_pruned

    prompts = load_prompts(DATA_DIR / "toy" / "calibration_prompts.txt", num_prompts=4).prompts
    pipe = DiffusionPipeline.from_pretrained(str(TOY), text_encoder_3=None, tokenizer_3=None)
    prune(pipe, "l1", "structured", 0.2, prompts=prompts, packages=2, sampling=SAMPLING,
          run_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="pruned a pipeline in memory.*pipeline=<it>"):
        load_pruned(tmp_path)
    base = DiffusionPipeline.from_pretrained(str(TOY), text_encoder_3=None, tokenizer_3=None)
    loaded, adapter, manifest = load_pruned(tmp_path, pipeline=base)
    assert loaded is base and manifest["granularity"] == "structured"
    state, pruned = loaded.transformer.state_dict(), pipe.transformer.state_dict()
    assert state.keys() == pruned.keys()
    assert all(torch.equal(state[k], pruned[k]) for k in state)


def test_an_unsupported_pipeline_or_setting_gets_one_clear_error() -> None:
    pipe = tiny_sd3_pipeline()
    with pytest.raises(ValueError, match="method='nosuch'; use one of obsdiff, wanda"):
        prune(pipe, "nosuch", prompts=["a cat"])
    with pytest.raises(ValueError, match="granularity='semi_3_4'; use one of"):
        prune(pipe, granularity="semi_3_4", prompts=["a cat"])
    with pytest.raises(ValueError, match="prompts is empty"):
        prune(pipe, prompts=[])

    class OtherPipeline:
        pass

    with pytest.raises(ModelConfigError, match="OtherPipeline cannot be pruned.*FluxPipeline"):
        prune(OtherPipeline(), prompts=["a cat"])  # type: ignore[arg-type]
