"""Quantizing a denoiser's linears with torchao, keeping the do-not-compress list as it is.

`quantize_denoiser` walks the linears in module order and hands each one that is not on the
family's list to torchao's `quantize_` on its own, with the scheme's config: what diffusers does
for a model loaded with `TorchAoConfig(FqnToConfig({<list>: None, "re:.*": <config>}))`, so
that an export's load code (`fqn_to_config_code`) quantizes exactly the layers obsdiff did.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import single_models
from obsdiff.quantization.settings import QuantizeSettings


log = logging.getLogger(__name__)

EVERY_MODULE = "re:.*"  # FqnToConfig's last key: every linear the list does not name


@dataclass
class QuantizeResult:
    """What a quantization did (the `quantize` section of a run record)."""

    scheme: str  # `QuantizeSettings.name`
    layers_quantized: int
    layers_kept: int  # linears on the do-not-compress list, left in the model's dtype
    weight_bytes_before: int  # the denoiser's parameters and buffers as stored in memory
    weight_bytes_after: int
    zeros_before: int  # exact zeros of the quantized linears' weights before quantization
    zeros_kept: int  # of those, still exactly zero after (dequantized)
    seconds: float
    layers: dict[str, list[int]] = field(default_factory=dict)  # name: [zeros before, kept]

    @property
    def memory_ratio(self) -> float:
        return self.weight_bytes_after / self.weight_bytes_before

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor holds in memory: for a torchao tensor subclass, its inner tensors'
    (quantized data, scales, zero points), not its logical shape at the original dtype."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def weight_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters and buffers as stored in memory."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(stored_bytes(t.data if isinstance(t, nn.Parameter) else t) for t in tensors)


def quantizable_linears(
    adapter: ModelAdapter, denoiser: nn.Module, keep_out: bool = True
) -> list[tuple[str, nn.Linear]]:
    """The linears a quantization reaches, in module order: every one off the do-not-compress
    list (`keep_out`; matched on each expert's own names), or every one."""
    return [
        (prefix + name, module)
        for prefix, model in single_models(denoiser)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (keep_out and adapter.is_kept_out(name))
    ]


def linear_widths(
    adapter: ModelAdapter, denoiser: nn.Module, keep_out: bool = True
) -> dict[str, int]:
    """The input width of every linear a quantization reaches (a skeleton on the meta device
    will do)."""
    return {
        name: linear.in_features
        for name, linear in quantizable_linears(adapter, denoiser, keep_out)
    }


def quantize_denoiser(
    adapter: ModelAdapter, denoiser: nn.Module, settings: QuantizeSettings
) -> QuantizeResult:
    """Quantize `denoiser` (one of `adapter`'s, timestep experts each on its own names) in
    place; returns what was done."""
    from torchao.quantization import quantize_

    start = time.perf_counter()
    before = weight_bytes(denoiser)
    targets = quantizable_linears(adapter, denoiser, settings.keep_out)
    linears = sum(isinstance(m, nn.Linear) for m in denoiser.modules())
    config = settings.torchao_config()
    layers: dict[str, list[int]] = {}
    for name, linear in targets:
        zero = linear.weight.detach() == 0
        quantize_(linear, config)
        weight = linear.weight
        dequantized = weight.dequantize() if hasattr(weight, "dequantize") else weight
        kept = int((dequantized.detach()[zero] == 0).sum())
        layers[name] = [int(zero.sum()), kept]
    result = QuantizeResult(
        scheme=settings.name,
        layers_quantized=len(targets),
        layers_kept=linears - len(targets),
        weight_bytes_before=before,
        weight_bytes_after=weight_bytes(denoiser),
        zeros_before=sum(z for z, _ in layers.values()),
        zeros_kept=sum(k for _, k in layers.values()),
        seconds=round(time.perf_counter() - start, 3),
        layers=layers,
    )
    log.info(
        "quantized %d linears (%s), %d kept in the model's dtype; weights %.2f -> %.2f MB; "
        "%d of %d zeros exact",
        result.layers_quantized, settings.name, result.layers_kept, before / 1e6,
        result.weight_bytes_after / 1e6, result.zeros_kept, result.zeros_before,
    )  # fmt: skip
    return result


def fqn_to_config(adapter: type[ModelAdapter] | ModelAdapter, settings: QuantizeSettings) -> Any:
    """torchao's `FqnToConfig` that quantizes a denoiser of this family as `quantize_denoiser`
    does, for diffusers' `TorchAoConfig` (the do-not-compress list mapped to None)."""
    from torchao.quantization import FqnToConfig

    keep = adapter.do_not_compress_regexes() if settings.keep_out else []
    rest = {EVERY_MODULE: settings.torchao_config()}  # the first key that matches applies
    return FqnToConfig({**{"re:" + p: None for p in keep}, **rest})


def fqn_to_config_code(
    adapter: type[ModelAdapter] | ModelAdapter, settings: QuantizeSettings
) -> list[str]:
    """Python source of `TorchAoConfig(fqn_to_config(adapter, settings))`, for a model card."""
    names = ["FqnToConfig", *settings.imports()]
    lines = [f"from torchao.quantization import {', '.join(names)}", ""]
    if settings.keep_out:
        lines.append("keep = [  # the do-not-compress list: left in the model's dtype")
        lines += [f'    r"{regex}",' for regex in adapter.do_not_compress_regexes()]
        lines.append("]")
        entries = ['    **{"re:" + pattern: None for pattern in keep},']
    else:
        entries = []
    lines += [
        "quantization = TorchAoConfig(FqnToConfig({",
        *entries,
        f'    "{EVERY_MODULE}": {settings.config_code()},  # the rest (the first match applies)',
        "}))",
    ]
    return lines
