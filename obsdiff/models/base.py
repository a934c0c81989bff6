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
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from obsdiff.models.experts import Experts, called_modules, single_models
from obsdiff.models.loading import (
    DTYPES,
    ModelConfigError,
    ModelLoadError,
    looks_like_local_path,
    null_components,
    set_eval_mode,
)
from obsdiff.models.sampling import (
    CFG_DOUBLED_BATCH,
    CFG_NONE,
    CFG_SEPARATE_CALLS,
    SamplingDefaults,
)
from obsdiff.models.structure import HeadGroup, NeuronGroup, Unit
from obsdiff.models.surgery import restore_shapes
from obsdiff.utils.memory import own_memory


if TYPE_CHECKING:  # diffusers is imported where a pipeline is loaded: the settings stay light
    from diffusers import DiffusionPipeline


log = logging.getLogger(__name__)

# the real models' `model_index.json` and component `config.json` files, shipped with obsdiff:
# their architecture (for checks and the memory plan) without the hub or any weights
DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # files shipped with obsdiff
ARCHITECTURES = DATA_DIR / "architectures"


TEXT_FIRST, IMAGE_FIRST = "text_first", "image_first"  # `ModelAdapter.joint_attention`


def pattern_regex(pattern: str) -> str:
    """A module name pattern (fnmatch's `*`, any characters; no `?` or `[`) as the regular
    expression that fully matches the module it names and every module under it."""
    if any(c in pattern for c in "?[]"):
        raise ValueError(f"module pattern {pattern!r}: only `*` is a wildcard here")
    return ".*".join(re.escape(part) for part in pattern.split("*")) + r"(\..+)?"


class ModelAdapter(ABC):
    """One architecture family (SD3/SD3.5, Flux, SDXL) and one model configuration of it."""

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # accepted diffusers pipeline class names
    denoiser_attr: ClassVar[str]  # "transformer" or "unet"
    tiny_variants: ClassVar[tuple[str, ...]]  # recipes of `obsdiff.models.tiny`
    takes_max_sequence_length: ClassVar[bool] = False  # its pipeline caps a T5 prompt
    ffn_modules: ClassVar[tuple[str, ...]] = ("ff", "ff_context")  # names of FFN submodules
    # the modulation linears (AdaLN projections of the conditioning vector), as name patterns
    # (fnmatch) over the denoiser's modules; none: the family has no low-rank modulation
    modulation_patterns: ClassVar[tuple[str, ...]] = ()
    # what no compression touches beside the modulation, by why: name patterns (fnmatch) of
    # modules, each covering everything under it. With the modulation it is the family's
    # do-not-compress list (`do_not_compress`), which pruning, quantization and the export read
    keep_out: ClassVar[dict[str, tuple[str, ...]]] = {}
    # depth pruning: each ModuleList of blocks and the config key of its length (none: the
    # family's blocks cannot be removed); `joint_blocks`: a block takes both streams and returns
    # (encoder_hidden_states, hidden_states) (the MMDiTs), else it returns hidden_states alone
    depth_lists: ClassVar[dict[str, str]] = {}
    joint_blocks: ClassVar[bool] = False
    # where its pipeline puts the latent and the timestep in a denoiser call (a position or a
    # keyword), and what it divides the scheduler's timestep (0..1000) by (Flux: 1000)
    # the order of a joint attention's keys, [text, image] or [image, text] (importance-weighted
    # OBS's attention maps, `obsdiff.calibration.importance`); None: the family's attention maps
    # cannot be read
    joint_attention: ClassVar[str | None] = TEXT_FIRST
    latent_argument: ClassVar[int | str] = "hidden_states"
    timestep_argument: ClassVar[int | str] = "timestep"
    timestep_divisor: ClassVar[float] = 1.0
    video: ClassVar[bool] = False  # samples frames (`sampling.num_frames`), not images
    fps: ClassVar[int] = 16  # frames a second of a video family's previews (Wan's 16)

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
        architecture: str | None = None,
        license: str | None = None,
        license_name: str | None = None,
    ) -> None:
        """`pipeline`: a pipeline already in memory (the Python API), instead of a source.
        `architecture`: where the checkpoint's config files can be read without the hub: a
        folder of `obsdiff/data/architectures/` (the real models') or a directory path.
        `license`, `license_name`: the weights' licence as the Hub's model card fields name it
        (`license_name` for `license: other`), which an export's model card repeats."""
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
        if self.sampling.num_frames is not None and not self.video:
            raise ModelConfigError(
                f"model {name!r}: model.sampling.num_frames={self.sampling.num_frames}, but "
                f"{self.family} generates images; drop it (model.sampling.num_frames=null)"
            )
        self.load_kwargs = dict(load_kwargs or {})
        self.pipeline = pipeline
        self.architecture = None if architecture is None else _architecture_dir(name, architecture)
        self.license = license
        self.license_name = license_name

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
            "license": self.license,
            "license_name": self.license_name,
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
        index = self._pipeline_index()
        entries = {k: v for k, v in index.items() if isinstance(v, list) and v[-1] is not None}
        built = {}
        for name in self.expert_names(entries):
            library, class_name = index[name]
            config = self._read_json(f"{name}/config.json")
            cls = getattr(importlib.import_module(library), class_name)
            with torch.device("meta"):
                built[name] = cls.from_config(config)
        return self.denoiser_of(built)

    def component_skeletons(self) -> dict[str, nn.Module]:
        """Every weighted component of the pipeline as `load()` would build it (the denoiser,
        VAE, text encoders; not those the config drops, e.g. SD3's T5 with `with_t5: false`),
        without weights: on the meta device from the checkpoint's config files, or the tiny
        recipe's (or the in-memory pipeline's) own modules. For the memory plan."""
        if self.pipeline is not None or self.tiny is not None:
            pipe = self.pipeline or self.build_tiny(self.tiny, self.seed)  # type: ignore[arg-type]
            found = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
            if self.pipeline is None and self.torch_dtype != torch.float32:
                found = {k: v.to(self.torch_dtype) for k, v in found.items()}
            return found
        dropped = {k for k, v in self._from_pretrained_kwargs().items() if v is None}
        modules: dict[str, nn.Module] = {}
        for component, entry in self._pipeline_index().items():
            if component.startswith("_") or component in dropped or not isinstance(entry, list):
                continue
            library, class_name = entry
            if library not in ("diffusers", "transformers") or class_name is None:
                continue
            cls = getattr(importlib.import_module(library), class_name)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                continue  # schedulers, tokenizers
            config = self._read_json(f"{component}/config.json")
            casting = logging.getLogger("diffusers.models.modeling_utils")
            level = casting.level
            casting.setLevel(logging.ERROR)  # "cast with `to()`": no weights here to keep float32
            try:
                builder: Any = cls  # a diffusers ModelMixin or a transformers PreTrainedModel
                with torch.device("meta"):
                    if library == "diffusers":
                        module = builder.from_config(config)
                    else:
                        module = builder(builder.config_class(**config))
                modules[component] = module.to(self.torch_dtype)
            finally:
                casting.setLevel(level)
        return modules

    def check_source(self) -> None:
        """The checkpoint can be reached (a hub id: in the cache, or online) and holds a
        pipeline of this family: `ModelLoadError` now rather than after the run has started.
        The architecture shipped with obsdiff stands in for the checkpoint's config files, not
        for its weights."""
        if self.pretrained is not None:
            self._pipeline_index(shipped=False)

    def _pipeline_index(self, shipped: bool = True) -> dict[str, Any]:
        """The checkpoint's `model_index.json`, checked to name a pipeline of this family."""
        index = self._read_json("model_index.json", shipped)
        if index.get("_class_name") not in self.pipeline_classes:
            raise ModelLoadError(
                f"model {self.name!r}: {self.pretrained!r} holds a {index.get('_class_name')}, but "
                f"the {self.family} adapter expects one of {list(self.pipeline_classes)}; pick the "
                "model config of the right family (see conf/model/)"
            )
        return index

    def _read_json(self, relative: str, shipped: bool = True) -> dict[str, Any]:
        """A small file of the checkpoint: from the local directory, else (`shipped`) the
        architecture shipped with obsdiff, else the hub (or its cache)."""
        assert self.pretrained is not None
        source = self.pretrained
        try:
            if looks_like_local_path(source):
                path = Path(source).expanduser() / relative
            elif shipped and self.architecture is not None and self.revision is None:
                path = self.architecture / relative
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
            from diffusers import DiffusionPipeline

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
        """The module that is pruned: the MMDiT transformer or the UNet (a pipeline's timestep
        experts as one `Experts` module)."""
        return self.denoiser_of(pipe.components)

    def expert_names(self, components: dict[str, Any]) -> tuple[str, ...]:
        """The pipeline attributes of its denoisers, in the order the sampler uses them: one
        (`denoiser_attr`), or a family's timestep experts where `components` (a pipeline's, or
        its `model_index.json` entries) hold them."""
        return (self.denoiser_attr,)

    def denoiser_of(self, components: dict[str, Any]) -> nn.Module:
        """The denoiser of a pipeline's components (`denoiser`), e.g. `component_skeletons`'."""
        names = self.expert_names(components)
        if len(names) == 1:
            return components[names[0]]  # type: ignore[no-any-return]
        return Experts({name: components[name] for name in names})

    def denoiser_at(self, pipe: DiffusionPipeline, timestep: float) -> nn.Module:
        """The denoiser the pipeline calls at `timestep` (0..1000): its one denoiser, or the
        timestep expert whose steps hold it."""
        return self.denoiser_of(pipe.components)

    def set_denoiser(self, pipe: DiffusionPipeline, denoiser: nn.Module) -> None:
        """Put `denoiser` (a `denoiser` of this family, e.g. the dense one for timing) into
        `pipe` in place of its own."""
        names = self.expert_names(pipe.components)
        for name, module in zip(names, called_modules(denoiser), strict=True):
            setattr(pipe, name, module)

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
        if self.takes_max_sequence_length and s.max_sequence_length is not None:
            kwargs["max_sequence_length"] = s.max_sequence_length
        return kwargs

    def outputs(self, result: Any) -> Any:
        """What a pipeline call made, one entry a prompt: its `images` (PIL images, arrays or a
        latent batch), a video family's `frames`."""
        return result.frames if self.video else result.images

    def samples_per_call(self, prompts: int) -> int:
        """The batch of one denoiser call for `prompts` prompts: doubled by classifier-free
        guidance where the pipeline batches [uncond, cond] together."""
        return 2 * prompts if self.cfg_mode() == CFG_DOUBLED_BATCH else prompts

    def example_call(
        self, prompts: int, components: dict[str, nn.Module], device: str | torch.device = "meta"
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments of one denoiser call of a sampling batch of
        `prompts` prompts at the model's sampling resolution, as its pipeline makes them (empty
        tensors: on the meta device by default, for the recovery's memory plan). `components`:
        the pipeline's modules (`component_skeletons`), whose configs give the latent and text
        sizes."""
        raise NotImplementedError(f"{type(self).__name__} has no example call")

    def with_latents(
        self,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        latents: torch.Tensor,
        timestep: torch.Tensor,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A denoiser call (`obsdiff.models.training.text_call`) with its latent replaced by
        `latents` (B, C, h, w) and its timestep by `timestep` (B,) on the scheduler's scale
        (0..1000), where and as the family's pipeline passes them (`latent_argument`,
        `timestep_argument`, `timestep_divisor`; the latent in the prediction's layout)."""
        args, kwargs = list(call[0]), dict(call[1])
        latents = self.as_prediction(latents)
        if self.timestep_divisor != 1.0:
            timestep = (timestep / self.timestep_divisor).to(latents.dtype)
        for slot, value in ((self.latent_argument, latents), (self.timestep_argument, timestep)):
            if isinstance(slot, int):
                args[slot] = value
            else:
                kwargs[slot] = value
        return tuple(args), kwargs

    def as_prediction(self, target: torch.Tensor) -> torch.Tensor:
        """A training target (B, C, h, w) in the layout of the denoiser's prediction."""
        return target

    def latent_size(self, components: dict[str, nn.Module]) -> tuple[int, int]:
        """The latent's height and width at the sampling resolution (the VAE's downsampling)."""
        factor = self.vae_scale_factor(components)
        return self.sampling.height // factor, self.sampling.width // factor

    def vae_scale_factor(self, components: dict[str, nn.Module]) -> int:
        """How many pixels one latent position spans (AutoencoderKL: 2 ** (levels - 1))."""
        return int(2 ** (len(component_config(components, "vae").block_out_channels) - 1))

    def latent_frames(self) -> int | None:
        """Latent frames of a sampled video (a video family's); None for images."""
        return None

    def latent_shape(self, components: dict[str, nn.Module]) -> tuple[int, ...]:
        """One sample's VAE latent at the sampling resolution: (C, h, w), a video's
        (C, F, h, w)."""
        frames = self.latent_frames()
        time = () if frames is None else (frames,)
        return (self.latent_channels(components), *time, *self.latent_size(components))

    def latent_channels(self, components: dict[str, nn.Module]) -> int:
        """Channels of the VAE's latent (B, C, h, w) that `as_prediction` lays out."""
        return int(component_config(components, "vae").latent_channels)

    def encode_latents(self, vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] as the normalised latents (B, C, h, w) the denoiser is
        trained on: the posterior's mode, shifted and scaled as the VAE's config says."""
        config: Any = getattr(vae, "config")  # noqa: B009 - nn.Module types it as a Module
        encoded = vae.encode(images).latent_dist.mode()  # type: ignore[operator]
        shift = getattr(config, "shift_factor", None) or 0.0
        return (encoded - shift) * config.scaling_factor  # type: ignore[no-any-return]

    def uses_cfg(self, sampling: SamplingDefaults | None = None) -> bool:
        """Whether a call runs classifier-free guidance (an unconditional branch)."""
        s = sampling or self.sampling
        return s.guidance_scale > 1.0

    def expert_steps(self, pipe: DiffusionPipeline) -> dict[str, list[int]]:
        """The denoising steps each denoiser runs, by expert name ("": one denoiser, every
        step)."""
        return {"": list(range(self.denoising_steps(pipe)))}

    def denoising_steps(self, pipe: DiffusionPipeline) -> int:
        """Denoiser steps of one trajectory (each step's calls share its timestep weight):
        `num_inference_steps`, unless the scheduler takes more (PNDM's PLMS: one more)."""
        return self.sampling.num_inference_steps

    def cfg_mode(self, sampling: SamplingDefaults | None = None) -> str:
        """How the unconditional branch reaches the denoiser: `doubled_batch` ([uncond, cond] in
        one call, SD3 and SDXL), `separate_calls` (cond call, then uncond call: Flux true CFG)
        or `none`."""
        return CFG_DOUBLED_BATCH if self.uses_cfg(sampling) else CFG_NONE

    # ---------------------------------------------------------------- structure
    @classmethod
    def do_not_compress(cls) -> dict[str, tuple[str, ...]]:
        """The family's do-not-compress list by why: its modulation (unless a low-rank
        modulation is asked for, pruning never touches it, and quantization never does), then
        `keep_out` (embedders, the final projection). Norms and convolutions are kept by type:
        only linears are ever pruned or quantized."""
        modulation = {"modulation": cls.modulation_patterns} if cls.modulation_patterns else {}
        return {**modulation, **cls.keep_out}

    @classmethod
    def do_not_compress_patterns(cls) -> tuple[str, ...]:
        """`do_not_compress` as one tuple of patterns."""
        return tuple(p for patterns in cls.do_not_compress().values() for p in patterns)

    def is_kept_out(self, name: str) -> bool:
        """Whether the module at qualified `name` (of one denoiser) is on the do-not-compress
        list: a pattern names it or a module it lies in."""
        return any(re.fullmatch(regex, name) for regex in self.do_not_compress_regexes())

    @classmethod
    def do_not_compress_regexes(cls) -> list[str]:
        """The do-not-compress list as regular expressions over qualified module names (what
        `is_kept_out` matches, and what an export's `FqnToConfig` keys say: one fact)."""
        return [pattern_regex(p) for p in cls.do_not_compress_patterns()]

    def modulation_linears(self, denoiser: nn.Module) -> list[str]:
        """The names of the denoiser's modulation linears (`modulation_patterns`, matched on
        each timestep expert's own names), in module order."""
        return [
            prefix + name
            for prefix, model in single_models(denoiser)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and any(fnmatchcase(name, pattern) for pattern in self.modulation_patterns)
        ]

    def block_streams(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input, output) of each stream a block carries, from one call's arguments and result
        (the image stream, then the text stream of a joint block where it returns one)."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not self.joint_blocks:
            return [(hidden, output)]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        text_out, hidden_out = output
        pairs = [(hidden, hidden_out)]
        if text_out is not None:  # SD3's last block returns no text stream
            pairs.append((text, text_out))
        return pairs

    def skipped_output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What a block returns when it is skipped: its inputs, in its output's form."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if not self.joint_blocks:
            return hidden
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return text, hidden

    def remove_blocks(self, denoiser: nn.Module, names: list[str]) -> None:
        """Delete the named blocks (`depth_lists`' `<list>.<index>`, original indices) from their
        lists and set the config's counts, so that the denoiser saves and loads as a plain
        diffusers model of fewer layers."""
        for list_name, key in self.depth_lists.items():
            blocks: nn.ModuleList = getattr(denoiser, list_name)
            gone = {int(n.rsplit(".", 1)[1]) for n in names if n.rsplit(".", 1)[0] == list_name}
            kept = [block for index, block in enumerate(blocks) if index not in gone]
            setattr(denoiser, list_name, nn.ModuleList(kept))
            denoiser.register_to_config(**{key: len(kept)})  # type: ignore[operator]

    def restore_structure(self, denoiser: nn.Module, structure: dict[str, Any]) -> None:
        """The base denoiser brought to a recorded structure (blocks removed, linears resized
        or factorised, head counts), before its weights are loaded."""
        self.remove_blocks(denoiser, list(structure.get("removed_blocks", [])))
        restore_shapes(denoiser, structure)

    def is_ffn(self, name: str) -> bool:
        """Whether the linear at qualified `name` belongs to a feed-forward network (what
        DSnoT's official `--skip_layer mlp` skips)."""
        return any(part in self.ffn_modules for part in name.split("."))

    def blocks(self, denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
        """The denoiser's transformer blocks in forward order, with their qualified names: by
        default those of each list of `depth_lists`, in its order."""
        return [
            (f"{name}.{index}", block)
            for name in self.depth_lists
            for index, block in enumerate(getattr(denoiser, name))
        ]

    @abstractmethod
    def block_units(self, block: nn.Module) -> list[Unit]:
        """The target linears of one block as basic units, in forward order (paper Sec. 4.2)."""

    def structured_groups(self, block: nn.Module) -> tuple[list[HeadGroup], list[NeuronGroup]]:
        """The heads and FFN neurons structured pruning may remove from one block."""
        raise NotImplementedError(f"structured pruning is not available for {self.family}")

    def check_structured(self, block_name: str, block: nn.Module) -> None:
        """Raise `ModelConfigError` (naming the block and the fix) where the block's layout
        cannot be cut as `structured_groups` says (a fused layout that does not tile); every
        layout of the unfused families can."""
        return None

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

    def calibration_kwargs(self) -> dict[str, Any]:
        """`call_kwargs` for a call with precomputed embeddings (which carry the negative
        prompt)."""
        kwargs = self.call_kwargs()
        kwargs.pop("negative_prompt", None)
        return kwargs

    def calibration_call(
        self,
        pipe: DiffusionPipeline,
        embeddings: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        on_step_end: Callable[..., dict[str, Any]],
    ) -> Any:
        """One denoising trajectory to latents (no VAE decode), `on_step_end` after each step."""
        return pipe(
            **embeddings,
            **self.calibration_kwargs(),
            **self.step_callback(pipe, on_step_end),
            generator=generators,
            output_type="latent",
        )

    def step_callback(
        self,
        pipe: DiffusionPipeline,
        on_step_end: Callable[..., dict[str, Any]],
        latents: bool = False,
    ) -> dict[str, Any]:
        """The pipeline keyword arguments that call `on_step_end(pipe, i, t, tensors)` after
        denoising step i (`latents`: with the step's latents in `tensors["latents"]`):
        `callback_on_step_end`, which the pipelines of every family but PixArt's take."""
        kwargs: dict[str, Any] = {"callback_on_step_end": on_step_end}
        if latents:
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        return kwargs

    def __repr__(self) -> str:
        source = f"tiny={self.tiny!r}" if self.tiny else f"pretrained={self.pretrained!r}"
        source = "in memory" if self.pipeline is not None else source
        return f"{type(self).__name__}(name={self.name!r}, {source}, dtype={self.dtype!r})"


class TrueCfgAdapter(ModelAdapter):
    """A family whose pipeline runs real classifier-free guidance as a second denoiser call of
    each step, conditional first (Flux, Qwen-Image): on when `true_cfg_scale > 1` and a
    `negative_prompt` is set."""

    def call_kwargs(self, sampling: SamplingDefaults | None = None) -> dict[str, Any]:
        s = sampling or self.sampling
        kwargs = super().call_kwargs(s)
        if s.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = s.true_cfg_scale
        return kwargs

    def uses_cfg(self, sampling: SamplingDefaults | None = None) -> bool:
        s = sampling or self.sampling
        return (s.true_cfg_scale or 1.0) > 1.0 and s.negative_prompt is not None

    def cfg_mode(self, sampling: SamplingDefaults | None = None) -> str:
        return CFG_SEPARATE_CALLS if self.uses_cfg(sampling) else CFG_NONE


def prediction(output: Any) -> torch.Tensor:
    """The denoiser's prediction from what its forward returns (a tuple or an output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return output[0]
    return output.sample


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) as tokens of 2 x 2 patches (B, h/2 * w/2, 4C), channel-major within a
    patch: the packing of the Flux, Qwen-Image and FLUX.2 pipelines (`_pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def component_config(components: dict[str, nn.Module], name: str) -> Any:
    """The config of a pipeline component (a diffusers or transformers model's `config`)."""
    return getattr(components[name], "config")  # noqa: B009 - nn.Module types it as a Module


def _architecture_dir(model: str, architecture: str) -> Path:
    shipped = ARCHITECTURES / architecture
    folder = shipped if shipped.is_dir() else Path(architecture).expanduser()
    if not (folder / "model_index.json").is_file():
        available = sorted(p.name for p in ARCHITECTURES.iterdir() if p.is_dir())
        raise ModelConfigError(
            f"model {model!r}: architecture={architecture!r} is neither one of {available} nor a "
            "directory with a model_index.json (and each component's config.json)"
        )
    return folder


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
