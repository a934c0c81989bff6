"""Model adapters, one module per architecture family; the tiny offline zoo is in `tiny`."""

from obsdiff.models.base import (
    ModelAdapter,
    ModelConfigError,
    ModelLoadError,
    SamplingDefaults,
)
from obsdiff.models.flux import FluxAdapter
from obsdiff.models.sd3 import SD3Adapter
from obsdiff.models.sdxl import SDXLAdapter


__all__ = [
    "FluxAdapter",
    "ModelAdapter",
    "ModelConfigError",
    "ModelLoadError",
    "SD3Adapter",
    "SDXLAdapter",
    "SamplingDefaults",
]
