"""Train the toy attribute classifier: `python -m obsdiff.toy.train_classifier [--steps N]`.

Every step draws a fresh batch of all scenes (the classifier measures the model under test, so
it sees the held-out combinations too), blurs and adds noise to some images so that it also reads
imperfect generated ones, and minimises the cross-entropy summed over the five attributes with
Adam (cosine learning rate). Deterministic from `--seed` at a fixed thread count. Writes
`classifier.safetensors` and `classifier.json` (settings, loss curve, accuracy on fresh images).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from obsdiff.toy.classifier import DEFAULT_WEIGHTS, AttributeClassifier, save_classifier
from obsdiff.toy.data import ATTRIBUTES, Scene, all_scenes, sample_batch, split_scenes


log = logging.getLogger(__name__)

BATCH_SIZE = 32
LEARNING_RATE = 2e-3
CURVE_POINTS = 20


def targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """{attribute: (B,) class indices}."""
    labels = [s.labels() for s in scenes]
    return {name: torch.tensor([lab[name] for lab in labels]) for name in ATTRIBUTES}


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable 5-tap Gaussian (reflect padding)."""
    taps = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    rows = kernel.view(1, 1, 1, 5).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, 5, 1).repeat(channels, 1, 1, 1)
    return F.conv2d(F.conv2d(padded, rows, groups=channels), cols, groups=channels)


def augment(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur half the images (one sigma per batch) and add Gaussian noise to half of them.

    images: (B, 3, H, W) in [-1, 1]."""
    count = images.shape[0]
    blur = torch.from_numpy(rng.random(count) < 0.5)
    if blur.any():
        images = images.clone()
        images[blur] = gaussian_blur(images[blur], float(rng.uniform(0.4, 1.2)))
    noise_std = np.where(rng.random(count) < 0.5, rng.uniform(0.0, 0.12, count), 0.0)
    noise = rng.standard_normal(images.shape, dtype=np.float32) * noise_std[:, None, None, None]
    return (images + torch.from_numpy(noise.astype(np.float32))).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(
    model: AttributeClassifier, scenes: list[Scene], count: int, seed: int, degrade: bool = False
) -> dict[str, float]:
    """Per-attribute accuracy on `count` fresh images of `scenes` (`degrade`: augmented)."""
    model.eval()
    rng = np.random.default_rng(seed)
    correct = dict.fromkeys(ATTRIBUTES, 0)
    for start in range(0, count, 250):
        images, chosen = sample_batch(scenes, min(250, count - start), rng)  # [-1, 1]
        images = augment(images, rng) if degrade else images
        logits = model((images + 1.0) * 127.5)
        for name, target in targets(chosen).items():
            correct[name] += int((logits[name].argmax(dim=1) == target).sum())
    return {name: round(hits / count, 4) for name, hits in correct.items()}


def train(steps: int, seed: int) -> tuple[AttributeClassifier, dict[str, object]]:
    """A trained classifier and its training record (seed, steps, loss curve, timing)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    model = AttributeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps))
    )
    every = max(1, steps // CURVE_POINTS)
    curve: list[float] = []
    running = 0.0
    started = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="classifier", unit="step", mininterval=5):
        images, chosen = sample_batch(scenes, BATCH_SIZE, rng)  # (B, 3, 32, 32) in [-1, 1]
        logits = model((augment(images, rng) + 1.0) * 127.5)
        losses = [F.cross_entropy(logits[name], y) for name, y in targets(chosen).items()]
        loss = torch.stack(losses).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % every == 0:
            curve.append(round(running / every, 4))
            running = 0.0
    record: dict[str, object] = {
        "seed": seed,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "optimizer": "Adam, cosine schedule",
        "augmentation": "half blurred (sigma 0.4-1.2), half with noise (std 0-0.12 of [-1, 1])",
        "train_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "loss_every_steps": every,
        "loss_curve": curve,
    }
    return model.eval(), record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m obsdiff.toy.train_classifier",
        description="Train the toy attribute classifier on fresh images of all scenes.",
    )
    parser.add_argument("--steps", type=int, default=3000, help="training steps (batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_WEIGHTS.parent,
        metavar="DIR",
        help="where classifier.safetensors and classifier.json go (default: the package's)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--eval-images", type=int, default=5000, help="fresh images per accuracy measurement"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    torch.set_num_threads(args.threads)
    model, record = train(args.steps, args.seed)
    eval_seed = args.seed + 10_000
    measured = {
        "all_scenes": accuracy(model, all_scenes(), args.eval_images, eval_seed),
        "held_out_scenes": accuracy(model, split_scenes()[1], args.eval_images, eval_seed + 1),
        "all_scenes_augmented": accuracy(
            model, all_scenes(), args.eval_images, eval_seed + 2, degrade=True
        ),
    }
    record["accuracy"] = {"images": args.eval_images, "seed": eval_seed, **measured}
    path = save_classifier(model, args.out.expanduser() / DEFAULT_WEIGHTS.name, record)
    log.info("trained in %.0f s; wrote %s", record["train_seconds"], path)
    for which, values in measured.items():
        log.info("accuracy on %s: %s", which, values)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
