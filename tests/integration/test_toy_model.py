"""The committed toy pipeline: real loader, SD3 classes, learned the task; training is
deterministic; the default `obsdiff.run` prunes and evaluates it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from app_runner import run_in_process
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from hydra import compose, initialize_config_dir

from obsdiff.app.config import CONF_DIR, instantiate_model
from obsdiff.artifacts.record import RunRecord
from obsdiff.eval.generation import generate
from obsdiff.toy.data import split_scenes
from obsdiff.toy.pipeline import PIPELINE_DIR
from obsdiff.toy.prompt_fidelity import PromptFidelity
from obsdiff.toy.train import main as train_main


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def toy():  # type: ignore[no-untyped-def]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run")  # the default model
    adapter = instantiate_model(cfg.model)
    return adapter, adapter.load()


def test_toy_pipeline_loads_through_the_real_loader(toy) -> None:  # type: ignore[no-untyped-def]
    adapter, pipe = toy
    assert adapter.name == "toy" and Path(adapter.pretrained) == PIPELINE_DIR
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.num_attention_heads >= 4  # structured pruning removes heads
    size = sum(f.stat().st_size for f in PIPELINE_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    record = json.loads((PIPELINE_DIR / "training.json").read_text())
    assert record["recipe"]["seed"] == 0 and record["loss_curves_every_50_steps"]["denoiser"]
    assert record["held_out_fidelity_curve"][-1]["step"] == record["recipe"]["denoiser_steps"]


def test_dense_toy_model_draws_held_out_prompts(toy) -> None:  # type: ignore[no-untyped-def]
    adapter, pipe = toy
    _, held_out = split_scenes()
    prompts = [s.caption for s in held_out[::6]]  # 12 combinations never seen in training
    images = generate(pipe, adapter, prompts, seed=0, batch_size=12)
    fidelity = PromptFidelity().compute(images, prompts).means()["prompt_fidelity"]
    assert fidelity >= 0.9  # a model that did not learn reads ~0.3 (chance over 5 attributes)


def test_training_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    quick = ["--vae-steps", "2", "--denoiser-steps", "2", "--pool-size", "256"]
    quick += ["--warmup", "1", "--sample-steps", "1", "--monitor-every", "0"]
    quick += ["--threads", str(torch.get_num_threads())]  # as the test process (xdist: one)
    weights = []
    for name in ("a", "b"):
        assert train_main([*quick, "--out", str(tmp_path / name)]) == 0
        file = tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.append(safetensors.torch.load_file(str(file)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (tmp_path / "a" / "training_curves.png").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 30 s here: sized for a loaded machine
def test_default_run_prunes_and_evaluates_the_toy_model(tmp_path: Path) -> None:
    """The default job (`make run`) as it prunes; evaluated on the first 24 prompt lines (12
    held-out scenes), one image each, where the default renders 144 lines x 4 images."""
    result = run_in_process(  # the app's entry point, in this process
        "obsdiff.run",
        f"paths.output_root={tmp_path}",
        f"hydra.run.dir={tmp_path}/r",
        "eval.prompts.num_prompts=24",
        "eval.images_per_prompt=1",
    )
    assert result.returncode == 0, result.stdout[-3000:]
    record = RunRecord.read(tmp_path / "r")
    names = record.identity
    assert (names.model, names.method, names.sparsity) == ("toy", "obsdiff", 0.5)
    assert record.prune is not None and record.prune.achieved_sparsity == pytest.approx(0.5)
    for evaluation in (record.eval, record.dense):
        assert evaluation is not None and evaluation.num_images == 24
        assert 0 <= evaluation.metrics["prompt_fidelity"] <= 1 and evaluation.metrics["fid"] >= 0
        assert Path(evaluation.grid).is_file()
    assert record.dense is not None
    assert record.dense.metrics["prompt_fidelity"] >= 0.9  # 0.969 on the whole set
    assert record.speed is not None and record.speed.speedup > 0  # timed back to back
    assert "prompt_fidelity" in result.stdout  # the short table
