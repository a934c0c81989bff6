"""The locked tested environment: requirements/lock.txt, the README's table, pyproject's ranges."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"


def _load_check_lock() -> ModuleType:
    path = ROOT / "requirements" / "check_lock.py"
    spec = importlib.util.spec_from_file_location("check_lock", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = _load_check_lock()


@pytest.fixture(scope="module")
def locked() -> dict[str, str]:
    pins: dict[str, str] = check_lock.parse_lock(LOCK.read_text())
    return pins


def _x86_torch_spec() -> dict[str, str]:
    """{"torch": version, "torchvision": version}: the Makefile's TORCH_SPEC for x86_64."""
    branch = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("ifeq") and "aarch64" in line:
            branch = "aarch64"
        elif line == "else" and branch == "aarch64":
            branch = "x86_64"
        elif line == "endif":
            branch = None
        elif branch == "x86_64" and line.startswith("TORCH_SPEC ?="):
            pins = re.findall(r"([A-Za-z0-9_.-]+)==(\S+)", line)
            return {check_lock.canonical(name): version for name, version in pins}
    raise AssertionError("no x86_64 TORCH_SPEC in the Makefile")


def _readme_versions() -> dict[str, str]:
    """{package: version} from the table of README.md's "Tested versions" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Tested versions", 1)[1].split("\n## ", 1)[0]
    versions: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for names, numbers in zip(cells[0::3], cells[1::3], strict=False):
            if not names or names == "package":
                continue
            name_list, number_list = names.split(" / "), numbers.split(" / ")
            assert len(name_list) == len(number_list), f"README row {line!r}"
            for name, number in zip(name_list, number_list, strict=True):
                versions[check_lock.canonical(name.strip("` "))] = number.strip("` ")
    return versions


def test_readme_tested_versions_agree_with_the_lock(locked: dict[str, str]) -> None:
    readme = _readme_versions()
    torch_pair = _x86_torch_spec()
    assert {"torch", "torchvision", "diffusers", "transformers"} <= readme.keys()
    expected = {name: torch_pair.get(name, locked.get(name)) for name in readme}
    assert readme == expected


def test_lock_is_well_formed() -> None:
    seen: set[str] = set()
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", line), line
        name = check_lock.canonical(line.split("==")[0])
        assert name not in seen, f"{name} locked twice"
        seen.add(name)
        assert name not in {"torch", "torchvision", "obsdiff"}, line
        assert not name.startswith(("nvidia-", "cuda-", "triton")), line
    assert len(seen) > 50
    assert {"pytest", "ruff", "mypy", "hydra-joblib-launcher", "hydra-submitit-launcher"} <= seen
    assert LOCK.read_text().startswith("#"), "the header says how the lock was generated"


def test_check_lock_reports_mismatches_and_accepts_an_identical_freeze() -> None:
    lock = "# header\nJinja2==3.1.6\ntyping_extensions==4.16.0\nnumpy==2.4.6\n"
    locked = check_lock.parse_lock(lock)
    identical = check_lock.parse_freeze(
        [
            "# Editable Git install with no remote (obsdiff==0.1.0)",
            "-e /somewhere/obsdiff",
            "jinja2==3.1.6",
            "typing-extensions==4.16.0",
            "numpy==2.4.6",
            "torch==2.14.1",
        ]
    )
    installed = {name: version for name, version in identical.values()}
    assert check_lock.mismatches(locked, installed) == []

    made_up = {"Jinja2": "3.1.5", "numpy": "2.4.6", "extra-package": "1.0"}
    assert check_lock.mismatches(locked, made_up) == [
        "jinja2: locked 3.1.6, installed 3.1.5",
        "typing-extensions: locked 4.16.0, not installed",
    ]
    with pytest.raises(ValueError, match="locked twice"):
        check_lock.parse_lock("numpy==2.4.6\nNumPy==2.4.5\n")
    with pytest.raises(ValueError, match="not `name==version`"):
        check_lock.parse_lock("numpy>=2\n")


def test_check_lock_main_exit_status(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==2.4.6\n")
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("numpy==2.4.6\ntorch==2.14.1\n")
    assert check_lock.main(["--lock", str(lock), "--freeze", str(freeze)]) == 0
    freeze.write_text("numpy==2.4.5\n")
    assert check_lock.main(["--lock", str(lock), "--freeze", str(freeze)]) == 1


def test_written_lock_leaves_out_obsdiff_torch_and_cuda_wheels(tmp_path: Path) -> None:
    freeze = check_lock.parse_freeze(
        [
            "-e /work/obsdiff",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "nvidia-cublas==13.1.1.3",
            "cuda-toolkit==13.0.3.0",
            "triton==3.8.0",
            "Jinja2==3.1.6",
            "accelerate==1.15.0",
        ]
    )
    text = check_lock.render_lock(freeze, "torch==2.14.1 torchvision==0.29.1")
    assert check_lock.parse_lock(text) == {"accelerate": "1.15.0", "jinja2": "3.1.6"}


def test_pyproject_ranges_admit_the_locked_versions(locked: dict[str, str]) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        requirements += group
    pinned = {**locked, **_x86_torch_spec()}
    for line in requirements:
        requirement = Requirement(line)
        name = check_lock.canonical(requirement.name)
        assert name in pinned, f"{name} (pyproject.toml) is not in the lock"
        assert requirement.specifier.contains(Version(pinned[name]), prereleases=True), (
            f"{line}: locked {pinned[name]}"
        )
