"""Weight quantization's settings and schemes, said once: the `quantize` config group's keys and
`obsdiff.quantize`'s keyword arguments; the torchao configuration of each scheme; the checks
that come before any model loads (the device a scheme needs, an int4 group size that divides
every width).

Every scheme quantizes the denoiser's linears, except those on the family's do-not-compress list
(`ModelAdapter.do_not_compress`), which stay in the model's dtype. Quantization is torchao's
(`quantize_`, the library diffusers integrates as `TorchAoConfig`), module by module, exactly as
diffusers quantizes a model it loads with that config (`obsdiff.quantization.apply`).

    scheme              torchao config                              device
    int8_weight_only    Int8WeightOnlyConfig (per row, symmetric)   CPU or GPU
    int8_dynamic        Int8DynamicActivationInt8WeightConfig       CPU or GPU
    float8_weight_only  Float8WeightOnlyConfig (e4m3)               GPU, compute capability >= 8.9
    float8_dynamic      Float8DynamicActivationFloat8WeightConfig   GPU, compute capability >= 8.9
                        (per row, as fixes of per-tensor scaling
                        outliers did)
    int4_weight_only    Int4WeightOnlyConfig (groups of group_size, GPU, compute capability >= 8.0
                        tinygemm's tile-packed layout)

The int8 and float8 schemes are symmetric: a zero weight is stored as a zero, so a 2:4 or
unstructured mask survives them exactly. torchao's int4 weight-only layouts keep a floating
zero point per group (tinygemm's asymmetric scheme; its symmetric layout needs the `mslk` kernels,
not on PyPI): a pruned zero comes back within half a quantization step of zero, and the run
records how many stayed exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch


if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig


@dataclass(frozen=True)
class Scheme:
    """What one scheme is: its torchao config class, the GPU it needs (None: the CPU too),
    whether it keeps exact zeros, whether it takes a group size."""

    config: str
    capability: tuple[int, int] | None = None
    exact_zeros: bool = True
    grouped: bool = False


SCHEMES: dict[str, Scheme] = {
    "int8_weight_only": Scheme("Int8WeightOnlyConfig"),
    "int8_dynamic": Scheme("Int8DynamicActivationInt8WeightConfig"),
    "float8_weight_only": Scheme("Float8WeightOnlyConfig", capability=(8, 9)),
    "float8_dynamic": Scheme("Float8DynamicActivationFloat8WeightConfig", capability=(8, 9)),
    "int4_weight_only": Scheme(
        "Int4WeightOnlyConfig", capability=(8, 0), exact_zeros=False, grouped=True
    ),
}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm's int4 kernels take


class QuantizeError(ValueError):
    """A quantization that cannot run as asked; raised before any model loads."""


@dataclass(frozen=True)
class QuantizeSettings:
    """Weight quantization of a denoiser (`conf/quantize/<scheme>.yaml`).

    Attributes:
        scheme: One of `SCHEMES`: int8_weight_only, int8_dynamic, float8_weight_only,
            float8_dynamic, int4_weight_only.
        group_size: int4_weight_only: the weights of each output row quantized in groups of
            this many inputs (32, 64, 128 or 256; it must divide every quantized width).
        keep_out: Keep the family's do-not-compress list (modulation, embedders, final
            projection) in the model's dtype; false quantizes it too (to measure what the list
            protects, never to ship).
    """

    scheme: str = field(default="int8_weight_only", metadata={"example": "int8_weight_only"})
    group_size: int | None = field(default=None, metadata={"example": 128, "minimum": 1})
    keep_out: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizeError(
                f"quantize.scheme={self.scheme!r} is not a scheme; use one of {list(SCHEMES)} "
                "(conf/quantize/)"
            )
        grouped = SCHEMES[self.scheme].grouped
        if grouped and self.group_size not in INT4_GROUP_SIZES:
            raise QuantizeError(
                f"quantize.group_size={self.group_size}: {self.scheme} takes one of "
                f"{list(INT4_GROUP_SIZES)}, e.g. quantize.group_size=128"
            )
        if not grouped and self.group_size is not None:
            raise QuantizeError(
                f"quantize.group_size={self.group_size}: {self.scheme} quantizes whole rows; "
                "drop it (quantize.group_size=null)"
            )

    @property
    def name(self) -> str:
        """The scheme with its group size and list setting, as records and reports name it."""
        group = f"_g{self.group_size}" if self.group_size else ""
        return f"{self.scheme}{group}{'' if self.keep_out else '_all'}"

    def as_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "keep_out": self.keep_out}

    def torchao_config(self) -> AOBaseConfig:
        """The torchao configuration of one quantized linear."""
        from torchao import quantization

        if self.scheme == "float8_dynamic":  # per-row scales: robust to outlier channels
            return quantization.Float8DynamicActivationFloat8WeightConfig(
                granularity=quantization.PerRow()
            )
        if self.scheme == "int4_weight_only":
            return quantization.Int4WeightOnlyConfig(
                group_size=self.group_size, int4_packing_format="tile_packed_to_4d"
            )
        return getattr(quantization, SCHEMES[self.scheme].config)()  # type: ignore[no-any-return]

    def config_code(self) -> str:
        """The torchao config as Python source, for a model card's load code."""
        if self.scheme == "float8_dynamic":
            return "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())"
        if self.scheme == "int4_weight_only":
            return (
                f"Int4WeightOnlyConfig(group_size={self.group_size}, "
                'int4_packing_format="tile_packed_to_4d")'
            )
        return f"{SCHEMES[self.scheme].config}()"

    def imports(self) -> list[str]:
        """The torchao names `config_code` uses."""
        names = [SCHEMES[self.scheme].config]
        return [*names, "PerRow"] if self.scheme == "float8_dynamic" else names


def check_device(settings: QuantizeSettings, device: str | torch.device) -> None:
    """QuantizeError unless `device` can run the scheme (float8: a GPU of compute capability
    >= 8.9; int4: >= 8.0), naming the fix; before anything loads."""
    need = SCHEMES[settings.scheme].capability
    if need is None:
        return
    device = torch.device(device)
    wanted = f"a CUDA GPU of compute capability >= {need[0]}.{need[1]}"
    cpu_schemes = [name for name, s in SCHEMES.items() if s.capability is None]
    if device.type != "cuda" or not torch.cuda.is_available():
        raise QuantizeError(
            f"quantize={settings.scheme} needs {wanted}; this run's device is {device}: use "
            f"one of {cpu_schemes} here"
        )
    have = torch.cuda.get_device_capability(device)
    if have < need:
        raise QuantizeError(
            f"quantize={settings.scheme} needs {wanted}; {torch.cuda.get_device_name(device)} "
            f"is {have[0]}.{have[1]}: use one of {cpu_schemes} (or int4_weight_only from 8.0)"
        )


def check_widths(settings: QuantizeSettings, widths: dict[str, int]) -> None:
    """QuantizeError unless the group size divides the input width of every linear to be
    quantized (`widths`: name -> in_features), naming the first that it does not."""
    if settings.group_size is None:
        return
    odd = {name: width for name, width in widths.items() if width % settings.group_size}
    if odd:
        name, width = next(iter(odd.items()))
        fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
        fix = f"use quantize.group_size={fits[-1]}" if fits else "no int4 group size fits it"
        raise QuantizeError(
            f"quantize.group_size={settings.group_size} does not divide the input width {width} "
            f"of {name} ({len(odd)} linears in all): {fix}"
        )
