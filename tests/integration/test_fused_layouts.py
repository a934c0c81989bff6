"""FLUX.2's fused single-block projections: structured pruning cuts a head's q, k and v rows and a
neuron's gate and up rows out of one linear and their columns out of another, consistently; a
layout that does not tile is refused before calibration."""

from __future__ import annotations

import pytest
import torch

import obsdiff
from obsdiff.models.flux2 import FUSED_IN, FUSED_OUT, packed_groups
from obsdiff.models.structure import linear_at
from obsdiff.models.surgery import Surgery
from obsdiff.models.tiny import tiny_flux2_pipeline
from obsdiff.oneshot.job import JobError


pytestmark = pytest.mark.integration


def single_block_output(block: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """One single-stream block on `tokens` (1, N, D), unmodulated, without rotary embedding."""
    modulation = torch.zeros(1, 1, 3 * tokens.shape[-1])  # shift 0, scale 0, gate 0 -> gate 1
    modulation[..., 2 * tokens.shape[-1] :] = 1.0
    with torch.no_grad():
        return block(hidden_states=tokens, encoder_hidden_states=None, temb_mod=modulation)


@pytest.mark.parametrize(("kind", "removed"), [("heads", [1]), ("neurons", [0, 5, 95])])
def test_cutting_a_packed_unit_equals_silencing_it(kind: str, removed: list[int]) -> None:
    """A head whose value rows are zero, or an MLP neuron whose up rows are zero, adds nothing
    to the block's output; cutting it out of the fused linears by the packed groups gives that
    output exactly (to float round-off), and the attention's widths follow the cut."""
    block = tiny_flux2_pipeline().transformer.single_transformer_blocks[0]
    heads, neurons = packed_groups(block)
    attention = block.attn
    inner, mlp, head_dim = attention.inner_dim, attention.mlp_hidden_dim, attention.head_dim
    tokens = torch.randn(
        1, 6, block.norm.normalized_shape[0], generator=torch.Generator().manual_seed(0)
    )

    silenced = tiny_flux2_pipeline().transformer.single_transformer_blocks[0]
    rows = linear_at(silenced, FUSED_IN).weight.data
    for unit in removed:
        if kind == "heads":  # the value slice starts at 2 x inner
            rows[2 * inner + unit * head_dim : 2 * inner + (unit + 1) * head_dim] = 0
        else:  # the up slice starts at 3 x inner + mlp
            rows[3 * inner + mlp + unit] = 0
    expected = single_block_output(silenced, tokens)

    surgery = Surgery()
    if kind == "heads":
        surgery.remove_heads(heads[0], removed, head_dim)
    else:
        surgery.remove_neurons(neurons[0], removed)
    surgery.apply(block)
    kept_heads = attention.heads
    assert attention.inner_dim == kept_heads * head_dim
    if kind == "heads":
        assert kept_heads == 2 - len(removed) and attention.mlp_hidden_dim == mlp
    else:
        assert kept_heads == 2 and attention.mlp_hidden_dim == mlp - len(removed)
    fused_in, fused_out = linear_at(block, FUSED_IN), linear_at(block, FUSED_OUT)
    assert fused_in.out_features == 3 * attention.inner_dim + 2 * attention.mlp_hidden_dim
    assert fused_out.in_features == attention.inner_dim + attention.mlp_hidden_dim
    torch.testing.assert_close(single_block_output(block, tokens), expected)


def test_a_fused_layout_that_does_not_tile_is_refused_before_calibration() -> None:
    """A single block whose attention's widths do not tile its fused linears (here a stored MLP
    width the linears do not have) cannot be cut consistently: one message naming the block and
    the fix, before any calibration pass."""
    pipe = tiny_flux2_pipeline()
    pipe.transformer.single_transformer_blocks[0].attn.mlp_hidden_dim -= 1
    with pytest.raises(JobError, match="single_transformer_blocks.0 does not hold") as err:
        obsdiff.prune(pipe, "obsdiff", "structured", 0.25, prompts=["a red circle"], packages=1)
    assert "unstructured or N:M" in str(err.value)
