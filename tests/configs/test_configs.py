"""Every config group option composes and instantiates; the apps' configs compose on the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_runner import run_in_process
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from registry import REAL_MODELS, SHIPPED_MODELS, TINY_MODELS

from obsdiff.app.config import CONF_DIR, ConfigError, instantiate_model
from obsdiff.models import SD3Adapter


MODEL_CONFIGS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# the models the paper does not cover sample at their model card's (or released pipeline's) size
MODEL_CARD_SIZES = {
    "pixart_sigma": (1024, 1024),
    "qwen_image": (1328, 1328),
    "flux2_dev": (1024, 1024),
    "wan21_t2v_14b": (720, 1280),
    "wan22_t2v_a14b": (720, 1280),
}


@pytest.fixture
def compose_sample() -> Iterator:  # type: ignore[type-arg]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):

        def _compose(*overrides: str) -> DictConfig:
            return compose(config_name="sample", overrides=list(overrides))

        yield _compose


@pytest.mark.unit
def test_every_model_config_is_in_the_readmes_model_table_and_only_those() -> None:
    readme = (CONF_DIR.parent / "README.md").read_text()
    table = readme.split("## Models", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", table, flags=re.MULTILINE))
    assert documented == set(MODEL_CONFIGS)
    assert set(MODEL_CONFIGS) == set(REAL_MODELS) | set(TINY_MODELS) | set(SHIPPED_MODELS)


@pytest.mark.unit
def test_every_method_is_in_the_readmes_method_table_and_only_those() -> None:
    from obsdiff.methods import METHODS

    readme = (CONF_DIR.parent / "README.md").read_text()
    table = readme.split("[start:methods]", 1)[1].split("[end:methods]", 1)[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", "\n".join(
        line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `")
    )))  # fmt: skip
    assert documented == set(METHODS)


@pytest.mark.unit
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_instantiates(name: str, compose_sample) -> None:  # type: ignore[no-untyped-def]
    adapter = instantiate_model(compose_sample(f"model={name}").model)
    assert adapter.name == name
    if name in REAL_MODELS:
        assert adapter.pretrained and adapter.tiny is None
        size = MODEL_CARD_SIZES.get(name, (512, 512))  # the paper's, App. B
        assert (adapter.sampling.height, adapter.sampling.width) == size
        assert adapter.dtype in ("float16", "bfloat16")
    elif name in SHIPPED_MODELS:  # the committed toy pipeline, loaded like a checkpoint
        assert (
            adapter.tiny is None and (Path(str(adapter.pretrained)) / "model_index.json").is_file()
        )
    else:
        assert adapter.tiny and adapter.pretrained is None and adapter.dtype == "float32"


@pytest.mark.unit
def test_paper_sampling_setup_of_sd3_medium(compose_sample) -> None:  # type: ignore[no-untyped-def]
    adapter = instantiate_model(compose_sample("model=sd3_medium").model)
    assert isinstance(adapter, SD3Adapter)
    assert (adapter.sampling.num_inference_steps, adapter.sampling.guidance_scale) == (25, 7.0)


@pytest.mark.unit
def test_bad_overrides_give_one_config_error(compose_sample) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="model.*dtype='fp8'"):
        instantiate_model(compose_sample("model.dtype=fp8").model)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'colour'"):
        instantiate_model(compose_sample("+model.colour=red").model)
    with pytest.raises(ConfigError, match="must name an obsdiff class"):
        instantiate_model(compose_sample("model._target_=os.system").model)


@pytest.mark.integration
def test_real_config_loads_a_local_copy(compose_sample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tiny = instantiate_model(compose_sample("model=tiny_sd3").model)
    tiny.load().save_pretrained(tmp_path)
    cfg = compose_sample("model=sd3_medium", f"model.pretrained={tmp_path}", "model.dtype=float32")
    pipe = instantiate_model(cfg.model).load()
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"


@pytest.mark.integration
@pytest.mark.unit
def test_every_app_has_a_console_script() -> None:
    """obsdiff-sample, -prune, -run, -evaluate (Hydra mains), -report and -export (argparse)."""
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((CONF_DIR.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {f"obsdiff-{app}" for app in APPS}
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == f"obsdiff.{name.removeprefix('obsdiff-')}"
        assert callable(getattr(importlib.import_module(module), function))


APPS = ("sample", "prune", "run", "evaluate", "recover", "quantize", "report", "export")


@pytest.mark.slow
def test_sample_app_runs_every_tiny_model(tmp_path: Path) -> None:
    """What `make sample` does: one multirun job per tiny model, images and a record each."""
    result = run_in_process(  # its entry point, in this process
        "obsdiff.sample", "--multirun", "model=glob(tiny_*)", f"paths.output_root={tmp_path}"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    records = sorted(tmp_path.glob("sample/multiruns/*/*/samples.json"))
    assert len(records) == len(TINY_MODELS)
    for record in records:
        job = record.parent
        assert (job / "grid.png").is_file()
        files = [job / entry["file"] for entry in json.loads(record.read_text())["images"]]
        assert len(files) == 2 and all(f.is_file() for f in files)
        for entry, file in zip(json.loads(record.read_text())["images"], files, strict=True):
            if file.suffix == ".gif":  # a video: its animated preview, then every frame
                frames = sorted(file.with_suffix("").glob("*.png"))
                assert len(frames) == entry["frames"] == Image.open(file).n_frames


# Every option of the prune app's groups, read from conf/: each builds its object.
BUILT_GROUPS = ("method", "granularity", "weighting")
OPTIONS = [
    (group, path.stem)
    for group in BUILT_GROUPS
    for path in sorted((CONF_DIR / group).glob("*.yaml"))
    if path.stem != "explicit"  # needs its list of weights: test_prune's bad settings
]


@pytest.mark.unit
def test_config_groups_are_the_registries() -> None:
    """An option per registry entry and none else: METHODS, the granularities, SCHEDULES."""
    from obsdiff.methods import METHODS
    from obsdiff.methods.granularity import GRANULARITY_OPTIONS
    from obsdiff.pruning.schedules import SCHEDULES

    def options(group: str) -> set[str]:
        return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}

    assert options("method") == set(METHODS)
    assert options("granularity") == {o for kind in GRANULARITY_OPTIONS.values() for o in kind}
    assert options("weighting") == set(SCHEDULES) | {"explicit"}


@pytest.mark.unit
@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_prune_group_options_build(group: str, option: str) -> None:
    from obsdiff.app.config import build

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="prune", overrides=[f"{group}={option}"])
    obj = build(cfg[group], object, group)
    assert type(obj).__module__.startswith("obsdiff.")
    if group == "method":
        assert obj.name == option  # type: ignore[attr-defined]


@pytest.mark.unit
def test_defaults_come_from_the_settings_dataclasses() -> None:
    """The composed prune config holds each dataclass's defaults, and the Python API's
    keyword defaults are the same objects' (each default said once)."""
    import inspect

    from obsdiff import api
    from obsdiff.app.config import settings
    from obsdiff.calibration.sequential import CalibrationSettings
    from obsdiff.methods import ObsDiff
    from obsdiff.oneshot.settings import PruneSettings
    from obsdiff.utils.settings import from_mapping, plain_defaults

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="prune", overrides=["calibration=tiny"], return_hydra_config=True)
    assert settings(cfg, PruneSettings, only=PruneSettings.values()) == PruneSettings()
    choices = cfg.hydra.runtime.choices
    assert {g: choices[g] for g in PruneSettings.GROUPS} == {
        g: getattr(PruneSettings(), g) for g in PruneSettings.GROUPS
    }
    method = {k: v for k, v in cfg.method.items() if k != "_target_"}
    assert from_mapping(ObsDiff, method) == ObsDiff() and method == plain_defaults(ObsDiff)
    signature = inspect.signature(api.prune).parameters
    assert signature["sparsity"].default == PruneSettings().sparsity
    assert signature["batch_size"].default == CalibrationSettings().batch_size


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("table*.yaml"))


def _compose_recipe(recipe: str) -> DictConfig:
    """The run config with `+experiment=recipe`, Hydra's own node included."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("run", overrides=[f"+experiment={recipe}"], return_hydra_config=True)


@pytest.mark.unit
@pytest.mark.parametrize("recipe", EXPERIMENTS)
def test_paper_recipes_compose_with_the_paper_protocol(recipe: str) -> None:
    cfg = _compose_recipe(recipe)
    choices = cfg.hydra.runtime.choices
    assert choices.calibration == "gcc3m_100" and cfg.packages in (4, 1)
    assert choices.eval in ("coco2014_5k", "coco2014_1k") and choices.weighting == "log_decrease"
    assert cfg.hydra.sweeper.params  # a sweep: methods, sparsities, weightings or packages
    assert choices.model in REAL_MODELS


TOY_RECIPES = sorted(p.stem for p in (CONF_DIR / "experiment").glob("toy_*.yaml"))


@pytest.mark.unit
@pytest.mark.parametrize("recipe", TOY_RECIPES)
def test_toy_benchmark_recipes_compose_with_the_toy_protocol(recipe: str) -> None:
    from obsdiff.app.config import build
    from obsdiff.methods import PruningMethod

    cfg = _compose_recipe(recipe)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.calibration, choices.eval) == ("toy", "toy", "toy")
    assert cfg.hydra.sweeper.params and cfg.save is False
    method = build(cfg.method, PruningMethod, "method")
    if recipe == "toy_7_dsnot_official":  # DSnoT's official threshold and skipped MLP layers
        assert method.reference_tokens is None and method.skip_mlp is True


@pytest.mark.unit
@pytest.mark.parametrize("launcher", ["joblib", "slurm", "submitit_local"])
def test_launchers_compose(launcher: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "launcher" in cfg.hydra.launcher._target_.lower()
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1


@pytest.mark.unit
@pytest.mark.parametrize("option", ["tiny", "coco2014_5k", "coco2014_1k", "parti"])
def test_eval_sets_compose_and_report_missing_data(option: str, tmp_path: Path) -> None:
    from obsdiff.app.settings import build_eval
    from obsdiff.prompts.files import BUNDLED_PROMPTS, PromptFileError, load_prompts

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"eval={option}", f"paths.data_root={tmp_path}"])
    assert cfg.eval.name == option
    if option == "tiny":
        settings = build_eval(cfg.eval)
        assert len(settings.prompts.prompts) == 4 and settings.fid and settings.text_image
        settings.prompts.check_disjoint(load_prompts(BUNDLED_PROMPTS).prompts)  # bundled sets
        return
    assert cfg.eval.clip_score.model == "openai/clip-vit-base-patch16"  # the paper's ViT-B/16
    with pytest.raises(PromptFileError, match=str(tmp_path)):
        build_eval(cfg.eval)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.fid.mode=bogus"], r"eval.fid.mode='bogus'; use one of clean"),
        (["eval.seed=x"], r"eval.seed='x' is not an integer"),
        (["eval.grid_size=x"], r"eval.grid_size='x' is not an integer"),
        (["eval.efficiency.repeats=-1"], r"eval.efficiency.repeats=-1 must be >= 0"),
        (["eval.prompts.num_prompts=abc"], r"eval.prompts.num_prompts='abc' is not an integer"),
        (["eval.clip_score.model=/nonexistent/clip"], r"eval.clip_score.model='/nonexistent/clip'"),
        # FID with Inception: the weights are fetched (here: refused, no network) before any work
        (["eval.fid.extractor=inception", "eval.fid.reference=REFERENCE"], r"Inception weights"),
        # LPIPS's torchvision backbone likewise (TORCH_HOME empty, no network)
        (["eval.dense_relative.lpips=alex"], r"eval.dense_relative.lpips=alex: torchvision"),
        (["eval.dense_relative.lpips=resnet"], r"lpips backbone 'resnet'"),
        (["eval.dense_relative.features=clip"], r"eval.dense_relative.features='clip'"),
        (["eval.images_per_prompt=0"], r"eval.images_per_prompt=0 must be >= 1"),
        (["eval.bootstrap.confidence=1.5"], r"eval.bootstrap.confidence=1.5 must lie in"),
        (["eval.bootstrap.resamples=-1"], r"eval.bootstrap.resamples=-1 must be >= 0"),
        (["+eval.sampling.cfg=2"], r"eval.sampling.cfg: not an evaluation sampling setting"),
        (["eval.sampling.num_inference_steps=0"], r"num_inference_steps=0 must be >= 1"),
        (["eval.sampling.scheduler=Euler"], r"eval.sampling.scheduler='Euler' is not a diff"),
    ],
)
def test_bad_eval_settings_name_their_key(
    overrides: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import obsdiff.eval.fid
    from obsdiff.app.settings import build_eval

    monkeypatch.setattr(obsdiff.eval.fid, "INCEPTION_DIR", tmp_path / "no-inception-here")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-weights-here"))
    (tmp_path / "reference").mkdir()
    overrides = [o.replace("REFERENCE", str(tmp_path / "reference")) for o in overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["eval=tiny", *overrides])
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        build_eval(cfg.eval)
    assert not list((tmp_path / "no-inception-here").glob("*"))  # no half-downloaded file kept
