"""Evaluation: prompt sets, the generation runner, and metrics with injectable backbones."""
