"""`python -m obsdiff.quantize`: a pruned (or recovered, or dense) run's denoiser quantized by
torchao, the family's do-not-compress list kept in the model's dtype, evaluated against the
dense model (conf/quantize.yaml).

    python -m obsdiff.quantize pruned=outputs/prune/runs/<time> quantize=int8_weight_only
    python -m obsdiff.quantize pruned=<run> quantize=int8_dynamic 'gate="psnr>=30"'

The run directory receives the weights in the model's dtype, the manifest with the quantization
(`load_pruned` quantizes them as this run did) and `results.json` with a `quantize` section and
the evaluation; a failed gate exits 3. Failures follow `obsdiff.app.shell.execute`.
"""

from __future__ import annotations

from typing import Any

from obsdiff.app.entry import HydraApp, callable_module


APP = HydraApp("quantize", "obsdiff.app.quantize_app")


def main() -> Any:
    """`python -m obsdiff.quantize`, `obsdiff-quantize`."""
    return APP.main()


callable_module(__name__, "quantize")  # `obsdiff.quantize(...)` is the Python API's

if __name__ == "__main__":
    main()
