"""Settings from plain values: typed by their dataclass, each error naming its key with an
example; the shell's run-directory differences."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from obsdiff.app.config import ConfigError, settings
from obsdiff.app.shell import setting_differences
from obsdiff.calibration.sequential import CalibrationSettings
from obsdiff.oneshot.settings import PruneSettings
from obsdiff.utils.settings import SettingError, from_mapping, plain_defaults


pytestmark = pytest.mark.unit


@dataclass
class Example:
    count: int = field(default=4, metadata={"minimum": 1})
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    limit: float | None = field(default=None, metadata={"example": 24})
    mode: int | str = 4
    pair: tuple[int, int] | None = field(default=None, metadata={"hint": "a pair, e.g. [1,2]"})
    inner: CalibrationSettings = field(default_factory=CalibrationSettings)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rate": "half"}, r"^p\.rate='half' is not a number; set e.g. p\.rate=0\.5$"),
        ({"count": 2.5}, r"^p\.count=2\.5 is not an integer; set e.g. p\.count=4$"),
        ({"count": True}, r"^p\.count=True is not an integer"),
        ({"count": 0}, r"^p\.count=0 must be >= 1; set e.g. p\.count=4$"),
        ({"flag": "yes"}, r"^p\.flag='yes' is not true or false; set e.g. p\.flag=false$"),
        ({"limit": "x"}, r"^p\.limit='x' is not a number; set e.g. p\.limit=24$"),
        ({"mode": 2.5}, r"^p\.mode=2\.5 is not an integer"),
        ({"pair": 3}, r"^p\.pair=3: a pair, e\.g\. \[1,2\]$"),
        ({"pair": [0, 1, 2]}, r"^p\.pair=\[0, 1, 2\]: a pair"),
        ({"pair": [0.5, 2]}, r"^p\.pair=\[0\.5, 2\]: a pair"),
        ({"pair": [True, 2]}, r"^p\.pair=\[True, 2\]: a pair"),
        ({"inner": {"batch_size": "two"}}, r"^p\.inner\.batch_size='two' is not an integer"),
        ({"nope": 1}, r"^p\.nope is not a setting; p has count, rate"),
    ],
)
def test_every_wrong_value_names_its_key_and_an_example(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SettingError, match=message):
        from_mapping(Example, data, "p.")


def test_values_are_converted_and_the_rest_keep_their_defaults() -> None:
    got = from_mapping(Example, {"count": "7", "rate": 2, "mode": "auto", "pair": [1, 23]})
    assert (got.count, got.rate, got.mode, got.pair) == (7, 2.0, "auto", (1, 23))
    assert isinstance(got.count, int) and isinstance(got.rate, float)
    assert got.inner == CalibrationSettings() and got.limit is None and got.name == "x"
    nested = from_mapping(Example, {"inner": {"seed": 3}})
    assert nested.inner == CalibrationSettings(seed=3)


def test_plain_defaults_are_the_dataclass_defaults_as_plain_data() -> None:
    defaults = plain_defaults(PruneSettings)
    assert defaults["offload"] == {"statistics": False, "components": False}
    assert from_mapping(PruneSettings, defaults) == PruneSettings()


def test_settings_of_a_config_node_raise_one_config_error() -> None:
    node = OmegaConf.create({"sparsity": "half", "model": {"a": 1}})
    with pytest.raises(ConfigError, match=r"sparsity='half' is not a number; set e.g. sparsity="):
        settings(node, PruneSettings, only=PruneSettings.values())
    node = OmegaConf.create({"blocks": 3})
    with pytest.raises(ConfigError, match=r"blocks=3: blocks must be null .* or \[start, end\)"):
        settings(node, PruneSettings, only=PruneSettings.values())
    assert settings(OmegaConf.create({"blocks": [1, 23]}), PruneSettings).blocks == (1, 23)


def test_setting_differences_ignore_neutral_keys() -> None:
    old = {"sparsity": 0.5, "eval": {"seed": 0}, "paths": {"output_root": "a"}, "device": "cpu"}
    new = {"sparsity": 0.5, "eval": {"seed": 5, "new": 1}, "paths": {"output_root": "b"}}
    assert setting_differences(old, new) == ["eval.new: (unset) -> 1", "eval.seed: 0 -> 5"]
    assert setting_differences(old, old) == []
