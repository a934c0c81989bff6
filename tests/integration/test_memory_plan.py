"""The memory plan: from the architecture alone, equal to what a run allocates on the tiny and
toy models, the published sizes of the real architectures, packages=auto, the prune app's
plan_only."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from app_runner import run_in_process
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from registry import REAL_MODELS

import obsdiff
from obsdiff.app.config import CONF_DIR
from obsdiff.app.settings import build_prune_job
from obsdiff.calibration import sequential
from obsdiff.models import ModelLoadError
from obsdiff.models.base import adapter_from_config
from obsdiff.oneshot.job import JobError
from obsdiff.oneshot.plan import choose_packages, memory_plan
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.utils.memory import module_bytes


pytestmark = pytest.mark.integration

FAST = ["model.sampling.num_inference_steps=2", "calibration.num_prompts=2"]


@pytest.fixture
def compose_prune() -> Iterator[Callable[..., DictConfig]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _compose(*overrides: str) -> DictConfig:
            return compose(config_name="prune", overrides=["calibration=tiny", *overrides])

        yield _compose


@pytest.mark.parametrize(
    ("model", "method", "granularity"),
    [
        ("toy", "obsdiff", "unstructured"),
        ("tiny_sd3", "wanda", "semi_2_4"),
        ("tiny_flux", "obsdiff", "structured"),
    ],
)
def test_the_plan_is_what_the_run_allocates(
    model: str,
    method: str,
    granularity: str,
    compose_prune,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    """Weights per component equal the loaded pipeline's, and each package's statistics
    equal what the run allocates for it, byte for byte."""
    sparsity = "sparsity=0.25" if granularity == "structured" else "sparsity=0.5"
    overrides = [f"model={model}", f"method={method}", f"granularity={granularity}", sparsity]
    job = build_prune_job(compose_prune(*FAST, *overrides, "packages=3"))
    plan = memory_plan(job)
    loaded = job.model.load()
    components = {k: v for k, v in loaded.components.items() if isinstance(v, torch.nn.Module)}
    assert plan.components == {k: module_bytes(v) for k, v in components.items()}

    real = sequential.build_package
    allocated: list[int] = []

    def measuring(*args, **kwargs):  # type: ignore[no-untyped-def]
        package = real(*args, **kwargs)
        stats = [g.stats for g in package.groups if g.stats is not None]
        tensors = [t for s in stats for t in s.state_tensors() if t.dtype == torch.float32]
        allocated.append(sum(t.numel() * t.element_size() for t in tensors))
        return package

    monkeypatch.setattr(sequential, "build_package", measuring)
    result = prune_pipeline(replace(job, save=False), tmp_path).result
    assert plan.packages == 3 and allocated == plan.package_statistics
    assert result.statistics_bytes == plan.statistics_peak_bytes > 0


@pytest.mark.parametrize(
    ("model", "component", "parameters"),
    [  # the published sizes
        ("sd3_medium", "transformer", 2_028_328_000),
        ("flux_dev", "transformer", 11_901_408_320),
        ("sdxl_base", "unet", 2_567_463_684),
        ("sd21_base", "unet", 865_910_724),
        ("sd15", "unet", 859_520_964),
        ("pixart_sigma", "transformer", 610_856_096),  # "0.6 B"
        ("qwen_image", "transformer", 20_430_401_088),  # model card: 20 B; issue trackers 20.43 B
        ("qwen_image", "text_encoder", 8_292_166_656),  # Qwen2.5-VL-7B-Instruct: 8.29 B
        ("flux2_dev", "transformer", 32_223_281_152),  # about 32.2 B (diffusers' defaults)
        ("wan21_t2v_14b", "transformer", 14_288_491_584),  # about 14.29 B
        ("wan21_t2v_14b", "text_encoder", 5_680_910_336),  # UMT5-XXL's encoder
        ("wan22_t2v_a14b", "transformer_2", 14_288_491_584),  # each expert: Wan 2.1-14B's size
        ("sd35_large", "text_encoder_3", 4_762_310_656),  # T5-XXL's encoder
    ],
)
def test_real_architectures_from_their_shipped_configs(
    model: str, component: str, parameters: int
) -> None:
    adapter = obsdiff.api.model_from_config(model)
    modules = adapter.component_skeletons()  # offline: the configs ship with obsdiff
    assert all(p.is_meta for m in modules.values() for p in m.parameters())
    assert sum(p.numel() for p in modules[component].parameters()) == parameters


@pytest.mark.parametrize("model", REAL_MODELS)
def test_every_real_model_has_a_plan_offline(model: str) -> None:
    """From the shipped architecture alone: the weights of every component, the statistics of
    4 packages over every block, what the job reaches."""
    plan = obsdiff.memory_plan(model, packages=4)
    assert plan.packages == 4 and 0 < plan.statistics_peak_bytes < plan.statistics_total_bytes
    assert sum(plan.components[name] for name in plan.denoisers) < plan.weights_bytes
    assert plan.reach and f"memory plan: {model}" in plan.table()


def test_sd3_medium_statistics_as_derived_from_its_blocks() -> None:
    """Per block 6 Hessians of 1536^2 and 2 of 6144^2 (float32); the last block has no text-
    stream output projection or FFN (`context_pre_only`): 4 of 1536^2 and 1 of 6144^2."""
    plan = obsdiff.memory_plan("sd3_medium", packages=24)
    block = 4 * (6 * 1536**2 + 2 * 6144**2)
    last = 4 * (4 * 1536**2 + 1 * 6144**2)
    assert plan.package_statistics == [block] * 23 + [last]
    assert plan.components["transformer"] == 2 * 2_028_328_000 + 2 * 192 * 192 * 1536  # + pos
    config = yaml.safe_load((CONF_DIR / "model" / "sd3_medium.yaml").read_text())
    no_t5 = obsdiff.memory_plan(adapter_from_config({**config, "with_t5": False}), packages=24)
    assert set(plan.components) - set(no_t5.components) == {"text_encoder_3"}
    wanda = obsdiff.memory_plan("sd3_medium", "wanda", packages=24)
    assert wanda.package_statistics[0] == 4 * 3 * (6 * 1536 + 2 * 6144)  # moments only


@pytest.mark.parametrize(
    ("model", "total", "block_modulation", "final_norm"),
    [  # the modulation linears' weights and biases, in the blocks and the final norm
        ("sd3_medium", 2_028_328_000, 670_476_288, 1536 * 3072 + 3072),
        ("sd35_large", 8_056_627_520, 2_674_509_312, 2432 * 4864 + 4864),
        ("flux_dev", 11_901_408_320, 3_228_567_552, 3072 * 6144 + 6144),
    ],
)
def test_the_parameters_by_role_and_what_each_compression_reaches(
    model: str, total: int, block_modulation: int, final_norm: int
) -> None:
    """A third of an MMDiT is modulation (0.670 B of SD3-Medium's 2.028 B in its blocks), which
    pruning the target linears never reaches; low-rank modulation at rank r saves
    out x in - r (out + in) of each linear."""
    plan = obsdiff.memory_plan(model)
    assert plan.roles is not None and plan.roles.total == total
    assert plan.roles.block_modulation == block_modulation
    assert plan.roles.counts["modulation"] == block_modulation + final_norm
    table = plan.table()
    share = plan.roles.share("modulation")
    modulation = plan.roles.counts["modulation"] / 1e9
    assert f"{'modulation':<28} {modulation:9.3f} B {share:6.1%}" in table
    assert f"(blocks {block_modulation / 1e9:.3f} B)" in table
    adapter = obsdiff.api.model_from_config(model)
    denoiser = adapter.denoiser_skeleton()
    shapes = [m.weight.shape for n, m in denoiser.named_modules()
              if n in adapter.modulation_linears(denoiser)]  # fmt: skip
    saved = sum(o * i - 64 * (o + i) for o, i in shapes)
    low = obsdiff.memory_plan(model, modulation={"rank": 64})
    assert f"{saved / 1e9:.3f} B ({saved / total:.1%} of the transformer) fewer" in low.table()
    targets = [line for line in table.splitlines() if "target linears" in line]
    assert targets and "obsdiff unstructured 0.5" in targets[0]


def test_packages_auto_picks_the_fewest_that_fit(compose_prune) -> None:  # type: ignore[no-untyped-def]
    job = build_prune_job(compose_prune("model=sd3_medium", "packages=1"), reach_model=False)
    components = job.model.component_skeletons()
    peaks = {
        k: memory_plan(replace(job, packages=k), components).predicted_peak_bytes
        for k in (1, 2, 3, 4)
    }
    assert peaks[1] > peaks[2] > peaks[3] > peaks[4]
    assert choose_packages(job, peaks[3], components).packages == 3
    assert choose_packages(job, peaks[3] - 1, components).packages == 4
    assert choose_packages(job, peaks[1], components).packages == 1
    with pytest.raises(JobError, match="weights and the costliest solve alone exceed it"):
        choose_packages(job, 10e9, components)
    auto = build_prune_job(
        compose_prune("model=sd3_medium", "packages=auto", "memory_budget=20"), reach_model=False
    )
    assert (
        auto.packages
        == obsdiff.memory_plan("sd3_medium", packages="auto", memory_budget=20).packages
    )
    with pytest.raises(JobError, match="packages=auto needs memory_budget"):
        build_prune_job(compose_prune("model=sd3_medium", "packages=auto"), reach_model=False)


@pytest.mark.slow
def test_plan_only_prints_the_plan_and_leaves_nothing(tmp_path: Path) -> None:
    result = run_in_process(  # the app from its entry point, here: it loads no weights
        "obsdiff.prune", "model=flux_dev", "plan_only=true", f"paths.output_root={tmp_path}/out",
        "packages=4",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert "memory plan: flux_dev (bfloat16), ObsDiff, 4 packages" in result.stdout
    assert obsdiff.memory_plan("flux_dev", packages=4).table() in result.stdout
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))  # no run written
    result = run_in_process(  # a video model of two timestep experts: both denoisers
        "obsdiff.prune", "model=wan22_t2v_a14b", "plan_only=true", "packages=4",
        f"paths.output_root={tmp_path}/out",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert obsdiff.memory_plan("wan22_t2v_a14b", packages=4).table() in result.stdout
    assert "parameters of the transformer + transformer_2: 28.577 B" in result.stdout
    result = run_in_process(  # the run app: the same, and the recovery's with recover=
        "obsdiff.run", "model=sdxl_base", "plan_only=true", f"paths.output_root={tmp_path}/run",
        "packages=2", "recover=distill", "recover.precision=bf16-mixed",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert obsdiff.memory_plan("sdxl_base", packages=2).table() in result.stdout
    recovery = obsdiff.recovery_memory_plan("sdxl_base", batch_size=16, precision="bf16-mixed")
    assert recovery.table() in result.stdout  # at the calibration's batch (calibration=toy)
    assert not any(p.is_file() for p in (tmp_path / "run").rglob("*"))


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_models_fail_offline_with_one_clear_message(model: str) -> None:
    """Here (no hub) the checkpoint cannot be reached: one error naming it and the fix, while
    the shipped configs still give the plan."""
    adapter = obsdiff.api.model_from_config(model)
    assert adapter.pretrained is not None
    with pytest.raises(ModelLoadError, match=f"hf download {re.escape(adapter.pretrained)}"):
        adapter.check_source()
    assert obsdiff.memory_plan(model, packages=4).predicted_peak_bytes > 0


@pytest.mark.parametrize(
    ("model", "granularity", "sparsity"),
    [("toy", "unstructured", "0.5"), ("tiny_flux", "structured", "0.25")],
)
def test_the_plan_counts_the_taylor_scores_the_run_keeps(
    model: str, granularity: str, sparsity: str, compose_prune, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Diff-Pruning's scoring line: the scores the Taylor pass keeps (per weight; structured,
    per row and column), byte for byte, plus the largest scored linear's gradient and score."""
    from obsdiff.oneshot import run

    overrides = [f"model={model}", "method=diff_pruning", "method.levels=2"]
    overrides += [f"granularity={granularity}", f"sparsity={sparsity}", "packages=2"]
    job = build_prune_job(compose_prune(*FAST, *overrides))
    plan = memory_plan(job)
    kept: list[tuple[int, int]] = []
    real = run.taylor_scores

    def measuring(denoiser, targets, *args, **kwargs):  # type: ignore[no-untyped-def]
        scores = real(denoiser, targets, *args, **kwargs)
        tensors = [*scores.weights.values(), *scores.rows.values(), *scores.columns.values()]
        largest = max(m.weight.numel() for m in targets.values())
        kept.append((sum(4 * t.numel() for t in tensors), largest))
        return scores

    monkeypatch.setattr(run, "taylor_scores", measuring)
    prune_pipeline(replace(job, save=False), tmp_path)
    [(scores, largest)] = kept
    assert plan.scoring_bytes == scores + 2 * 4 * largest > 0
    assert "scoring pass (gradients)" in plan.table()
    if granularity == "structured":
        assert scores < plan.weights_bytes / 10  # rows and columns, not a copy of the weights
