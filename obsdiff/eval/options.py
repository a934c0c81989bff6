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

    Attributes:
        source: `bundled` (obsdiff's demo prompts), `coco` (a captions_val2014.json) or `file`.
        path: coco: the captions JSON; file: a TSV (PartiPrompts), text, CSV or JSONL file.
        num_prompts: How many; null: all.
        subset_seed: coco: the seed of the sample of images.
        format: file: auto, tsv, txt, csv or jsonl.
        column: file: the TSV header or the CSV/JSONL column.
    """

    source: str = "bundled"
    path: str | None = None
    num_prompts: int | None = field(default=None, metadata={"example": 1000, "minimum": 1})
    subset_seed: int = 0
    format: str = "auto"
    column: str = "Prompt"


@dataclass
class FIDOptions:
    """eval.fid: the Frechet Inception Distance (clean-fid).

    Attributes:
        enabled: Compute it.
        reference: A folder of real images, an .npz of (mu, sigma), `dense` (the dense model's
            images of the same prompts and seeds) or `toy_dataset`.
        mode: clean, legacy_pytorch or legacy_tensorflow (clean-fid's).
        extractor: `inception` (clean-fid's), `tiny` (random features, for tests) or
            `toy_classifier`.
        batch_size: Images per feature batch.
    """

    enabled: bool = False
    reference: str | None = None
    mode: str = "clean"
    extractor: str = "inception"
    batch_size: int = field(default=32, metadata={"minimum": 1})


@dataclass
class CLIPScoreOptions:
    """eval.clip_score: the CLIP score (torchmetrics), reported as the raw cosine.

    Attributes:
        enabled: Compute it.
        model: A hub id or a local path (the paper's ViT-B/16), or `tiny` (a random tiny CLIP).
        batch_size: Images per batch.
    """

    enabled: bool = True
    model: str = "openai/clip-vit-base-patch16"
    batch_size: int = field(default=32, metadata={"minimum": 1})


@dataclass
class PromptFidelityOptions:
    """eval.prompt_fidelity: the share of the prompt's attributes the toy world's classifier
    sees in the image.

    Attributes:
        enabled: Compute it.
    """

    enabled: bool = False


@dataclass
class ImageRewardOptions:
    """eval.image_reward: ImageReward, scored in its own environment.

    Attributes:
        enabled: Compute it.
        model: The ImageReward checkpoint.
        python: The interpreter of its isolated environment (`make imagereward-env`).
        download_root: Where its weights are cached.
    """

    enabled: bool = False
    model: str = "ImageReward-v1.0"
    python: str | None = None
    download_root: str | None = None


@dataclass
class EfficiencyOptions:
    """eval.efficiency: size, FLOPs and latency.

    Attributes:
        repeats: Timed one-image generations per model; 0 skips latency and FLOPs. The
            intervals of the latency and of the speed-up (distribution-free, from the order
            statistics) reach 95% from 6 repeats; fewer give the range and say its lower
            coverage (75% at 3).
    """

    repeats: int = field(default=0, metadata={"minimum": 0})


@dataclass
class DenseRelativeOptions:
    """eval.dense_relative: each image against the dense model's image of the same prompt and
    seed: PSNR, SSIM, LPIPS, the final latents' error (needs the dense evaluation).

    Attributes:
        enabled: Compute them.
        lpips: alex, vgg or squeeze (torchvision's weights, fetched once), tiny (a random
            backbone, for tests) or null.
        features: `toy_classifier`: the distance in the toy attribute classifier's features;
            or null.
    """

    enabled: bool = True
    lpips: str | None = "alex"
    features: str | None = None


def _no_sampling_overrides() -> dict[str, Any]:
    return {"num_inference_steps": None, "guidance_scale": None, "scheduler": None}


@dataclass
class EvalOptions:
    """An evaluation's settings: the `eval` config group's keys and `obsdiff.evaluate`'s
    keyword arguments.

    Attributes:
        name: The evaluation set's name (records, the dense cache's folder).
        prompts: Where the prompts come from (`EvalPromptOptions`).
        seed: The image of prompt id i uses the noise of seed + i (the same for every method).
        batch_size: Prompts per pipeline call.
        dense: Evaluate the dense model too (cached under `paths.dense_cache`).
        grid_size: The first prompts' images tiled into grid.png (logged to W&B).
        images_per_prompt: Images of each prompt (image j of prompt id i has id i * n + j).
        fid: The FID (`FIDOptions`).
        clip_score: The CLIP score (`CLIPScoreOptions`).
        prompt_fidelity: The toy's prompt fidelity (`PromptFidelityOptions`).
        image_reward: ImageReward (`ImageRewardOptions`).
        efficiency: Latency and FLOPs (`EfficiencyOptions`).
        sampling: Other sampling than the model's, for the evaluation images only: any of
            num_inference_steps, guidance_scale and scheduler (a diffusers scheduler class,
            e.g. FlowMatchHeunDiscreteScheduler); null keeps the model's.
        dense_relative: The paired metrics against the dense images (`DenseRelativeOptions`).
        bootstrap: The intervals over prompts (`BootstrapSettings`).
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

    def with_metrics(self, metrics: Sequence[str]) -> EvalOptions:
        """These options with exactly `metrics` turned on."""
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics={list(metrics)}: {unknown} unknown; use any of {METRICS}")
        changes = {m: replace(getattr(self, m), enabled=m in metrics) for m in METRICS}
        return replace(self, **changes)

    def metric_names(self, against_dense: bool) -> list[str]:
        """The metrics an evaluation with these options computes (`against_dense`: of a model
        compared with its dense model, with the dense model evaluated: the dense-relative ones
        too)."""
        names = [m for m in METRICS if getattr(self, m).enabled]
        relative = self.dense_relative
        if against_dense and relative.enabled:
            names += ["psnr", "ssim", "latent_rel_error"]
            names += [] if relative.lpips is None else ["lpips"]
            names += [] if relative.features is None else ["toy_feature_distance"]
        return names

    def sampling_overrides(self) -> dict[str, Any]:
        """The evaluation-only sampling settings that are set."""
        return {k: v for k, v in self.sampling.items() if v is not None}
