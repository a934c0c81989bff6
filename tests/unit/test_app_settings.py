"""The shell's setting checks: typed values naming their key, run-directory differences."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from obsdiff.app.config import ConfigError
from obsdiff.app.settings import block_range, number
from obsdiff.app.shell import setting_differences


pytestmark = pytest.mark.unit


def test_number_names_the_key_and_an_example() -> None:
    node = OmegaConf.create({"sparsity": "half", "packages": 2.5, "seed": True, "a": {"b": "7"}})
    with pytest.raises(ConfigError, match=r"sparsity='half' is not a number; set e.g. sparsity="):
        number(node, "sparsity", float, "0.5")
    with pytest.raises(ConfigError, match=r"packages=2.5 is not an integer"):
        number(node, "packages", int, "4")
    with pytest.raises(ConfigError, match=r"seed=True is not an integer"):
        number(node, "seed", int, "0")
    assert number(node, "a.b", int, "1") == 7 and isinstance(number(node, "a.b", int, "1"), int)
    assert number(OmegaConf.create({"x": 4}), "x", float, "1") == 4.0


@pytest.mark.parametrize("value", [3, "3", [1], [0, 1, 2], [0, "x"], [0.5, 2], [True, 2]])
def test_block_range_refuses_anything_but_two_integers(value: object) -> None:
    node = OmegaConf.create({"blocks": value})
    with pytest.raises(ConfigError, match=r"blocks=.* must be null .* or \[start, end\)"):
        block_range(node.blocks)


def test_block_range_accepts_null_and_a_pair() -> None:
    assert block_range(None) is None
    assert block_range(OmegaConf.create({"b": [1, 23]}).b) == (1, 23)


def test_setting_differences_ignore_neutral_keys() -> None:
    old = {"sparsity": 0.5, "eval": {"seed": 0}, "paths": {"output_root": "a"}, "device": "cpu"}
    new = {"sparsity": 0.5, "eval": {"seed": 5, "new": 1}, "paths": {"output_root": "b"}}
    assert setting_differences(old, new) == ["eval.new: (unset) -> 1", "eval.seed: 0 -> 5"]
    assert setting_differences(old, old) == []
