"""Depth pruning criteria (`granularity=depth`): which whole blocks go, from forward passes alone.

Each criterion scores every candidate block on the calibration trajectories, each denoiser call
weighted by its step's alpha_t (the run's timestep weighting), and removes the `count` blocks it
ranks least useful (`obsdiff.calibration.depth` runs the passes):

- `block_cosine`: the mean over tokens of the cosine between a block's input and output hidden
  states, per stream (both streams of an MMDiT block, averaged); a block whose output is most
  like its input does least, and goes first (the criterion of LAPTOP-Diff's and ShortGPT's
  block importance).
- `block_output_loss`: the mean squared error of the denoiser's prediction when only that block
  is skipped (its inputs passed on), against the dense prediction on the same call; the blocks
  of least error go. Each block is measured alone and the losses are taken as additive: the
  `count` lowest go together, with no second measurement after the first removal (one pass,
  one extra denoiser forward per candidate and call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obsdiff.methods.base import PruningMethod


class DepthCriterion(PruningMethod):
    """A depth pruning criterion: what its pass measures (`measures`), and which blocks go."""

    granularities = ("depth",)
    measures: ClassVar[str]  # "cosine" (a block's input against its output) or "output_loss"
    higher_goes: ClassVar[bool]  # the blocks of the highest scores go first (else the lowest)

    def chosen(self, scores: dict[str, float], count: int) -> list[str]:
        """The `count` blocks that go, in the order the criterion ranks them."""
        ranked = sorted(scores, key=lambda name: scores[name], reverse=self.higher_goes)
        return ranked[:count]


@dataclass
class BlockCosine(DepthCriterion):
    name = "block_cosine"
    measures = "cosine"
    higher_goes = True


@dataclass
class BlockOutputLoss(DepthCriterion):
    name = "block_output_loss"
    measures = "output_loss"
    higher_goes = False


def token_cosine(before: torch.Tensor, after: torch.Tensor) -> float:
    """The mean over tokens (and the batch) of the cosine between a block's input and output
    (..., channels), in float32."""
    return float(
        torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).mean()
    )
