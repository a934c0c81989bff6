"""Inference speed of pruned models (`make bench-speed`): the paper's Table 5 and beyond.

    python experiments/bench_speed.py                       # every part this machine can run
    python experiments/bench_speed.py --parts block --repeats 7

Parts, each a dense model against its pruned variants, timed interleaved (variant after variant,
repeat after repeat, after a warm-up of each), reported as the median and range of the ratio
dense / variant over the repeats:
- `block`: one SD3.5-Large MMDiT block at its real width (hidden 2432, 38 heads x 64, random
  weights), the paper's Table 5: dense vs structured 15/20/25/30% (heads and FFN neurons cut by
  obsdiff's surgery, `round(units x sparsity)` of every group; which ones go does not change the
  speed), and at 20 and 30% the counts `granularity.align` 64 and 128 round to (at 30%: 27
  heads and 6810 neurons left, aligned 27 or 28 heads and 6784 neurons) vs 2:4 (magnitude 2:4
  through `obsdiff.models.sparse`, CUDA only). The paper's setting
  is batch 4 at 1024 x 1024 (4096 image tokens, 333 text tokens); on a CPU batch 1 at 512 x 512.
- `quantized`: the same block in bfloat16 (float32 on a CPU) against its target linears
  quantized by torchao, every scheme of `conf/quantize/` the device can run (int8 weight-only
  and dynamic anywhere; float8 weight-only and dynamic from compute capability 8.9; int4
  weight-only, groups of 128, from 8.0), and on CUDA 2:4 on the sparse kernels and 2:4 then
  int8 dynamic (the mask kept, no sparse int8 kernel): what quantizing a pruned model buys.
- `toy`: the toy model's whole denoiser forward and whole pipeline call (its real settings).
- `full`: SD3-Medium's whole denoiser at full size (random weights, the first and last block
  kept as the structured default), at 128 x 128 on a CPU and 1024 x 1024 on a GPU; the whole
  pipeline call on a GPU only (its text encoders are 5 B parameters more).
Every variant eager and, with `--compile` (default on CUDA; the block and the toy on a CPU),
under `torch.compile` too, against the dense model compiled the same way: a user's alternative
to pruning is compiling (or quantising) the dense model.

Absolute times are printed on a GPU only; on a CPU the ratios are what transfers.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from obsdiff.api import model_from_config
from obsdiff.models.base import ModelAdapter
from obsdiff.models.sparse import use_sparse_kernels
from obsdiff.models.structure import linear_at
from obsdiff.models.surgery import Surgery
from obsdiff.pruning.magnitude import magnitude_prune
from obsdiff.pruning.obs_structured import aligned_count
from obsdiff.pruning.patterns import NM
from obsdiff.quantization import SCHEMES, QuantizeError, QuantizeSettings, check_device


log = logging.getLogger("bench_speed")

SPARSITIES = (0.15, 0.20, 0.25, 0.30)
PAPER_TABLE5 = {"2:4": 1.23, "structured 15%": 1.03, "structured 20%": 1.20,
                "structured 25%": 1.29, "structured 30%": 1.31}  # fmt: skip


# ----------------------------------------------------------------------------- variants
def cut_blocks(
    adapter: ModelAdapter, blocks: list[nn.Module], sparsity: float, align: int | None = None
) -> None:
    """Structured pruning's shapes: the last round(units x sparsity) heads and neurons of every
    head and neuron group of `blocks` removed by obsdiff's surgery (with `align`, the count
    `granularity.align` rounds to: the widths left are multiples of it)."""
    for block in blocks:
        heads, neurons = adapter.structured_groups(block)
        surgery = Surgery()
        for group in heads:
            count = int(block.get_submodule(group.attention).heads)  # type: ignore[arg-type]
            head_dim = linear_at(block, group.producers[0]).out_features // count
            drop = aligned_count(count, sparsity, head_dim, align)
            surgery.remove_heads(group, list(range(count - drop, count)), head_dim)
        for group in neurons:
            drop = aligned_count(group.width, sparsity, 1, align)
            surgery.remove_neurons(group, list(range(group.width - drop, group.width)))
        surgery.apply(block)


def two_four(adapter: ModelAdapter, module: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    """Magnitude 2:4 on every target linear of `blocks`, then the sparse kernels (CUDA)."""
    names = []
    for block_name, block in blocks:
        for unit in adapter.block_units(block):
            for linear_name in (n for group in unit for n in group):
                name = f"{block_name}.{linear_name}" if block_name else linear_name
                linear = module.get_submodule(name)
                weight, mask = magnitude_prune(linear.weight.data, NM(2, 4))
                linear.weight.data.copy_(weight.masked_fill(mask, 0))
                names.append(name)
    report = use_sparse_kernels(module, names)
    log.info("2:4: %d of %d linears on sparse kernels", len(report.converted), len(names))


def variants(
    adapter: ModelAdapter,
    dense: nn.Module,
    blocks_of: Callable[[nn.Module], list[tuple[str, nn.Module]]],
    cuda: bool,
    aligned: tuple[float, ...] = (),
) -> dict[str, nn.Module]:
    """dense, structured 15-30% and (CUDA) 2:4 copies of `dense`; at each of the `aligned`
    sparsities also the widths `granularity.align` 64 and 128 leave."""
    out = {"dense": dense}
    for sparsity in SPARSITIES:
        for align in (None, *((64, 128) if sparsity in aligned else ())):
            pruned = copy.deepcopy(dense)
            cut_blocks(adapter, [b for _, b in blocks_of(pruned)], sparsity, align)
            suffix = "" if align is None else f" align {align}"
            out[f"structured {round(100 * sparsity)}%{suffix}"] = pruned
    if cuda:
        pruned = copy.deepcopy(dense)
        two_four(adapter, pruned, blocks_of(pruned))
        out["2:4"] = pruned
    return out


# ----------------------------------------------------------------------------- timing
def timed(run: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(
    runs: dict[str, Callable[[], Any]], repeats: int, warmup: int, cuda: bool
) -> dict[str, list[float]]:
    """Seconds of every run, `repeats` rounds of one call each, after `warmup` calls each."""
    for run in runs.values():
        for _ in range(warmup):
            timed(run, cuda)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(timed(run, cuda))
    return seconds


def report(title: str, seconds: dict[str, list[float]], reference: str, cuda: bool) -> list[str]:
    """One line per run: the ratio reference / run, median [min, max] over the repeats
    (round by round), and on CUDA the median milliseconds."""
    lines = [title]
    base = seconds[reference]
    for name, values in seconds.items():
        ratios = [b / v for b, v in zip(base, values, strict=True)]
        line = (
            f"  {name:<34} {statistics.median(ratios):5.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"
        )
        if cuda:
            line += f"  {1000 * statistics.median(values):9.2f} ms"
        lines.append(line)
    return lines


def with_compiled(models: dict[str, nn.Module], compile_them: bool) -> dict[str, nn.Module]:
    out = dict(models)
    if compile_them:
        out |= {f"{name}, compiled": torch.compile(m) for name, m in models.items()}
    return out


def run_all(
    title: str,
    models: dict[str, nn.Module],
    call: Callable[[nn.Module], Any],
    args: argparse.Namespace,
    cuda: bool,
    compile_them: bool,
) -> list[str]:
    models = with_compiled(models, compile_them)
    seconds = interleaved(
        {name: (lambda m=m: call(m)) for name, m in models.items()},
        args.repeats,
        args.warmup,
        cuda,
    )
    lines = report(f"{title}: speed-up against dense, eager", seconds, "dense", cuda)
    if compile_them:
        compiled = {k: v for k, v in seconds.items() if k.endswith("compiled")}
        lines += report("  ... against dense, compiled", compiled, "dense, compiled", cuda)[1:]
    return lines


# ----------------------------------------------------------------------------- the parts
def sd3_denoiser(name: str, layers: int | None, device: str, dtype: torch.dtype) -> tuple:
    from diffusers import SD3Transformer2DModel

    adapter = model_from_config(name)
    assert adapter.architecture is not None
    config = json.loads((adapter.architecture / "transformer" / "config.json").read_text())
    if layers is not None:
        config["num_layers"] = layers
    torch.manual_seed(0)
    return adapter, SD3Transformer2DModel.from_config(config).to(device, dtype).eval(), config


def sd35_block(
    args: argparse.Namespace, device: str, dtype: torch.dtype
) -> tuple[ModelAdapter, nn.Module, Callable[[nn.Module], Any], str]:
    """One full SD3.5-Large MMDiT block (the last one is context_pre_only), a call of it on
    random inputs of the paper's size (a CPU: `--batch`, `--resolution`), and their title."""
    adapter, denoiser, _ = sd3_denoiser("sd35_large", 2, device, dtype)
    batch, size = (4, 1024) if device == "cuda" else (args.batch, args.resolution)
    tokens, text = (size // 16) ** 2, 333
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, tokens, 2432, generator=g, device=device, dtype=dtype)
    context = torch.randn(batch, text, 2432, generator=g, device=device, dtype=dtype)
    temb = torch.randn(batch, 2432, generator=g, device=device, dtype=dtype)
    title = (
        f"SD3.5-Large MMDiT block, batch {batch}, {size} x {size} ({tokens} + {text} tokens), "
        f"{dtype}, {device}"
    )

    def call(block: nn.Module) -> Any:
        return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)

    return adapter, denoiser.transformer_blocks[0], call, title


def part_block(args: argparse.Namespace, device: str, dtype: torch.dtype) -> list[str]:
    cuda = device == "cuda"
    adapter, block, call, title = sd35_block(args, device, dtype)
    models = variants(adapter, block, lambda b: [("", b)], cuda, aligned=(0.2, 0.3))
    lines = run_all(title, models, call, args, cuda, args.compile)
    lines.append("  the paper (RTX 4090, batch 4, 1024 x 1024): " + ", ".join(
        f"{k} {v:.2f}x" for k, v in PAPER_TABLE5.items()))  # fmt: skip
    return lines


def quantized(adapter: ModelAdapter, block: nn.Module, settings: QuantizeSettings) -> nn.Module:
    """A copy of `block` with its target linears quantized by torchao (`settings`)."""
    from torchao.quantization import quantize_

    out = copy.deepcopy(block)
    for unit in adapter.block_units(out):
        for name in (n for group in unit for n in group):
            quantize_(out.get_submodule(name), settings.torchao_config())
    return out


def part_quantized(args: argparse.Namespace, device: str, dtype: torch.dtype) -> list[str]:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # tinygemm's int4 takes bfloat16
    adapter, block, call, title = sd35_block(args, device, dtype)
    models: dict[str, nn.Module] = {"dense": block}
    skipped = []
    for scheme, kind in SCHEMES.items():
        settings = QuantizeSettings(scheme, 128 if kind.grouped else None)
        try:
            check_device(settings, device)
        except QuantizeError as err:
            skipped.append(f"  {scheme}: not measured ({err})")
            continue
        models[settings.name] = quantized(adapter, block, settings)
    if cuda:
        sparse = copy.deepcopy(block)
        two_four(adapter, sparse, [("", sparse)])
        models["2:4 (sparse kernels)"] = sparse
        masked = copy.deepcopy(block)
        for unit in adapter.block_units(masked):
            for name in (n for group in unit for n in group):
                linear = masked.get_submodule(name)
                weight, mask = magnitude_prune(linear.weight.data, NM(2, 4))
                linear.weight.data.copy_(weight.masked_fill(mask, 0))
        models["2:4 + int8_dynamic"] = quantized(adapter, masked, QuantizeSettings("int8_dynamic"))
    title += ", target linears quantized (torchao)"
    return run_all(title, models, call, args, cuda, args.compile) + skipped


def denoiser_blocks(adapter: ModelAdapter) -> Callable[[nn.Module], list[tuple[str, nn.Module]]]:
    def blocks_of(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        found = adapter.blocks(denoiser)
        start, end = adapter.default_blocks(len(found), structured=True)
        return found[start:end]

    return blocks_of


def part_toy(args: argparse.Namespace, device: str, dtype: torch.dtype) -> list[str]:
    cuda = device == "cuda"
    adapter = model_from_config("toy")
    pipe = adapter.load().to(device)
    pipe.set_progress_bar_config(disable=True)
    dense = adapter.denoiser(pipe)
    models = variants(adapter, dense, denoiser_blocks(adapter), cuda)
    kwargs = adapter.call_kwargs()
    kwargs.pop("negative_prompt", None)
    prompt = "a small red circle in the top left"
    with torch.inference_mode():
        inputs: dict[str, Any] = {}

        def capture(module: nn.Module, a: tuple, kw: dict) -> None:
            inputs.update(kw)
            inputs["hidden_states"] = a[0] if a else kw["hidden_states"]

        handle = dense.register_forward_pre_hook(capture, with_kwargs=True)
        pipe(prompt, output_type="latent", **{**kwargs, "num_inference_steps": 1})
        handle.remove()
    lines = run_all(
        f"toy denoiser forward ({adapter.name}, {device})",
        models,
        lambda m: m(**inputs),
        args,
        cuda,
        args.compile,
    )

    def pipeline_call(model: nn.Module) -> Any:
        setattr(pipe, adapter.denoiser_attr, model)
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt, generator=generator, output_type="latent", **kwargs)

    lines += run_all(
        f"toy pipeline call ({kwargs.get('num_inference_steps')} steps, {device})",
        models,
        pipeline_call,
        args,
        cuda,
        args.compile,
    )
    setattr(pipe, adapter.denoiser_attr, dense)
    return lines


def part_full(args: argparse.Namespace, device: str, dtype: torch.dtype) -> list[str]:
    cuda = device == "cuda"
    adapter, denoiser, config = sd3_denoiser("sd3_medium", None, device, dtype)
    size = 1024 if cuda else args.full_resolution
    latent = size // 8
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, 16, latent, latent)
    inputs = {
        "hidden_states": torch.randn(*shape, generator=g, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            1, 333 if cuda else 154, config["joint_attention_dim"], generator=g, device=device,
            dtype=dtype,
        ),
        "pooled_projections": torch.randn(
            1, config["pooled_projection_dim"], generator=g, device=device, dtype=dtype
        ),
        "timestep": torch.tensor([500.0], device=device),
    }  # fmt: skip
    blocks_of = denoiser_blocks(adapter)
    title = f"SD3-Medium denoiser forward, full size, {size} x {size}, batch 1, {dtype}, {device}"
    lines = [f"{title}: speed-up against dense, eager (each variant timed in turn with dense)"]
    names = [f"structured {round(100 * s)}%" for s in SPARSITIES] + (["2:4"] if cuda else [])
    for name in names:  # one pruned copy at a time: a full-size model is large
        pruned = copy.deepcopy(denoiser)
        if name == "2:4":
            two_four(adapter, pruned, blocks_of(pruned))
        else:
            sparsity = float(name.split()[1].rstrip("%")) / 100
            cut_blocks(adapter, [b for _, b in blocks_of(pruned)], sparsity)
        models = with_compiled({"dense": denoiser, name: pruned}, args.compile and cuda)
        seconds = interleaved(
            {k: (lambda m=m: m(**inputs)) for k, m in models.items()}, args.repeats, 1, cuda
        )
        lines += report("", seconds, "dense", cuda)[2:3]
        if args.compile and cuda:
            compiled = {k: v for k, v in seconds.items() if k.endswith("compiled")}
            lines += [
                line + "  (compiled)" for line in report("", compiled, "dense, compiled", cuda)[2:3]
            ]
        del pruned, models
    if not (args.compile and cuda):
        lines.append("  compiled: not measured here (compiling the 2 B model on a CPU)")
    return lines


PARTS = {"block": part_block, "quantized": part_quantized, "toy": part_toy, "full": part_full}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="block batch on a CPU")
    parser.add_argument("--resolution", type=int, default=512, help="block resolution on a CPU")
    parser.add_argument("--full-resolution", type=int, default=128, help="full model on a CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    lines = [f"bench_speed: {torch.cuda.get_device_name() if cuda else 'CPU'}, torch "
             f"{torch.__version__}, {args.repeats} repeats (ratio dense / variant, median "
             "[min, max])"]  # fmt: skip
    if not cuda:
        lines.append("  2:4: not measured (the sparse kernels run on CUDA only)")
    for part in args.parts:
        lines += ["", *PARTS[part](args, device, dtype)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
