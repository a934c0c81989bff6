"""Weight quantization on top of a pruned (or recovered, or dense) denoiser, through torchao,
the family's do-not-compress list kept in the model's dtype."""

from obsdiff.quantization.apply import (
    QuantizeResult,
    fqn_to_config,
    fqn_to_config_code,
    linear_widths,
    quantizable_linears,
    quantize_denoiser,
    weight_bytes,
)
from obsdiff.quantization.settings import (
    SCHEMES,
    QuantizeError,
    QuantizeSettings,
    check_device,
    check_widths,
)


__all__ = [
    "SCHEMES",
    "QuantizeError",
    "QuantizeResult",
    "QuantizeSettings",
    "check_device",
    "check_widths",
    "fqn_to_config",
    "fqn_to_config_code",
    "linear_widths",
    "quantizable_linears",
    "quantize_denoiser",
    "weight_bytes",
]
