"""Quantization's settings and checks, and the quality gate's limits: every option of the
`quantize` config group, the device each scheme needs, the int4 group size against the widths,
the gate's parsing and its checks against an interval's bound."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml

from obsdiff.app.config import CONF_DIR
from obsdiff.eval.gate import GateError, Limit, check_gate_metrics, gate_checks, parse_gate
from obsdiff.models.base import pattern_regex
from obsdiff.quantization import SCHEMES, QuantizeError, QuantizeSettings
from obsdiff.quantization.settings import check_device, check_widths


pytestmark = pytest.mark.unit

OPTIONS = sorted(p.stem for p in (CONF_DIR / "quantize").glob("*.yaml") if p.stem != "none")


def option(name: str) -> QuantizeSettings:
    values = yaml.safe_load((CONF_DIR / "quantize" / f"{name}.yaml").read_text())
    values.pop("defaults")
    return QuantizeSettings(**values)


def test_every_scheme_is_an_option_of_the_config_group() -> None:
    assert OPTIONS == sorted(SCHEMES)
    for name in OPTIONS:
        assert option(name).scheme == name
        assert option(name).torchao_config() is not None  # torchao builds it (CPU or not)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"scheme": "int3"}, "quantize.scheme='int3' is not a scheme; use one of"),
        ({"scheme": "int4_weight_only"}, "quantize.group_size=None: int4_weight_only takes"),
        ({"scheme": "int4_weight_only", "group_size": 100}, "takes one of [32, 64, 128, 256]"),
        ({"scheme": "int8_dynamic", "group_size": 128}, "drop it (quantize.group_size=null)"),
    ],
)
def test_bad_settings_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(QuantizeError, match=re.escape(message)):
        QuantizeSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["float8_weight_only", "float8_dynamic", "int4_weight_only"])
def test_gpu_schemes_are_refused_on_the_cpu(scheme: str) -> None:
    settings = option(scheme)
    with pytest.raises(QuantizeError, match=f"quantize={scheme} needs a CUDA GPU .*device is cpu"):
        check_device(settings, "cpu")
    check_device(option("int8_weight_only"), "cpu")  # the int8 schemes run here


def test_float8_is_refused_on_a_gpu_older_than_ada(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(QuantizeError, match=r"compute capability >= 8.9; NVIDIA A100 is 8.0"):
        check_device(option("float8_dynamic"), "cuda")
    check_device(option("int4_weight_only"), "cuda")  # int4 from 8.0


def test_the_group_size_must_divide_every_width() -> None:
    settings = option("int4_weight_only")  # group size 128
    check_widths(settings, {"a.to_q": 3072, "a.to_out": 12288})
    with pytest.raises(QuantizeError, match=r"width 3008 of b.ff .*use quantize.group_size=64"):
        check_widths(settings, {"a.to_q": 3072, "b.ff": 3008})  # 64 x 47
    with pytest.raises(QuantizeError, match="no int4 group size fits it"):
        check_widths(settings, {"odd": 100})


def test_a_module_pattern_names_the_module_and_what_lies_in_it() -> None:
    top = pattern_regex("proj_out")
    assert re.fullmatch(top, "proj_out") and re.fullmatch(top, "proj_out.weight")
    assert not re.fullmatch(top, "single_transformer_blocks.0.proj_out")  # Flux's single blocks
    assert not re.fullmatch(top, "proj_out_2")
    blocks = pattern_regex("transformer_blocks.*.norm1.linear")
    assert re.fullmatch(blocks, "transformer_blocks.12.norm1.linear")
    assert re.fullmatch(blocks, "transformer_blocks.12.norm1.linear.0")  # its low-rank factors
    assert not re.fullmatch(blocks, "transformer_blocks.12.norm1_context.linear")
    with pytest.raises(ValueError, match="only `\\*` is a wildcard"):
        pattern_regex("blocks.[0-9]")


def test_a_gate_is_read_from_a_list_or_one_string() -> None:
    expected = [Limit("lpips", "<=", 0.15), Limit("psnr", ">=", 30.0)]
    assert parse_gate(["lpips<=0.15", "psnr >= 30"]) == expected
    assert parse_gate("lpips<=0.15,psnr>=30") == expected
    assert parse_gate(None) == [] and parse_gate([]) == []
    assert str(expected[0]) == "lpips<=0.15"


@pytest.mark.parametrize("bad", ["lpips<0.15", "lpips=0.15", "<=0.15", "lpips<=high", "psnr>=3e"])
def test_a_malformed_limit_is_refused_with_the_form(bad: str) -> None:
    with pytest.raises(GateError, match=f"gate: {re.escape(repr(bad))} is not a limit; write"):
        parse_gate([bad])


def test_a_limit_on_a_metric_not_computed_is_refused() -> None:
    with pytest.raises(GateError, match="names 'lpips', which this evaluation does not compute"):
        check_gate_metrics(parse_gate("lpips<=0.15"), ["psnr", "ssim"])


def test_each_limit_is_checked_against_the_bound_that_could_break_it() -> None:
    metrics = {"lpips": 0.10, "psnr": 31.0, "fid": 4.0}
    intervals = {"lpips": [0.08, 0.16], "psnr": [29.5, 32.0]}
    checks = gate_checks(
        parse_gate("lpips<=0.15,psnr>=29,psnr>=30,fid<=5,ssim>=0.5"), metrics, intervals
    )
    assert [c.passed for c in checks] == [False, True, False, True, False]
    assert checks[0].measured == 0.16 and checks[0].statistic.startswith("upper bound")
    assert checks[1].measured == 29.5 and checks[1].statistic.startswith("lower bound")
    assert checks[3].statistic == "value (no interval)"  # the mean 0.10 alone would pass lpips
    assert math.isnan(checks[4].measured) and checks[4].statistic == "not measured"


def test_the_manual_lists_every_familys_do_not_compress_list() -> None:
    """docs/apps/quantize.md's table names every pattern of every family's list, in the row of
    the family's name, under the column of its reason."""
    from obsdiff.models import ADAPTERS

    text = (CONF_DIR.parent / "docs" / "apps" / "quantize.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    header = next(line for line in text.splitlines() if line.startswith("| family |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    names = {"sd3": "SD3", "flux": "Flux.1", "unet": "UNet", "pixart": "PixArt", "wan": "Wan",
             "qwen_image": "Qwen-Image", "flux2": "FLUX.2"}  # fmt: skip
    for cls in ADAPTERS:
        (row,) = [r for r in rows if names[cls.family] in r.split("|")[1]]
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
        for why, patterns in cls.do_not_compress().items():
            listed = re.findall(r"`([^`]+)`", cells[why])
            assert listed == list(patterns), (cls.family, why)
