"""A procedural captioned-image dataset: one coloured shape on a plain background.

Every scene is a combination of five attributes (shape, colour, size, position, background); its
caption names them all ("a small red circle in the top left on a black background"). Images are
drawn from a seed with small jitter of position, size and colour, so a scene is a distribution,
not one image. A fixed, seeded tenth of the combinations is held out of training: evaluation
prompts describe combinations the model has never seen (every single attribute value it has).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from obsdiff.utils.images import image_name, save_image


IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 40),
    "purple": (145, 55, 185),
    "orange": (240, 130, 30),
}
SIZES = {"small": 0.15, "large": 0.27}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
BACKGROUNDS = {"black": (25, 25, 25), "white": (240, 240, 240), "gray": (125, 125, 125)}
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
SPLIT_SEED = 1234
HELD_OUT_FRACTION = 0.1
_SUPERSAMPLE = 4
_CAPTION = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+?) "
    r"on a (?P<background>\w+) background$"
)


@dataclass(frozen=True, order=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"in the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"

    def labels(self) -> dict[str, int]:
        """Class index of each attribute (the classifier's targets)."""
        return {name: ATTRIBUTES[name].index(value) for name, value in asdict(self).items()}


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; ValueError for anything else."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"not a toy caption: {caption!r}")
    scene = Scene(**match.groupdict())
    for name, value in asdict(scene).items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r} in {caption!r}")
    return scene


def all_scenes() -> list[Scene]:
    return [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def split_scenes(seed: int = SPLIT_SEED) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): a seeded tenth of the combinations is held out."""
    scenes = all_scenes()
    order = random.Random(seed).sample(range(len(scenes)), len(scenes))
    held = set(order[: round(HELD_OUT_FRACTION * len(scenes))])
    train = [s for i, s in enumerate(scenes) if i not in held]
    return train, [s for i, s in enumerate(scenes) if i in held]


def _jitter(
    colour: tuple[int, int, int], rng: np.random.Generator, tint: bool = True
) -> tuple[int, ...]:
    """The colour with a little noise: per channel (`tint`) or brightness only."""
    noise = rng.normal(0, 8, 3) if tint else np.full(3, rng.normal(0, 8))
    return tuple(int(np.clip(c + n, 0, 255)) for c, n in zip(colour, noise, strict=True))


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One image of `scene`, jittered by `rng` (drawn 4x larger, then downsampled)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[scene.background], rng, tint=False))
    draw = ImageDraw.Draw(image)
    cx, cy = (np.array(POSITIONS[scene.position]) + rng.uniform(-0.04, 0.04, 2)) * big
    r = SIZES[scene.size] * rng.uniform(0.9, 1.1) * big
    fill = _jitter(COLOURS[scene.colour], rng)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    else:  # cross
        w = 0.33 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def sample_batch(
    scenes: list[Scene], count: int, rng: np.random.Generator
) -> tuple[torch.Tensor, list[Scene]]:
    """`count` random scenes of `scenes`, rendered: ((count, 3, H, W) floats in [-1, 1], scenes)."""
    chosen = [scenes[i] for i in rng.integers(0, len(scenes), count)]
    pixels = np.stack([np.asarray(render(s, rng)) for s in chosen])  # (count, H, W, 3) uint8
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return tensor, chosen


def render_folder(folder: Path, captions: list[str], seed: int) -> Path:
    """Fresh dataset images of `captions` (image i from seed + i): the toy FID reference."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        target = folder / image_name(i)
        if not target.is_file():  # an interrupted render goes on where it stopped
            save_image(render(parse_caption(caption), np.random.default_rng(seed + i)), target)
    return folder


def covering_prompts(prompts: list[str], limit: int = 8) -> list[int] | None:
    """Indices of at most `limit` prompts that together name as many attribute values as
    possible (greedy set cover, first prompt first on ties), for figures that show every
    colour, shape, size, position and background; None when a prompt is not a toy caption."""
    try:
        named = [set(asdict(parse_caption(p)).items()) for p in prompts]
    except ValueError:
        return None
    chosen: list[int] = []
    missing = set().union(*named) if named else set()
    while missing and len(chosen) < limit:
        best = max(range(len(named)), key=lambda i: (len(named[i] & missing), -i))
        if not named[best] & missing:
            break
        chosen.append(best)
        missing -= named[best]
    return chosen
