"""A pipeline's timestep experts as one module to prune (Wan 2.2-A14B: `transformer` denoises the
high-noise steps, `transformer_2` the rest).

`Experts` holds the pipeline's own denoisers (no copies) under their attribute names, so every
part of obsdiff that walks a denoiser (blocks, target linears, surgery, saving and loading its
state, counting parameters) walks both, by qualified names that say which expert (e.g.
`transformer_2.blocks.3.attn1.to_q`). The pipeline calls each expert itself; `called_modules`
are the modules its calls enter, where hooks that count calls go.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class Experts(nn.Module):
    """The denoisers of one pipeline by attribute name, in the order the sampler uses them."""

    def __init__(self, experts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in experts.items():
            self.add_module(name, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Experts is not called: the pipeline calls each expert on its own steps")


def single_models(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """The single models of a denoiser with the prefix of their names in it: itself (""), or
    each expert of an `Experts` (`transformer.`, `transformer_2.`), whose own names a family's
    module patterns describe."""
    if isinstance(denoiser, Experts):
        return [(f"{name}.", expert) for name, expert in denoiser.named_children()]
    return [("", denoiser)]


def called_modules(denoiser: nn.Module) -> list[nn.Module]:
    """The modules a pipeline calls: each expert of an `Experts`, else the denoiser itself."""
    return list(denoiser.children()) if isinstance(denoiser, Experts) else [denoiser]


def expert_of(name: str, denoiser: nn.Module) -> str:
    """The expert a qualified name of `denoiser` lies in ("" for a single denoiser)."""
    if not isinstance(denoiser, Experts):
        return ""
    return name.split(".", 1)[0]


def check_one_denoiser(denoiser: nn.Module, model: str) -> None:
    """ValueError naming the model and the fix where `denoiser` is a pipeline's timestep experts:
    recovery trains one denoiser against its teacher."""
    if isinstance(denoiser, Experts):
        experts = ", ".join(name for name, _ in denoiser.named_children())
        raise ValueError(
            f"recovery of {model}: its denoiser is {len(list(denoiser.children()))} timestep "
            f"experts ({experts}), each run on its own steps; recovery trains one denoiser. "
            "Evaluate the one-shot prune as it is (recover=none)"
        )
