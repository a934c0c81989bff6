"""The apps' shared failure policy, run as a user would: bad settings refused before any weights
load (exit 2, one message naming the key, no run directory left), a sweep that survives a bad
job, a refused resume that changes nothing, an interrupted run that reads as incomplete, and no
checkpoint left after a finished run."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from app_runner import TINY_PRUNE, run_app, run_in_process, run_python

from obsdiff.artifacts.record import RunRecord
from obsdiff.report import main as report_main


pytestmark = pytest.mark.slow

TINY = TINY_PRUNE
EVAL = ["eval=tiny", "eval.prompts.num_prompts=2"]
LOADED = "loaded model"  # the log line of ModelAdapter.load


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative name -> sha256 of its bytes)."""
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def load(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("app", "overrides", "key"),
    [
        ("obsdiff.prune", ["model=sd3_medium"], "model.pretrained"),  # offline, not cached
        ("obsdiff.prune", ["runner=ddp"], "runner.accelerator"),
        ("obsdiff.prune", ["packages=1000"], "packages=1000"),  # from the model's config
        ("obsdiff.prune", ["method.head_saliency=nosuch"], "method.head_saliency='nosuch'; use"),
        ("obsdiff.prune", ["method=diff_pruning", "method.threshold=0"], "method.threshold=0.0"),
        ("obsdiff.prune", ["method=diff_pruning", "method.levels=0"], "method.levels"),
        (
            "obsdiff.prune",
            ["method=diff_pruning", "method.images=/no/such"],
            "method.images=/no/such: no such folder",
        ),
        (
            "obsdiff.prune",
            ["method=ecodiff", "granularity=structured", "sparsity=0.25", "method.beta=0"],
            "method.beta=0.0 must be > 0",
        ),
        (
            "obsdiff.prune",  # 4 heads, 128 neurons: round(4 x 0.003) = round(128 x 0.003) = 0
            ["method=ecodiff", "granularity=structured", "sparsity=0.003"],
            "the sparsity removes none of the",
        ),
        (
            "obsdiff.prune",
            ["method=ecodiff", "sparsity=0.5"],
            "method 'ecodiff' does not support unstructured pruning",
        ),
        (
            "obsdiff.prune",
            ["method.head_saliency=nosuch", "granularity=structured", "sparsity=0.25"],
            "method.head_saliency='nosuch'; use one of reference, eq7, exact",
        ),
        ("obsdiff.run", ["calibration.batch_size=two"], "calibration.batch_size"),
        ("obsdiff.run", ["recover.steps=5"], "recover.steps: recover=none has no keys"),
        ("obsdiff.run", ["recover=distill", "recover.precision=fp8"], "recover.precision='fp8'"),
        ("obsdiff.run", ["recover=distill", "recover.kd_weight=1"], "recover.kd_weight"),
        ("obsdiff.run", ["recover=distill", "recover.images=/no/such"], "recover.images=/no/such"),
        ("obsdiff.run", ["recover=distill", "recover.lora_rank=4096"], "recover.lora_rank=4096"),
        (
            "obsdiff.run",
            ["recover=distill", "runner=fsdp_cpu", "runner.devices=1"],
            "runner.strategy=fsdp on one device (runner.devices=1)",
        ),
        ("obsdiff.prune", ["runner=fsdp_cpu"], "runner.strategy=fsdp shards a recovery's"),
        ("obsdiff.run", ["model=tiny_wan"], "set's FID compares sets of images; evaluate a video"),
        (
            "obsdiff.prune",
            ["model=tiny_wan", "model.sampling.num_frames=8"],
            "model.sampling.num_frames=8 is not a frame count Wan's VAE takes",
        ),
        ("obsdiff.prune", ["model=tiny_wan", "calibration.max_tokens=0"], "max_tokens=0 must be"),
        ("obsdiff.prune", ["runner.strategy=zero3"], "runner.strategy='zero3'; use one of"),
        ("obsdiff.prune", ["modulation=low_rank"], "exactly one of modulation.rank"),
        ("obsdiff.prune", ["granularity.align=64"], "granularity.align: 'granularity' has no"),
        (
            "obsdiff.prune",
            ["granularity=structured", "sparsity=0.25", "granularity.align=1024"],
            "granularity.align=1024: 4 units of width 8 cannot leave a multiple of 1024",
        ),
        (
            "obsdiff.prune",
            ["modulation=low_rank", "modulation.rank=33"],  # the tiny SD3 is 32 wide
            "modulation.rank=33 is larger than transformer_blocks.0.norm1.linear (192 x 32)",
        ),
        (
            "obsdiff.run",
            ["modulation=low_rank", "modulation.energy=1.5"],
            "modulation.energy=1.5 must be in (0, 1]",
        ),
        ("obsdiff.evaluate", ["model=flux_dev"], "model.pretrained"),
        ("obsdiff.sample", ["model=sdxl_base"], "model.pretrained"),
    ],
)
def test_bad_setting_exits_2_naming_its_key_before_loading(
    app: str, overrides: list[str], key: str, tmp_path: Path
) -> None:
    """As a user sees it, for every app (each input of the prune app's list is checked in
    process by tests/integration/test_prune.py); the app runs in this process, from its entry
    point, since it stops before any work."""
    common = TINY if app in ("obsdiff.prune", "obsdiff.run") else ["model=tiny_sd3"]
    if app == "obsdiff.run":
        common = [*common, *EVAL]
    result = run_in_process(app, *common, *overrides, f"paths.output_root={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1, output[-3000:]
    first_line = output[output.index("[ERROR]") :].splitlines()[0]
    assert key in first_line, output[-3000:]
    assert "Traceback" not in output
    assert LOADED not in output  # refused before any weights were loaded (or built)
    assert not any(tmp_path.iterdir())  # no run directory left behind


@pytest.mark.timeout(600)  # about 25 s here: sized for a loaded machine
def test_prune_sweep_survives_a_bad_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_app("obsdiff.prune", "-m", *TINY, "method=l1,obsdiff", f"hydra.sweep.dir={sweep}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]  # the sweep says that something failed
    bad, good = RunRecord.read(sweep / "0"), RunRecord.read(sweep / "1")
    assert bad.status == "failed" and bad.identity.method == "l1" and bad.error is not None
    assert "does not support unstructured" in bad.error and "granularity=structured" in bad.error
    assert good.completed and good.prune is not None
    assert good.prune.achieved_sparsity == pytest.approx(0.5)
    assert good.overrides["method"] == "obsdiff"  # the job's own command-line settings
    assert (sweep / "1" / "denoiser.safetensors").is_file()
    assert "1 job(s) of the sweep did not complete" in output and str(sweep / "0") in output
    assert "Traceback" not in output

    # the same sweep directory with another sparsity: job 1 holds a finished run of other
    # settings, so it is refused and left as it is; the sweep still says so
    finished = snapshot(sweep / "1")
    again = run_in_process("obsdiff.prune", "-m", *TINY, "method=l1,obsdiff", "sparsity=0.4",
                           f"hydra.sweep.dir={sweep}")  # fmt: skip
    output = again.stdout + again.stderr
    assert again.returncode == 1, output[-3000:]
    assert "2 job(s) of the sweep did not complete" in output and "sparsity: 0.5 -> 0.4" in output
    assert snapshot(sweep / "1") == finished
    # and the original sweep again: its finished job is not redone
    resumed = run_in_process(
        "obsdiff.prune", "-m", *TINY, "method=l1,obsdiff", f"hydra.sweep.dir={sweep}"
    )
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 1 and "1 job(s) of the sweep did not complete" in output
    assert "completed; nothing to do" in output and snapshot(sweep / "1") == finished


@pytest.mark.timeout(600)  # about 25 s here: sized for a loaded machine
@pytest.mark.parametrize(
    ("app", "extra", "change"),
    [("obsdiff.run", EVAL, "eval.seed=5"), ("obsdiff.prune", [], "sparsity=0.3")],
)
def test_refused_resume_changes_nothing(
    app: str, extra: list[str], change: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    common = [*TINY, *extra, f"paths.output_root={tmp_path}", f"hydra.run.dir={run}"]
    first = run_in_process(app, *common)  # the apps' own processes: the tests above
    assert first.returncode == 0, first.stdout[-3000:]
    assert (run / "denoiser.safetensors").is_file()
    assert not (run / "checkpoint").exists()  # gone once the run is recorded (keep_checkpoint)
    before, dense_before = snapshot(run), snapshot(tmp_path / "dense")
    again = run_in_process(app, *common, change)
    output = again.stdout + again.stderr
    assert again.returncode == 2, output[-3000:]
    key = change.split("=")[0]
    assert f"{key}: " in output and "holds a run with other settings" in output
    assert LOADED not in output and "Traceback" not in output
    assert snapshot(run) == before  # byte-identical, results.json and .hydra included
    assert snapshot(tmp_path / "dense") == dense_before  # no new dense evaluation either
    assert RunRecord.read(run).completed
    same = run_in_process(app, *common, "device=cpu")  # a neutral key: the same run, already done
    assert same.returncode == 0 and "completed; nothing to do" in same.stdout + same.stderr
    assert LOADED not in same.stdout + same.stderr
    assert snapshot(run) == before


INTERRUPT_DURING_EVAL = textwrap.dedent(
    """
    from pathlib import Path

    import obsdiff.eval.harness

    original = obsdiff.eval.harness.evaluate_pipeline

    def interrupted(pipe, model, settings, images_dir, *args, **kwargs):
        if Path(images_dir).name == "eval":  # the pruned model's evaluation, not the dense one
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return original(pipe, model, settings, images_dir, *args, **kwargs)

    obsdiff.eval.harness.evaluate_pipeline = interrupted
    """
)


@pytest.mark.timeout(600)  # about 20 s here: sized for a loaded machine
def test_interrupted_run_reads_incomplete_then_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, *EVAL, "save=false", f"paths.output_root={tmp_path}", f"hydra.run.dir={run}"]
    result = run_python(INTERRUPT_DURING_EVAL, "obsdiff.run", *args)
    output = result.stdout + result.stderr
    assert result.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    assert f"resume with the same command plus hydra.run.dir={run}" in output
    record = RunRecord.read(run)
    assert record.status == "interrupted" and record.eval is None
    assert (run / "checkpoint" / "progress.json").is_file()  # what the resume continues from

    assert report_main([str(run), "--out", str(tmp_path / "report")]) == 0
    rows = (tmp_path / "report" / "results.csv").read_text()
    assert "interrupted" in rows and ",completed," not in rows

    resumed = run_in_process("obsdiff.run", *args)  # the same command
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming after package 2 of 2" in resumed.stdout + resumed.stderr
    record = RunRecord.read(run)
    assert record.completed and record.eval is not None and record.eval.num_images == 2
    # save=false: no pruned model and, once finished, no checkpoint (a full denoiser copy)
    assert not (run / "checkpoint").exists() and not (run / "denoiser.safetensors").exists()


def test_keep_checkpoint_a_line_per_package_and_the_run_directory_last(tmp_path: Path) -> None:
    """A 4-package prune that keeps its checkpoint: a few lines per package off a terminal, not
    one per denoising step, and `run directory: <path>` last (a plain run leaves no checkpoint:
    test_refused_resume_changes_nothing)."""
    run = tmp_path / "run"
    result = run_app("obsdiff.prune", *TINY, "packages=4", "keep_checkpoint=true",
                     f"hydra.run.dir={run}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [f.name for f in (run / "checkpoint").glob("*.safetensors")] == [
        "denoiser-4.safetensors"
    ]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 12, "\n".join(lines)
    assert sum("package " in line and "calibration" in line for line in lines) == 4
    assert result.stdout.strip().splitlines()[-1].endswith(f"run directory: {run}")
    assert (run / "prune.log").read_text().count("run directory") == 1


CRASH_AT_30_PERCENT = textwrap.dedent(
    """
    import obsdiff.oneshot.run

    original = obsdiff.oneshot.run.prune_pipeline

    def crashing(job, *args, **kwargs):
        if job.sparsity == 0.3:
            raise RuntimeError("injected crash")  # a bug or an out-of-memory, not a setting
        return original(job, *args, **kwargs)

    obsdiff.oneshot.run.prune_pipeline = crashing
    """
)


def test_a_crashing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_python(
        CRASH_AT_30_PERCENT, "obsdiff.prune", "-m", *TINY, "sparsity=0.3,0.5",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    crashed, done = RunRecord.read(sweep / "0"), RunRecord.read(sweep / "1")
    assert crashed.status == "failed" and "injected crash" in (crashed.error or "")
    assert done.completed
    assert "1 job(s) of the sweep did not complete" in output
    assert "RuntimeError: injected crash" in output  # the traceback, in the log


def test_multi_process_runner_in_a_multirun_is_refused(tmp_path: Path) -> None:
    result = run_app(
        "obsdiff.prune", "-m", *TINY, "runner=ddp_cpu", "sparsity=0.3,0.5",
        f"paths.output_root={tmp_path}",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    (sweep,) = (tmp_path / "prune" / "multiruns").iterdir()  # no second sweep from a relaunch
    for job in ("0", "1"):
        record = RunRecord.read(sweep / job)
        assert record.status == "failed" and "inside a multirun" in (record.error or "")
    assert LOADED not in output


def test_sample_takes_one_prompt_as_text_and_refuses_batch_size_0(tmp_path: Path) -> None:
    run = tmp_path / "one"
    result = run_in_process("obsdiff.sample", "prompts=a red circle", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert [i["prompt"] for i in load(run / "samples.json")["images"]] == ["a red circle"]
    bad = run_in_process("obsdiff.sample", "batch_size=0", f"paths.output_root={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "batch_size=0 must be >= 1" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
