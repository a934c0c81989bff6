"""`python -m obsdiff.export RUN_DIR OUT_DIR`: a pruned run as a diffusers pipeline folder
(unstructured, N:M: plain `DiffusionPipeline.from_pretrained(OUT_DIR)` loads it, obsdiff not
needed) or obsdiff's folder (structured: `obsdiff.load_pruned(OUT_DIR)`), with a model card
(`README.md`), optionally pushed to the Hugging Face Hub.

    python -m obsdiff.export outputs/prune/runs/<time> exported/my-model
    python -m obsdiff.export RUN_DIR OUT_DIR --components reference   # the denoiser alone
    python -m obsdiff.export RUN_DIR OUT_DIR --push-to-hub me/sd3-obsdiff-50 [--private]
    python -m obsdiff.export RUN_DIR OUT_DIR --quantize int8_weight_only  # quantized at load
    python -m obsdiff.export QUANTIZED_RUN OUT_DIR --gate 'lpips<=0.15,psnr>=30' [--force]

Every input is checked before anything is loaded or written (exit code 2, one message).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from obsdiff.app.entry import callable_module
from obsdiff.artifacts.export import (
    COMPONENT_CHOICES,
    ExportError,
    UploadError,
    export_pruned,
)
from obsdiff.quantization import SCHEMES, QuantizeError, QuantizeSettings


log = logging.getLogger("obsdiff.export")
EXIT_SETTING = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m obsdiff.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="the run directory of a finished prune (or run)")
    parser.add_argument("out_dir", help="where the export goes (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--components",
        choices=COMPONENT_CHOICES,
        default="copy",
        help="copy: every pipeline component (default); reference: the denoiser alone",
    )
    parser.add_argument("--pretrained", help="another copy of the base model (hub id or path)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="a private Hub repo")
    parser.add_argument(
        "--expand-low-rank",
        action="store_true",
        help="low-rank modulation as the dense matrix of each product: a plain diffusers folder",
    )
    parser.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="quantized at load by the card's code (torchao): " + ", ".join(SCHEMES),
    )
    parser.add_argument("--group-size", type=int, help="int4_weight_only: its group size (128)")
    parser.add_argument(
        "--prequantized",
        action="store_true",
        help="write the denoiser quantized (torchao's safetensors) rather than quantized at load",
    )
    parser.add_argument(
        "--gate",
        help="limits on the run's evaluation, e.g. 'lpips<=0.15,psnr>=30': refused if one fails",
    )
    parser.add_argument(
        "--force", action="store_true", help="export past a failed gate (the card warns)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    command = "python -m obsdiff.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:  # every check comes first: nothing is loaded or written for a bad input
        quantize = None
        if args.quantize is not None or args.group_size is not None:
            group = args.group_size
            if group is None and args.quantize == "int4_weight_only":
                group = 128
            quantize = QuantizeSettings(args.quantize or "", group)
        export_pruned(
            args.run_dir,
            args.out_dir,
            overwrite=args.overwrite,
            components=args.components,
            pretrained=args.pretrained,
            push_to_hub=args.push_to_hub,
            private=args.private,
            export_command=command,
            expand_low_rank=args.expand_low_rank,
            quantize=quantize,
            prequantized=args.prequantized,
            gate=args.gate,
            force=args.force,
        )
    except (ExportError, QuantizeError) as err:
        log.error("%s", err)
        return EXIT_SETTING
    except UploadError as err:
        log.error("%s", err)
        return 1
    return 0


callable_module(__name__, "export")  # `obsdiff.export(...)` is the Python API's

if __name__ == "__main__":
    raise SystemExit(main())
