"""Tensors inside the nested arguments of a call (tuples, lists, dicts), mapped or listed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with every tensor replaced by `function(tensor)`; the rest as it was."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, function) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(map_tensors(v, function) for v in value)
    return value


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside `value`, in the order `map_tensors` visits them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from tensors_in(item)
