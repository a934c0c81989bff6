"""The app layer: the only code that sees Hydra (configs to typed objects, the run shell)."""
