"""Settings that cannot work are refused before any model loads, with one message naming the key
or the file and the fix: a damaged resume checkpoint, a statistics cache that cannot be a
folder, one string given as the prompts; a pipeline given without `sampling` samples as its
checkpoint's config (or the pipeline itself) does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from diffusers import DiffusionPipeline

import obsdiff
from obsdiff.api import MODEL_CONFIGS, in_memory_adapter
from obsdiff.app.config import DATA_DIR
from obsdiff.models.base import ModelAdapter
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.models.tiny import tiny_sd3_pipeline
from obsdiff.oneshot.job import JobError


pytestmark = pytest.mark.integration

SAMPLING = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64}
UNWRITABLE = Path("/proc/obsdiff-cannot-be-written")  # no one may create files there, not root


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ModelAdapter) -> None:
        raise AssertionError("the model was loaded for a run that cannot work")

    monkeypatch.setattr(ModelAdapter, "load", refuse)


def test_a_damaged_checkpoint_stops_a_resume_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    settings = {"prompts": ["a cat"], "packages": 2, "sampling": SAMPLING, "run_dir": run}
    obsdiff.prune(tiny_sd3_pipeline(), "magnitude", keep_checkpoint=True, **settings)
    progress = run / "checkpoint" / "progress.json"
    progress.write_text(progress.read_text()[:50])  # cut short
    monkeypatch.setattr(ModelAdapter, "load", lambda self: pytest.fail("the model was loaded"))
    message = f"{progress} is damaged .*delete {run / 'checkpoint'}/ to start the pruning again"
    with pytest.raises(JobError, match=message):
        obsdiff.prune(tiny_sd3_pipeline(), "magnitude", **settings)


@pytest.mark.usefixtures("no_model_loads")
def test_a_statistics_cache_that_cannot_be_a_folder_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "statistics.bin"
    a_file.write_text("not a folder")
    for cache, problem in [(a_file, "is a file, not a folder"), (UNWRITABLE, "cannot be written")]:
        with pytest.raises(JobError, match=f"statistics_cache={cache} .*{problem}"):
            obsdiff.prune(tiny_sd3_pipeline(), prompts=["a cat"], statistics_cache=cache)
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["statistics.bin"]


@pytest.mark.usefixtures("no_model_loads")
def test_one_string_as_the_prompts_is_refused(tmp_path: Path) -> None:
    pipe = tiny_sd3_pipeline()
    hint = r"give a list, e.g. prompts=\['a cat'\]"
    with pytest.raises(ValueError, match=f"one string, which would be read as 5 .*{hint}"):
        obsdiff.prune(pipe, "wanda", prompts="a cat")
    with pytest.raises(ValueError, match=hint):
        obsdiff.evaluate(pipe, "a cat", out_dir=tmp_path / "eval")
    with pytest.raises(ValueError, match="prompts holds 3, not a string"):
        obsdiff.prune(pipe, prompts=["a cat", 3])  # type: ignore[list-item]
    assert not (tmp_path / "eval").exists()


def test_a_pipeline_without_sampling_samples_as_its_checkpoint_is_known_to() -> None:
    """The toy checkpoint: its model config's sampling; a pipeline built in code: the
    pipeline's own defaults (the resolution its denoiser was made for); a dict sets only its
    keys."""
    toy = DiffusionPipeline.from_pretrained(
        str(DATA_DIR / "toy" / "pipeline"), text_encoder_3=None, tokenizer_3=None
    )
    toy_config = yaml.safe_load((MODEL_CONFIGS / "toy.yaml").read_text())
    assert in_memory_adapter(toy, None).sampling == SamplingDefaults(**toy_config["sampling"])

    tiny = tiny_sd3_pipeline()
    sampling = in_memory_adapter(tiny, None).sampling
    assert (sampling.height, sampling.width) == (64, 64)  # sample size 32 x VAE scale 2
    assert (sampling.num_inference_steps, sampling.guidance_scale) == (28, 7.0)
    assert sampling.max_sequence_length == 256  # StableDiffusion3Pipeline's defaults
    steps = in_memory_adapter(tiny, {"num_inference_steps": 3}).sampling
    assert (steps.num_inference_steps, steps.height) == (3, 64)
    with pytest.raises(ValueError, match=r"unknown keys \['steps'\]"):
        in_memory_adapter(tiny, {"steps": 3})


def test_a_pipeline_without_its_resolution_prunes() -> None:
    """What failed inside calibration: obsdiff's 512 x 512 is beyond the tiny denoiser's
    positions (2 steps instead of the pipeline's 28, for time)."""
    pruned = obsdiff.prune(
        tiny_sd3_pipeline(), "wanda", prompts=["a cat"], packages=1,
        sampling={"num_inference_steps": 2},
    )  # fmt: skip
    assert pruned.result is not None and pruned.result.achieved_sparsity == pytest.approx(0.5)
    assert pruned.manifest["model_config"]["sampling"]["height"] == 64
