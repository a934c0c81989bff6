"""Recovery after pruning (`obsdiff.recover`) on the tiny SD3, data-free: the student moves
towards the dense teacher, an unstructured student keeps every zero exactly, a structured one
trains every remaining weight, and the pruned model itself is left as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from app_runner import TINY_PRUNE, run_in_process
from diffusers import DiffusionPipeline
from images import image_folder
from lightning.fabric.loggers import Logger
from peft.tuners.lora.layer import LoraLayer
from torch import nn

import obsdiff
from obsdiff.api import in_memory_adapter
from obsdiff.artifacts.pruned import PrunedModel
from obsdiff.artifacts.record import RunRecord
from obsdiff.models.base import prediction
from obsdiff.models.tiny import tiny_sd3_pipeline
from obsdiff.prompts.files import BUNDLED_PROMPTS as CALIBRATION_PROMPTS
from obsdiff.prompts.image_folder import read_image_folder
from obsdiff.recovery.checkpoint import (
    RECOVERY_CHECKPOINT,
    RecoveryCheckpoint,
    RecoveryCheckpointError,
)
from obsdiff.recovery.data import DenoiserCall, draw_calls, record_calls, step_density
from obsdiff.recovery.losses import feature_loss
from obsdiff.recovery.run import kept_weights, recover_pruned
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.runners.parallel import DataParallel


pytestmark = pytest.mark.integration

SAMPLING = {"num_inference_steps": 4, "guidance_scale": 4.0, "height": 32, "width": 32}
PROMPTS = ["a red circle", "a blue square on green", "two yellow triangles", "a white star"]


def pruned(granularity: str, sparsity: float) -> PrunedModel:
    method = "l1" if granularity == "structured" else "magnitude"
    return obsdiff.prune(
        tiny_sd3_pipeline(), method, granularity, sparsity, prompts=PROMPTS, sampling=SAMPLING
    )


def prediction_error(model: PrunedModel, teacher: DiffusionPipeline) -> float:
    """Mean MSE of the model's denoiser against the teacher's on the teacher's own calls (its
    trajectories for PROMPTS, where recovery trains)."""
    calls = record_calls(teacher, model.adapter, PROMPTS, 2, 0, torch.device("cpu"))
    errors = []
    with torch.no_grad():
        for call in calls:
            student = prediction(model.denoiser(*call.args, **call.kwargs))
            target = prediction(teacher.transformer(*call.args, **call.kwargs))
            errors.append(float(nn.functional.mse_loss(student, target)))
    return sum(errors) / len(errors)


def test_an_unstructured_student_keeps_its_zeros_and_moves_towards_the_teacher() -> None:
    model = pruned("unstructured", 0.5)
    teacher = tiny_sd3_pipeline()
    masks = kept_weights(model)
    assert masks and all(0 < m.float().mean() < 1 for m in masks.values())
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    error_before = prediction_error(model, teacher)

    recovered = obsdiff.recover(model, PROMPTS, teacher=teacher, steps=30, lr=1e-3)

    weights = dict(recovered.denoiser.named_parameters())
    for name, kept in masks.items():  # every pruned weight an exact zero, every count the same
        assert torch.equal(weights[name] != 0, kept), name
    assert any(not torch.equal(before[k], v) for k, v in recovered.denoiser.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.denoiser.state_dict().items())
    assert prediction_error(recovered, teacher) < error_before / 2
    result = recovered.recovery
    assert result is not None and result.steps == 30
    assert result.calls_recorded == 4 * 4  # prompts x steps (CFG: both branches in one call)
    assert result.last_loss < result.first_loss and math.isfinite(result.last_loss)
    assert recovered.manifest["recovery"]["steps"] == 30


def test_a_bfloat16_model_trains_float32_master_weights_and_keeps_its_zeros() -> None:
    """A half-precision checkpoint (as real ones are): the student trains in float32 under
    bf16 autocast against the bfloat16 teacher, and comes back in bfloat16 with every pruned
    weight still an exact zero. Steps of 2e-4 are below half a bfloat16 step of most weights:
    only float32 master weights add them up (in bfloat16 weights about 6% of them change)."""
    model = obsdiff.prune(
        tiny_sd3_pipeline().to(torch.bfloat16), "magnitude", "unstructured", 0.5,
        prompts=PROMPTS[:1], sampling=SAMPLING,
    )  # fmt: skip
    masks = kept_weights(model)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    recovered = obsdiff.recover(
        model, PROMPTS[:2], teacher=tiny_sd3_pipeline().to(torch.bfloat16), steps=4, lr=2e-4,
        precision="bf16-mixed",
    )  # fmt: skip
    weights = dict(recovered.denoiser.named_parameters())
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    changed = []
    for name, kept in masks.items():
        assert torch.equal(weights[name] != 0, kept), name
        changed.append(float(((weights[name] != before[name]) & kept).sum() / kept.sum()))
    assert sum(changed) / len(changed) > 0.5
    assert recovered.recovery is not None and math.isfinite(recovered.recovery.last_loss)


def test_a_structured_student_trains_every_remaining_weight() -> None:
    model = pruned("structured", 0.25)
    assert kept_weights(model) == {}
    recovered = obsdiff.recover(
        model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), steps=5, lr=1e-3, feature_weight=0
    )
    before, after = model.denoiser.state_dict(), recovered.denoiser.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    changed = [k for k in before if k.endswith(".weight") and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 4


class Collected(Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "collected"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass


def test_gradient_checkpointing_gives_the_same_weights_and_every_step_is_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = pruned("structured", 0.25)
    settings = {"steps": 3, "lr": 1e-3, "massive_sigma": 3.0}
    plain = obsdiff.recover(model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), **settings)
    original, recomputed = torch.utils.checkpoint.checkpoint, []

    def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        recomputed.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    logger = Collected()
    checkpointed = obsdiff.recover(
        model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), gradient_checkpointing=True,
        loggers=[logger], **settings,
    )  # fmt: skip
    expected = plain.denoiser.state_dict()
    for name, weight in checkpointed.denoiser.state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6)
    blocks = len(model.adapter.blocks(model.denoiser))
    assert len(recomputed) == 3 * blocks  # every block of every step's student forward
    assert not checkpointed.denoiser.is_gradient_checkpointing
    assert checkpointed.recovery is not None
    assert [step for step, _ in logger.metrics] == [1, 2, 3]
    assert logger.metrics[-1][1]["recover/loss"] == checkpointed.recovery.last_loss
    assert logger.metrics[0][1]["recover/lr"] == 1e-3


def test_lora_trains_adapters_and_merges_them_keeping_the_mask() -> None:
    """LoRA (peft): a plain denoiser of the pruned shapes comes back, its weights moved; a
    sparse student's merge adds only the masked product, so every pruned weight is still an
    exact zero. A rank wider than a layer is refused before any work."""
    model = pruned("unstructured", 0.5)
    masks = kept_weights(model)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    recovered = obsdiff.recover(
        model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), steps=3, lr=1e-2, lora_rank=2
    )
    after = recovered.denoiser.state_dict()
    assert set(after) == set(before) and all(after[k].shape == before[k].shape for k in before)
    assert not any(isinstance(m, LoraLayer) for m in recovered.denoiser.modules())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".weight") for k in changed)  # only merged adapters
    assert recovered.manifest["recovery"]["lora_rank"] == 2
    weights = dict(recovered.denoiser.named_parameters())
    for name, kept in masks.items():
        assert torch.equal(weights[name] != 0, kept), name
    with pytest.raises(ValueError, match=r"recover.lora_rank=4096 is larger than .*; use"):
        obsdiff.recover(model, PROMPTS[:1], teacher=tiny_sd3_pipeline(), lora_rank=4096)


DATA_PARALLEL: dict[str, Any] = {"steps": 3, "lr": 1e-3, "feature_weight": 0.5}


def _recover_on_rank(rank: int, init: str, out: str) -> None:
    """One of two gloo ranks: the same recovery data parallel (DDP), then sharded (FSDP),
    interrupted after the checkpoint of step 2 of 3 and resumed from it; each rank on its share
    of every step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)

    def recover(parallel: DataParallel, **more: Any) -> PrunedModel:
        return recover_pruned(
            pruned("unstructured", 0.5), tiny_sd3_pipeline(), PROMPTS[:2],
            RecoverySettings(**DATA_PARALLEL, checkpoint_every=1), torch.device("cpu"),
            parallel=parallel, **more,
        )  # fmt: skip

    def save(model: PrunedModel, name: str) -> None:
        state = {k: v.contiguous() for k, v in model.denoiser.state_dict().items()}
        safetensors.torch.save_file(state, f"{out}/{name}{rank}.safetensors")

    original = RecoveryCheckpoint.save

    def interrupted(self: RecoveryCheckpoint, step: int, *args: Any) -> None:
        original(self, step, *args)
        if step == 2:
            raise KeyboardInterrupt

    try:
        save(recover(DataParallel(rank, 2)), "ddp")
        sharded, run = DataParallel(rank, 2, fsdp=True), Path(out) / "run"
        RecoveryCheckpoint.save = interrupted  # type: ignore[method-assign,assignment]
        try:
            recover(sharded, run_dir=run)
        except KeyboardInterrupt:
            pass
        RecoveryCheckpoint.save = original  # type: ignore[method-assign]
        dist.barrier()  # rank 0 has written the checkpoint of step 2
        resumed = recover(sharded, run_dir=run)
        assert resumed.recovery is not None and resumed.recovery.steps == 3
        assert resumed.recovery.sharded and resumed.recovery.world_size == 2
        save(resumed, "fsdp")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_recover_as_one_process_accumulating_twice(tmp_path: Path) -> None:
    """Data parallel (DDP): each rank trains on its share of a step's calls and the gradients
    are averaged. Sharded (FSDP): each rank holds half of every weight, gradient and moment,
    FSDP's reduce-scatter averages the gradients, the mask is sharded like its weight, and the
    run is interrupted and resumed from its checkpoint (full tensors under the plain
    denoiser's names). Either way both ranks end with the weights of one process accumulating
    both shares, to float round-off (the reductions add in another order), zeros exact."""
    mp.spawn(_recover_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single = obsdiff.recover(
        pruned("unstructured", 0.5), PROMPTS[:2], teacher=tiny_sd3_pipeline(), accumulate=2,
        **DATA_PARALLEL,
    ).denoiser.state_dict()  # fmt: skip
    for mode in ("ddp", "fsdp"):
        ranks = [
            safetensors.torch.load_file(str(tmp_path / f"{mode}{r}.safetensors")) for r in (0, 1)
        ]
        assert set(ranks[0]) == set(single)
        for name, weight in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), name  # the same step everywhere
            torch.testing.assert_close(ranks[0][name], weight, rtol=1e-4, atol=1e-6)
            assert torch.equal(ranks[0][name] == 0, weight == 0), name
    folder = tmp_path / "run" / RECOVERY_CHECKPOINT
    progress = json.loads((folder / "progress.json").read_text())
    written = safetensors.torch.load_file(str(folder / progress["weights"]))
    assert progress["step"] == 3 and set(written) == set(ranks[0])
    for name, weight in ranks[0].items():  # float32: the last step's weights, whole
        assert torch.equal(written[name], weight), name


def test_an_image_folder_trains_with_the_models_own_loss_keeping_the_zeros(
    tmp_path: Path,
) -> None:
    """recover.images: images noised at the training levels, the task loss alone (the
    velocity target of SD3's flow matching) moves the student; its zeros stay zeros. The
    folder's layouts and mistakes: captions beside the images or in metadata.jsonl."""
    folder = image_folder(tmp_path / "images", 3)
    model = pruned("unstructured", 0.5)
    masks = kept_weights(model)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    recovered = obsdiff.recover(
        model, PROMPTS[:1], teacher=tiny_sd3_pipeline(), images=str(folder), steps=3, lr=1e-3,
        output_weight=0, feature_weight=0, task_weight=1, caption_dropout=0.5, batch_size=2,
    )  # fmt: skip
    assert recovered.recovery is not None and recovered.recovery.images == 3
    assert recovered.recovery.calls_recorded == 0 and math.isfinite(recovered.recovery.last_loss)
    weights = dict(recovered.denoiser.named_parameters())
    for name, kept in masks.items():
        assert torch.equal(weights[name] != 0, kept), name
    assert any(not torch.equal(before[k], v) for k, v in recovered.denoiser.state_dict().items())

    assert read_image_folder(image_folder(tmp_path / "listed", 2, metadata=True)) == [
        (tmp_path / "listed" / "0.png", "a red circle"),
        (tmp_path / "listed" / "1.png", "a green circle"),
    ]
    (folder / "1.txt").unlink()
    with pytest.raises(ValueError, match=r"recover.images: 1.png has no caption"):
        read_image_folder(folder)
    with pytest.raises(ValueError, match=r"recover.task_weight=1.0 needs clean images"):
        RecoverySettings(task_weight=1.0)


def test_bad_settings_are_refused_before_any_work() -> None:
    model = pruned("unstructured", 0.5)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        obsdiff.recover(model, PROMPTS, teacher=tiny_sd3_pipeline(), steps=0)
    with pytest.raises(ValueError, match="pruned in memory"):
        obsdiff.recover(model, PROMPTS)
    with pytest.raises(ValueError, match="one string"):
        obsdiff.recover(model, "a cat", teacher=tiny_sd3_pipeline())


def test_steps_are_drawn_with_the_training_density() -> None:
    """Flow matching: logit-normal in sigma, so the step whose sigma is nearest 1/2 is drawn
    most, and the ends (sigma near 1 and 0) almost never."""
    pipe = tiny_sd3_pipeline()
    pipe.scheduler.set_timesteps(8)
    density = step_density(pipe, 8)
    sigmas = pipe.scheduler.sigmas[:8]
    assert density.sum().item() == pytest.approx(1.0)
    assert density.argmax().item() == (sigmas - 0.5).abs().argmin().item()
    assert density[0] < 1e-3 and density[-1] < 1e-3


def test_a_batch_keeps_its_prompt_embeddings_once() -> None:
    """The pipeline passes a batch's embeddings unchanged at every step: one CPU copy, shared
    by the batch's calls (not one a step); the latents are each step's own."""
    pipe = tiny_sd3_pipeline()
    adapter = in_memory_adapter(pipe, SAMPLING)
    calls = record_calls(pipe, adapter, PROMPTS[:3], 2, 0, torch.device("cpu"))
    assert [c.step for c in calls] == [0, 1, 2, 3] * 2
    embeddings = [id(c.kwargs["encoder_hidden_states"]) for c in calls]
    assert len(set(embeddings[:4])) == len(set(embeddings[4:])) == 1
    assert embeddings[0] != embeddings[4]
    latents = {c.kwargs["hidden_states"].data_ptr() for c in calls}
    assert len(latents) == len(calls)


def test_draws_follow_the_density_and_the_seed() -> None:
    calls = [DenoiserCall((), {}, step) for step in (0, 1, 1, 2)]
    density = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    drawn = draw_calls(calls, density, 400, seed=3)
    assert drawn == draw_calls(calls, density, 400, seed=3)
    counts = torch.bincount(torch.tensor(drawn), minlength=4)
    assert counts[0] == 0 and abs(counts[1] - counts[2]) < 60 and counts[3] > 150


def test_the_feature_loss_is_per_token_normalised_and_masks_massive_tokens() -> None:
    teacher = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    assert feature_loss([teacher * 3.0], [teacher], None).item() == pytest.approx(0.0, abs=1e-6)
    student = teacher.clone()
    student[0, 2] = -student[0, 2]  # one token points the other way
    plain = feature_loss([student], [teacher], None).item()
    assert plain == pytest.approx(4 / 8 / 5, rel=1e-4)  # |2u|^2 / C, averaged over 5 tokens
    massive = teacher.clone()
    massive[0, 2] *= 100.0  # the same token, a massive activation in the teacher
    assert feature_loss([student], [massive], 2.0).item() < 1e-6


@pytest.mark.timeout(600)
def test_the_recover_app_the_run_stage_and_the_api_agree(tmp_path: Path) -> None:
    """`python -m obsdiff.recover pruned=<a tiny run>`: results.json completed with a `recover`
    section, the manifest with the recovery's settings, weights that load and differ from the
    pruned run's, its zeros kept. The recover stage of `python -m obsdiff.run` and
    `obsdiff.recover(...)` with the same settings give the same weights, bit for bit. A run
    without weights is refused before any work."""
    recovery = ["recover.steps=3", "recover.lr=1e-3"]
    source = tmp_path / "pruned"
    prune = run_in_process(
        "obsdiff.prune", *TINY_PRUNE, "method=magnitude", f"hydra.run.dir={source}"
    )
    assert prune.returncode == 0, prune.stdout[-3000:]
    out = tmp_path / "recovered"
    result = run_in_process(
        "obsdiff.recover", f"pruned={source}", "calibration=tiny", "calibration.num_prompts=2",
        *recovery, f"hydra.run.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    record = RunRecord.read(out)
    assert record.completed and record.recover is not None and record.recover.steps == 3
    assert record.identity.method == "magnitude" and record.identity.pruned_run == str(source)
    assert record.identity.recover == "distill"
    assert record.prune is not None and record.prune.achieved_sparsity == pytest.approx(0.5)
    before, after = obsdiff.load_pruned(source), obsdiff.load_pruned(out)
    assert after.manifest["recovery"]["steps"] == 3
    for name, kept in kept_weights(before).items():
        weight = dict(after.denoiser.named_parameters())[name]
        assert torch.equal(weight != 0, kept), name
    expected = after.denoiser.state_dict()
    assert any(not torch.equal(v, expected[k]) for k, v in before.denoiser.state_dict().items())

    card = obsdiff.export(out, tmp_path / "exported") / "README.md"
    assert "then recovered by 3 steps of distillation" in card.read_text()
    assert "## Recovery" in card.read_text() and "distillation" in card.read_text()

    staged = tmp_path / "run"
    run = run_in_process(
        "obsdiff.run", *TINY_PRUNE, "method=magnitude", "eval=tiny", "recover=distill",
        *recovery, f"hydra.run.dir={staged}",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    record = RunRecord.read(staged)
    assert record.recover is not None and record.recover.steps == 3 and record.eval is not None
    from_run = obsdiff.load_pruned(staged).denoiser.state_dict()
    prompts = CALIBRATION_PROMPTS.read_text().splitlines()[:2]
    from_api = obsdiff.recover(before, prompts, batch_size=2, steps=3, lr=1e-3).denoiser
    for name, weight in expected.items():
        assert torch.equal(from_run[name], weight), name
        assert torch.equal(from_api.state_dict()[name], weight), name

    planned = run_in_process(
        "obsdiff.recover", f"pruned={source}", "plan_only=true", f"hydra.run.dir={tmp_path / 'p'}"
    )
    assert planned.returncode == 0 and "recovery memory plan: tiny_sd3" in planned.stdout
    assert not (tmp_path / "p").exists()

    refused = run_in_process(
        "obsdiff.recover", f"pruned={source}", "recover.lora_rank=4096",
        f"hydra.run.dir={tmp_path / 'x'}",
    )  # fmt: skip
    assert refused.returncode == 2 and "recover.lora_rank=4096 is larger than" in refused.stdout
    assert not (tmp_path / "x").exists()
    other = tmp_path / "tiny_sd35"  # another architecture: not the pruned model's base
    tiny_sd3_pipeline(sd35=True).save_pretrained(other)
    refused = run_in_process(
        "obsdiff.recover", f"pruned={source}", f"pretrained={other}",
        f"hydra.run.dir={tmp_path / 'x'}",
    )  # fmt: skip
    assert refused.returncode == 2 and f"pretrained={other} is not the pruned" in refused.stdout
    assert not (tmp_path / "x").exists()

    (source / "denoiser.safetensors").unlink()
    refused = run_in_process(
        "obsdiff.recover", f"pruned={source}", f"hydra.run.dir={tmp_path / 'x'}"
    )
    assert refused.returncode == 2 and "denoiser.safetensors" in refused.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_an_interrupted_recovery_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora_rank: int
) -> None:
    """Interrupted after the checkpoint of step 4 of 6, then the same call: bit-identical to a
    run that was never interrupted (weights and every step's loss); the checkpoint is gone
    once the recovered model is saved. Under LoRA the checkpoint holds the adapters alone (the
    frozen weights are the pruned model's)."""
    settings = {"steps": 6, "lr": 1e-3, "checkpoint_every": 2, "lora_rank": lora_rank}
    model = pruned("unstructured", 0.5)
    whole = obsdiff.recover(model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), **settings)

    original = RecoveryCheckpoint.save

    def interrupted(self: RecoveryCheckpoint, step: int, *args: object) -> None:
        original(self, step, *args)  # type: ignore[arg-type]
        if step == 4:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(RecoveryCheckpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        obsdiff.recover(model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), run_dir=run, **settings)
    progress = json.loads((run / RECOVERY_CHECKPOINT / "progress.json").read_text())
    saved = safetensors.torch.load_file(str(run / RECOVERY_CHECKPOINT / progress["weights"]))
    assert progress["step"] == 4
    if lora_rank:  # the adapters and the buffers; no frozen weight
        buffers = {f"base_model.model.{name}" for name, _ in model.denoiser.named_buffers()}
        adapters = set(saved) - buffers
        assert adapters and all(".lora_" in name for name in adapters)
    else:
        assert set(saved) == set(whole.denoiser.state_dict())
    monkeypatch.setattr(RecoveryCheckpoint, "save", original)
    resumed = obsdiff.recover(
        model, PROMPTS[:2], teacher=tiny_sd3_pipeline(), run_dir=run, **settings
    )
    assert resumed.recovery is not None and whole.recovery is not None
    assert resumed.recovery.steps == 6 and resumed.recovery.last_loss == whole.recovery.last_loss
    after, expected = resumed.denoiser.state_dict(), whole.denoiser.state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert not (run / RECOVERY_CHECKPOINT).exists()
    loaded = obsdiff.load_pruned(run, pipeline=tiny_sd3_pipeline())
    assert all(torch.equal(loaded.denoiser.state_dict()[k], expected[k]) for k in expected)


def test_a_diverging_recovery_stops_naming_the_step(tmp_path: Path) -> None:
    model = pruned("unstructured", 0.5)
    with pytest.raises(FloatingPointError, match=r"diverged: loss (nan|inf) at step \d+"):
        obsdiff.recover(
            model, PROMPTS[:1], teacher=tiny_sd3_pipeline(), steps=50, lr=1e12,
            gradient_clip=0, run_dir=tmp_path / "run", checkpoint_every=1,
        )  # fmt: skip
    assert (tmp_path / "run" / RECOVERY_CHECKPOINT / "progress.json").is_file()


def test_a_checkpoint_of_an_older_layout_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """The optimizer's state was keyed by index before sharding: such a checkpoint is named
    with the fix instead of failing inside the restore."""
    checkpoint = RecoveryCheckpoint(tmp_path, "key")
    checkpoint.dir.mkdir()
    old = {"key": "key", "step": 1, "weights": "w.safetensors", "optimizer": "o.safetensors"}
    (checkpoint.dir / "progress.json").write_text(json.dumps(old))
    with pytest.raises(RecoveryCheckpointError, match=r"older obsdiff.*: delete .* to start"):
        checkpoint.check()
