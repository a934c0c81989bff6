"""ImageReward scores in an isolated environment: `python image_reward_worker.py [--check]`.

Run by obsdiff.eval.image_reward with the interpreter of the environment that has image-reward
(experiments/imagereward_env.sh); it needs the standard library and ImageReward only, never
obsdiff. The request is JSON on stdin:

    {"model": "ImageReward-v1.0", "device": "cuda", "download_root": null, "batch_size": 16,
     "items": [[prompt, image path], ...]}

and stdout's last line is {"scores": [...]}, one per item in order (ImageReward's own prints go
to stderr). `--check` only imports ImageReward and prints its version.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def score_grouped(
    score: Callable[[str, list[Any]], Any], items: Sequence[tuple[str, Any]], batch_size: int
) -> list[float]:
    """Scores of `items` (prompt, image) in order: one `score(prompt, images)` call per batch of
    images sharing a prompt; a float answer (ImageReward's for a single image) counts as one."""
    groups: dict[str, list[int]] = {}
    for index, (prompt, _) in enumerate(items):
        groups.setdefault(prompt, []).append(index)
    scores: list[float] = [0.0] * len(items)
    for prompt, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            answer = score(prompt, [items[i][1] for i in batch])
            values = [answer] if isinstance(answer, int | float) else list(answer)
            if len(values) != len(batch):
                raise RuntimeError(f"{len(values)} scores for {len(batch)} images")
            for index, value in zip(batch, values, strict=True):
                scores[index] = float(value)
    return scores


def main(argv: list[str]) -> None:
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # no obsdiff shadows
    with contextlib.redirect_stdout(sys.stderr):
        import ImageReward as RM

        if argv[1:] == ["--check"]:
            try:
                result: dict[str, Any] = {"image_reward": metadata.version("image-reward")}
            except metadata.PackageNotFoundError:
                result = {"image_reward": "unknown"}
        else:
            request = json.load(sys.stdin)
            model = RM.load(
                request["model"], device=request["device"], download_root=request["download_root"]
            )
            torch = sys.modules.get("torch")  # the real package brings it, test fakes do not
            with torch.no_grad() if torch is not None else contextlib.nullcontext():
                items = [(prompt, str(path)) for prompt, path in request["items"]]
                result = {"scores": score_grouped(model.score, items, request["batch_size"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
