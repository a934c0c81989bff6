"""`python -m obsdiff.sample`: images for a few prompts from one model config (conf/sample.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from obsdiff.config import CONF_DIR, ConfigError, instantiate_model
from obsdiff.sampling import sample_to_dir
from obsdiff.utils.devices import resolve_device


log = logging.getLogger(__name__)


@hydra.main(config_path=str(CONF_DIR), config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model = instantiate_model(cfg.model)
    prompts = [str(p) for p in cfg.prompts]
    if not prompts:
        raise ConfigError("prompts is empty; give at least one, e.g. 'prompts=[a red circle]'")
    device = resolve_device(str(cfg.device))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sample_to_dir(model, prompts, int(cfg.seed), int(cfg.batch_size), device, out_dir)


if __name__ == "__main__":
    main()
