"""ImageReward: an injected scorer, the isolated worker run for real on a fake `ImageReward`
package, and the clear errors of a missing package or interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from obsdiff.eval.image_reward import (
    ImageReward,
    ImageRewardError,
    ImageRewardUnavailable,
)
from obsdiff.eval.image_reward_worker import score_grouped


pytestmark = pytest.mark.unit

# Scores len(prompt) + mean pixel / 255, a float for one image as the real package does; its
# load() prints to stdout as the real one does, which the worker must keep off its answer.
FAKE_PACKAGE = """
from PIL import Image, ImageStat


class Model:
    def __init__(self, name, device, download_root):
        self.name, self.device, self.download_root = name, device, download_root

    def _score(self, prompt, path):
        if "fail" in prompt:
            raise ValueError("fake scoring failure")
        assert isinstance(path, str), path
        pixels = ImageStat.Stat(Image.open(path).convert("RGB")).mean
        return len(prompt) + sum(pixels) / len(pixels) / 255

    def score(self, prompt, images):
        if isinstance(images, list) and len(images) > 1:
            return [self._score(prompt, path) for path in images]
        return self._score(prompt, images[0] if isinstance(images, list) else images)


def load(name="ImageReward-v1.0", device="cpu", download_root=None):
    print("load checkpoint from", name)
    assert name == "ImageReward-v1.0" and device == "cpu" and download_root == "/weights"
    return Model(name, device, download_root)
"""


def image(tmp_path: Path, name: str, grey: int) -> Path:
    path = tmp_path / f"{name}.png"
    Image.new("RGB", (8, 8), (grey, grey, grey)).save(path)
    return path


@pytest.fixture
def fake_package(tmp_path: Path) -> dict[str, str]:
    """The worker's environment: PYTHONPATH holding a fake ImageReward package."""
    package = tmp_path / "site" / "ImageReward"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_PACKAGE)
    return {"PYTHONPATH": str(package.parent)}


def test_injected_scorer_mean_and_grouping(tmp_path: Path) -> None:
    files = [image(tmp_path, str(i), 0) for i in range(5)]
    prompts = ["cat", "dog", "cat", "cat", "dog"]
    calls: list[tuple[str, int]] = []

    def scorer(prompt: str, paths: list[Path]) -> list[float]:
        calls.append((prompt, len(paths)))
        return [float(files.index(path)) for path in paths]

    metric = ImageReward(scorer=scorer, batch_size=2)
    result = metric.compute(files, prompts)
    assert result.values["image_reward"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # image order
    assert result.means() == {"image_reward": 2.0}
    assert result.info == {
        "image_reward_model": "ImageReward-v1.0",
        "image_reward_backend": "custom",
    }
    assert calls == [("cat", 2), ("cat", 1), ("dog", 2)]
    metric.check()  # nothing to check


def test_score_grouped_keeps_order_and_takes_a_float_for_one_image() -> None:
    def score(prompt: str, images: list[str]) -> float | list[float]:
        values = [len(prompt) * 10.0 + int(image) for image in images]
        return values[0] if len(values) == 1 else values

    items = [("ab", "1"), ("abc", "2"), ("ab", "3")]
    assert score_grouped(score, items, batch_size=4) == [21.0, 32.0, 23.0]
    with pytest.raises(RuntimeError, match="1 scores for 2 images"):
        score_grouped(lambda prompt, images: [0.0], items, batch_size=2)


def test_length_mismatch_and_missing_images(tmp_path: Path) -> None:
    metric = ImageReward(scorer=lambda prompt, paths: [0.0] * len(paths))
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.compute([image(tmp_path, "a", 0)], ["a", "b"])
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.compute([], [])
    with pytest.raises(FileNotFoundError, match="missing"):
        metric.compute([tmp_path / "absent.png"], ["a"])


def test_isolated_worker_scores_every_image(tmp_path: Path, fake_package: dict[str, str]) -> None:
    files = [
        image(tmp_path, "black", 0),
        image(tmp_path, "grey", 51),
        image(tmp_path, "white", 255),
    ]
    prompts = ["a cat", "a cat", "dog"]  # "a cat": one call on two images; "dog": a float
    metric = ImageReward(
        python=sys.executable, device="cpu", download_root="/weights", env=fake_package
    )
    metric.check()
    result = metric.compute(files, prompts)
    expected = [5 + 0.0, 5 + 0.2, 3 + 1.0]
    assert result.values["image_reward"] == pytest.approx(expected, abs=1e-12)
    assert result.info["image_reward_backend"] == "isolated"
    assert result.info["image_reward_model"] == "ImageReward-v1.0"


def test_isolated_worker_failure_is_reported(tmp_path: Path, fake_package: dict[str, str]) -> None:
    metric = ImageReward(python=sys.executable, download_root="/weights", env=fake_package)
    with pytest.raises(ImageRewardError, match="fake scoring failure"):
        metric.compute([image(tmp_path, "a", 0)], ["fail"])


def test_isolated_check_without_the_package(tmp_path: Path) -> None:
    metric = ImageReward(python=sys.executable, env={"PYTHONPATH": str(tmp_path)})
    with pytest.raises(ImageRewardUnavailable, match="No module named 'ImageReward'") as failure:
        metric.check()
    assert "make imagereward-env" in str(failure.value)


def test_in_process_import_failure_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # `import ImageReward` now fails
    metric = ImageReward()
    assert metric.backend == "in-process"
    for attempt in (metric.check, lambda: metric.compute([image(tmp_path, "a", 0)], ["a"])):
        with pytest.raises(ImageRewardUnavailable) as failure:
            attempt()
        message = str(failure.value)
        assert "cannot be imported" in message and "make imagereward-env" in message
        assert "eval.image_reward.python=.venv-imagereward/bin/python" in message
        assert "eval.image_reward.enabled=false" in message


@pytest.mark.parametrize("python", ["absent-env/bin/python", "/nonexistent/bin/python"])
def test_check_fails_for_a_missing_interpreter(python: str) -> None:
    with pytest.raises(ImageRewardUnavailable, match="no interpreter") as failure:
        ImageReward(python=python).check()
    assert python in str(failure.value) and "make imagereward-env" in str(failure.value)
