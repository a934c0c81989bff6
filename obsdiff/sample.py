"""`python -m obsdiff.sample`: images for a few prompts from one model config (conf/sample.yaml)."""

from __future__ import annotations

from typing import Any

from obsdiff.app.entry import HydraApp


APP = HydraApp("sample", "obsdiff.app.sample_app")


def main() -> Any:
    """`python -m obsdiff.sample`, `obsdiff-sample`."""
    return APP.main()


if __name__ == "__main__":
    main()
