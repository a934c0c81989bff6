"""The command line checked before the heavy imports (obsdiff.app.preflight), in process: every
refusal is exit code 2 with one message naming the key or option, the closest names, and the
fix; a good command line passes through untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from obsdiff.app.preflight import check_command_line


pytestmark = pytest.mark.unit


def refusal(config: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one message a refused command line prints (exit code 2 asserted)."""
    with pytest.raises(SystemExit) as exit_info:
        check_command_line(config, argv)
    assert exit_info.value.code == 2
    output = capsys.readouterr().out
    assert output.count("[ERROR]") == 1, output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    return output


@pytest.mark.parametrize(
    ("config", "argv", "expected"),
    [
        ("prune", ["sparsity=half"], ["sparsity='half' is not a number", "sparsity=0.5"]),
        ("prune", ["+sparsty=0.3"], ["sparsty:", "did you mean sparsity?", "--cfg job"]),
        ("prune", ["sparsty=0.3"], ["sparsty:", "did you mean sparsity?"]),
        ("prune", ["++calibration.sed=1"], ["calibration.sed", "calibration.seed?"]),
        ("prune", ["method.foo=1"], ["method.foo: 'method' has no such key"]),
        (  # a parameter of another method: the method that has it, and the fix
            "prune",
            ["method=wanda", "method.token_weighting=cfg_response"],
            ["method=wanda has no such key, method=obsdiff has", "use method=obsdiff or drop"],
        ),
        ("prune", ["method.token_weighting=saliency"], ["'saliency'; use one of none, cfg"]),
        ("prune", ["method=nosuch"], ["method=nosuch", "no option 'nosuch'", "obsdiff, wanda"]),
        ("prune", ["method=obsdif"], ["did you mean method=obsdiff or method=ecodiff?"]),
        ("prune", ["weighting=nosuch"], ["weighting=nosuch", "log_decrease"]),
        ("run", ["eval=nosuch"], ["eval=nosuch", "coco2014_5k"]),
        ("sample", ["model=nosuch"], ["model=nosuch", "tiny_sd3"]),
        ("evaluate", ["pruned_run=outputs/x"], ["pruned_run:", "did you mean pruned?"]),
        ("prune", ["-m", "sparsity=0.2,0.4", "method=wanda,nosuch"], ["method=nosuch"]),
        ("prune", ["calibration.batch_size=0"], ["calibration.batch_size=0 must be >= 1"]),
        ("recover", ["pruned=x", "recover.steps=0"], ["recover.steps=0 must be >= 1"]),
        ("recover", ["pruned=x", "recover.precision=fp8"], ["recover.precision='fp8'"]),
        ("run", ["eval.bootstrap.samples=many"], ["eval.bootstrap.samples"]),
        ("prune", ["plan_only=maybe"], ["plan_only"]),
        ("prune", ["sparsity=[1"], ["'sparsity=[1' cannot be read"]),
    ],
)
def test_refused_with_one_message_naming_the_key(
    config: str, argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    output = refusal(config, argv, capsys)
    for text in expected:
        assert text in output, output


@pytest.mark.parametrize(
    ("config", "argv"),
    [
        ("prune", ["method=wanda", "sparsity=0.3", "calibration.seed=3"]),
        ("prune", ["-m", "method=wanda,magnitude", "sparsity=0.3,0.5"]),
        ("run", ["+experiment=toy_1_unstructured"]),  # a config group added with `+`
        ("run", ["eval=tiny", "eval.prompts.num_prompts=2", "hydra.job.name=x"]),
        ("evaluate", ["pruned=outputs/somewhere"]),
        ("recover", ["pruned=outputs/somewhere", "recover.steps=3"]),  # a key that must be given
        ("prune", ["--cfg", "job", "+anything=1"]),  # not a run: Hydra prints the config
        ("prune", ["-m", "sparsity=0.3,half"]),  # a bad job of a sweep: recorded by the app
        ("prune", ["-m", "sparsity=0.3,0.5", "plan_only=maybe"]),  # likewise
        ("sample", ["--multirun", "model=glob(tiny_*)"]),  # make sample
        ("run", ["-m", "model=sd3_medium,sd35_large", "model.variant=fp16"]),  # in both options
        ("prune", ["model=sd3_medium", "+model.load_kwargs.use_safetensors=true"]),  # free-form
        ("prune", ["hydra.mode=MULTIRUN", "sparsity=0.3,0.5"]),
        ("prune", ["hydra.run.dir=${paths.output_root}/${hydra:runtime.choices.method}"]),
    ],
)
def test_good_command_lines_pass(config: str, argv: list[str], tmp_path: Path) -> None:
    check_command_line(config, [*argv, f"paths.output_root={tmp_path / 'out'}"])


def test_an_output_path_the_filesystem_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    output = refusal("prune", [f"hydra.run.dir={a_file}"], capsys)
    assert f"hydra.run.dir={a_file}: {a_file} is a file" in output
    output = refusal("prune", [f"paths.output_root={a_file / 'runs'}"], capsys)
    assert f"paths.output_root={a_file / 'runs'}: {a_file} is a file" in output
    output = refusal("run", [f"paths.dense_cache={a_file}"], capsys)
    assert "paths.dense_cache" in output
    output = refusal("prune", ["-m", "sparsity=0.2,0.4", f"hydra.sweep.dir={a_file}"], capsys)
    assert "hydra.sweep.dir" in output
    assert a_file.read_text() == "x"


def test_a_directory_that_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nobody may create files under /proc, root included (a read-only filesystem answers
    the same way: the probe is a real write)."""
    output = refusal("prune", ["hydra.run.dir=/proc/obsdiff-run"], capsys)
    assert "hydra.run.dir=/proc/obsdiff-run: /proc cannot be written" in output
