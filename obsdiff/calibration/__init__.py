"""Feeding the kernels: calibration prompts, module packages, hooks and the sequential loop."""
