"""The Python API (`obsdiff.prune`, `save_pruned`, `load_pruned`, `evaluate`) prunes and
evaluates a pipeline in memory exactly as the apps do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from app_runner import run_app
from diffusers import DiffusionPipeline
from PIL import Image

import obsdiff
from obsdiff.app.config import DATA_DIR
from obsdiff.models import ModelConfigError
from obsdiff.models.tiny import tiny_sd3_pipeline
from obsdiff.prompts.files import load_prompts


pytestmark = pytest.mark.slow

TOY = DATA_DIR / "toy" / "pipeline"
SAMPLING = {"num_inference_steps": 4, "guidance_scale": 4.0, "height": 32, "width": 32}
SAMPLING |= {"max_sequence_length": 4}  # as conf/model/toy.yaml, at 4 steps
CLI = ["model=toy", "calibration=toy", "model.sampling.num_inference_steps=4"]
CLI += ["calibration.num_prompts=8", "packages=2"]


GRANULARITIES = ["unstructured", "semi_2_4", "structured"]  # sweep jobs 0, 1, 2 at 50%


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prune app's sweep over the three granularities: one process for the three runs."""
    sweep = tmp_path_factory.mktemp("cli")
    result = run_app(
        "obsdiff.prune", "-m", *CLI, f"granularity={','.join(GRANULARITIES)}", "sparsity=0.5",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


@pytest.mark.xdist_group("api_cli_sweep")  # the sweep runs once, on one worker
@pytest.mark.parametrize("job", range(len(GRANULARITIES)))
def test_prune_in_memory_equals_the_prune_app(job: int, cli_sweep: Path, tmp_path: Path) -> None:
    granularity, sparsity = GRANULARITIES[job], 0.5
    saved = safetensors.torch.load_file(str(cli_sweep / str(job) / "denoiser.safetensors"))

    # plain diffusers; an SD3 pipeline saved without T5 needs both components passed as None
    pipe = DiffusionPipeline.from_pretrained(str(TOY), text_encoder_3=None, tokenizer_3=None)
    prompts = load_prompts(DATA_DIR / "toy" / "calibration_prompts.txt", num_prompts=8)
    pruned = obsdiff.prune(
        pipe, "obsdiff", granularity, sparsity, prompts=prompts.prompts, packages=2,
        sampling=SAMPLING, batch_size=16, device="cpu", run_dir=tmp_path / "api",
    )  # fmt: skip
    state = pipe.transformer.state_dict()  # pruned in place
    assert pruned.pipeline is pipe and state.keys() == saved.keys()
    written = safetensors.torch.load_file(str(tmp_path / "api" / "denoiser.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor) and torch.equal(written[name], tensor), name
    runs = (cli_sweep / str(job), tmp_path / "api")
    manifests = [json.loads((run / "manifest.json").read_text()) for run in runs]
    assert manifests[0]["records"] == manifests[1]["records"]
    assert manifests[0].get("structure") == manifests[1].get("structure")
    assert not (tmp_path / "api" / "checkpoint").exists()  # gone once the model is saved
    assert pruned.manifest["granularity"] == granularity
    assert pruned.result is not None and pruned.result.achieved_sparsity > 0


def test_save_load_and_evaluate_a_pipeline_in_memory(tmp_path: Path) -> None:
    """prune -> save_pruned -> load_pruned (into its base: the manifest names no files) ->
    evaluate gives the images and scores of the pruned pipeline itself."""
    prompts = load_prompts(DATA_DIR / "toy" / "calibration_prompts.txt", num_prompts=4).prompts
    pipe = DiffusionPipeline.from_pretrained(str(TOY), text_encoder_3=None, tokenizer_3=None)
    pruned = obsdiff.prune(
        pipe, "l1", "structured", 0.2, prompts=prompts, packages=2, sampling=SAMPLING
    )
    assert not any(tmp_path.iterdir())  # nothing written until saved
    obsdiff.save_pruned(pruned, tmp_path / "run")
    with pytest.raises(ValueError, match="pruned a pipeline in memory.*pipeline=<it>"):
        obsdiff.load_pruned(tmp_path / "run")
    base = DiffusionPipeline.from_pretrained(str(TOY), text_encoder_3=None, tokenizer_3=None)
    loaded = obsdiff.load_pruned(tmp_path / "run", pipeline=base)
    assert loaded.pipeline is base and loaded.manifest["granularity"] == "structured"
    state, original = loaded.denoiser.state_dict(), pruned.denoiser.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)

    eval_prompts = (DATA_DIR / "toy" / "eval_prompts.txt").read_text().splitlines()[:2]
    metrics = ["prompt_fidelity"]
    ours = obsdiff.evaluate(pruned, eval_prompts, out_dir=tmp_path / "a", metrics=metrics)
    theirs = obsdiff.evaluate(loaded, eval_prompts, out_dir=tmp_path / "b", metrics=metrics)
    assert ours.num_images == 2 and 0 <= ours.metrics["prompt_fidelity"] <= 1
    assert ours.metrics == theirs.metrics
    for name in ("0000000.png", "0000001.png"):
        a, b = (Image.open(tmp_path / d / "images" / name) for d in ("a", "b"))
        assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="'sharpness'.*unknown"):
        obsdiff.evaluate(pruned, eval_prompts, out_dir=tmp_path / "c", metrics=["sharpness"])
    with pytest.raises(ValueError, match="fid needs a reference"):
        obsdiff.evaluate(pruned, eval_prompts, out_dir=tmp_path / "c", metrics=["fid"])
    assert not (tmp_path / "c").exists()  # refused before any image


def test_the_entry_point_modules_do_not_shadow_the_functions() -> None:
    """`import obsdiff.prune` (the app) sets the package attribute `prune` to the module; the
    module calls the function, so `obsdiff.prune(...)` works after it too."""
    import obsdiff.evaluate
    import obsdiff.prune

    assert callable(obsdiff.prune) and callable(obsdiff.evaluate)
    assert obsdiff.prune.main is not None  # still the app's module
    with pytest.raises(ValueError, match="prompts is empty"):
        obsdiff.prune(tiny_sd3_pipeline(), prompts=[])
    with pytest.raises(ValueError, match="prompts is empty"):
        obsdiff.evaluate(tiny_sd3_pipeline(), [], out_dir="unused")


def test_an_unsupported_pipeline_or_setting_gets_one_clear_error() -> None:
    pipe = tiny_sd3_pipeline()
    with pytest.raises(ValueError, match="method='nosuch'; use one of obsdiff, wanda"):
        obsdiff.prune(pipe, "nosuch", prompts=["a cat"])
    with pytest.raises(ValueError, match="granularity='semi_4_4': N:M pattern 4:4 needs"):
        obsdiff.prune(pipe, granularity="semi_4_4", prompts=["a cat"])
    with pytest.raises(ValueError, match="granularity='blocky'; use one of"):
        obsdiff.prune(pipe, granularity="blocky", prompts=["a cat"])
    with pytest.raises(ValueError, match="prompts is empty"):
        obsdiff.prune(pipe, prompts=[])

    class OtherPipeline:
        pass

    with pytest.raises(ModelConfigError, match="OtherPipeline cannot be pruned.*FluxPipeline"):
        obsdiff.prune(OtherPipeline(), prompts=["a cat"])  # type: ignore[arg-type]
