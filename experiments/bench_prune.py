"""Benchmarks of the prune app's calibration and end-to-end pruning.

    python experiments/bench_prune.py overhead             # hook overhead on a tiny family
    python experiments/bench_prune.py sd3-medium           # full-size SD3-Medium, reduced setting
    python experiments/bench_prune.py sd3-medium --prompts 100 --steps 25 --resolution 512  # paper

`overhead`: wall time of one package's calibration pass (hooks feeding the statistics) divided by
the time of the same pipeline calls without hooks (target <= 1.5).

`sd3-medium`: a random-weight SD3-Medium MMDiT built from its public hyper-parameters (24 blocks,
24 heads x 64, hidden 1536, joint attention 4096), with tiny stand-in text encoders of the right
output widths and a tiny VAE (no download), pruned end to end with OBS-Diff (50% unstructured,
4 packages by default). Prints calibration and solve times and peak memory; the paper reports
14.95 minutes and 24 GB on an RTX 4090 for 100 prompts, 25 steps, 512 x 512, 4 packages.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from obsdiff.calibration.hooks import StatisticsHooks, StepTracker
from obsdiff.calibration.packages import list_units, split_packages
from obsdiff.calibration.sequential import CalibrationSettings, build_package, embed_batches
from obsdiff.methods import Granularity, ObsDiff
from obsdiff.models import SD3Adapter
from obsdiff.models.loading import set_eval_mode
from obsdiff.models.sampling import SamplingDefaults
from obsdiff.models.tiny import char_clip_tokenizer, char_t5_tokenizer
from obsdiff.oneshot.plan import memory_plan
from obsdiff.oneshot.run import prune_pipeline
from obsdiff.oneshot.settings import PruneSettings
from obsdiff.prompts.files import BUNDLED_PROMPTS, load_prompts
from obsdiff.pruning.patterns import Unstructured
from obsdiff.pruning.schedules import TimestepWeighting
from obsdiff.utils.devices import resolve_device
from obsdiff.utils.seeds import image_generators


log = logging.getLogger("bench_prune")


def overhead(repeats: int) -> None:
    """Calibration pass with hooks vs the same calls without, on the tiny SD3."""
    sampling = {
        "num_inference_steps": 10,
        "height": 64,
        "width": 64,
        "guidance_scale": 5.0,
        "max_sequence_length": 77,
    }
    adapter = SD3Adapter(name="tiny_sd3", tiny="sd3", sampling=sampling)
    pipe = adapter.load()
    pipe.set_progress_bar_config(disable=True)
    denoiser = adapter.denoiser(pipe)
    prompts = load_prompts(BUNDLED_PROMPTS, num_prompts=8).prompts
    batches = embed_batches(adapter, pipe, prompts, 4, torch.device("cpu"))
    method = ObsDiff()
    packages = split_packages(list_units(adapter, denoiser), 4)
    weights = TimestepWeighting("log_decrease").step_weights(10)

    def calls() -> None:
        for i, batch in enumerate(batches):
            tracker.reset()
            adapter.calibration_call(
                pipe, batch, image_generators(0, 4 * i, 4), tracker.on_step_end
            )

    tracker = StepTracker()
    log.info("tiny SD3, 8 prompts x 10 steps with CFG, 4 packages, best of %d runs", repeats)
    worst = 0.0
    with torch.inference_mode():
        calls()  # warm-up
        for index, package in enumerate(packages):
            plain, hooked = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                calls()
                plain.append(time.perf_counter() - start)
                groups = [
                    (g.modules[0], g.stats)
                    for g in build_package(denoiser, package, method, Unstructured(0.5)).groups
                    if g.stats is not None
                ]
                hooks = StatisticsHooks(denoiser, groups, weights, tracker, "doubled_batch")
                with hooks.attached():
                    start = time.perf_counter()
                    calls()
                    hooked.append(time.perf_counter() - start)
            ratio = min(hooked) / min(plain)
            worst = max(worst, ratio)
            log.info(
                "package %d (%2d input groups): %.3f s without hooks, %.3f s with: %.2fx",
                index + 1, len(groups), min(plain), min(hooked), ratio,
            )  # fmt: skip
    log.info("worst overhead: %.2fx (target <= 1.5)", worst)


def sd3_medium_pipeline(seed: int, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """SD3-Medium's MMDiT at full size with random weights; stand-in encoders of the real widths
    (CLIP-L 768 and CLIP-G 1280 pooled and hidden, T5 4096) but 1 layer each."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )

    def clip(width: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            hidden_size=width, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
            vocab_size=514, max_position_embeddings=77, projection_dim=width,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config)

    t5 = T5EncoderModel(
        T5Config(vocab_size=200, d_model=4096, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        norm_num_groups=4,
        layers_per_block=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )  # vae_scale_factor 8, as the real one
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip(768),
        tokenizer=char_clip_tokenizer(),
        text_encoder_2=clip(1280),
        tokenizer_2=char_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=char_t5_tokenizer(),
    )
    return set_eval_mode(pipe).to(dtype)


def sd3_medium(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype
    ]
    with tempfile.TemporaryDirectory() as tmp:
        log.info("building a random-weight SD3-Medium (2.0 B transformer parameters) ...")
        sd3_medium_pipeline(args.seed, dtype).save_pretrained(tmp)
        sampling = SamplingDefaults(
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            height=args.resolution,
            width=args.resolution,
            max_sequence_length=args.t5_tokens,
        )
        model = SD3Adapter(
            name="sd3_medium_random", pretrained=tmp, dtype=args.dtype, sampling=sampling
        )
        prompts = load_prompts(
            BUNDLED_PROMPTS if args.prompts <= 32 else args.prompt_file, num_prompts=args.prompts
        )
        job = PruneSettings(packages=args.packages, device=str(device), save=False).job(
            model=model,
            model_config={},
            method=ObsDiff(),
            granularity=Granularity.from_name("unstructured"),
            weighting=TimestepWeighting("log_decrease"),
            prompts=prompts,
            calibration=CalibrationSettings(
                batch_size=args.batch_size, hessian_precision=args.precision
            ),
            shard_solve=True,
        )
        plan = memory_plan(job)  # from the saved pipeline's config files, no weights
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results = prune_pipeline(job, Path(tmp) / "run").result
        assert results is not None
    setting = (args.prompts, args.steps, args.resolution, args.batch_size, args.packages)
    log.info("SD3-Medium (random): %d prompts x %d steps at %d px, batch %d, %d packages", *setting)
    log.info("dtype %s, Hessian products %s, device %s", args.dtype, args.precision, device)
    seconds = (results.calibration_seconds, results.solve_seconds, results.wall_seconds)
    log.info("calibration %.1f s; solving %.1f s; wall %.1f s", *seconds)
    memory = "GPU" if device.type == "cuda" else "process RSS"
    log.info("peak memory %.2f GB (%s)", results.peak_memory_bytes / 1e9, memory)
    log.info(
        "memory plan: predicted peak %.2f GB (weights %.2f, statistics %.2f, solve %.2f; "
        "activations and the CUDA context not predicted)",
        plan.predicted_peak_bytes / 1e9,
        plan.weights_bytes / 1e9,
        plan.statistics_peak_bytes / 1e9,
        plan.solve_bytes / 1e9,
    )
    log.info("achieved sparsity %.4f", results.achieved_sparsity)
    log.info("paper (RTX 4090, 100 prompts, 25 steps, 512 px, 4 packages): 14.95 min, 24 GB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead")
    over.add_argument("--repeats", type=int, default=5)
    full = sub.add_parser("sd3-medium")
    full.add_argument("--prompts", type=int, default=2)
    full.add_argument(
        "--prompt-file",
        type=str,
        default=str(BUNDLED_PROMPTS.with_name("gpu_check_prompts.txt")),
        help="more than 32 prompts: read from here (100 captions ship with obsdiff)",
    )
    full.add_argument("--steps", type=int, default=2)
    full.add_argument("--resolution", type=int, default=128)
    full.add_argument("--t5-tokens", type=int, default=32)
    full.add_argument("--batch-size", type=int, default=2)
    full.add_argument("--packages", type=int, default=4)
    full.add_argument("--dtype", default="float32")
    full.add_argument("--precision", default="float32", help="Hessian products")
    full.add_argument("--device", default="auto")
    full.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "overhead":
        overhead(args.repeats)
    else:
        sd3_medium(args)


if __name__ == "__main__":
    main()
