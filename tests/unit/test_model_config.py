"""Model configurations are validated before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from obsdiff.models import (
    FluxAdapter,
    ModelConfigError,
    SamplingDefaults,
    SD3Adapter,
    SDXLAdapter,
)
from obsdiff.models.loading import looks_like_local_path, null_components
from obsdiff.utils.devices import resolve_device
from obsdiff.utils.images import make_grid


pytestmark = pytest.mark.unit


def test_exactly_one_source_is_required() -> None:
    with pytest.raises(ModelConfigError, match="exactly one of `pretrained`"):
        SD3Adapter(name="m")
    with pytest.raises(ModelConfigError, match="exactly one of `pretrained`"):
        SD3Adapter(name="m", pretrained="org/repo", tiny="sd3")


def test_unknown_dtype_and_tiny_recipe_are_named() -> None:
    with pytest.raises(ModelConfigError, match="dtype='fp8'.*float32"):
        SD3Adapter(name="m", tiny="sd3", dtype="fp8")
    with pytest.raises(ModelConfigError, match="tiny='sdxl' is not a flux recipe.*'dev'"):
        FluxAdapter(name="m", tiny="sdxl")


def test_missing_local_path_fails_at_construction(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelConfigError, match="no-such-model.*model.pretrained"):
        SDXLAdapter(name="m", pretrained=str(missing))
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    with pytest.raises(ModelConfigError, match="no model_index.json"):
        SDXLAdapter(name="m", pretrained=str(not_a_pipeline))


def test_hub_ids_and_paths_are_told_apart(tmp_path: Path) -> None:
    assert not looks_like_local_path("stabilityai/stable-diffusion-3-medium-diffusers")
    assert looks_like_local_path("./models/sd3")
    assert looks_like_local_path("/data/sd3")
    assert looks_like_local_path(str(tmp_path))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_inference_steps", 0),
        ("guidance_scale", -1.0),
        ("height", 4),
        ("true_cfg_scale", 0.5),
        ("max_sequence_length", 0),
    ],
)
def test_sampling_defaults_reject_bad_values(field: str, value: float) -> None:
    with pytest.raises(ModelConfigError, match=field):
        SamplingDefaults(**{field: value})


def test_call_kwargs_follow_each_family() -> None:
    sampling = {"num_inference_steps": 3, "guidance_scale": 4.0, "height": 64, "width": 64}
    sd3 = SD3Adapter(name="m", tiny="sd3", sampling={**sampling, "max_sequence_length": 20})
    assert sd3.call_kwargs() == {**sampling, "max_sequence_length": 20}
    assert sd3.uses_cfg()

    flux = FluxAdapter(name="m", tiny="dev", sampling=sampling)
    assert "true_cfg_scale" not in flux.call_kwargs()
    assert not flux.uses_cfg()  # guidance-distilled: guidance_scale is an embedding input
    true_cfg = FluxAdapter(
        name="m", tiny="dev", sampling={**sampling, "true_cfg_scale": 2.0, "negative_prompt": ""}
    )
    assert true_cfg.call_kwargs()["true_cfg_scale"] == 2.0
    assert true_cfg.uses_cfg()

    sdxl = SDXLAdapter(name="m", tiny="sdxl", sampling={**sampling, "guidance_scale": 1.0})
    assert not sdxl.uses_cfg()


def test_null_components_are_read_from_model_index(tmp_path: Path) -> None:
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "text_encoder_3": [None, None],
        "tokenizer_3": [None, None],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert null_components(tmp_path) == {"text_encoder_3": None, "tokenizer_3": None}
    assert null_components(tmp_path / "elsewhere") == {}


def test_weights_fingerprint_follows_the_files_of_a_local_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    weights = tmp_path / "transformer" / "model.safetensors"
    weights.write_bytes(b"old weights")
    adapter = SD3Adapter(name="local", pretrained=str(tmp_path))
    before = adapter.weights_fingerprint()
    assert before is not None and adapter.weights_fingerprint() == before
    weights.write_bytes(b"re-trained weights")  # same path, new weights: cached images are stale
    assert adapter.weights_fingerprint() != before
    assert SD3Adapter(name="hub", pretrained="org/repo").weights_fingerprint() is None
    assert SD3Adapter(name="tiny", tiny="sd3").weights_fingerprint() is None


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="none is available"):
            resolve_device("cuda")


def test_make_grid_tiles_row_by_row() -> None:
    from PIL import Image

    images = [Image.new("RGB", (10, 8), c) for c in ("red", "green", "blue")]
    grid = make_grid(images, cols=2, pad=1)
    assert grid.size == (2 * 10 + 3, 2 * 8 + 3)
    assert grid.getpixel((1, 1)) == (255, 0, 0)
    assert grid.getpixel((12, 1)) == (0, 128, 0)
    assert grid.getpixel((1, 10)) == (0, 0, 255)
    assert grid.getpixel((12, 10)) == (255, 255, 255)  # empty cell
    with pytest.raises(ValueError):
        make_grid([])


@pytest.mark.parametrize(
    ("adapter", "name", "ffn"),
    [
        (SD3Adapter(name="s", tiny="sd3"), "transformer_blocks.0.ff.net.0.proj", True),
        (SD3Adapter(name="s", tiny="sd3"), "transformer_blocks.0.ff_context.net.2", True),
        (SD3Adapter(name="s", tiny="sd3"), "transformer_blocks.0.attn.to_out.0", False),
        (FluxAdapter(name="f", tiny="dev"), "single_transformer_blocks.0.proj_mlp", True),
        (FluxAdapter(name="f", tiny="dev"), "single_transformer_blocks.0.proj_out", True),
        (FluxAdapter(name="f", tiny="dev"), "single_transformer_blocks.0.attn.to_q", False),
        (FluxAdapter(name="f", tiny="dev"), "transformer_blocks.1.ff.net.2", True),
        (
            SDXLAdapter(name="x", tiny="sdxl"),
            "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
            True,
        ),
        (
            SDXLAdapter(name="x", tiny="sdxl"),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            False,
        ),
    ],
)
def test_the_adapter_names_its_feed_forward_linears(adapter, name: str, ffn: bool) -> None:  # type: ignore[no-untyped-def]
    """What DSnoT's skip_mlp skips: the family's FFN linears, named by the adapter."""
    assert adapter.is_ffn(name) is ffn
