"""Model adapters, one module per architecture family; the tiny offline zoo is in `tiny`."""

from typing import Any

from obsdiff.models.base import ModelAdapter
from obsdiff.models.flux import FluxAdapter
from obsdiff.models.flux2 import Flux2Adapter
from obsdiff.models.loading import ModelConfigError, ModelLoadError
from obsdiff.models.pixart import PixArtAdapter
from obsdiff.models.qwen_image import QwenImageAdapter
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.models.sd3 import SD3Adapter
from obsdiff.models.unet import SDXLAdapter, UNetAdapter
from obsdiff.models.wan import WanAdapter


ADAPTERS: tuple[type[ModelAdapter], ...] = (
    SD3Adapter,
    FluxAdapter,
    UNetAdapter,
    PixArtAdapter,
    QwenImageAdapter,
    Flux2Adapter,
    WanAdapter,
)


def adapter_for(
    pipe: Any,
    sampling: dict[str, Any] | SamplingDefaults | None = None,
    name: str = "in_memory",
) -> ModelAdapter:
    """The adapter of `pipe`'s family (recognised from its class), holding `pipe` itself;
    `sampling` as a model config's (steps, guidance, resolution)."""
    for cls in ADAPTERS:
        if type(pipe).__name__ in cls.pipeline_classes:
            return cls(name=name, pipeline=pipe, sampling=sampling)
    supported = [c for cls in ADAPTERS for c in cls.pipeline_classes]
    raise ModelConfigError(
        f"a {type(pipe).__name__} cannot be pruned by obsdiff; it supports {', '.join(supported)}"
    )


def family_adapter(family: str) -> type[ModelAdapter]:
    """The adapter class of a family by its name (a manifest's `model.family`)."""
    for cls in ADAPTERS:
        if cls.family == family:
            return cls
    raise ModelConfigError(f"no family {family!r}; obsdiff knows {[c.family for c in ADAPTERS]}")


__all__ = [
    "ADAPTERS",
    "adapter_for",
    "family_adapter",
    "FluxAdapter",
    "Flux2Adapter",
    "ModelAdapter",
    "ModelConfigError",
    "ModelLoadError",
    "PixArtAdapter",
    "QwenImageAdapter",
    "SD3Adapter",
    "SDXLAdapter",
    "UNetAdapter",
    "WanAdapter",
    "SamplingDefaults",
]
