"""What an evaluation measures, as plain values: the `eval` config group's keys and defaults
(every eval set, `conf/eval/<set>.yaml`, overrides what it needs) and `obsdiff.evaluate`'s
keyword arguments. `obsdiff.api.evaluation_settings` builds the metrics from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from obsdiff.eval.bootstrap import BootstrapSettings


# the metrics `obsdiff.evaluate(metrics=[...])` turns on: each option group's `enabled`
METRICS = ("fid", "clip_score", "prompt_fidelity", "image_reward")


@dataclass
class EvalPromptOptions:
    """eval.prompts: where the evaluation prompts come from.

    source:      bundled (obsdiff's demo prompts) | coco (a captions_val2014.json) | file
    path:        coco: the captions JSON; file: a TSV (PartiPrompts), text, CSV or JSONL file
    num_prompts: how many; null: all
    subset_seed: coco: the seeded sample of images
    format:      file: auto | tsv | txt | csv | jsonl
    column:      file: the TSV header or CSV/JSONL column
    """

    source: str = "bundled"
    path: str | None = None
    num_prompts: int | None = field(default=None, metadata={"example": 1000, "minimum": 1})
    subset_seed: int = 0
    format: str = "auto"
    column: str = "Prompt"


@dataclass
class FIDOptions:
    """eval.fid.

    reference: a folder of real images, an .npz of (mu, sigma), `dense` (the dense model's
               images of the same prompts and seeds) or `toy_dataset`
    mode:      clean | legacy_pytorch | legacy_tensorflow (clean-fid)
    extractor: inception (clean-fid's) | tiny (random features, tests only) | toy_classifier
    """

    enabled: bool = False
    reference: str | None = None
    mode: str = "clean"
    extractor: str = "inception"
    batch_size: int = field(default=32, metadata={"minimum": 1})


@dataclass
class CLIPScoreOptions:
    """eval.clip_score. model: a hub id or local path (the paper's ViT-B/16) | tiny."""

    enabled: bool = True
    model: str = "openai/clip-vit-base-patch16"
    batch_size: int = field(default=32, metadata={"minimum": 1})


@dataclass
class PromptFidelityOptions:
    """eval.prompt_fidelity: the toy world's attribute classifier."""

    enabled: bool = False


@dataclass
class ImageRewardOptions:
    """eval.image_reward. python: the interpreter of its isolated environment (make
    imagereward-env); download_root: where its weights are cached."""

    enabled: bool = False
    model: str = "ImageReward-v1.0"
    python: str | None = None
    download_root: str | None = None


@dataclass
class EfficiencyOptions:
    """eval.efficiency. repeats: timed one-image generations per model; 0 skips latency and
    FLOPs."""

    repeats: int = field(default=0, metadata={"minimum": 0})


@dataclass
class DenseRelativeOptions:
    """eval.dense_relative: each image against the dense model's image of the same prompt and
    seed: PSNR, SSIM, LPIPS, the final latents' error (needs the dense evaluation).

    lpips:    alex | vgg | squeeze (torchvision weights, fetched once) | tiny (a random
              backbone, tests) | null
    features: toy_classifier: the distance in the toy attribute classifier's features | null
    """

    enabled: bool = True
    lpips: str | None = "alex"
    features: str | None = None


def _no_sampling_overrides() -> dict[str, Any]:
    return {"num_inference_steps": None, "guidance_scale": None, "scheduler": None}


@dataclass
class EvalOptions:
    """An evaluation's settings (the `eval` group).

    name:              the evaluation set's name (records, the dense cache's folder)
    prompts:           where the prompts come from (`EvalPromptOptions`)
    seed:              the image of prompt id i uses seed + i (the same noise for every method)
    batch_size:        prompts per pipeline call
    dense:             evaluate the dense model too (cached under paths.dense_cache)
    grid_size:         the first prompts' images tiled into grid.png (logged to W&B)
    images_per_prompt: images of each prompt (image j of prompt id i: id i * n + j)
    fid, clip_score, prompt_fidelity, image_reward: the metrics, each turned on by `enabled`
    efficiency:        latency and FLOPs
    sampling:          other than the model's, for the evaluation images only (robustness):
                       num_inference_steps, guidance_scale, scheduler (a diffusers scheduler
                       class, e.g. FlowMatchHeunDiscreteScheduler); null: the model's
    dense_relative:    the paired metrics against the dense images
    bootstrap:         the intervals over prompts (`BootstrapSettings`)
    """

    name: str = "python"
    prompts: EvalPromptOptions = field(default_factory=EvalPromptOptions)
    seed: int = field(default=0, metadata={"minimum": 0})
    batch_size: int = field(default=4, metadata={"minimum": 1})
    dense: bool = False
    grid_size: int = field(default=8, metadata={"minimum": 0})
    images_per_prompt: int = field(default=1, metadata={"minimum": 1})
    fid: FIDOptions = field(default_factory=FIDOptions)
    clip_score: CLIPScoreOptions = field(default_factory=CLIPScoreOptions)
    prompt_fidelity: PromptFidelityOptions = field(default_factory=PromptFidelityOptions)
    image_reward: ImageRewardOptions = field(default_factory=ImageRewardOptions)
    efficiency: EfficiencyOptions = field(default_factory=EfficiencyOptions)
    sampling: dict[str, Any] = field(default_factory=_no_sampling_overrides)
    dense_relative: DenseRelativeOptions = field(default_factory=DenseRelativeOptions)
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    @property
    def metrics(self) -> list[str]:
        """The metrics turned on, in `METRICS` order."""
        return [name for name in METRICS if getattr(self, name).enabled]

    def with_metrics(self, metrics: Sequence[str]) -> EvalOptions:
        """These options with exactly `metrics` turned on."""
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics={list(metrics)}: {unknown} unknown; use any of {METRICS}")
        changes = {m: replace(getattr(self, m), enabled=m in metrics) for m in METRICS}
        return replace(self, **changes)

    def sampling_overrides(self) -> dict[str, Any]:
        """The evaluation-only sampling settings that are set."""
        return {k: v for k, v in self.sampling.items() if v is not None}
