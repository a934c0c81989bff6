"""Pruning methods as the prune app uses them: one module each, selected by the `method` group."""

from obsdiff.methods.base import GroupJob, LayerRecord, PruningMethod
from obsdiff.methods.dense import Dense
from obsdiff.methods.dsnot import DSnoT
from obsdiff.methods.granularity import Granularity
from obsdiff.methods.l1 import L1
from obsdiff.methods.magnitude import Magnitude
from obsdiff.methods.obs_diff import ObsDiff
from obsdiff.methods.wanda import Wanda


__all__ = [
    "DSnoT",
    "Dense",
    "Granularity",
    "L1",
    "GroupJob",
    "LayerRecord",
    "Magnitude",
    "ObsDiff",
    "PruningMethod",
    "Wanda",
]
