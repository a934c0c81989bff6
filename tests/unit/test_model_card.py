"""Every model config names its weights' licence, and an export's model card carries it (the
real models' as their own cards publish it)."""

from __future__ import annotations

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
