"""The recovery's settings, said once."""

from __future__ import annotations

from dataclasses import dataclass, field


PRECISIONS = ("32", "bf16-mixed", "16-mixed")


@dataclass
class RecoverySettings:
    """How a pruned denoiser is distilled towards the dense one.

    Attributes:
        steps: Optimizer steps.
        lr: AdamW's peak learning rate (BK-SDM's 5e-5 by default).
        warmup_steps: Steps of linear warm-up to `lr`, then constant.
        weight_decay: AdamW's weight decay.
        accumulate: Batches of gradients accumulated per optimizer step.
        gradient_clip: Gradients clipped to this norm (0: not clipped).
        precision: Lightning's precision: `32`, `bf16-mixed` or `16-mixed` (the arithmetic;
            the student's weights are float32 in every case).
        gradient_checkpointing: Recompute each block's activations in the backward instead of
            keeping them (the student's blocks, diffusers' own checkpointing): the same
            gradients for one more forward of each block (the memory plan says what it saves).
        lora_rank: 0: every weight of the student trains (a sparse student's zeros kept);
            r > 0: LoRA adapters of rank r on its blocks' linears train instead (peft), merged
            into the weights at the end, a sparse student's masked (`obsdiff.recovery.lora`).
        lora_alpha: LoRA's alpha (its scale is alpha / rank); None: the rank (scale 1).
        images: An image-text folder (`obsdiff.recovery.images`): train on its images, noised
            at the model's training levels, instead of the dense model's trajectories; None:
            data-free.
        caption_dropout: With `images`, the probability that a caption is replaced by the
            empty one, so that the unconditional branch of classifier-free guidance learns too.
        task_weight: With `images`, the weight of the model's own training loss (MSE of the
            student's prediction against the velocity or noise target); 0 turns it off.
        output_weight: Weight of the output distillation (MSE of the student's prediction
            against the teacher's).
        feature_weight: Weight of the feature distillation (MSE of every block's outputs, each
            token L2-normalised, both streams of an MMDiT block); 0 turns it off.
        massive_sigma: Tokens whose teacher feature lies more than this many standard deviations
            from its block's mean are left out of the feature term (TinyFusion's rule); None
            keeps every token.
        seed: Seed of the noise of the teacher's trajectories and of the order of the training
            inputs.
        log_every: A log line every this many steps off a terminal.
        checkpoint_every: A resume checkpoint every this many steps (and after the last), in
            the run directory.
    """

    steps: int = field(default=100, metadata={"minimum": 1})
    lr: float = field(default=5e-5, metadata={"example": 5e-5})
    warmup_steps: int = field(default=0, metadata={"minimum": 0})
    weight_decay: float = field(default=0.0, metadata={"minimum": 0.0})
    accumulate: int = field(default=1, metadata={"minimum": 1})
    gradient_clip: float = field(default=1.0, metadata={"minimum": 0.0})
    precision: str = "32"
    gradient_checkpointing: bool = False
    lora_rank: int = field(default=0, metadata={"minimum": 0})
    lora_alpha: int | None = None
    images: str | None = None
    caption_dropout: float = field(default=0.1, metadata={"minimum": 0.0, "maximum": 1.0})
    task_weight: float = field(default=0.0, metadata={"minimum": 0.0})
    output_weight: float = field(default=1.0, metadata={"minimum": 0.0})
    feature_weight: float = field(default=1.0, metadata={"minimum": 0.0})
    massive_sigma: float | None = None
    seed: int = 0
    log_every: int = field(default=50, metadata={"minimum": 1})
    checkpoint_every: int = field(default=50, metadata={"minimum": 1})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"recover.steps={self.steps} must be >= 1; e.g. recover.steps=100")
        if not self.lr > 0:
            raise ValueError(f"recover.lr={self.lr} must be > 0; e.g. recover.lr=5e-5")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"recover.precision={self.precision!r}; use one of {', '.join(PRECISIONS)}"
            )
        if self.output_weight == 0 and self.feature_weight == 0 and self.task_weight == 0:
            raise ValueError(
                "recover.output_weight, recover.feature_weight and recover.task_weight are all "
                "0: nothing to learn"
            )
        if self.task_weight > 0 and self.images is None:
            raise ValueError(
                f"recover.task_weight={self.task_weight} needs clean images for its target: "
                "give recover.images=<an image-text folder>, or set recover.task_weight=0"
            )
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"recover.caption_dropout={self.caption_dropout} must be in [0, 1]")
        if self.lora_rank < 0:
            raise ValueError(
                f"recover.lora_rank={self.lora_rank} must be >= 0 (0: no LoRA); e.g. 16"
            )
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"recover.lora_alpha={self.lora_alpha} must be > 0 or null")
        if self.massive_sigma is not None and not self.massive_sigma > 0:
            raise ValueError(f"recover.massive_sigma={self.massive_sigma} must be > 0 or null")
