"""Depth pruning (`granularity=depth`): whole blocks removed by a forward-only criterion, the
config's layer count updated so the model saves and loads as a plain diffusers model of fewer
layers, and its bad settings refused before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from app_runner import TINY_PRUNE, run_in_process
from diffusers import DiffusionPipeline

import obsdiff
from obsdiff.artifacts.record import RunRecord
from obsdiff.models.tiny import tiny_sd3_pipeline
from obsdiff.oneshot.job import JobError


pytestmark = pytest.mark.integration

SAMPLING = {"num_inference_steps": 4, "guidance_scale": 4.0, "height": 32, "width": 32}
PROMPTS = ["a red circle", "a blue square on green", "two yellow triangles", "a white star"]


def latents(pipe: DiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPTS[:2], generator=generator, output_type="latent", **SAMPLING).images


def with_identity_block(index: int) -> DiffusionPipeline:
    """The tiny SD3 whose block `index` does nothing: its modulation's gates are zero, so both
    streams leave it as they entered."""
    pipe = tiny_sd3_pipeline()
    block = pipe.transformer.transformer_blocks[index]
    with torch.no_grad():
        for linear in (block.norm1.linear, block.norm1_context.linear):
            linear.weight.zero_()
            linear.bias.zero_()
    return pipe


@pytest.mark.parametrize(("method", "score"), [("block_cosine", 1.0), ("block_output_loss", 0.0)])
def test_each_criterion_removes_a_block_that_does_nothing(method: str, score: float) -> None:
    """A block whose output is its input: cosine 1 (the highest), output loss 0 (the lowest);
    either criterion removes it, and the model without it gives the same images."""
    dense = with_identity_block(2)
    model = obsdiff.prune(
        with_identity_block(2), method, "depth", 0.25, prompts=PROMPTS, sampling=SAMPLING
    )
    records = {r["name"]: r for r in model.manifest["records"]}
    assert [name for name, r in records.items() if r["removed"]] == ["transformer_blocks.2"]
    assert records["transformer_blocks.2"]["score"] == pytest.approx(score, abs=1e-6)
    assert records["transformer_blocks.0"]["score"] is None  # first and last: not candidates
    assert model.result is not None and model.result.achieved_sparsity == 0.25
    assert model.denoiser.config.num_layers == 3 and len(model.denoiser.transformer_blocks) == 3
    block = sum(p.numel() for p in dense.transformer.transformer_blocks[2].parameters())
    assert model.result.params_before - model.result.params_after == block
    assert model.result.tflops_after < model.result.tflops_before
    torch.testing.assert_close(latents(model.pipeline), latents(dense), rtol=1e-5, atol=1e-5)


def test_the_prune_app_removes_blocks_that_load_back(tmp_path: Path) -> None:
    """`python -m obsdiff.prune granularity=depth method=block_output_loss sparsity=0.25` on the
    tiny SD3.5 (dual attention in blocks 0 and 1): one block goes, the dual-attention layers are
    renumbered, and load_pruned gives the same images as the pruned pipeline in memory."""
    run = tmp_path / "run"
    depth = ["granularity=depth", "method=block_output_loss", "sparsity=0.25"]
    result = run_in_process(
        "obsdiff.prune", *TINY_PRUNE, "model=tiny_sd35", *depth, f"hydra.run.dir={run}"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    record = RunRecord.read(run)
    assert record.prune is not None and record.prune.achieved_sparsity == 0.25
    manifest = json.loads((run / "manifest.json").read_text())
    (gone,) = manifest["structure"]["removed_blocks"]
    loaded = obsdiff.load_pruned(run)
    config = loaded.denoiser.config
    assert config.num_layers == 3
    removed = int(gone.rsplit(".", 1)[1])  # a middle block: 1 or 2
    expected = tuple(i if i < removed else i - 1 for i in (0, 1) if i != removed)
    assert tuple(config.dual_attention_layers) == expected
    assert sum(p.numel() for p in loaded.denoiser.parameters()) == record.prune.params_after
    in_memory = obsdiff.prune(
        tiny_sd3_pipeline(sd35=True), "block_output_loss", "depth", 0.25, prompts=PROMPTS[:2],
        sampling={**SAMPLING, "num_inference_steps": 2},
    )  # fmt: skip
    assert in_memory.manifest["structure"]["removed_blocks"] == [gone]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["granularity=depth", "method=block_cosine", "sparsity=0.5"],
            "sparsity=0.5 would remove 2 of 4 blocks (round(4 x 0.5)), every one of the 2",
        ),
        (
            ["model=tiny_sd15", "granularity=depth", "method=block_cosine", "sparsity=0.25"],
            "granularity=depth: the unet family has no table of removable blocks",
        ),
        (["granularity=depth", "sparsity=0.25"], "method 'obsdiff' does not support depth"),
        (["method=block_cosine"], "method 'block_cosine' does not support unstructured"),
        (
            [
                "granularity=depth",
                "method=block_cosine",
                "sparsity=0.25",
                "modulation=low_rank",
                "modulation.rank=33",
            ],
            "modulation.rank=33 is larger than",
        ),  # fmt: skip
    ],
)
def test_bad_depth_settings_exit_2_before_loading(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    result = run_in_process(
        "obsdiff.prune", *TINY_PRUNE, *overrides, f"hydra.run.dir={tmp_path / 'x'}"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1 and message in output, output[-3000:]
    assert not (tmp_path / "x").exists()


def test_the_python_api_refuses_as_the_app_does() -> None:
    with pytest.raises(JobError, match="would remove 2 of 4 blocks"):
        obsdiff.prune(tiny_sd3_pipeline(), "block_cosine", "depth", 0.5, prompts=PROMPTS)


def test_a_depth_pruned_model_recovers_each_block_against_the_one_it_was() -> None:
    """The feature loss pairs each remaining block with the teacher's block of its original
    index: with the identity block 2 removed, block 2 of the student is the teacher's 3."""
    model = obsdiff.prune(
        with_identity_block(2), "block_output_loss", "depth", 0.25, prompts=PROMPTS,
        sampling=SAMPLING,
    )  # fmt: skip
    recovered = obsdiff.recover(
        model, PROMPTS[:2], teacher=with_identity_block(2), steps=2, lr=1e-3
    )
    assert recovered.recovery is not None and recovered.recovery.steps == 2
    assert recovered.recovery.first_loss < 1e-6  # before any step the student is the teacher


def test_depth_and_low_rank_modulation_in_one_run_load_back(tmp_path: Path) -> None:
    """One pass scores the blocks and gathers the modulation's statistics; the blocks go, then
    the modulation linears that remain are factorised under their new names; the run reloads to
    the same images."""
    run = tmp_path / "run"
    model = obsdiff.prune(
        tiny_sd3_pipeline(), "block_cosine", "depth", 0.25, prompts=PROMPTS, sampling=SAMPLING,
        modulation={"rank": 2}, run_dir=run,
    )  # fmt: skip
    kinds = [r["type"] for r in model.manifest["records"]]
    assert kinds.count("block") == 4 and kinds.count("low_rank") == 3 * 2 + 1  # + norm_out
    assert len(model.denoiser.transformer_blocks) == 3
    loaded = obsdiff.load_pruned(run, pipeline=tiny_sd3_pipeline())
    assert torch.equal(latents(loaded.pipeline), latents(model.pipeline))
