"""Export: a pruned run becomes a diffusers folder that plain diffusers loads without
obsdiff (unstructured, 2:4), or obsdiff's folder (structured), with a model card that holds the
run's figures; bad inputs are refused before anything is written."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from app_runner import run_app, run_in_process

import obsdiff
from obsdiff.artifacts.export import ExportError, check_export, upload
from obsdiff.artifacts.record import RunRecord
from obsdiff.export import main as export_main


# the module's runs take about 40 s here: the timeout is sized for a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = ["model=tiny_sd3", "calibration=tiny", "model.sampling.num_inference_steps=2"]
TINY += ["calibration.num_prompts=2", "packages=1"]
TOY = ["model=toy", "calibration=toy", "model.sampling.num_inference_steps=2"]
TOY += ["calibration.num_prompts=4", "packages=1"]
PROMPT = "a red circle in the top left"
UNWRITABLE = Path("/proc/obsdiff-cannot-be-written")  # no one may create files there, not root

# plain diffusers in a process where obsdiff cannot be imported: the card's code, then a call
PLAIN = """
import json, sys
sys.modules["obsdiff"] = None  # obsdiff is not importable here
try:
    import obsdiff
except ImportError:
    pass
else:
    raise SystemExit("obsdiff was importable")
import safetensors.torch, torch
{load}
denoiser = pipe.{attr}
state = {{k: v.contiguous() for k, v in denoiser.state_dict().items()}}
safetensors.torch.save_file(state, sys.argv[1])
kwargs = json.loads(sys.argv[3])
generator = torch.Generator().manual_seed(0)
out = pipe({prompt!r}, generator=generator, output_type="latent", **kwargs)
safetensors.torch.save_file({{"latents": out.images.contiguous()}}, sys.argv[2])
assert "obsdiff" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
"""


RUNS = {  # the runs the tests export, each made once (module scope)
    "tiny, evaluated": ("obsdiff.run", [*TINY, "eval=tiny", "eval.prompts.num_prompts=2"]),
    "tiny 2:4 wanda": ("obsdiff.prune", [*TINY, "granularity=semi_2_4", "method=wanda"]),
    "toy 2:4": ("obsdiff.prune", [*TOY, "granularity=semi_2_4"]),
    "tiny structured": ("obsdiff.prune", [*TINY, "granularity=structured", "sparsity=0.25"]),
    "tiny low-rank": ("obsdiff.prune", [*TINY, "modulation=low_rank", "modulation.rank=2"]),
    "tiny depth": (  # as a user would: whole blocks out, a plain diffusers model of fewer layers
        "obsdiff.prune",
        [*TINY, "granularity=depth", "method=block_output_loss", "sparsity=0.25"],
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for name, (app, overrides) in RUNS.items():
        out = tmp_path_factory.mktemp("outputs")
        result = run_in_process(app, *overrides, f"paths.output_root={out}")
        assert result.returncode == 0, result.stdout[-3000:]
        (made[name],) = [p.parent for p in out.glob("*/runs/*/results.json")]
    return made


def card_code(card: str, heading: str = "## How to load") -> str:
    section = card[card.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def generate(pipe: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, generator=generator, output_type="latent", **kwargs).images


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
@pytest.mark.parametrize("name", ["tiny, evaluated", "tiny 2:4 wanda", "toy 2:4", "tiny depth"])
def test_plain_diffusers_loads_the_export(tmp_path: Path, runs: dict[str, Path], name: str) -> None:
    run_dir = runs[name]
    app, overrides = RUNS[name]
    out = obsdiff.export(run_dir, tmp_path / "exported")
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    card = (out / "README.md").read_text()

    pruned = obsdiff.load_pruned(run_dir)
    kwargs = pruned.adapter.call_kwargs()
    kwargs.pop("negative_prompt", None)
    attr = pruned.adapter.denoiser_attr
    script = PLAIN.format(load=card_code(card), attr=attr, prompt=PROMPT)
    weights, latents = tmp_path / "weights.safetensors", tmp_path / "latents.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", script, str(weights), str(latents), json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain = safetensors.torch.load_file(str(weights))
    ours = pruned.denoiser.state_dict()
    assert plain.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(plain[name], tensor), name
    expected = generate(pruned.pipeline, kwargs)
    torch.testing.assert_close(
        safetensors.torch.load_file(str(latents))["latents"], expected, rtol=1e-4, atol=1e-5
    )

    # the card: the Hub's front matter and the run's figures
    front = card.split("---")[1]
    assert "library_name: diffusers" in front and "pipeline_tag: text-to-image" in front
    assert all(tag in front for tag in ("pruning", "obs-diff", "sparsity"))
    record = RunRecord.read(run_dir)
    assert record.prune is not None
    assert f"{record.prune.params_before:,}" in card and f"{record.prune.tflops_after:.4g}" in card
    if record.prune.target_nonzero is not None:  # a depth prune has no target linears
        assert f"{record.prune.target_nonzero:,}" in card
    if "granularity=depth" in overrides:  # fewer layers in the config plain diffusers reads
        config = json.loads((out / attr / "config.json").read_text())
        assert (
            config["num_layers"] == 3 and len(pruned.manifest["structure"]["removed_blocks"]) == 1
        )
    assert f"python -m {app} " in card and "| timestep weighting | log_decrease |" in card
    for key, value in record.overrides.items():
        assert f"{key}={value}" in card
    if record.eval is not None:
        assert f"Evaluation set `{record.eval.set}`: {record.eval.num_images} images" in card
        numbers = {k: v for k, v in record.eval.metrics.items() if isinstance(v, float)}
        assert numbers
        for value in numbers.values():
            assert f"{value:.4g}" in card
    else:
        assert "Not evaluated in this run" in card
    if "model=toy" in overrides:  # saved without T5: plain diffusers must be told
        assert "text_encoder_3=None, tokenizer_3=None" in card


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
def test_structured_export_reloads_with_identical_outputs(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    run_dir = runs["tiny structured"]
    out = obsdiff.export(run_dir, tmp_path / "exported")
    card = (out / "README.md").read_text()
    assert "library_name: obsdiff" in card and "obsdiff.load_pruned" in card_code(card)
    original, exported = obsdiff.load_pruned(run_dir), obsdiff.load_pruned(out)
    a, b = original.denoiser.state_dict(), exported.denoiser.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(t.numel() for t in b.values()) < sum(
        t.numel() for t in original.adapter.denoiser(original.adapter.load()).state_dict().values()
    )
    kwargs = original.adapter.call_kwargs()
    kwargs.pop("negative_prompt", None)
    assert torch.equal(generate(original.pipeline, kwargs), generate(exported.pipeline, kwargs))


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
def test_low_rank_modulation_exports_as_obsdiffs_folder_or_expanded_for_plain_diffusers(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    """Kept as two linears each: obsdiff's folder, reloaded bit for bit. Expanded: a diffusers
    folder that plain diffusers loads without obsdiff, each modulation weight the product of
    its pair, the same latents within round-off (the product's sums run in another order)."""
    run_dir = runs["tiny low-rank"]
    pruned = obsdiff.load_pruned(run_dir)
    kwargs = pruned.adapter.call_kwargs()
    kwargs.pop("negative_prompt", None)
    folder = obsdiff.export(run_dir, tmp_path / "folder")
    card = (folder / "README.md").read_text()
    assert "library_name: obsdiff" in card and "linears at low rank (rank 2: ranks 2)" in card
    assert torch.equal(generate(obsdiff.load_pruned(folder).pipeline, kwargs),
                       generate(pruned.pipeline, kwargs))  # fmt: skip

    out = obsdiff.export(run_dir, tmp_path / "expanded", expand_low_rank=True)
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "dense product of each pair" in card
    script = PLAIN.format(load=card_code(card), attr="transformer", prompt=PROMPT)
    weights, latents = tmp_path / "weights.safetensors", tmp_path / "latents.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", script, str(weights), str(latents), json.dumps(kwargs)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    plain = safetensors.torch.load_file(str(weights))
    ours = pruned.denoiser.state_dict()
    for name in pruned.manifest["structure"]["low_rank"]:
        product = ours[f"{name}.up.weight"] @ ours[f"{name}.down.weight"]
        torch.testing.assert_close(plain[f"{name}.weight"], product)
        assert torch.equal(plain[f"{name}.bias"], ours[f"{name}.up.bias"])
    torch.testing.assert_close(
        safetensors.torch.load_file(str(latents))["latents"], generate(pruned.pipeline, kwargs),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    with pytest.raises(ExportError, match="no low-rank modulation to expand"):
        check_export(runs["tiny 2:4 wanda"], tmp_path / "x", expand_low_rank=True)


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
def test_reference_export_holds_the_denoiser_alone(tmp_path: Path, runs: dict[str, Path]) -> None:
    run_dir = runs["toy 2:4"]
    out = obsdiff.export(run_dir, tmp_path / "exported", components="reference")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "transformer"]
    code = card_code((out / "README.md").read_text())
    assert 'subfolder="transformer"' in code and "transformer=transformer" in code
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # the card's code, as a user would paste it
    pruned = obsdiff.load_pruned(run_dir)
    loaded = namespace["pipe"].transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in pruned.denoiser.state_dict().items())


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
def test_bad_inputs_are_refused_before_anything_is_written(
    tmp_path: Path, runs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = runs["tiny 2:4 wanda"]
    out = tmp_path / "exported"
    with pytest.raises(ExportError, match="is not a directory"):
        check_export(tmp_path / "nowhere", out)
    with pytest.raises(ExportError, match="not the run directory of a finished prune"):
        check_export(tmp_path, out)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in ("manifest.json", "results.json"):
        (weightless / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(ExportError, match="holds no denoiser.safetensors"):
        check_export(weightless, out)
    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir, truncated)
    weights = truncated / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a copy cut short
    with pytest.raises(ExportError, match=f"{weights} is damaged .*prune again"):
        check_export(truncated, out)
    (tmp_path / "a file").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        check_export(run_dir, tmp_path / "a file")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_export(run_dir, tmp_path / "a file" / "exported")
    with pytest.raises(ExportError, match=f"OUT_DIR {UNWRITABLE} cannot be written: /proc"):
        check_export(run_dir, UNWRITABLE)
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty; choose another, or pass --overwrite"):
        check_export(run_dir, out)
    with pytest.raises(ExportError, match="components='copy'"):
        check_export(run_dir, tmp_path / "other", components="reference")  # tiny: built in code
    with pytest.raises(ExportError, match="<owner>/<name>"):
        check_export(run_dir, tmp_path / "other", repo_id="no-owner")
    assert not (tmp_path / "other").exists()

    # the command line (its entry point, in this process): one message, exit code 2, nothing
    # written
    caplog.set_level(logging.INFO)
    assert export_main([str(run_dir), str(out)]) == 2
    assert "not empty; choose another, or pass --overwrite" in caplog.text
    caplog.clear()
    assert export_main([str(run_dir), str(UNWRITABLE / "exported")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"OUT_DIR {UNWRITABLE / 'exported'} cannot be written" in errors[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not list(tmp_path.glob(".*partial*"))

    # --overwrite replaces it once the new export is complete
    assert export_main([str(run_dir), str(out), "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model_index.json").is_file()
    assert "Exported with `python -m obsdiff.export" in (out / "README.md").read_text()


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
def test_the_cards_commands_run(tmp_path: Path, runs: dict[str, Path]) -> None:
    """The card of a run that was not evaluated: its evaluate command evaluates the pruned
    model (not the dense one); its prune command makes the same weights again."""
    run_dir = runs["toy 2:4"]
    card = (obsdiff.export(run_dir, tmp_path / "exported") / "README.md").read_text()

    (evaluate,) = re.findall(r"`(python -m obsdiff\.evaluate [^`]*)`", card)
    _, _, app, *overrides = shlex.split(evaluate)
    fast = ["eval.prompts.num_prompts=2", "eval.images_per_prompt=1", "eval.efficiency.repeats=0"]
    result = run_in_process(  # the command as typed, run from its entry point in this process
        app, *overrides, *fast, f"paths.output_root={tmp_path}", f"hydra.run.dir={tmp_path / 'ev'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = RunRecord.read(tmp_path / "ev")
    assert evaluated.identity.pruned_run == str(run_dir)
    assert (evaluated.identity.method, evaluated.identity.granularity) == ("obsdiff", "semi_2_4")
    assert evaluated.eval is not None and evaluated.eval.num_images == 2

    made = card[card.index("## How it was made") :]
    prune = re.search(r"```bash\n(python -m obsdiff\.prune .*)\n```", made).group(1)  # type: ignore[union-attr]
    _, _, app, *overrides = shlex.split(prune)
    result = run_in_process(app, *overrides, f"hydra.run.dir={tmp_path / 'again'}")
    assert result.returncode == 0, result.stderr[-3000:]
    again = safetensors.torch.load_file(str(tmp_path / "again" / "denoiser.safetensors"))
    first = safetensors.torch.load_file(str(run_dir / "denoiser.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


class FakeHub:
    """Records the calls `upload` makes; sends nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> str:
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/me/model/commit/0"


@pytest.mark.xdist_group("export_runs")  # the module's runs are made once, on one worker
def test_push_to_hub_forms_the_upload_and_sends_nothing(
    tmp_path: Path, runs: dict[str, Path]
) -> None:
    run_dir = runs["tiny 2:4 wanda"]
    out = obsdiff.export(run_dir, tmp_path / "exported")
    hub = FakeHub()
    url = upload(out, "me/tiny-sd3-obsdiff", private=True, api=hub)
    assert url.startswith("https://huggingface.co/me/model")
    (create, created), (upload_call, uploaded) = hub.calls
    assert create == "create_repo" and created["repo_id"] == "me/tiny-sd3-obsdiff"
    assert created["private"] is True and created["exist_ok"] is True
    assert upload_call == "upload_folder" and uploaded["folder_path"] == str(out)
    assert uploaded["repo_id"] == "me/tiny-sd3-obsdiff" and uploaded["repo_type"] == "model"
    folder = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "model_index.json"} <= folder
    assert any(name.startswith("transformer/") and name.endswith(".safetensors") for name in folder)

    # offline, the CLI exports, then says the upload failed and how to retry it
    result = run_app(
        "obsdiff.export", str(run_dir), str(tmp_path / "again"), "--push-to-hub", "me/x",
        env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test_not_a_token"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "the export is complete in" in result.stderr
    assert "huggingface-cli upload" in result.stderr
    assert (tmp_path / "again" / "model_index.json").is_file()
    card = (tmp_path / "again" / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("me/x")' in card_code(card)  # where it will be
