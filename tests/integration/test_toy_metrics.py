"""The toy metrics on dataset images: the committed attribute classifier reads the attributes,
prompt fidelity rewards matching captions, and the toy FID separates scenes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from obsdiff.eval.fid import FID
from obsdiff.toy.classifier import AttributeClassifier, ClassifierFeatures, load_classifier
from obsdiff.toy.data import (
    ATTRIBUTES,
    COLOURS,
    all_scenes,
    render,
    render_folder,
    sample_batch,
)
from obsdiff.toy.prompt_fidelity import PromptFidelity
from obsdiff.toy.train_classifier import train


pytestmark = pytest.mark.integration

TEST_SEED = 2024  # the classifier was trained from seed 0 and measured from 10_000


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny batches: one thread is faster than several (and trains as the script does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier() -> AttributeClassifier:
    return load_classifier()


def test_committed_classifier_reads_every_attribute(classifier: AttributeClassifier) -> None:
    assert not classifier.training
    scenes = all_scenes()
    images, chosen = sample_batch(scenes, 300, np.random.default_rng(TEST_SEED))  # [-1, 1]
    with torch.no_grad():
        logits = classifier((images + 1.0) * 127.5)
    for name, values in ATTRIBUTES.items():
        target = torch.tensor([values.index(getattr(s, name)) for s in chosen])
        assert float((logits[name].argmax(dim=1) == target).float().mean()) >= 0.95, name
    # predict: the same reading from PIL images of any size
    rng = np.random.default_rng(TEST_SEED + 1)
    few = [scenes[i] for i in rng.integers(0, len(scenes), 8)]
    big = [render(s, rng, size=64) for s in few]
    assert sum(a == b for a, b in zip(classifier.predict(big), few, strict=True)) >= 7


def test_training_is_deterministic_from_its_seed() -> None:
    digests = [train(steps=6, seed=seed)[0].digest() for seed in (3, 3, 4)]
    assert digests[0] == digests[1] != digests[2]


def test_prompt_fidelity_rewards_the_captions_of_the_images(
    classifier: AttributeClassifier, tmp_path: Path
) -> None:
    rng = np.random.default_rng(TEST_SEED + 2)
    scenes = [all_scenes()[i] for i in rng.integers(0, 720, 100)]
    images = [render(s, rng) for s in scenes]
    captions = [s.caption for s in scenes]
    metric = PromptFidelity(classifier, batch_size=32)
    assert metric.name == PromptFidelity().name == f"attribute_classifier:{classifier.digest()}"
    scores = metric.compute(images, captions)
    assert len(scores.values["prompt_fidelity"]) == 100
    own = scores.means()
    assert set(own) == {"prompt_fidelity", *(f"prompt_fidelity_{n}" for n in ATTRIBUTES)}
    assert own["prompt_fidelity"] >= 0.95
    assert own["prompt_fidelity"] == pytest.approx(
        np.mean([own[f"prompt_fidelity_{n}"] for n in ATTRIBUTES])
    )
    others = metric.compute(images, captions[1:] + captions[:1]).means()
    assert others["prompt_fidelity"] < own["prompt_fidelity"] - 0.4
    recoloured = [replace(s, colour="green" if s.colour != "green" else "red") for s in scenes]
    wrong_colour = metric.compute(images, [s.caption for s in recoloured]).means()
    assert wrong_colour["prompt_fidelity_colour"] < 0.05
    assert wrong_colour["prompt_fidelity_shape"] == own["prompt_fidelity_shape"]

    files = []  # image files: the same numbers
    for i, image in enumerate(images[:40]):
        image.save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    assert (
        metric.compute(files, captions[:40]).means()
        == metric.compute(images[:40], captions[:40]).means()
    )
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.compute(images, captions[:-1])
    with pytest.raises(ValueError, match="prompt 1 .*a photo of a cat"):
        metric.compute(images[:2], [captions[0], "a photo of a cat"])


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 100 images, 128 features
def test_toy_fid_is_small_for_the_same_scenes_and_large_for_other_colours(
    classifier: AttributeClassifier, tmp_path: Path
) -> None:
    extractor = ClassifierFeatures(classifier)
    with torch.no_grad():
        assert extractor(torch.rand(2, 3, 299, 299) * 255).shape == (2, 128)
    rng = np.random.default_rng(TEST_SEED + 3)
    scenes = [all_scenes()[i] for i in rng.choice(720, 20, replace=False)] * 5
    colours = list(COLOURS)
    recoloured = [replace(s, colour=colours[(colours.index(s.colour) + 1) % 6]) for s in scenes]
    captions = [s.caption for s in scenes]
    reference = render_folder(tmp_path / "reference", captions, seed=0)
    same = render_folder(tmp_path / "same", captions, seed=100_000)
    other = render_folder(tmp_path / "other", [s.caption for s in recoloured], seed=100_000)
    statistics = tmp_path / "reference.npz"  # the reference features once, not per compute
    FID(reference, feature_extractor=extractor).save_reference_statistics(statistics)
    metric = FID(statistics, feature_extractor=extractor)
    near = metric.compute(same)["fid"]
    far = metric.compute(other)["fid"]
    assert 0 <= near < far / 5
