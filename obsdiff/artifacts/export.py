"""Export a pruned run for use elsewhere: a diffusers pipeline folder with a model card.

    export_pruned("outputs/prune/runs/<time>", "exported/sd3-obsdiff-50")  # or the CLI:
    python -m obsdiff.export outputs/prune/runs/<time> exported/sd3-obsdiff-50

Unstructured and N:M: the pruned weights are ordinary dense tensors with zeros, so the export is
a standard diffusers folder (`model_index.json`, the pruned denoiser in `transformer/` or
`unet/` as safetensors) that plain `DiffusionPipeline.from_pretrained` loads without obsdiff.
`components="copy"` (default) writes every component; `"reference"` writes the denoiser alone
and the card shows how to join it to the base model's other components.

Structured: diffusers' configs cannot express per-block widths and head counts, so the export is
obsdiff's own folder (`manifest.json` with the structure, `denoiser.safetensors`), loaded with
`obsdiff.load_pruned(OUT_DIR)` on top of the base model the manifest names. So is a run with
low-rank modulation (two linears where diffusers has one), unless `expand_low_rank`: each pair
is then written as the dense matrix of its product, and an unstructured or N:M run is a plain
diffusers folder again (the same function; the modulation at its dense size on disk).

Quantized (`quantize`, or a run of `obsdiff.quantize`): the weights stay in the model's dtype and
the card's code quantizes them at load with plain diffusers and torchao (`TorchAoConfig`, the
family's do-not-compress list left out); `prequantized` writes the denoiser quantized instead, in
safetensors (`obsdiff.artifacts.quantized_export`). A `gate` checks the run's evaluation before
anything is written: a failed limit refuses the export, or with `force` the card says so first.

Always a `README.md` model card (the Hub's YAML front matter, then what was pruned, the sizes
before and after, the evaluation figures of `results.json`, the command, how to load it, the base
model's licence). Every input is checked before anything is loaded or written; the folder is
built beside OUT_DIR and moved into place at the end, so a failed export leaves nothing behind
and `overwrite` replaces an old export only once the new one is complete.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DiffusionPipeline

from obsdiff.artifacts.pruned import (
    MANIFEST,
    WEIGHTS,
    PrunedModel,
    PrunedRunError,
    check_group_size,
    check_pruned_run,
    load_pruned,
    quantize_settings,
)
from obsdiff.artifacts.quantized_export import (
    ExportCheckError,
    checked_gate,
    export_quantization,
    gate_card_lines,
    gate_warning,
    prequantized_load_code,
    quantization_card_lines,
    quantized_load_code,
)
from obsdiff.artifacts.record import RESULTS, RecordError, RunRecord
from obsdiff.eval.gate import GateCheck
from obsdiff.models import family_adapter
from obsdiff.models.surgery import expand_low_rank
from obsdiff.quantization import QuantizeError, QuantizeSettings, check_device, fqn_to_config
from obsdiff.utils.file_checks import unwritable_folder_problem
from obsdiff.utils.io import write_json


log = logging.getLogger(__name__)

COMPONENT_CHOICES = ("copy", "reference")
CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ExportError(ValueError):
    """The export cannot be made as asked; raised before anything is loaded or written."""


class UploadError(RuntimeError):
    """The export is complete, its upload to the Hub failed."""


@dataclass(frozen=True)
class ExportRequest:
    """A checked export: what is read, what is written, how."""

    run_dir: Path
    out_dir: Path
    manifest: dict[str, Any]
    record: RunRecord | None
    structured: bool  # obsdiff's folder: structured widths, or low-rank modulation kept
    components: str
    base: str | None  # the base model's hub id or local path (None: built in code)
    expand_low_rank: bool = False  # low-rank modulation written as its dense product
    quantization: QuantizeSettings | None = None  # quantized at load (or `prequantized`)
    prequantized: bool = False  # the denoiser written quantized (torchao's safetensors)
    gate: list[GateCheck] | None = None  # the gate's limits, checked on the run's evaluation


def check_export(
    run_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    components: str = "copy",
    in_memory: bool = False,
    repo_id: str | None = None,
    expand_low_rank: bool = False,
    quantize: QuantizeSettings | None = None,
    prequantized: bool = False,
    gate: Sequence[str] | str | None = None,
    force: bool = False,
) -> ExportRequest:
    """Every check of an export, before any work: a run directory of a finished prune with its
    weights intact (`check_pruned_run`), an OUT_DIR that is new or empty (or `overwrite`) and can
    be written, with its parent, a known `components` mode, a well-formed `repo_id`; the
    quantization (the run's own or `quantize`: its group size against every width,
    `prequantized` on a device that can quantize it) and the `gate` on the run's evaluation
    (`force`: a failed limit is written on the card instead of refusing).
    `in_memory`: the base pipeline will be passed in."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    try:
        manifest = check_pruned_run(run_dir)
    except PrunedRunError as err:
        raise ExportError(str(err)) from err
    if components not in COMPONENT_CHOICES:
        raise ExportError(f"components={components!r}; use one of {COMPONENT_CHOICES}")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        raise ExportError(f"OUT_DIR {out_dir} lies in the run directory; export elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"OUT_DIR {out_dir} exists and is not a directory; choose another")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"OUT_DIR {out_dir} exists and is not empty; choose another, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    # the export is built beside OUT_DIR, then moved into place (replacing an old one)
    for folder in (out_dir.parent, *([out_dir] if out_dir.is_dir() else [])):
        if (problem := unwritable_folder_problem(folder)) is not None:
            raise ExportError(f"OUT_DIR {out_dir} cannot be written: {problem}; choose another")
    if repo_id is not None and not HUB_ID.match(repo_id):
        raise ExportError(f"repo id {repo_id!r} is not of the form <owner>/<name>")
    config = manifest.get("model_config", {})
    if "_target_" not in config and not in_memory:
        raise ExportError(
            f"{run_dir} pruned a pipeline in memory: its manifest names no base model to load; "
            "export it from Python with obsdiff.export(run_dir, out_dir, pipeline=<the base>)"
        )
    low_rank = bool(manifest.get("structure", {}).get("low_rank"))
    if expand_low_rank and not low_rank:
        raise ExportError(
            f"{run_dir} has no low-rank modulation to expand; leave --expand-low-rank off"
        )
    widths = manifest.get("granularity") == "structured"
    if expand_low_rank and widths:
        raise ExportError(
            "--expand-low-rank makes a plain diffusers folder only where nothing else changed "
            "a shape; a structured run is obsdiff's folder either way: leave it off"
        )
    structured = widths or (low_rank and not expand_low_rank)
    base = None if config.get("tiny") else config.get("pretrained")
    if components == "reference" and not structured and base is None:
        raise ExportError(
            f"{run_dir} pruned a model built in code or in memory: it has no files to reference; "
            "use components='copy' (--components copy)"
        )
    if components == "reference" and structured:
        raise ExportError(
            "a structured export is obsdiff's folder on top of the base model the manifest "
            "names; --components does not apply to it: leave it at copy"
        )
    record = None
    if (run_dir / RESULTS).is_file():
        try:
            record = RunRecord.read(run_dir)
        except RecordError as err:
            log.warning("%s: %s; the model card goes without its figures", run_dir / RESULTS, err)
    try:
        quantization = export_quantization(manifest, quantize, run_dir)
        checks = checked_gate(
            gate, record, quantization, manifest, force,
            evaluate_command_of(run_dir, manifest),
        )  # fmt: skip
        if prequantized and (quantization is None or structured):
            raise ExportCheckError(
                "--prequantized writes a quantized diffusers folder: it needs --quantize (or a "
                "quantized run) and a run that is not structured"
                + (
                    " (a structured one is obsdiff's folder, quantized at load)"
                    if structured
                    else ""
                )
            )
        if quantization is not None and quantize_settings(manifest) is None:
            check_group_size(manifest, quantization)
        if prequantized and quantization is not None:  # quantized here, where the export runs
            check_device(quantization, "cuda" if torch.cuda.is_available() else "cpu")
    except (ExportCheckError, QuantizeError) as err:
        raise ExportError(str(err)) from None
    return ExportRequest(
        run_dir, out_dir, manifest, record, structured, components, base, expand_low_rank,
        quantization, prequantized, checks,
    )  # fmt: skip


def export_pruned(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    components: str = "copy",
    pretrained: str | None = None,
    pipeline: DiffusionPipeline | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    export_command: str | None = None,
    expand_low_rank: bool = False,
    quantize: QuantizeSettings | str | None = None,
    prequantized: bool = False,
    gate: Sequence[str] | str | None = None,
    force: bool = False,
) -> Path:
    """Export the pruned model of `run_dir` into `out_dir` (see the module docstring); returns
    `out_dir`. `pretrained` / `pipeline`: another copy of the base model, or the base pipeline
    in memory (as `load_pruned`). `push_to_hub="<owner>/<name>"`: then uploaded there (the
    card's code loads it from there; `UploadError` if the upload fails, the export kept).
    `export_command`: the export's own command line, for the card. `expand_low_rank`: a run
    with low-rank modulation written as a plain diffusers folder, each pair of linears as the
    dense matrix of its product. `quantize`: a scheme (or `QuantizeSettings`) the card's code
    quantizes with at load (a quantized run brings its own); `prequantized`: the denoiser
    written quantized. `gate`: limits on the run's evaluation (`"lpips<=0.15,psnr>=30"`), the
    export refused when one fails, unless `force`."""
    if isinstance(quantize, str):
        try:
            quantize = QuantizeSettings(quantize, 128 if quantize == "int4_weight_only" else None)
        except QuantizeError as err:
            raise ExportError(str(err)) from None
    request = check_export(
        run_dir, out_dir, overwrite, components, pipeline is not None, push_to_hub,
        expand_low_rank, quantize, prequantized, gate, force,
    )  # fmt: skip
    out = request.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        where = push_to_hub or str(request.out_dir)
        if request.structured:
            load = _write_structured(request, building, where)
        else:
            load = _write_diffusers(request, building, where, pretrained, pipeline)
        (building / CARD).write_text(model_card(request, load, export_command))
        if out.exists():
            shutil.rmtree(out)
        building.rename(out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log.info("exported %s to %s (%s)", request.run_dir, out, _layout(request))
    if push_to_hub is not None:
        try:
            url = upload(out, push_to_hub, private=private)
        except Exception as err:  # offline, no token, no rights: the export itself stands
            raise UploadError(
                f"the export is complete in {out}, but the upload to {push_to_hub} failed: "
                f"{err}; upload it later with `huggingface-cli upload {push_to_hub} {out}`"
            ) from err
        log.info("pushed to %s", url)
    return out


def _layout(request: ExportRequest) -> str:
    if request.structured:
        return "obsdiff folder: structured"
    expanded = ", low-rank modulation expanded" if request.expand_low_rank else ""
    return f"diffusers pipeline, components {request.components}{expanded}"


def _write_structured(request: ExportRequest, out: Path, where: str) -> str:
    """obsdiff's folder: the manifest (with the structure, and the quantization load_pruned
    applies), the weights, the run record."""
    for name in (WEIGHTS, RESULTS):
        if (request.run_dir / name).is_file():
            shutil.copy2(request.run_dir / name, out / name)
    manifest = dict(request.manifest)
    if request.quantization is not None and "quantize" not in manifest:
        settings = request.quantization
        manifest["quantize"] = {**settings.as_dict(), "name": settings.name}
    write_json(out / MANIFEST, manifest)
    return "\n".join(
        [
            "import obsdiff  # pip install obsdiff",
            "",
            f'pruned = obsdiff.load_pruned("{where}")  # base model + pruned denoiser',
            "pipe = pruned.pipeline",
        ]
    )


def _write_diffusers(
    request: ExportRequest,
    out: Path,
    where: str,
    pretrained: str | None,
    pipeline: DiffusionPipeline | None,
) -> str:
    """A diffusers folder; returns the plain-diffusers code that loads it."""
    pruned = load_pruned(request.run_dir, pretrained, pipeline, quantized=False)  # as saved
    pipe, attr = pruned.pipeline, pruned.adapter.denoiser_attr
    denoiser = pruned.denoiser
    if request.expand_low_rank:
        expand_low_rank(denoiser)
    optional = set(getattr(pipe, "_optional_components", []))
    missing = sorted(
        n for n, value in pipe.components.items() if value is None and n not in optional
    )
    extra = "".join(f", {name}=None" for name in missing)  # saved as absent: say so on load
    if request.quantization is not None:
        return _write_quantized(request, pruned, out, where, pretrained, extra)
    if request.components == "copy":
        pipe.save_pretrained(str(out), safe_serialization=True)
        return "\n".join(
            [
                "from diffusers import DiffusionPipeline",
                "",
                f'pipe = DiffusionPipeline.from_pretrained("{where}"{extra})',
            ]
        )
    denoiser.save_pretrained(str(out / attr), safe_serialization=True)  # type: ignore[operator]
    cls = type(denoiser).__name__
    base = pretrained or request.base
    return "\n".join(
        [
            f"from diffusers import DiffusionPipeline, {cls}",
            "",
            f'{attr} = {cls}.from_pretrained("{where}", subfolder="{attr}")',
            f'pipe = DiffusionPipeline.from_pretrained("{base}", {attr}={attr}{extra})',
        ]
    )


def _write_quantized(
    request: ExportRequest,
    pruned: PrunedModel,
    out: Path,
    where: str,
    pretrained: str | None,
    extra: str,
) -> str:
    """A diffusers folder of a quantized export: the weights in the model's dtype and the code
    that quantizes them at load, or (`prequantized`) the denoiser loaded back by diffusers with
    that quantization and saved quantized in safetensors; returns the load code."""
    assert request.quantization is not None
    pipe, adapter = pruned.pipeline, pruned.adapter
    experts = adapter.expert_names(pipe.components)
    if request.components == "copy":
        pipe.save_pretrained(str(out), safe_serialization=True)
    else:
        for name in experts:
            pipe.components[name].save_pretrained(str(out / name), safe_serialization=True)
    cls = type(pipe.components[experts[0]])
    dtype = str(next(pipe.components[experts[0]].parameters()).dtype).removeprefix("torch.")
    base = None if request.components == "copy" else pretrained or request.base
    if not request.prequantized:
        return quantized_load_code(
            type(adapter), request.quantization, experts, cls.__name__, where, base, dtype, extra
        )
    from diffusers import TorchAoConfig

    config = TorchAoConfig(fqn_to_config(adapter, request.quantization))
    for name in experts:  # diffusers' own quantized save: what diffusers loads back
        folder = out / name
        model = cls.from_pretrained(
            str(folder), quantization_config=config, dtype=getattr(torch, dtype)
        )
        shutil.rmtree(folder)
        model.save_pretrained(str(folder), safe_serialization=True)
    if request.components == "copy":
        return prequantized_load_code(where, dtype, extra)
    loads = [
        f'{n} = {cls.__name__}.from_pretrained("{where}", subfolder="{n}", dtype=torch.{dtype})'
        for n in experts
    ]
    joined = ", ".join(f"{n}={n}" for n in experts)
    return "\n".join(
        [
            "import torch",
            f"from diffusers import DiffusionPipeline, {cls.__name__}  # torchao >= 0.16 too",
            "",
            *loads,
            f'pipe = DiffusionPipeline.from_pretrained("{base}", {joined}{extra})',
        ]
    )


# ----------------------------------------------------------------------------- the model card
def model_card(request: ExportRequest, load_code: str, export_command: str | None = None) -> str:
    """The model card: the Hub's YAML front matter, then the figures and how to load."""
    manifest, record = request.manifest, request.record
    method = manifest.get("method", {}).get("name", "?")
    granularity = manifest.get("granularity", "?")
    sparsity = manifest.get("sparsity")
    model = manifest.get("model", {}).get("name") or manifest.get("model_config", {}).get("name")
    config = manifest.get("model_config", {})
    licence, licence_name = config.get("license"), config.get("license_name")
    front: dict[str, Any] = {}
    if request.base and HUB_ID.match(request.base):
        front["base_model"] = request.base
    front["library_name"] = "obsdiff" if request.structured else "diffusers"
    front["pipeline_tag"] = "text-to-image"
    front["license"] = licence or "other"
    if licence_name:
        front["license_name"] = licence_name
    recovery = manifest.get("recovery")
    front["tags"] = ["pruning", "obs-diff", "sparsity", method, granularity, "text-to-image"]
    if recovery is not None:
        front["tags"].append("distillation")
    quantization = request.quantization
    if quantization is not None:
        front["tags"] += ["quantized", "torchao", quantization.scheme]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    how = (
        "without training"
        if recovery is None
        else f"then recovered by {recovery.get('steps')} steps of distillation towards the dense "
        "model on its own trajectories (no training data)"
    )
    quantized = "" if quantization is None else f", {quantization.name}"
    lines += [
        f"# {model}: {method}, {granularity}, sparsity {sparsity}{quantized}",
        "",
        *gate_warning(request.gate or []),
        f"`{request.base or model}` pruned one-shot by "
        f"[obsdiff](https://arxiv.org/abs/2510.06751) ({_method_name(method)}), {how}.",
        "",
        "## What was pruned",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    calibration = manifest.get("calibration", {})
    rows = {
        "method": json.dumps(manifest.get("method", {})),
        "granularity": granularity,
        "target sparsity": sparsity,
        "achieved sparsity": _round(manifest.get("achieved_sparsity")),
        "blocks": _blocks(manifest.get("blocks")),
        "packages": manifest.get("packages"),
        "timestep weighting": manifest.get("weighting", {}).get("scheme"),
        "calibration prompts": f"{calibration.get('num_prompts')} ({calibration.get('source')}, "
        f"sha256 {str(calibration.get('prompts_sha256', ''))[:12]})",
        "calibration sampling": f"{calibration.get('num_inference_steps')} steps, guidance "
        f"{calibration.get('guidance_scale')}, {calibration.get('resolution')}",
    }
    if "modulation" in manifest:
        rows["modulation"] = _modulation(manifest, request.expand_low_rank)
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    prune = None if record is None else record.prune
    if prune is not None:
        lines += [
            "",
            "## Size",
            "",
            "| | before | after |",
            "|---|--:|--:|",
            f"| parameters (denoiser) | {prune.params_before:,} | {prune.params_after:,} |",
            f"| TFLOPs per denoiser forward | {prune.tflops_before:.4g} "
            f"| {prune.tflops_after:.4g} |",
        ]
        if prune.target_parameters and prune.target_nonzero is not None:
            lines.append(
                f"| non-zero weights of the pruned linears | {prune.target_parameters:,} "
                f"| {prune.target_nonzero:,} |"
            )
        lines += [
            "",
            "Unstructured and N:M zeros keep the tensors' shapes: the files and the dense "
            "speed stay as they were; structured pruning removes heads and neurons.",
        ]
    if recovery is not None:
        lines += ["", "## Recovery", ""] + _recovery_lines(recovery, record)
    if quantization is not None:
        adapter = family_adapter(str(manifest.get("model", {}).get("family")))
        lines += ["", "## Quantization", ""]
        lines += quantization_card_lines(adapter, quantization, record, request.prequantized)
    lines += ["", "## Evaluation", ""] + _evaluation_lines(record, request)
    if request.gate:
        lines += ["", "## Quality gate", ""]
        lines += [
            "Each limit checked against the bound of its 95% interval over prompts that could "
            "break it (the value where there is none), on the same prompts and seeds as the "
            "dense model:",
            "",
            *gate_card_lines(request.gate),
        ]
    lines += ["", "## How it was made", "", "```bash", _command(record), "```"]
    if export_command:
        lines += ["", f"Exported with `{export_command}`."]
    lines += ["", "## How to load", "", "```python", load_code, "```"]
    if not request.structured:
        needs = " (with torchao installed)" if quantization is not None else ""
        lines += ["", f"obsdiff is not needed to load it: plain diffusers does{needs}."]
    lines += ["", "## Licence", ""]
    source = f"`{request.base or model}`"
    lines.append(
        f"These weights derive from {source}, whose licence ({licence_name or licence}) applies "
        "to them: read it on its model card before using or sharing them."
        if licence
        else f"These weights derive from {source}: its licence applies to them; read it on the "
        "base model's card before using or sharing them."
    )
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


CITATION = """@inproceedings{zhu2026obsdiff,
  title     = {OBS-Diff: Accurate Pruning for Diffusion Models in One-Shot},
  author    = {Zhu, Junhan and others},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  note      = {arXiv:2510.06751}
}"""


def _modulation(manifest: dict[str, Any], expanded: bool) -> str:
    """The low-rank modulation's row of the card: the rule, the ranks, how it is written."""
    records = [r for r in manifest.get("records", []) if r.get("type") == "low_rank"]
    ranks = sorted({int(r["rank"]) for r in records})
    rule = ", ".join(f"{k} {v}" for k, v in manifest["modulation"].items() if k != "name")
    span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    written = "; written as the dense product of each pair" if expanded else ""
    return f"{len(records)} linears at low rank ({rule}: ranks {span}){written}"


def _recovery_lines(recovery: dict[str, Any], record: RunRecord | None) -> list[str]:
    """The recovery's recipe (the manifest) and what it did (the run record)."""
    rows = {
        "steps": recovery.get("steps"),
        "prompts (the teacher's trajectories)": recovery.get("prompts"),
        "learning rate (AdamW), warm-up": f"{recovery.get('lr')}, {recovery.get('warmup_steps')}",
        "losses": f"output x {recovery.get('output_weight')}, block features x "
        f"{recovery.get('feature_weight')}",
        "LoRA rank": recovery.get("lora_rank") or "none (every weight trained)",
        "precision": recovery.get("precision"),
    }
    done = None if record is None else record.recover
    if done is not None:
        rows["loss, first and last step"] = f"{done.first_loss:.4g}, {done.last_loss:.4g}"
        rows["seconds"] = f"{done.seconds:.0f}"
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]


def _method_name(method: str) -> str:
    return {"obsdiff": "OBS-Diff", "wanda": "Wanda", "dsnot": "DSnoT"}.get(method, method)


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _blocks(blocks: Any) -> str:
    if not blocks:
        return "?"
    return f"{len(blocks)} ({blocks[0]}..{blocks[-1]})"


def evaluation_set(manifest: dict[str, Any]) -> str:
    """The evaluation set (conf/eval) that fits the pruned model: the toy's, the tiny zoo's,
    else the paper's."""
    config = manifest.get("model_config", {})
    if config.get("name") == "toy":
        return "toy"
    return "tiny" if config.get("tiny") else "coco2014_5k"


def evaluate_command(request: ExportRequest) -> str:
    """The evaluate app's command that measures the exported run against its dense model."""
    return evaluate_command_of(request.run_dir, request.manifest)


def evaluate_command_of(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The evaluate app's command that measures a run against its dense model."""
    eval_set = evaluation_set(manifest)
    return shlex.join(["python", "-m", "obsdiff.evaluate", f"pruned={run_dir}", f"eval={eval_set}"])


def _evaluation_lines(record: RunRecord | None, request: ExportRequest) -> list[str]:
    if record is None or record.eval is None:
        return [
            f"Not evaluated in this run: `{evaluate_command(request)}` measures it against the "
            f"dense model (the metrics of `conf/eval/{evaluation_set(request.manifest)}.yaml`; "
            "another set: `eval=<name>`)."
        ]
    evaluation, dense = record.eval, record.dense
    sampling = evaluation.sampling or {}
    lines = [
        f"Evaluation set `{evaluation.set}`: {evaluation.num_images} images, seed "
        f"{evaluation.seed}"
        + (f", {json.dumps(sampling)}" if sampling else "")
        + "; 95% bootstrap intervals over prompts in brackets.",
        "",
        "| metric | pruned | dense |",
        "|---|--:|--:|",
    ]
    for name, value in evaluation.metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        dense_value = None if dense is None else dense.metrics.get(name)
        dense_interval = None if dense is None else dense.intervals.get(name)
        lines.append(
            f"| {name} | {_with_interval(value, evaluation.intervals.get(name))} "
            f"| {_with_interval(dense_value, dense_interval)} |"
        )
    settings = {k: v for k, v in evaluation.metrics.items() if isinstance(v, str)}
    if settings:
        lines += ["", "Measured with: " + ", ".join(f"{k} {v}" for k, v in settings.items())]
    if record.speed is not None:
        speed = record.speed
        dense_s = _with_interval(speed.dense_seconds_per_image, speed.dense_seconds_interval)
        pruned_s = _with_interval(speed.pruned_seconds_per_image, speed.pruned_seconds_interval)
        lines += [
            "",
            f"Seconds per image on {speed.device}, timed back to back (medians of "
            f"{speed.repeats} repeats, with their intervals): dense {dense_s}, pruned "
            f"{pruned_s}; speed-up dense / pruned {speed.describe()}.",
        ]
    return lines


def _with_interval(value: Any, interval: list[float] | None) -> str:
    if value is None:
        return "–"
    text = f"{value:.4g}"
    if interval:
        text += f" [{interval[0]:.4g}, {interval[1]:.4g}]"
    return text


def _command(record: RunRecord | None) -> str:
    if record is None:
        return "# the run directory holds no results.json: see its config.yaml"
    app = "obsdiff.run" if record.eval is not None else "obsdiff.prune"
    if record.quantize is not None and "pruned" in record.overrides:
        app = "obsdiff.quantize"
    overrides = [f"{key}={value}" for key, value in record.overrides.items()]
    return shlex.join(["python", "-m", app, *overrides])


# ----------------------------------------------------------------------------- the Hub
def upload(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    api: Any = None,
) -> str:
    """Upload an exported folder to the Hub model repo `repo_id` (created if missing); returns
    the commit's URL. `api`: a `huggingface_hub.HfApi` (default: one with `token`)."""
    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise ExportError(f"{folder} is not an obsdiff export (no {CARD}); export it first")
    if not HUB_ID.match(repo_id):
        raise ExportError(f"repo id {repo_id!r} is not of the form <owner>/<name>")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload a model pruned with obsdiff",
    )
    return str(getattr(commit, "commit_url", commit))
