"""EcoDiff's masks on real pipelines: gates of one leave every family's latents exactly as they
were, a shut gate is the surgery that removes its unit, the checkpointed sampler gives the
gradients of the plain one, beta's bisection, and a resume that reuses a first pass instead of
computing it again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from registry import TINY_MODELS, method_overrides, model_configs, tiny_adapter

from obsdiff.app.config import CONF_DIR
from obsdiff.app.settings import build_prune_job
from obsdiff.calibration import ecodiff
from obsdiff.calibration.ecodiff import (
    checkpointed_steps,
    final_latents,
    mask_hooks,
    train_masks_for,
)
from obsdiff.calibration.sequential import embed_batches
from obsdiff.eval.generation import generate
from obsdiff.methods import DiffPruning, EcoDiff
from obsdiff.methods.package import StructuredBlock, UnitGroup
from obsdiff.models.base import ModelAdapter, adapter_from_config
from obsdiff.models.surgery import Surgery
from obsdiff.oneshot import run
from obsdiff.oneshot.checkpoint import Checkpointer
from obsdiff.oneshot.job import plan_packages
from obsdiff.utils.seeds import image_generators


pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "a blue square"]


def blocks_of(adapter: ModelAdapter, denoiser: torch.nn.Module) -> list[StructuredBlock]:
    blocks = []
    for name, block in adapter.blocks(denoiser):
        heads, neurons = adapter.structured_groups(block)
        blocks.append(StructuredBlock(name, block, heads, neurons))
    return blocks


def groups_of(adapter: ModelAdapter, denoiser: torch.nn.Module) -> list[UnitGroup]:
    return [g for block in blocks_of(adapter, denoiser) for g in block.unit_groups()]


def adapter_for(name: str) -> ModelAdapter:
    two_steps = {"num_inference_steps": 2}
    if name == "toy":
        config = model_configs()["toy"]
        return adapter_from_config({**config, "sampling": {**config["sampling"], **two_steps}})
    return tiny_adapter(name, sampling=two_steps)


@pytest.mark.parametrize("name", ["toy", *TINY_MODELS])
def test_gates_of_one_reproduce_the_dense_latents_exactly(name: str) -> None:
    """Every head and neuron of every block gated by exactly 1.0: the same latents, bit for
    bit, as the model without hooks (EcoDiff's training starts from the dense model)."""
    adapter = adapter_for(name)
    pipe = adapter.load()
    denoiser = adapter.denoiser(pipe)
    groups = groups_of(adapter, denoiser)
    assert groups
    ones = [torch.ones(g.units) for g in groups]
    dense = generate(pipe, adapter, PROMPTS[:1], seed=0, batch_size=1, output_type="latent")
    with mask_hooks(denoiser, groups, lambda i: ones[i]):
        gated = generate(pipe, adapter, PROMPTS[:1], seed=0, batch_size=1, output_type="latent")
    assert torch.equal(dense[0], gated[0])
    half = [torch.full((g.units,), 0.5) for g in groups]
    with mask_hooks(denoiser, groups, lambda i: half[i]):
        changed = generate(pipe, adapter, PROMPTS[:1], seed=0, batch_size=1, output_type="latent")
    assert not torch.equal(dense[0], changed[0])


def test_a_shut_gate_is_the_surgery_that_removes_its_unit() -> None:
    """Gates of 0 on heads {0, 2} of a block's attention and on a third of its FFN's neurons
    give the latents of the model whose units obsdiff's surgery removed (float32, to 1e-5)."""
    adapter = adapter_for("toy")
    pipe = adapter.load()
    denoiser = adapter.denoiser(pipe)
    block = blocks_of(adapter, denoiser)[1]
    heads, neurons = block.head_units(block.heads[0]), block.neuron_units(block.neurons[0])
    removed_heads, removed_neurons = [0, 2], list(range(0, neurons.units, 3))
    gates = {heads.key: torch.ones(heads.units), neurons.key: torch.ones(neurons.units)}
    gates[heads.key][removed_heads] = 0
    gates[neurons.key][removed_neurons] = 0
    groups = [heads, neurons]
    with mask_hooks(denoiser, groups, lambda i: gates[groups[i].key]):
        gated = generate(pipe, adapter, PROMPTS, seed=0, batch_size=2, output_type="latent")
    surgery = Surgery()
    surgery.remove_heads(block.heads[0], removed_heads, heads.unit_width)
    surgery.remove_neurons(block.neurons[0], removed_neurons)
    with torch.no_grad():
        surgery.apply(block.module)
    cut = generate(pipe, adapter, PROMPTS, seed=0, batch_size=2, output_type="latent")
    for a, b in zip(gated, cut, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_checkpointed_sampler_gives_the_plain_samplers_gradients() -> None:
    """The gates' gradients of the final latents' loss, backpropagated through every step of
    the sampler: with each denoiser call recomputed in the backward, the same as with the
    whole graph kept; every group receives one."""
    adapter = adapter_for("toy")
    pipe = adapter.load()
    denoiser = adapter.denoiser(pipe)
    denoiser.requires_grad_(False)
    groups = groups_of(adapter, denoiser)
    [batch] = embed_batches(adapter, pipe, PROMPTS, 2, torch.device("cpu"))
    batch = {k: v.clone() for k, v in batch.items()}
    target = torch.randn(final_latents(adapter, pipe, batch, image_generators(0, 0, 2)).shape)

    def gradients(checkpointed: bool) -> list[torch.Tensor]:
        logits = [torch.full((g.units,), 0.5, requires_grad=True) for g in groups]
        with mask_hooks(denoiser, groups, lambda i: torch.sigmoid(logits[i])):
            if checkpointed:  # the backward recomputes the calls: the hooks are still on
                with checkpointed_steps(denoiser):
                    latents = final_latents(adapter, pipe, batch, image_generators(0, 0, 2))
                    torch.nn.functional.mse_loss(latents, target).backward()
            else:
                latents = final_latents(adapter, pipe, batch, image_generators(0, 0, 2))
                torch.nn.functional.mse_loss(latents, target).backward()
        return [p.grad for p in logits]  # type: ignore[misc]

    plain, recomputed = gradients(False), gradients(True)
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert "forward" not in vars(denoiser)  # the patched forward is gone


def test_beta_is_bisected_to_the_units_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a training that closes round(60 x beta / (1 + beta)) of 60 units: x4 from 0.5
    until the target (30, at beta = 1) is passed, then geometric means, until it is hit; the
    closest training is kept, every training is listed."""
    seen: list[float] = []

    def training(adapter, pipe, groups, embeddings, settings, beta, seed):  # type: ignore[no-untyped-def]
        seen.append(beta)
        closed = round(60 * beta / (1 + beta))
        logits = torch.cat([-torch.ones(closed), torch.ones(60 - closed)])
        return {"g": logits}, [beta]

    monkeypatch.setattr(ecodiff, "train_masks", training)
    method = EcoDiff(bisection_steps=6)
    result = train_masks_for(None, None, [], [30], [], method)  # type: ignore[arg-type]
    assert seen[:2] == [0.5, 2.0] and seen[2] == pytest.approx(1.0)
    assert result.beta == pytest.approx(1.0) and result.trainings[-1][1] == 30
    assert len(result.trainings) == 3
    stuck = train_masks_for(None, None, [], [61], [], EcoDiff(bisection_steps=3))  # type: ignore[arg-type]
    assert [b for b, _ in stuck.trainings] == [0.5, 2.0, 8.0]
    assert stuck.beta == 8.0  # never reached: the closest training


@pytest.fixture
def compose_prune() -> Iterator[Callable[..., DictConfig]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _compose(*overrides: str) -> DictConfig:
            return compose(config_name="prune", overrides=["calibration=tiny", *overrides])

        yield _compose


@pytest.mark.parametrize("method", ["ecodiff", "diff_pruning"])
def test_a_resume_reads_the_first_pass_instead_of_computing_it_again(
    method: str, compose_prune, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    overrides = ["model=toy", f"method={method}", "granularity=structured", "sparsity=0.25"]
    overrides += ["model.sampling.num_inference_steps=2", "calibration.num_prompts=2"]
    job = build_prune_job(compose_prune(*overrides, *method_overrides(method)))
    pipe = job.model.load()
    denoiser = job.model.denoiser(pipe)
    packages, targets = plan_packages(job, denoiser)
    checkpointer = Checkpointer(tmp_path, job.run_key, denoiser, len(packages))
    first = run.scoring_pass(job, pipe, denoiser, packages, dict(targets), checkpointer)

    def again(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the first pass ran again")

    monkeypatch.setattr(run, "mask_pass", again)
    monkeypatch.setattr(run, "taylor_pass", again)
    chosen = job.method
    kept = {
        k: v.clone()
        for k, v in (
            chosen._logits if isinstance(chosen, EcoDiff) else chosen.scores.as_tensors()  # type: ignore[union-attr]
        ).items()
    }
    job.method.__post_init__()  # forgets what it was given
    resumed = run.scoring_pass(job, pipe, denoiser, packages, dict(targets), checkpointer)
    assert resumed == first
    given = chosen._logits if isinstance(chosen, EcoDiff) else chosen.scores.as_tensors()  # type: ignore[union-attr]
    assert given is not None and kept.keys() == given.keys()
    assert all(torch.equal(kept[k], given[k].to(kept[k].dtype)) for k in kept)
    assert isinstance(chosen, EcoDiff | DiffPruning)
