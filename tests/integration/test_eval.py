"""Evaluation building blocks: prompt sets, sharded resumable generation, FID and CLIP score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore
from transformers import CLIPProcessor

from obsdiff.eval.clip_score import CLIPScore, FeatureAdapter
from obsdiff.eval.fid import FID
from obsdiff.eval.generation import IMAGES_LIST, generate_images
from obsdiff.eval.tiny_backbones import tiny_clip
from obsdiff.models import SD3Adapter
from obsdiff.prompts.eval_sets import coco_captions, prompt_file
from obsdiff.prompts.files import PromptFileError
from obsdiff.runners.parallel import DataParallel


pytestmark = pytest.mark.integration


def coco_file(tmp_path: Path) -> Path:
    annotations = []
    for image_id in range(10, 30):
        for k in range(2):
            annotations.append(
                {
                    "image_id": image_id,
                    "id": 100 * image_id + k,
                    "caption": f"photo {image_id} take {k}",
                }
            )
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": annotations}))
    return path


def test_coco_subsets_take_one_caption_per_image(tmp_path: Path) -> None:
    path = coco_file(tmp_path)
    subset = coco_captions(path, 5, seed=1)
    assert len(subset.ids) == 5 and subset.ids == sorted(subset.ids)
    assert all(p == f"photo {i} take 0" for i, p in zip(subset.ids, subset.prompts, strict=True))
    assert coco_captions(path, 5, seed=1) == subset and coco_captions(path, 5, seed=2) != subset
    assert len(coco_captions(path, None).prompts) == 20
    with pytest.raises(PromptFileError, match="does not exist"):
        coco_captions(tmp_path / "missing.json", 5)
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\na red bus\tVehicles\na cat\tAnimals\n")
    assert prompt_file(parti).prompts == ["a red bus", "a cat"]
    with pytest.raises(PromptFileError, match="also calibration prompts"):
        prompt_file(parti).check_disjoint(["a cat", "a dog"])


@pytest.fixture(scope="module")
def tiny_model() -> SD3Adapter:
    sampling = {"num_inference_steps": 2, "height": 64, "width": 64, "max_sequence_length": 77}
    return SD3Adapter(name="tiny_sd3", tiny="sd3", sampling=sampling)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generation_shards_exactly_resumes_and_fixes_noise_per_id(
    tiny_model, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    prompts = coco_captions(coco_file(tmp_path), 7, seed=0)
    pipe = tiny_model.load()
    calls: list[int] = []
    original = type(pipe).__call__

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    monkeypatch.setattr(DataParallel, "barrier", lambda self: None)  # a simulated world of 3
    sharded = tmp_path / "sharded"
    for rank in range(3):
        generate_images(
            pipe, tiny_model, prompts, sharded, seed=5, batch_size=2, parallel=DataParallel(rank, 3)
        )
    assert sum(calls) == 7  # every prompt rendered once: no duplicates, no padding
    manifest = json.loads((sharded / IMAGES_LIST).read_text())["images"]
    assert [m["id"] for m in manifest] == prompts.ids and all(
        m["seed"] == 5 + m["id"] for m in manifest
    )
    assert all((sharded / m["file"]).is_file() for m in manifest)

    single = tmp_path / "single"
    generate_images(pipe, tiny_model, prompts, single, seed=5, batch_size=3)
    for m in manifest:  # the same noise for the same prompt id, whatever the rank or batch
        np.testing.assert_allclose(pixels(sharded / m["file"]), pixels(single / m["file"]), atol=1)

    calls.clear()
    victim = single / manifest[3]["file"]
    before = pixels(victim)
    victim.unlink()
    generate_images(pipe, tiny_model, prompts, single, seed=5, batch_size=3)
    assert calls == [1]  # only the missing image is rendered again
    np.testing.assert_allclose(pixels(victim), before, atol=1)  # batch of 1 vs 3: round-off


class TinyFeatures(nn.Module):
    """A fixed random projection of pooled pixels: enough for FID's code paths."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x / 255.0).flatten(1))


def image_folder(path: Path, shift: float, count: int = 24) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        array = np.clip(rng.normal(120 + shift, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(path / f"{i:03d}.png")
    return path


def test_fid_against_itself_is_zero_and_grows_with_a_shift(tmp_path: Path) -> None:
    reference = image_folder(tmp_path / "reference", 0)
    same = image_folder(tmp_path / "same", 0)
    shifted = image_folder(tmp_path / "shifted", 60)
    metric = FID(reference, feature_extractor=TinyFeatures())
    assert metric.compute(same)["fid"] == pytest.approx(0.0, abs=1e-3)
    far = metric.compute(shifted)["fid"]
    assert far > 0.1
    metric.save_reference_statistics(tmp_path / "reference.npz")
    cached = FID(tmp_path / "reference.npz", feature_extractor=TinyFeatures())
    assert cached.compute(shifted)["fid"] == pytest.approx(far, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        FID(tmp_path / "nothing.npz")
    # reference statistics of a folder are computed once per cache and reused by later runs
    cache = tmp_path / "cache"
    first = FID(reference, feature_extractor=TinyFeatures(), cache_dir=cache).compute(shifted)
    assert len(list(cache.glob("fid-reference-*.npz"))) == 1
    np.savez(next(cache.glob("*.npz")), mu=np.zeros(8), sigma=np.eye(8))  # prove it is read
    again = FID(reference, feature_extractor=TinyFeatures(), cache_dir=cache).compute(shifted)
    assert again["fid"] != pytest.approx(first["fid"]) and first["fid"] == pytest.approx(far)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def trained_tiny_clip() -> tuple[nn.Module, CLIPProcessor]:
    """The tiny CLIP of `eval=tiny`, taught in a few steps that colour words go with colours."""
    adapter, processor = tiny_clip(seed=0)
    model = adapter.model.train()
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS.values()]
    inputs = processor(text=list(COLOURS), images=images, return_tensors="pt", padding=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(**inputs, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return FeatureAdapter(model.eval()), processor


def test_clip_score_prefers_matching_prompts() -> None:
    metric = CLIPScore(trained_tiny_clip)
    images = [Image.new("RGB", (48, 48), c) for c in COLOURS.values()]
    words = list(COLOURS)
    matching = metric.compute(images, words).values["clip_score"]  # (3,), cosines
    shuffled = metric.compute(images, words[1:] + words[:1]).values["clip_score"]
    assert (matching > shuffled).all() and bool((matching <= 1).all())
    # the mean is torchmetrics' CLIPScore (100 x the mean cosine)
    reference = TorchmetricsCLIPScore(model_name_or_path=trained_tiny_clip)  # type: ignore[arg-type]
    reference.update([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images], words)
    assert matching.mean() == pytest.approx(float(reference.compute()) / 100, abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.compute(images, words[:2])


def test_efficiency_of_dense_and_pruned_models(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from obsdiff.eval.efficiency import measure_efficiency
    from obsdiff.models.surgery import Surgery

    pipe = tiny_model.load()
    dense = measure_efficiency(pipe, tiny_model, repeats=2)
    assert dense.forwards_per_image == 2  # 2 steps, CFG in one doubled batch
    assert dense.seconds_per_image > dense.seconds_per_forward > 0
    # every timed generation kept; the median's interval from 2 repeats is their range, 50%
    assert len(dense.image_seconds) == 2 and dense.interval_confidence == pytest.approx(0.5)
    assert dense.seconds_per_image_interval == sorted(dense.image_seconds)
    block = pipe.transformer.transformer_blocks[1]
    heads, neurons = tiny_model.structured_groups(block)
    surgery = Surgery()
    surgery.remove_heads(heads[0], [0], head_dim=8)
    surgery.remove_neurons(neurons[0], list(range(64)))
    surgery.apply(block)
    pruned = measure_efficiency(pipe, tiny_model, repeats=2)
    assert pruned.params < dense.params
    assert pruned.tflops_per_forward < dense.tflops_per_forward


def test_a_model_against_itself_sampling_overrides_and_latency(
    tiny_model: SD3Adapter, tmp_path: Path
) -> None:
    """The same pipeline evaluated as "dense" and as "pruned" is identical image for image:
    infinite PSNR, SSIM 1, LPIPS 0, latent error 0. Evaluation-only sampling overrides render
    other images and leave the pipeline as it was; the latency comparison swaps denoisers and
    puts the pipeline's own back."""
    from obsdiff.api import evaluation_options, evaluation_settings
    from obsdiff.eval.efficiency import compare_latency
    from obsdiff.eval.harness import evaluate_pipeline

    pipe = tiny_model.load()
    prompts = ["a red cube", "a blue ball"]

    def settings(**options: object):  # type: ignore[no-untyped-def]
        return evaluation_settings(
            prompts,
            evaluation_options(
                metrics=[], dense_relative={"lpips": "tiny"}, images_per_prompt=2, **options
            ),
        )

    dense = evaluate_pipeline(pipe, tiny_model, settings(), tmp_path / "dense")
    again = evaluate_pipeline(pipe, tiny_model, settings(), tmp_path / "again", dense=dense)
    assert dense.num_images == again.num_images == 4  # two prompts, two seeds each
    table = json.loads((tmp_path / "again" / IMAGES_LIST).read_text())["images"]
    assert [(e["id"], e["seed"]) for e in table] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert again.metrics["psnr"] == float("inf") and again.metrics["ssim"] == pytest.approx(1.0)
    assert again.metrics["lpips"] == 0.0 and again.metrics["latent_rel_error"] == 0.0
    assert "psnr" not in dense.metrics and again.comparison  # dense beside "pruned"

    scheduler = type(pipe.scheduler)
    for overrides in ({"num_inference_steps": 3}, {"scheduler": "FlowMatchHeunDiscreteScheduler"}):
        name = "-".join(map(str, overrides.values()))
        other = evaluate_pipeline(
            pipe, tiny_model, settings(sampling=overrides), tmp_path / name, dense=dense
        )
        assert other.sampling == overrides and 0 < other.metrics["psnr"] < float("inf")
        assert type(pipe.scheduler) is scheduler  # restored
    assert settings().images_key({}) != settings(sampling={"guidance_scale": 2.0}).images_key({})

    own = pipe.transformer
    speed = compare_latency(pipe, tiny_model, tiny_model.load().transformer, repeats=1)
    assert pipe.transformer is own and speed.speedup > 0 and speed.repeats == 1
    assert len(speed.dense_seconds) == len(speed.pruned_seconds) == 1
    assert speed.flags == ["no interval"]  # one repeat: no interval, the speed-up not shown
