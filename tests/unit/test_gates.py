"""EcoDiff's gates: hard concrete gates open fully at the starting logit and shut fully at its
negative, stay in [0, 1] while training (exact 0 and 1 among them), and the binarised mask
closes the units whose logit is below 0."""

from __future__ import annotations

import pytest
import torch

from obsdiff.pruning.gates import MASKINGS, closed_units, gate_values


pytestmark = pytest.mark.unit


def test_evaluation_gates_are_exactly_open_at_three_and_shut_at_minus_three() -> None:
    logits = torch.tensor([3.0, -3.0, 0.0])
    gates = gate_values(logits, "hard_discrete", training=False)
    assert gates[0].item() == 1.0 and gates[1].item() == 0.0  # exact: the clip of the stretch
    assert gates[2].item() == pytest.approx(0.5)


def test_training_gates_lie_in_zero_one_with_exact_ends_and_a_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(4000, requires_grad=True)
    gates = gate_values(logits, "hard_discrete", training=True)
    assert 0.0 <= float(gates.min()) and float(gates.max()) <= 1.0
    assert (gates == 0).any() and (gates == 1).any() and ((gates > 0) & (gates < 1)).any()
    gates.sum().backward()
    assert logits.grad is not None and (logits.grad > 0).any()


@pytest.mark.parametrize("masking", MASKINGS)
def test_the_binarised_mask_closes_the_units_below_zero(masking: str) -> None:
    logits = torch.tensor([2.0, -0.1, 0.3, -4.0, 1.0])
    assert closed_units(logits, masking) == 2


def test_an_unknown_masking_is_refused() -> None:
    with pytest.raises(ValueError, match="masking='gumbel'; use one of hard_discrete, sigmoid"):
        gate_values(torch.zeros(2), "gumbel", training=False)
