"""Train the toy SD3 pipeline from scratch on the procedural dataset (CPU, deterministic).

    python -m obsdiff.toy.train                 # the committed recipe, obsdiff/data/toy/pipeline
    python -m obsdiff.toy.train --out /tmp/toy --denoiser-steps 500     # a quick try

1. The VAE: reconstruction (MSE) plus a small KL term; then the latents' mean and standard
   deviation become the VAE's `shift_factor` and `scaling_factor` (as SD3's VAE).
2. The denoiser and both text encoders together, VAE frozen: rectified flow as SD3
   (x_t = (1 - s) x_0 + s e, the target e - x_0, s logit-normal), the caption dropped to "" for
   10% of the images (classifier-free guidance), an EMA of the weights saved at the end.
Only the training scenes are seen: the held-out combinations of obsdiff.toy.data never are.
Monitored without touching the training's random streams: the VAE's round trips and, every
`monitor_every` steps, the EMA model on every held-out prompt, both read by the attribute
classifier (prompt fidelity). Writes the diffusers pipeline directory (safetensors),
`training.json` (recipe, seed, data, times, loss curves, the monitored fidelities),
`training_curves.png` and `samples.png` (every third held-out prompt).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from obsdiff.toy.data import (
    ATTRIBUTES,
    HELD_OUT_FRACTION,
    IMAGE_SIZE,
    all_scenes,
    sample_batch,
    split_scenes,
)
from obsdiff.toy.pipeline import PIPELINE_DIR, build_pipeline
from obsdiff.toy.prompt_fidelity import PromptFidelity
from obsdiff.utils.images import make_grid


log = logging.getLogger("obsdiff.toy.train")


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    pool_size: int = 32768  # training images rendered and encoded once
    denoiser_steps: int = 7000
    denoiser_lr: float = 1e-3
    warmup: int = 300
    batch_size: int = 32
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    threads: int = 2
    sample_steps: int = 20
    sample_guidance: float = 4.0
    max_sequence_length: int = 4  # zero tokens in SD3's T5 slot (the toy has no T5)
    monitor_every: int = 500  # prompt fidelity of the EMA model on the held-out prompts
    monitor_steps: int = 12


def _lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def vae_fidelity(
    pipe: StableDiffusion3Pipeline, fidelity: PromptFidelity, count: int = 720
) -> dict[str, float]:
    """Prompt fidelity of VAE round trips (encode, decode) of fresh images of every scene: the
    ceiling for the denoiser. Its own seed: monitoring does not change training."""
    scenes = all_scenes()
    images, chosen = sample_batch(scenes, count, np.random.default_rng(10_000))
    decoded = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mode()).sample
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    return fidelity.compute(images, [s.caption for s in chosen]).means()


@torch.no_grad()
def sample(
    pipe: StableDiffusion3Pipeline, prompts: list[str], recipe: Recipe, steps: int
) -> list[Image.Image]:
    """One image per prompt (seed i for prompt i) at the recipe's guidance."""
    return pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=recipe.sample_guidance,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        max_sequence_length=recipe.max_sequence_length,
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    ).images


def sample_fidelity(
    pipe: StableDiffusion3Pipeline,
    modules: dict[str, nn.Module],
    recipe: Recipe,
    fidelity: PromptFidelity,
) -> dict[str, float]:
    """Prompt fidelity of `modules` (the EMA weights) on every held-out prompt, sampled with
    `monitor_steps` steps."""
    sampler = StableDiffusion3Pipeline(**{**pipe.components, **modules})
    sampler.set_progress_bar_config(disable=True)
    prompts = [s.caption for s in split_scenes()[1]]
    return fidelity.compute(sample(sampler, prompts, recipe, recipe.monitor_steps), prompts).means()


def write_samples(pipe: StableDiffusion3Pipeline, recipe: Recipe, path: Path) -> list[str]:
    """A grid of every third held-out prompt (all shapes, colours, places) at `path`."""
    prompts = [s.caption for s in split_scenes()[1][::3]]
    images = sample(pipe, prompts, recipe, recipe.sample_steps)
    make_grid([i.resize((96, 96), 0) for i in images], cols=8).save(path)
    return prompts


def train_vae(
    pipe: StableDiffusion3Pipeline, recipe: Recipe, rng: np.random.Generator
) -> list[float]:
    scenes, _ = split_scenes()
    vae = pipe.vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    losses = []
    for step in tqdm(range(recipe.vae_steps), desc="vae", unit="step"):
        images, _ = sample_batch(scenes, recipe.vae_batch_size, rng)  # (B, 3, 32, 32), [-1, 1]
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = nn.functional.mse_loss(reconstruction, images)
        loss = loss + recipe.kl_weight * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * _lr(step, recipe.vae_steps, 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images, _ = sample_batch(scenes, 1024, rng)
        latents = vae.encode(images).latent_dist.mode()  # (1024, 4, 16, 16)
    shift, scale = float(latents.mean()), 1.0 / float(latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log.info("vae: final loss %.5f, shift %.4f, scale %.4f", losses[-1], shift, scale)
    return losses


def _encode(
    pipe: StableDiffusion3Pipeline, captions: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt encoding, with gradients: ((B, 16 + T, 128), (B, 128))."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


@torch.no_grad()
def latent_pool(
    pipe: StableDiffusion3Pipeline, recipe: Recipe, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`pool_size` training images encoded once: (posterior means, stds, captions)."""
    scenes, _ = split_scenes()
    means, stds, captions = [], [], []
    for _ in tqdm(range(recipe.pool_size // 256), desc="latent pool", unit="batch"):
        images, chosen = sample_batch(scenes, 256, rng)
        posterior = pipe.vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += [s.caption for s in chosen]
    return torch.cat(means), torch.cat(stds), captions


def train_denoiser(
    pipe: StableDiffusion3Pipeline,
    recipe: Recipe,
    rng: np.random.Generator,
    fidelity: PromptFidelity,
) -> tuple[list[float], dict[str, nn.Module], list[dict[str, float]]]:
    """Returns (losses, EMA modules, fidelity curve: the held-out prompt fidelity of the EMA
    model every `monitor_every` steps, 0 for none)."""
    means, stds, pool_captions = latent_pool(pipe, recipe, rng)  # (N, 4, 16, 16) each
    modules: dict[str, nn.Module] = {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    params = [p for m in modules.values() for p in m.train().parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.denoiser_lr, weight_decay=0.0)
    ema = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in modules.items()}
    vae = pipe.vae
    losses: list[float] = []
    monitor: list[dict[str, float]] = []
    for step in tqdm(range(recipe.denoiser_steps), desc="denoiser", unit="step"):
        index = torch.from_numpy(rng.integers(0, len(means), recipe.batch_size))
        drop = rng.random(recipe.batch_size) < recipe.caption_dropout
        captions = [
            "" if d else pool_captions[i] for i, d in zip(index.tolist(), drop, strict=True)
        ]
        latents = means[index] + stds[index] * torch.randn_like(means[index])
        x0 = (latents - vae.config.shift_factor) * vae.config.scaling_factor  # (B, 4, 16, 16)
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(len(x0)))  # logit-normal, as SD3
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        embeds, pooled = _encode(pipe, captions, recipe.max_sequence_length)
        prediction = pipe.transformer(
            hidden_states=noisy,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample
        loss = nn.functional.mse_loss(prediction, noise - x0)
        for group in optimizer.param_groups:
            group["lr"] = recipe.denoiser_lr * _lr(step, recipe.denoiser_steps, recipe.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, module in modules.items():
                for p_ema, p in zip(ema[name].parameters(), module.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        if recipe.monitor_every and (
            done % recipe.monitor_every == 0 or done == recipe.denoiser_steps
        ):
            scores = sample_fidelity(pipe, ema, recipe, fidelity)
            monitor.append({"step": done, **{k: round(v, 4) for k, v in scores.items()}})
            log.info("held-out prompt fidelity %s", monitor[-1])
    return losses, ema, monitor


def _smooth(values: list[float], window: int = 50) -> list[float]:
    return [float(np.mean(values[i : i + window])) for i in range(0, len(values), window)]


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2))
    for axis, (name, values) in zip(figure.subplots(1, len(curves)), curves.items(), strict=True):
        axis.plot(np.arange(len(values)) * 50, values)
        axis.set(title=name, xlabel="step", ylabel="loss (mean of 50 steps)", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def train(recipe: Recipe, out: Path) -> dict[str, Any]:
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    pipe = build_pipeline(recipe.seed)
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    vae_losses = train_vae(pipe, recipe, rng)
    vae_seconds = time.perf_counter() - started
    fidelity = PromptFidelity()  # the committed attribute classifier, loaded once
    vae_scores = vae_fidelity(pipe, fidelity)
    log.info("vae round trip: prompt fidelity %s", vae_scores)
    denoiser_losses, ema, monitor = train_denoiser(pipe, recipe, rng, fidelity)
    pipe.register_modules(**ema)  # the EMA weights are the ones saved
    total_seconds = time.perf_counter() - started

    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    prompts = write_samples(pipe, recipe, out / "samples.png")
    _, held_out = split_scenes()
    curves = {"vae": _smooth(vae_losses), "denoiser": _smooth(denoiser_losses)}
    _plot(curves, out / "training_curves.png")
    record = {
        "recipe": asdict(recipe),
        "command": "python -m obsdiff.toy.train",
        "data": {
            "generator": "obsdiff.toy.data (one coloured shape on a plain background)",
            "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
            "image_size": IMAGE_SIZE,
            "held_out_fraction": HELD_OUT_FRACTION,
            "training_scenes": len(split_scenes()[0]),
            "held_out_scenes": len(held_out),
        },
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
        },
        "seconds": {"vae": round(vae_seconds, 1), "total": round(total_seconds, 1)},
        "loss_curves_every_50_steps": curves,
        "vae_round_trip_fidelity": {k: round(v, 4) for k, v in vae_scores.items()},
        "held_out_fidelity_curve": monitor,
        "samples": {"file": "samples.png", "prompts": prompts},
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("trained in %.0f s -> %s", total_seconds, out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the toy SD3 pipeline from scratch.")
    parser.add_argument("--out", type=Path, default=PIPELINE_DIR)
    defaults = Recipe()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(defaults)})
    train(recipe, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
