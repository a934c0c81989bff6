"""Prompt files and evaluation prompt sets, shared by calibration and evaluation."""
