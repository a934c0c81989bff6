"""Pruning methods as the prune app uses them: one module each, selected by the `method` group."""

from obsdiff.methods.base import PruningMethod
from obsdiff.methods.dense import Dense
from obsdiff.methods.depth import BlockCosine, BlockOutputLoss, DepthCriterion
from obsdiff.methods.diff_pruning import DiffPruning
from obsdiff.methods.dsnot import DSnoT
from obsdiff.methods.ecodiff import EcoDiff
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.l1 import L1
from obsdiff.methods.magnitude import Magnitude
from obsdiff.methods.obs_diff import ObsDiff
from obsdiff.methods.package import (
    InputGroup,
    LayerRecord,
    Package,
    PruneRecord,
    Structured,
    StructuredRecord,
    Target,
)
from obsdiff.methods.wanda import Wanda


# Each method by the name of its config option (conf/method/<name>.yaml): the Python API's names.
METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls
    for cls in (
        ObsDiff,
        Wanda,
        DSnoT,
        Magnitude,
        L1,
        DiffPruning,
        EcoDiff,
        Dense,
        BlockCosine,
        BlockOutputLoss,
    )
}

__all__ = [
    "METHODS",
    "BlockCosine",
    "BlockOutputLoss",
    "DSnoT",
    "Dense",
    "DiffPruning",
    "EcoDiff",
    "DepthCriterion",
    "Granularity",
    "InputGroup",
    "L1",
    "LayerRecord",
    "Magnitude",
    "ObsDiff",
    "Package",
    "PruneRecord",
    "PruningMethod",
    "Structured",
    "StructuredRecord",
    "Target",
    "Wanda",
]
