"""From importance maps to the weights of a linear's token rows (importance-weighted OBS,
`ObsDiff.token_weighting`): the maps of a calibration set by (prompt, step), the levels a map is
pooled to, where a linear's tokens lie, and their weights. The maps themselves come from the
dense pass of `obsdiff.calibration.importance`; the statistics hooks
(`obsdiff.calibration.hooks`) read them here.

The map is kept at the denoiser's token grid (a DiT's patch grid; a UNet's latent grid; a
video's frames x patches) and pooled 2 x 2 (ceil, as a UNet's strided convolutions) until a level
has as many positions as the linear reads tokens a sample (a UNet's deeper levels), in raster
order. A linear reading text tokens + a level's positions reads [text, image] concatenated (the
single-stream blocks of Flux and FLUX.2): its text tokens weigh 1. A linear reading exactly the
call's text length is a text-stream linear: uniform weights (also where that length equals a
grid level's, which the shapes cannot tell apart), as for any token count that matches no level.
Each sample's image weights have mean 1, so a sample's weights have mean 1 and H keeps its scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# where a linear's tokens lie (`token_layout`)
IMAGE, JOINT, TEXT, AMBIGUOUS, UNMATCHED = "image", "joint", "text", "ambiguous", "unmatched"


@dataclass
class ImportanceMaps:
    """The map of each (prompt, step) of one rank's calibration prompts, on the CPU.

    `by_step[t]`: (prompts, *grid) float32, prompt 0 being prompt number `first_prompt` of the
    whole set; each map has mean 1 (uniform where a step had no map)."""

    by_step: list[torch.Tensor]
    first_prompt: int = 0
    seconds: float = field(default=0.0, compare=False)  # the pass's

    def batch(self, first: int, count: int, step: int) -> torch.Tensor:
        """The maps (count, *grid) of prompts first .. first + count - 1 at `step`."""
        start = first - self.first_prompt
        maps = self.by_step[min(step, len(self.by_step) - 1)]
        if not 0 <= start <= start + count <= maps.shape[0]:
            raise IndexError(
                f"prompts [{first}, {first + count}) are not among this rank's maps "
                f"[{self.first_prompt}, {self.first_prompt + maps.shape[0]})"
            )
        return maps[start : start + count]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.by_step)


def pyramid(grid_map: torch.Tensor) -> list[torch.Tensor]:
    """A map (B, [F,] H, W) and its 2 x 2 poolings (ceil mode: the grids of a UNet's strided
    convolutions) down to 1 x 1, each flattened in raster order: [(B, N_0), (B, N_1), ...]. A
    map already flat (B, N) has that one level."""
    levels = [grid_map.flatten(1)]
    current = grid_map
    while current.dim() >= 3 and (current.shape[-2] > 1 or current.shape[-1] > 1):
        lead, (h, w) = current.shape[:-2], current.shape[-2:]
        pooled = F.avg_pool2d(
            current.reshape(-1, 1, h, w), (min(2, h), min(2, w)), ceil_mode=True
        )  # (B * F, 1, ceil(h / 2), ceil(w / 2))
        current = pooled.reshape(*lead, *pooled.shape[-2:])
        levels.append(current.flatten(1))
    return levels


def level_sizes(grid: tuple[int, ...]) -> list[int]:
    """Positions per sample of each `pyramid` level of a map of one sample's `grid`."""
    return [level.shape[1] for level in pyramid(torch.zeros(1, *grid))]


def token_layout(grid: tuple[int, ...], tokens: int, text_tokens: int | None) -> tuple[str, int]:
    """Where the `tokens` tokens a sample of a linear's input lie, for a map of one sample's
    `grid` and a call of `text_tokens` text tokens (None: unknown): (`image`, level) for a
    pyramid level's positions, (`joint`, level) for [text, that level's positions]; `text`
    (the call's text length), `ambiguous` (the text length, and a level's size too) or
    `unmatched` (neither), level -1: those are weighted uniformly."""
    sizes = level_sizes(grid)
    if text_tokens is not None and tokens == text_tokens:
        return (AMBIGUOUS if tokens in sizes else TEXT), -1
    if tokens in sizes:
        return IMAGE, sizes.index(tokens)
    if text_tokens is not None and tokens - text_tokens in sizes:
        return JOINT, sizes.index(tokens - text_tokens)
    return UNMATCHED, -1


def mean_one(weights: torch.Tensor) -> torch.Tensor:
    """Weights (B, N) scaled to mean 1 per sample (uniform where a sample's are all 0)."""
    mean = weights.mean(1, keepdim=True)
    return torch.where(mean > 0, weights / mean.clamp_min(1e-30), torch.ones_like(weights))


def token_weights(
    grid_map: torch.Tensor, tokens: int, text_tokens: int | None
) -> torch.Tensor | None:
    """The weights (B, tokens), mean 1 per sample, of the token rows of a linear that reads
    `tokens` tokens a sample in a call of `text_tokens` text tokens, from the maps (B, *grid) of
    the call's samples (`token_layout`); None where they are uniform."""
    kind, level = token_layout(tuple(grid_map.shape[1:]), tokens, text_tokens)
    if kind not in (IMAGE, JOINT):
        return None
    image = mean_one(pyramid(grid_map.float())[level])  # (B, N_level)
    if kind == IMAGE:
        return image
    assert text_tokens is not None
    text = torch.ones(image.shape[0], text_tokens, dtype=image.dtype, device=image.device)
    return torch.cat([text, image], dim=1)  # (B, text + N_level): [text, image]
