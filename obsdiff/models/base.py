"""The model adapter contract: how one architecture family is loaded and sampled.

An adapter instance is one model configuration (`conf/model/<name>.yaml`): where the weights come
from (a hub id, a local directory, or a tiny recipe built in code), the dtype, and the sampling
defaults of the paper's setup. Everything is validated in the constructor, before any weights are
touched; `load()` then returns a diffusers pipeline with every component in eval mode.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import nn

from obsdiff.utils.memory import own_memory


log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


InputGroup = tuple[str, ...]  # linears of one block (relative names) that read one input tensor
Unit = tuple[InputGroup, ...]  # a basic unit: groups whose inputs do not depend on each other
# How classifier-free guidance reaches the denoiser (`ModelAdapter.cfg_mode`).
CFG_NONE, CFG_DOUBLED_BATCH, CFG_SEPARATE_CALLS = CFG_MODES = (
    "none",
    "doubled_batch",
    "separate_calls",
)


@dataclass(frozen=True)
class HeadGroup:
    """Attention heads of one attention module (names relative to the block).

    Head h owns rows [h d, (h + 1) d) of every producer (q/k/v, add_q/k/v) and columns
    [offset + h d, offset + (h + 1) d) of every consumer (the output projections, one per
    stream); `attention` is the module whose `heads` count changes.
    """

    attention: str
    producers: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class NeuronGroup:
    """FFN neurons: neuron i is row offset + i of each producer (both GEGLU halves) and column
    offset + i of the consumer (the down-projection); `width` neurons in all."""

    producers: tuple[tuple[str, int], ...]
    consumer: tuple[str, int]
    width: int


def head_group(
    block: nn.Module,
    attention: str,
    producers: Sequence[str],
    consumers: Sequence[str],
    offset: int = 0,
) -> list[HeadGroup]:
    """[the group] restricted to the linears present, or [] when the attention is absent."""
    kept_producers = tuple(name for name in producers if is_linear(block, name))
    kept_consumers = tuple((name, offset) for name in consumers if is_linear(block, name))
    if not (kept_producers and kept_consumers):
        return []
    return [HeadGroup(attention, kept_producers, kept_consumers)]


def ffn_group(block: nn.Module, up: str, down: str, gated: bool = False) -> list[NeuronGroup]:
    """[the FFN's neurons] (a gated up-projection holds value and gate halves), or []."""
    if not (is_linear(block, up) and is_linear(block, down)):
        return []
    width = linear_at(block, down).in_features
    producers = ((up, 0), (up, width)) if gated else ((up, 0),)
    return [NeuronGroup(producers, (down, 0), width)]


def embedding_kwargs(
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    negative: torch.Tensor | None = None,
    negative_pooled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments for precomputed prompt embeddings (negatives only with CFG)."""
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if negative is not None and negative_pooled is not None:
        out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return out


def present_groups(block: nn.Module, groups: Sequence[InputGroup]) -> Unit:
    """The groups restricted to the linears `block` really has (SD3's last block has no context
    output path, SD3.5-Medium has `attn2` only in its first blocks)."""
    kept = []
    for group in groups:
        names = tuple(name for name in group if is_linear(block, name))
        if names:
            kept.append(names)
    return tuple(kept)


def linear_at(module: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear at `name` inside `module` (a clear error if it is something else)."""
    found = module.get_submodule(name)
    if not isinstance(found, nn.Linear):
        raise TypeError(f"{name} is a {type(found).__name__}, not an nn.Linear")
    return found


def is_linear(block: nn.Module, name: str) -> bool:
    try:
        return isinstance(block.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


class ModelConfigError(ValueError):
    """A model configuration is invalid; raised before anything is loaded."""


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded from its hub id or local path."""


@dataclass(frozen=True)
class SamplingDefaults:
    """How the pipeline is called by default (the paper's setup for each real model).

    `negative_prompt` and `true_cfg_scale` matter only where the pipeline accepts them
    (`true_cfg_scale > 1` turns on real classifier-free guidance for Flux).
    `max_sequence_length` caps the T5 prompt length (SD3 and Flux only).
    """

    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        problems = []
        kinds = {
            "num_inference_steps": int,
            "height": int,
            "width": int,
            "guidance_scale": float,
            "true_cfg_scale": float,
            "max_sequence_length": int,
        }
        for key, kind in kinds.items():
            value = getattr(self, key)
            if value is None and key in ("true_cfg_scale", "max_sequence_length"):
                continue
            allowed, what = ((int,), "an integer") if kind is int else ((int, float), "a number")
            if isinstance(value, bool) or not isinstance(value, allowed):
                problems.append(f"model.sampling.{key}={value!r} is not {what}")
        if problems:
            raise ModelConfigError("invalid model.sampling: " + "; ".join(problems))
        if self.num_inference_steps < 1:
            problems.append(f"num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.guidance_scale < 0:
            problems.append(f"guidance_scale={self.guidance_scale} must be >= 0")
        if self.height < 8 or self.width < 8:
            problems.append(f"height x width = {self.height} x {self.width} is too small")
        if self.true_cfg_scale is not None and self.true_cfg_scale < 1:
            problems.append(f"true_cfg_scale={self.true_cfg_scale} must be >= 1 (or null)")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            problems.append(f"max_sequence_length={self.max_sequence_length} must be >= 1")
        if problems:
            raise ModelConfigError("invalid model.sampling: " + "; ".join(problems))


def looks_like_local_path(source: str) -> bool:
    """True when `source` is meant as a filesystem path rather than a hub id (`org/name`)."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def set_eval_mode(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Put every torch component in eval mode (models built from configs start in train mode)."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    return pipe


def null_components(model_dir: Path) -> dict[str, None]:
    """Components that `model_index.json` records as absent (e.g. SD3 saved without T5).

    diffusers refuses to load such a directory unless those components are passed as None.
    """
    index_file = model_dir / "model_index.json"
    if not index_file.is_file():
        return {}
    index = json.loads(index_file.read_text())
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is None
    }


class ModelAdapter(ABC):
    """One architecture family (SD3/SD3.5, Flux, SDXL) and one model configuration of it."""

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # accepted diffusers pipeline class names
    denoiser_attr: ClassVar[str]  # "transformer" or "unet"
    tiny_variants: ClassVar[tuple[str, ...]]  # recipes of `obsdiff.models.tiny`
    ffn_modules: ClassVar[tuple[str, ...]] = ("ff", "ff_context")  # names of FFN submodules

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        dtype: str = "float32",
        tiny: str | None = None,
        seed: int = 0,
        sampling: dict[str, Any] | SamplingDefaults | None = None,
        load_kwargs: dict[str, Any] | None = None,
        pipeline: DiffusionPipeline | None = None,
    ) -> None:
        """`pipeline`: a pipeline already in memory (the Python API), instead of a source."""
        if [pretrained, tiny, pipeline].count(None) != 2:
            raise ModelConfigError(
                f"model {name!r}: set exactly one of `pretrained` (a hub id or local path) "
                f"and `tiny` (one of {list(self.tiny_variants)}), or from Python `pipeline`; got "
                f"pretrained={pretrained!r}, tiny={tiny!r}"
            )
        if pipeline is not None:
            self._check_pipeline_class(pipeline, "the pipeline given", name)
            first = next(getattr(pipeline, self.denoiser_attr).parameters())
            dtype = next((k for k, v in DTYPES.items() if v == first.dtype), dtype)
        if dtype not in DTYPES:
            raise ModelConfigError(
                f"model {name!r}: dtype={dtype!r} is not supported; use one of {list(DTYPES)}"
            )
        if tiny is not None and tiny not in self.tiny_variants:
            raise ModelConfigError(
                f"model {name!r}: tiny={tiny!r} is not a {self.family} recipe; "
                f"use one of {list(self.tiny_variants)}"
            )
        if pretrained is not None and looks_like_local_path(pretrained):
            local = Path(pretrained).expanduser()
            if not (local / "model_index.json").is_file():
                raise ModelConfigError(
                    f"model {name!r}: local path {str(local)!r} is not a diffusers pipeline "
                    "directory (no model_index.json there). Point `model.pretrained` at the folder "
                    "written by `pipe.save_pretrained(...)` or by "
                    "`hf download <hub id> --local-dir <folder>`."
                )
        self.name = name
        self.pretrained = pretrained
        self.revision = revision
        self.variant = variant
        self.dtype = dtype
        self.tiny = tiny
        self.seed = seed
        self.sampling = (
            sampling
            if isinstance(sampling, SamplingDefaults)
            else SamplingDefaults(**(sampling or {}))
        )
        self.load_kwargs = dict(load_kwargs or {})
        self.pipeline = pipeline

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for logs and result files."""
        return {
            "name": self.name,
            "family": self.family,
            "pretrained": self.pretrained,
            "revision": self.revision,
            "variant": self.variant,
            "dtype": self.dtype,
            "tiny": self.tiny,
            "in_memory": self.pipeline is not None,
            "seed": self.seed if self.tiny else None,
            "sampling": asdict(self.sampling),
        }

    def weights_fingerprint(self) -> str | None:
        """For a local checkpoint directory: a hash of its files' names, sizes and modification
        times, so that a checkpoint re-trained or re-saved at the same path never reuses images
        cached for the old weights. None for hub ids and tiny models (id, revision or seed name
        their weights)."""
        if self.pretrained is None or not looks_like_local_path(self.pretrained):
            return None
        root = Path(self.pretrained).expanduser()
        sha = hashlib.sha256()
        for file in sorted(f for f in root.rglob("*") if f.is_file()):
            stat = file.stat()
            sha.update(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return sha.hexdigest()[:16]

    # ------------------------------------------------------------------ loading
    def load(self) -> DiffusionPipeline:
        """The pipeline on the CPU in `self.dtype`, every component in eval mode. Weights read
        from files are copied into memory of their own (`obsdiff.utils.memory`), so a pipeline
        saved and loaded back computes bit for bit what the saved one does, on any CPU."""
        if self.pipeline is not None:  # the caller's pipeline itself (pruned in place)
            pipe = self.pipeline
            for component in pipe.components.values():
                if isinstance(component, nn.Module):
                    own_memory(component)  # as a loaded one: the same results on any CPU
        elif self.tiny is not None:
            pipe = self.build_tiny(self.tiny, self.seed)
            if self.torch_dtype != torch.float32:
                pipe = pipe.to(self.torch_dtype)
        else:
            pipe = self._from_pretrained()
        log.info("loaded model %r", self.name)
        return set_eval_mode(pipe)

    def denoiser_skeleton(self) -> nn.Module:
        """The denoiser's architecture without its weights, for checks before loading: built on
        the meta device from the checkpoint's `model_index.json` and denoiser `config.json` (a
        local directory, or two small files from the hub or its cache), or the tiny recipe's
        denoiser (built in code, under a second). A pipeline of another family, or a hub id
        that cannot be reached and is not cached, fails here with `ModelLoadError`."""
        if self.pipeline is not None:
            return self.denoiser(self.pipeline)
        if self.tiny is not None:
            return self.denoiser(self.build_tiny(self.tiny, self.seed))
        assert self.pretrained is not None
        index = self._read_json("model_index.json")
        if index.get("_class_name") not in self.pipeline_classes:
            raise ModelLoadError(
                f"model {self.name!r}: {self.pretrained!r} holds a {index.get('_class_name')}, but "
                f"the {self.family} adapter expects one of {list(self.pipeline_classes)}; pick the "
                "model config of the right family (see conf/model/)"
            )
        library, class_name = index[self.denoiser_attr]
        config = self._read_json(f"{self.denoiser_attr}/config.json")
        cls = getattr(importlib.import_module(library), class_name)
        with torch.device("meta"):
            return cls.from_config(config)  # type: ignore[no-any-return]

    def _read_json(self, relative: str) -> dict[str, Any]:
        """A small file of the checkpoint (local directory, hub cache, or the hub)."""
        assert self.pretrained is not None
        source = self.pretrained
        try:
            if looks_like_local_path(source):
                path = Path(source).expanduser() / relative
            else:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(source, relative, revision=self.revision))
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise ModelLoadError(self._load_failure_message(source, err)) from err

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments of the family (e.g. dropping T5)."""
        return {}

    def _from_pretrained(self) -> DiffusionPipeline:
        assert self.pretrained is not None
        source = self.pretrained
        kwargs: dict[str, Any] = {
            "dtype": self.torch_dtype,
            "use_safetensors": True,  # never unpickle weights
        }
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.variant is not None:
            kwargs["variant"] = self.variant
        if looks_like_local_path(source):
            source = str(Path(source).expanduser())
            kwargs.update(null_components(Path(source)))
        kwargs.update(self._from_pretrained_kwargs())
        kwargs.update(self.load_kwargs)
        log.info("loading %s pipeline %r (%s)", self.family, source, self.dtype)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(self._load_failure_message(source, err)) from err
        self._check_pipeline_class(pipe, source)
        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                own_memory(component)  # compute exactly as the saved pipeline (utils.memory)
        return pipe

    def _load_failure_message(self, source: str, err: Exception) -> str:
        where = "local directory" if looks_like_local_path(source) else "hub id"
        revision = f" at revision {self.revision!r}" if self.revision else ""
        reason = str(err).splitlines()[0] if str(err) else ""
        return (
            f"model {self.name!r}: could not load the {self.family} pipeline from {where} "
            f"model.pretrained={source!r}{revision}: {type(err).__name__}: {reason}\n"
            "If this machine has no network access or the repository is gated (accept its licence "
            "on the hub and run `hf auth login`), download it once elsewhere with "
            f"`hf download {source} --local-dir <folder>` and point the config at the copy: "
            "`model.pretrained=<folder>` on the command line or `pretrained:` in "
            f"conf/model/{self.name}.yaml."
        )

    def _check_pipeline_class(
        self, pipe: DiffusionPipeline, source: str, name: str | None = None
    ) -> None:
        cls_name = type(pipe).__name__
        if cls_name not in self.pipeline_classes:
            raise ModelLoadError(
                f"model {name or self.name!r}: {source!r} holds a {cls_name}, but the "
                f"{self.family} adapter expects one of {list(self.pipeline_classes)}; pick the "
                "model config of the right family (see conf/model/)"
            )

    @abstractmethod
    def build_tiny(self, variant: str, seed: int) -> DiffusionPipeline:
        """A tiny random-weight pipeline of this family, built in code (no files fetched)."""

    # ----------------------------------------------------------------- sampling
    def denoiser(self, pipe: DiffusionPipeline) -> nn.Module:
        """The module that is pruned: the MMDiT transformer or the UNet."""
        return getattr(pipe, self.denoiser_attr)

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        """Keyword arguments for `pipe(prompt=..., **kwargs)` with these sampling settings."""
        s = sampling or self.sampling
        kwargs: dict[str, Any] = {
            "num_inference_steps": s.num_inference_steps,
            "guidance_scale": s.guidance_scale,
            "height": s.height,
            "width": s.width,
        }
        if s.negative_prompt is not None:
            kwargs["negative_prompt"] = s.negative_prompt
        return kwargs

    def uses_cfg(self, sampling: SamplingDefaults | None = None) -> bool:
        """Whether a call runs classifier-free guidance (an unconditional branch)."""
        s = sampling or self.sampling
        return s.guidance_scale > 1.0

    def cfg_mode(self, sampling: SamplingDefaults | None = None) -> str:
        """How the unconditional branch reaches the denoiser: `doubled_batch` ([uncond, cond] in
        one call, SD3 and SDXL), `separate_calls` (cond call, then uncond call: Flux true CFG)
        or `none`."""
        return CFG_DOUBLED_BATCH if self.uses_cfg(sampling) else CFG_NONE

    # ---------------------------------------------------------------- structure
    def is_ffn(self, name: str) -> bool:
        """Whether the linear at qualified `name` belongs to a feed-forward network (what
        DSnoT's official `--skip_layer mlp` skips)."""
        return any(part in self.ffn_modules for part in name.split("."))

    @abstractmethod
    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """The denoiser's transformer blocks in forward order, with their qualified names."""

    @abstractmethod
    def block_units(self, block: nn.Module) -> list[Unit]:
        """The target linears of one block as basic units, in forward order (paper Sec. 4.2)."""

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """The heads and FFN neurons structured pruning may remove from one block."""
        raise NotImplementedError(f"structured pruning is not available for {self.family}")

    def structured_units(self, block: nn.Module) -> list[Unit]:
        """The consumers of `structured_groups` (output and down projections) as basic units:
        the layers whose input statistics structured OBS needs."""
        heads, neurons = self.structured_groups(block)
        attention = list(dict.fromkeys((name,) for group in heads for name, _ in group.consumers))
        ffn = [
            g
            for g in dict.fromkeys((group.consumer[0],) for group in neurons)
            if g not in attention
        ]
        return [tuple(unit) for unit in (attention, ffn) if unit]

    def default_blocks(self, num_blocks: int, structured: bool) -> tuple[int, int]:
        """Blocks pruned when the config names none: all of them, but for structured pruning the
        first and last are kept (the paper's parameter counts require it)."""
        return (1, num_blocks - 1) if structured and num_blocks > 2 else (0, num_blocks)

    # -------------------------------------------------------------- calibration
    @abstractmethod
    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Prompt embeddings (and the negative ones when CFG is on) as pipeline keyword arguments,
        computed once and reused by every calibration pass."""

    def calibration_call(
        self,
        pipe: DiffusionPipeline,
        embeddings: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        on_step_end: Callable[..., dict[str, Any]],
    ) -> Any:
        """One denoising trajectory to latents (no VAE decode), `on_step_end` after each step."""
        kwargs = self.call_kwargs()
        kwargs.pop("negative_prompt", None)  # the embeddings carry it
        return pipe(
            **embeddings,
            **kwargs,
            generator=generators,
            output_type="latent",
            callback_on_step_end=on_step_end,
        )

    def __repr__(self) -> str:
        source = f"tiny={self.tiny!r}" if self.tiny else f"pretrained={self.pretrained!r}"
        source = "in memory" if self.pipeline is not None else source
        return f"{type(self).__name__}(name={self.name!r}, {source}, dtype={self.dtype!r})"


def adapter_from_config(config: dict[str, Any]) -> ModelAdapter:
    """The adapter of a plain model config (a manifest's `model_config`, `conf/model/<name>.yaml`
    resolved): `_target_` names an obsdiff adapter class, the other keys are its arguments.
    The library's way back from a saved run to its model, without Hydra."""
    target = config.get("_target_")
    module_name, _, class_name = str(target).rpartition(".")
    if not module_name.startswith("obsdiff.models"):
        raise ModelConfigError(
            f"model config: `_target_` must name an obsdiff adapter; got {target!r}"
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise ModelConfigError(f"model config: {target!r} is not a model adapter class")
    arguments = {k: v for k, v in config.items() if k != "_target_"}
    try:
        return cls(**arguments)
    except TypeError as err:
        raise ModelConfigError(f"model config ({target}): {err}") from err
