"""Every model config names its weights' licence, and an export's model card carries it (the
real models' as their own cards publish it)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from obsdiff.app.config import CONF_DIR


pytestmark = pytest.mark.unit

PUBLISHED_LICENCES = {  # the Hub's licence fields of each shipped real model's card
    "sd3_medium": ("other", "stabilityai-ai-community"),
    "sd35_medium": ("other", "stabilityai-ai-community"),
    "sd35_large": ("other", "stabilityai-ai-community"),
    "flux_dev": ("other", "flux-1-dev-non-commercial-license"),
    "flux_schnell": ("apache-2.0", None),
    "sdxl_base": ("openrail++", None),
    "sd21_base": ("openrail++", None),
    "sd15": ("creativeml-openrail-m", None),
    "pixart_sigma": ("openrail++", None),
    "qwen_image": ("apache-2.0", None),
    "flux2_dev": ("other", "flux-dev-non-commercial-license"),
}


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_the_model_card_names_the_base_models_licence(model: str, tmp_path: Path) -> None:
    """Every model config states its licence; the card of an export carries it, in its front
    matter and its Licence section (real models: as their own cards publish it)."""
    from obsdiff.api import model_from_config
    from obsdiff.artifacts.export import ExportRequest, model_card

    config = yaml.safe_load((CONF_DIR / "model" / f"{model}.yaml").read_text())
    adapter = model_from_config(model)
    expected = PUBLISHED_LICENCES.get(model, ("apache-2.0", None))  # else obsdiff's own
    assert (adapter.license, adapter.license_name) == expected
    manifest = {"model": adapter.describe(), "model_config": config, "method": {"name": "wanda"}}
    request = ExportRequest(
        tmp_path, tmp_path / "out", manifest, None, False, "copy", adapter.pretrained
    )
    card = model_card(request, "load code")
    front = yaml.safe_load(card.split("---")[1])
    assert (front["license"], front.get("license_name")) == expected
    licence_section = card.split("## Licence", 1)[1].split("##", 1)[0]
    assert f"({expected[1] or expected[0]})" in licence_section


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_the_cards_evaluate_command_names_the_apps_real_keys(model: str, tmp_path: Path) -> None:
    """The command the card of an unevaluated run prints composes with the evaluate app's
    config: `pruned=` is its key, the eval set one of its options."""
    from hydra import compose, initialize_config_dir

    from obsdiff.artifacts.export import ExportRequest, model_card

    config = yaml.safe_load((CONF_DIR / "model" / f"{model}.yaml").read_text())
    run_dir = tmp_path / "runs" / "a run"  # a space: the command quotes it
    manifest = {"model_config": config, "method": {"name": "wanda"}}
    card = model_card(
        ExportRequest(run_dir, tmp_path / "out", manifest, None, False, "copy", None), ""
    )
    (command,) = re.findall(r"`(python -m obsdiff\.evaluate [^`]*)`", card)
    python, flag, app, *overrides = shlex.split(command)
    assert (python, flag, app) == ("python", "-m", "obsdiff.evaluate")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    assert cfg.pruned == str(run_dir)
    expected = "toy" if model == "toy" else "tiny" if config.get("tiny") else "coco2014_5k"
    assert cfg.eval.name == expected
