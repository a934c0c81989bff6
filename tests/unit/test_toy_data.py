"""The toy dataset: seeded rendering, captions <-> scenes, the held-out split, and pictures that
show what their captions say."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

from obsdiff.app.config import DATA_DIR
from obsdiff.toy.data import (
    ATTRIBUTES,
    BACKGROUNDS,
    IMAGE_SIZE,
    POSITIONS,
    Scene,
    all_scenes,
    covering_prompts,
    parse_caption,
    render,
    sample_batch,
    split_scenes,
)
from obsdiff.utils.images import captioned_grid


pytestmark = pytest.mark.unit

SCENE = Scene("triangle", "blue", "large", "top right", "white")
DATA = DATA_DIR / "toy"


def test_same_seed_same_pixels_and_another_seed_other_pixels() -> None:
    def pixels(seed: int) -> np.ndarray:
        return np.asarray(render(SCENE, np.random.default_rng(seed)))

    assert pixels(IMAGE_SIZE).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(pixels(3), pixels(3))
    assert not np.array_equal(pixels(3), pixels(4))
    scenes = all_scenes()
    first, chosen = sample_batch(scenes, 8, np.random.default_rng(7))
    again, chosen_again = sample_batch(scenes, 8, np.random.default_rng(7))
    other, _ = sample_batch(scenes, 8, np.random.default_rng(8))
    assert first.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and chosen == chosen_again
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert -1.0 <= float(first.min()) and float(first.max()) <= 1.0


def test_every_caption_parses_back_to_its_scene() -> None:
    scenes = all_scenes()
    assert len(scenes) == np.prod([len(values) for values in ATTRIBUTES.values()]) == 720
    assert len({s.caption for s in scenes}) == len(scenes)
    assert all(parse_caption(s.caption) == s for s in scenes)
    assert parse_caption(f"  {SCENE.caption.upper()} ") == SCENE
    assert "in the center on" in replace(SCENE, position="center").caption


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a photo of a cat",
        "a small pink circle in the center on a black background",  # unknown colour
        "a tiny red circle in the center on a black background",  # unknown size
        "a small red circle in the middle on a black background",  # unknown position
        "a small red circle in the center on a black background, highly detailed",
    ],
)
def test_other_text_is_not_a_caption(text: str) -> None:
    with pytest.raises(ValueError):
        parse_caption(text)


def test_split_is_disjoint_and_training_sees_every_attribute_value() -> None:
    train, held_out = split_scenes()
    assert (len(train), len(held_out)) == (648, 72)
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(all_scenes())
    assert split_scenes() == (train, held_out)
    for name, values in ATTRIBUTES.items():
        assert {getattr(s, name) for s in train} == set(values), name


def shape_mask(scene: Scene, seed: int) -> np.ndarray:
    """(H, W) bool: pixels far from the scene's background colour."""
    pixels = np.asarray(render(scene, np.random.default_rng(seed))).astype(np.float32)
    distance = np.linalg.norm(pixels - np.array(BACKGROUNDS[scene.background]), axis=-1)
    return distance > 50


def test_shapes_are_drawn_where_and_as_large_as_the_caption_says() -> None:
    nominal = {name: np.array(xy) * IMAGE_SIZE for name, xy in POSITIONS.items()}
    areas: dict[tuple[str, str], list[int]] = {}
    for i, scene in enumerate(all_scenes()):
        mask = shape_mask(scene, seed=i)
        ys, xs = np.nonzero(mask)
        centroid = np.array([xs.mean(), ys.mean()]) + 0.5  # pixel centres
        nearest = min(nominal, key=lambda name: np.linalg.norm(centroid - nominal[name]))
        assert nearest == scene.position, scene.caption
        assert np.abs(centroid - nominal[scene.position]).max() < 4, scene.caption
        areas.setdefault((scene.shape, scene.size), []).append(int(mask.sum()))
    for shape in ATTRIBUTES["shape"]:
        assert min(areas[shape, "large"]) > max(areas[shape, "small"]), shape


def test_covering_prompts_show_every_attribute_value() -> None:
    """The held-out evaluation prompts: a few of them name every value of every attribute (the
    comparison figure of the run app); prompts that are not toy captions give None."""
    prompts = (DATA / "eval_prompts.txt").read_text().splitlines()
    chosen = covering_prompts(prompts, limit=8)
    assert chosen is not None and len(chosen) <= 8 and chosen[0] == 0
    named = {pair for i in chosen for pair in asdict(parse_caption(prompts[i])).items()}
    assert named == {(name, value) for name, values in ATTRIBUTES.items() for value in values}
    assert covering_prompts(prompts, limit=2) is not None
    assert len(covering_prompts(prompts, limit=2) or []) == 2
    assert covering_prompts(["a photo of a cat"]) is None


def test_captioned_grid_enlarges_and_places_images() -> None:
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    grid = captioned_grid([("a red square", [red, None])], ["dense", "pruned"], cell=64)
    assert grid.size == (200 + 2 * 68, 20 + 68)
    assert grid.getpixel((200 + 32, 20 + 32)) == (255, 0, 0)  # enlarged to the 64-pixel cell
    assert grid.getpixel((200 + 68 + 32, 20 + 32)) == (160, 160, 160)  # no image: placeholder
