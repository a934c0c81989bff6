"""The memory plan of a recovery, from the model's architecture alone (no weights loaded).

    plan = recovery_plan(adapter, RecoverySettings(precision="bf16-mixed"), prompts=1)
    print(plan.table())

What a recovery holds on its device:
- while it records the teacher's trajectories, the dense pipeline's weights (every component,
  at the model's dtype); the text encoders and the VAE go back to the CPU once it has (the
  pruned pipeline waits on the CPU meanwhile: the recover app loads it there, the run moves it);
- while it trains, the teacher denoiser's weights (the model's dtype), the student's float32
  master weights, their float32 gradients and AdamW's two float32 moments (the student is
  counted at the dense size: a structured prune trains fewer), the activations the student's
  forward keeps for its backward, and the teacher's block outputs that the feature loss compares
  (none with `feature_weight=0`).

The activations are measured, not modelled: the student's forward runs once on the meta device
on a denoiser call of the model's sampling batch and resolution (`ModelAdapter.example_call`),
and every tensor autograd saves is counted (`torch.autograd.graph.saved_tensors_hooks`), with
attention counted as a fused kernel keeps it (query, key, value, output and the float32
log-sum-exp; not the score matrix). On a tiny SD3 this is the CPU's allocation byte for byte
in float32; under `bf16-mixed` the forward runs in bfloat16 throughout, within 1% of CPU
autocast there (CUDA's autocast keeps a few more ops, norms and softmax, in float32). With
per-block gradient checkpointing only the blocks' inputs are kept, plus one block's activations
while it is recomputed.

Several devices (`fewest_devices`): FSDP with full sharding splits the weights, gradients and
optimizer state of teacher and student evenly, and each device keeps the activations of its own
batch and one gathered block (the largest) besides; while recording, the text encoders and the
VAE are whole on every device and the teacher denoiser sharded. A device's usable memory is 90%
of its size (the CUDA context and the allocator's slack take the rest). Not predicted: the
allocator's fragmentation and the CUDA context itself; measure them on the device.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from obsdiff.models.base import ModelAdapter
from obsdiff.models.experts import check_one_denoiser
from obsdiff.recovery.data import DenoiserCall
from obsdiff.recovery.settings import RecoverySettings
from obsdiff.utils.memory import module_bytes
from obsdiff.utils.nested import tensors_in


GB = 1e9
DEVICE_SIZES_GB = (24, 48, 80)
USABLE = 0.9  # of a device's memory: the rest for the CUDA context and the allocator
MAX_DEVICES = 64
FLOAT32 = 4
ADAMW_MOMENTS = 2


@dataclass
class RecoveryPlan:
    """What a recovery will hold on its device, in bytes (see the module docstring)."""

    model: str
    dtype: str
    precision: str
    samples_per_call: int
    recording_bytes: int  # the dense pipeline, every component
    parameters: int  # the denoiser's
    teacher_bytes: int
    student_bytes: int  # float32 master weights
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # the student's saved activations, no checkpointing
    checkpointed_activation_bytes: int  # with per-block gradient checkpointing
    block_activation_bytes: list[int]  # each block's saved activations
    feature_bytes: int  # the teacher's block outputs held for the feature loss
    largest_block_parameters: int

    @property
    def states_bytes(self) -> int:
        """Weights, gradients and optimizer state: what FSDP shards."""
        return self.teacher_bytes + self.student_bytes + self.gradient_bytes + self.optimizer_bytes

    def activations(self, checkpointing: bool) -> int:
        kept = self.checkpointed_activation_bytes if checkpointing else self.activation_bytes
        return kept + self.feature_bytes

    def training_bytes(self, checkpointing: bool) -> int:
        return self.states_bytes + self.activations(checkpointing)

    def peak_bytes(self, checkpointing: bool) -> int:
        return max(self.recording_bytes, self.training_bytes(checkpointing))

    def fewest_devices(self, size_gb: float, checkpointing: bool) -> int | None:
        """The fewest devices of `size_gb` that hold the recovery with FSDP (one device: no
        sharding); None when even MAX_DEVICES cannot (the activations alone exceed one)."""
        usable = USABLE * size_gb * GB
        if self.peak_bytes(checkpointing) <= usable:
            return 1
        gathered = self.largest_block_parameters * (FLOAT32 + FLOAT32)  # student + its gradient
        encoders = self.recording_bytes - self.teacher_bytes  # replicated while recording
        for devices in range(2, MAX_DEVICES + 1):
            per_device = self.states_bytes / devices + self.activations(checkpointing) + gathered
            recording = encoders + self.teacher_bytes / devices
            if per_device <= usable and recording <= usable:
                return devices
        return None

    def table(self) -> str:
        def gb(value: float) -> str:
            return f"{value / GB:9.2f} GB"

        rows = [
            ("recording: the dense pipeline", self.recording_bytes),
            (f"teacher denoiser ({self.dtype})", self.teacher_bytes),
            ("student weights (float32)", self.student_bytes),
            ("gradients (float32)", self.gradient_bytes),
            ("AdamW moments (float32)", self.optimizer_bytes),
            ("activations, no checkpointing", self.activation_bytes),
            ("activations, per-block checkpointing", self.checkpointed_activation_bytes),
            ("  largest block's activations", max(self.block_activation_bytes, default=0)),
            ("teacher block outputs (feature loss)", self.feature_bytes),
            ("training peak, no checkpointing", self.training_bytes(False)),
            ("training peak, checkpointing", self.training_bytes(True)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [
            f"recovery memory plan: {self.model} ({self.dtype}), precision {self.precision}, "
            f"{self.samples_per_call} samples a call, {self.parameters / 1e9:.3f} B parameters"
        ]
        lines += [f"  {name:<{width}} {gb(value)}" for name, value in rows]
        for checkpointing in (False, True):
            found = []
            for size in DEVICE_SIZES_GB:
                devices = self.fewest_devices(size, checkpointing)
                found.append(f"{size} GB: {devices if devices is not None else 'none'}")
            label = "checkpointing" if checkpointing else "no checkpointing"
            lines.append(f"  fewest devices with FSDP (runner=fsdp), {label}: " + ", ".join(found))
        return "\n".join(lines)


def recovery_plan(
    adapter: ModelAdapter,
    settings: RecoverySettings,
    prompts: int = 1,
    components: dict[str, nn.Module] | None = None,
) -> RecoveryPlan:
    """The plan of recovering `adapter`'s model with `settings`, `prompts` prompts a sampling
    batch (the calibration's batch size), from its architecture (`component_skeletons`)."""
    components = components or adapter.component_skeletons()
    denoiser = adapter.denoiser_of(components)
    check_one_denoiser(denoiser, adapter.name)
    parameters = sum(p.numel() for p in denoiser.parameters())
    model_bytes = adapter.torch_dtype.itemsize
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    compute = half.get(settings.precision, torch.float32)
    casting = logging.getLogger("diffusers.models.modeling_utils")
    level = casting.level
    casting.setLevel(logging.ERROR)  # "cast with `to()`": only counted, on the meta device
    try:
        student = copy.deepcopy(denoiser).to("meta", compute)
    finally:
        casting.setLevel(level)
    call = DenoiserCall(*adapter.example_call(prompts, components), step=0)
    args, kwargs = (call := call.to(torch.device("meta"), compute)).args, call.kwargs
    blocks = [block for _, block in adapter.blocks(student)]
    saved = saved_activations(student, blocks, lambda: student(*args, **kwargs))
    block_params = [sum(p.numel() for p in b.parameters()) for _, b in adapter.blocks(denoiser)]
    features = 0
    if settings.feature_weight > 0:  # the teacher's outputs, in the model's dtype
        features = sum(out * model_bytes // compute.itemsize for out in saved.block_outputs)
    return RecoveryPlan(
        model=adapter.name,
        dtype=str(adapter.torch_dtype).removeprefix("torch."),
        precision=settings.precision,
        samples_per_call=adapter.samples_per_call(prompts),
        recording_bytes=sum(module_bytes(m) for m in components.values()),
        parameters=parameters,
        teacher_bytes=parameters * model_bytes,
        student_bytes=parameters * FLOAT32,
        gradient_bytes=parameters * FLOAT32,
        optimizer_bytes=parameters * FLOAT32 * ADAMW_MOMENTS,
        activation_bytes=saved.total,
        checkpointed_activation_bytes=saved.checkpointed,
        block_activation_bytes=saved.per_block,
        feature_bytes=features,
        largest_block_parameters=max(block_params, default=0),
    )


@dataclass
class SavedActivations:
    total: int  # every tensor autograd keeps for the backward
    per_block: list[int]  # those kept inside each block
    block_inputs: int  # the distinct tensors the blocks read (what checkpointing keeps)
    block_outputs: list[int]  # each block's output tensors

    @property
    def checkpointed(self) -> int:
        """Kept with per-block checkpointing: everything outside the blocks, the blocks'
        inputs, and the largest block's activations while it is recomputed."""
        outside = self.total - sum(self.per_block)
        return outside + self.block_inputs + max(self.per_block, default=0)


def saved_activations(
    model: nn.Module, blocks: list[nn.Module], forward: Callable[[], Any], fused: bool = True
) -> SavedActivations:
    """What autograd keeps during `forward()` (model in training mode), in bytes: in total,
    inside each of `blocks`, and the blocks' inputs and outputs. A tensor saved twice (or as
    a view) counts once; parameters are not activations. `fused`: attention counted as a
    fused kernel keeps it (`fused_attention`; needed on the meta device), else as the device's
    own kernel does."""
    parameters = {id(p) for p in model.parameters()}
    sizes: dict[int, int] = {}  # by storage: what is held
    owner: dict[int, int] = {}  # storage -> the block that saved it first (-1: outside)
    inputs: dict[int, int] = {}
    outputs: list[int] = [0] * len(blocks)
    current = [-1]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            key, size = _storage(tensor)
            if key not in sizes:
                owner[key] = current[0]
            sizes[key] = max(sizes.get(key, 0), size)
        return tensor

    def enter(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[0] = index
            for tensor in tensors_in((args, kwargs)):
                if tensor.is_floating_point():
                    key, size = _storage(tensor)
                    inputs[key] = max(inputs.get(key, 0), size)

        return hook

    def leave(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            current[0] = -1
            outputs[index] = sum(_storage(t)[1] for t in tensors_in(output))

        return hook

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave(index), with_kwargs=True))
    model.train()
    try:
        with (
            fused_attention() if fused else nullcontext(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        ):
            forward()
    finally:
        for handle in handles:
            handle.remove()
    per_block = [0] * len(blocks)
    for key, size in sizes.items():
        if owner[key] >= 0:
            per_block[owner[key]] += size
    return SavedActivations(sum(sizes.values()), per_block, sum(inputs.values()), outputs)


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention as a fused kernel (flash, memory-efficient) keeps it for
    its backward: query, key, value, output and a float32 log-sum-exp per query. For counting
    on the meta device only: its values are empty and it has no gradient."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Any:
        # (..., queries, d), (..., keys, d), (..., keys, d_v) -> (..., queries, d_v)
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise RuntimeError("counting only: the meta pass has no backward")


@contextmanager
def fused_attention() -> Iterator[None]:
    """`torch.nn.functional.scaled_dot_product_attention` as `_FusedAttention` while counting
    (on the meta device it would otherwise keep the score matrix, as no GPU kernel does)."""
    original = functional.scaled_dot_product_attention

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                  **kwargs: Any) -> Any:  # fmt: skip
        return _FusedAttention.apply(query, key, value)

    functional.scaled_dot_product_attention = attention  # type: ignore[assignment]
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """A key of the memory `tensor` lives in and its size in bytes (meta tensors have no
    storage address: their base tensor stands for it)."""
    if tensor.device.type == "meta":
        base = tensor
        while base._base is not None:
            base = base._base
        return id(base), base.numel() * base.element_size()
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()
