"""Nothing lost when runs collide, the disk fills, a run is killed or a path is wrong, run as a
user would (subprocesses): jobs started together get their own directories, one process at a
time works in a run directory, SIGTERM reads as an interruption and resumes into the same W&B
run, a write that fails mid-run keeps the last checkpoint and says how to resume, and a bad
command line is refused before the heavy libraries load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from app_runner import REPO_ROOT, TINY_PRUNE, run_app, run_in_process, run_python

from obsdiff.artifacts.lock import LOCK_FILE
from obsdiff.artifacts.pruned import read_manifest
from obsdiff.artifacts.record import RunRecord


pytestmark = pytest.mark.slow

TINY = [*TINY_PRUNE, "method=magnitude"]
HEAVY = ("diffusers", "transformers", "lightning", "wandb")


def launch(*args: str, prelude: str = "", go: Path | None = None) -> subprocess.Popen[str]:
    """`python -m obsdiff.prune <args>` started, not waited for (`prelude`: code run first;
    `go`: the file WAIT_FOR_GO waits for)."""
    code = prelude + textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["obsdiff.prune", *{list(args)!r}]
        runpy.run_module("obsdiff.prune", run_name="__main__", alter_sys=True)
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "OBSDIFF_TEST_GO": str(go)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


WAIT_FOR_GO = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import obsdiff.oneshot.run

    original = obsdiff.oneshot.run.prune_pipeline

    def waiting(*args, **kwargs):  # holds the run directory until the test says go
        go, deadline = Path(os.environ["OBSDIFF_TEST_GO"]), time.monotonic() + 300
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return original(*args, **kwargs)

    obsdiff.oneshot.run.prune_pipeline = waiting
    """
)


def test_a_refusal_comes_before_the_heavy_libraries(tmp_path: Path) -> None:
    """`sparsity=half` from the real entry point: exit 2, one message, and diffusers,
    transformers, Lightning and W&B never imported (the refusal takes seconds, not the ML
    stack's import time). Every other refusal of the command line takes the same path:
    tests/unit/test_preflight.py checks them in process."""
    report = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('imported:', [m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = run_python(report, "obsdiff.prune", "sparsity=half", f"paths.output_root={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1 and "sparsity='half' is not a number" in output
    assert "imported: []" in output and "Traceback" not in output
    assert not any(tmp_path.iterdir())  # nothing left behind


@pytest.mark.timeout(600)
def test_prunes_started_together_each_get_their_own_directory(tmp_path: Path) -> None:
    jobs = [
        launch(*TINY, f"sparsity={s}", f"paths.output_root={tmp_path}") for s in (0.2, 0.4, 0.6)
    ]
    outcomes = [finish(job) for job in jobs]
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes[0][1][-3000:]
    runs = sorted((tmp_path / "prune" / "runs").iterdir())
    assert len(runs) == 3
    sparsities = sorted(read_manifest(run)["sparsity"] for run in runs)
    assert sparsities == [0.2, 0.4, 0.6]
    for (_, output), sparsity in zip(outcomes, (0.2, 0.4, 0.6), strict=True):
        printed = Path(output.strip().splitlines()[-1].split("run directory: ")[1])
        assert read_manifest(printed)["sparsity"] == sparsity


@pytest.mark.timeout(600)
def test_runs_started_together_into_one_directory_one_works(tmp_path: Path) -> None:
    """Three prunes into one directory at once, two of them with the same settings: the first
    to hold it works (held until the other two have ended), the others exit 2 naming it, and
    the directory holds that one run, whole."""
    run, go = tmp_path / "run", tmp_path / "go"
    jobs = [
        launch(*TINY, f"sparsity={s}", f"hydra.run.dir={run}", prelude=WAIT_FOR_GO, go=go)
        for s in (0.4, 0.4, 0.6)
    ]
    deadline = time.monotonic() + 300
    while sum(job.poll() is None for job in jobs) > 1:  # the two that came later are refused
        assert time.monotonic() < deadline
        time.sleep(0.2)
    go.touch()
    outcomes = [finish(job) for job in jobs]
    assert sorted(code for code, _ in outcomes) == [0, 2, 2], [o[-2000:] for _, o in outcomes]
    winner = next(i for i, (code, _) in enumerate(outcomes) if code == 0)
    for code, output in outcomes:
        if code == 2:
            assert output.count("[ERROR]") == 1 and "Traceback" not in output
            assert f"is in use by process {jobs[winner].pid} on" in output
    record = RunRecord.read(run)
    assert record.completed and record.identity.sparsity == (0.4, 0.4, 0.6)[winner]
    assert read_manifest(run)["sparsity"] == record.identity.sparsity
    assert not (run / LOCK_FILE).exists()


SIGTERM_DURING_THE_SECOND_PACKAGE = textwrap.dedent(
    """
    import os, signal
    import obsdiff.oneshot.checkpoint

    original = obsdiff.oneshot.checkpoint.Checkpointer.save

    def save(self, index, report):
        original(self, index, report)
        if index == 0:  # package 1 committed: a time limit strikes
            os.kill(os.getpid(), signal.SIGTERM)

    obsdiff.oneshot.checkpoint.Checkpointer.save = save
    """
)


@pytest.mark.timeout(600)
def test_sigterm_reads_as_interrupted_and_resumes_into_the_same_wandb_run(
    tmp_path: Path,
) -> None:
    """SIGTERM after the first package, then the resume; copies of the run along the way, one
    with its checkpoint cut short, one with its pruned weights cut short, are refused before any
    model loads (exit 2, one message naming the file and the fix, nothing changed)."""
    run = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run}", "+tracking=wandb", "tracking.mode=offline"]
    env = {"WANDB_MODE": None, "WANDB_DIR": None}
    result = run_python(SIGTERM_DURING_THE_SECOND_PACKAGE, "obsdiff.prune", *args, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 143, output[-3000:]
    assert f"interrupted (SIGTERM); resume with the same command plus hydra.run.dir={run}" in (
        output
    )
    assert "Traceback" not in output
    record = RunRecord.read(run)
    assert record.status == "interrupted" and "SIGTERM" in str(record.error)
    assert not (run / LOCK_FILE).exists()

    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    progress = damaged / "checkpoint" / "progress.json"
    progress.write_text(progress.read_text()[:40])
    before = snapshot(damaged)
    refused = run_in_process("obsdiff.prune", *TINY, f"hydra.run.dir={damaged}")
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1 and f"{progress} is damaged" in output
    assert f"delete {damaged / 'checkpoint'}/" in output and "loaded model" not in output
    assert snapshot(damaged) == before

    resumed = run_app("obsdiff.prune", *args, env=env)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming after package 1 of 2" in output
    assert RunRecord.read(run).completed
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2  # the killed start and the resumed one...
    assert len({d.name.rsplit("-", 1)[1] for d in offline_runs}) == 1  # ...are one W&B run

    cut = tmp_path / "cut"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("wandb"))
    weights = cut / "denoiser.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    evaluation = run_in_process(
        "obsdiff.evaluate", f"pruned={cut}", "eval=tiny", f"hydra.run.dir={cut}-e"
    )
    output = evaluation.stdout + evaluation.stderr
    assert evaluation.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1 and str(weights) in output
    assert "loaded model" not in output and "Traceback" not in output
    assert not Path(f"{cut}-e").exists()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(directory)): f.read_bytes() for f in directory.rglob("*") if f.is_file()
    }


DISK_FULL_AT_THE_SECOND_PACKAGE = textwrap.dedent(
    """
    from pathlib import Path
    import safetensors, safetensors.torch

    original = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if "denoiser-2" in str(filename):  # the second package's checkpoint: the disk fills
            Path(filename).write_bytes(b"the first bytes")
            raise safetensors.SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                'message: "No space left on device" })'
            )
        return original(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file
    """
)


@pytest.mark.timeout(600)
def test_a_full_disk_mid_run_keeps_the_checkpoint_and_says_how_to_resume(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run}"]
    result = run_python(DISK_FULL_AT_THE_SECOND_PACKAGE, "obsdiff.prune", *args)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert output.count("[ERROR]") == 1 and "Traceback" not in output
    assert f"could not write {run / 'checkpoint' / 'denoiser-2.safetensors'} (" in output
    assert "No space left on device" in output
    assert f"the last complete checkpoint in {run / 'checkpoint'} is kept" in output
    assert f"resume with the same command plus hydra.run.dir={run}" in output
    assert RunRecord.read(run).status == "failed"
    leftovers = sorted(f.name for f in (run / "checkpoint").iterdir())
    assert leftovers == ["denoiser-1.safetensors", "progress.json"]

    resumed = run_in_process("obsdiff.prune", *args)  # the same command, here in this process
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming after package 1 of 2" in output and RunRecord.read(run).completed


def test_an_unwritable_run_directory_is_refused_before_any_work() -> None:
    """Nobody may create files under /proc, root included: the probe is a real write, so a
    read-only filesystem or a folder without permission answers the same way."""
    result = run_in_process("obsdiff.prune", *TINY, "hydra.run.dir=/proc/obsdiff-run")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("[ERROR]") == 1 and "hydra.run.dir=/proc/obsdiff-run" in output
    assert "cannot be written" in output and "Traceback" not in output
