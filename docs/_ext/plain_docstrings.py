"""Griffe extension for the manual: obsdiff's docstrings are plain prose, not Markdown.

Two things in them would change when read as Markdown, and are kept as written here:

- text laid out in aligned columns (a paragraph with a run of three or more spaces inside a
  line) is shown as preformatted text;
- brackets that follow brackets outside backticks (an index such as `result[p][k]`) would form a
  reference link: the second bracket is escaped.

mkdocs.yml loads it (plugins: mkdocstrings: ... extensions); it is not part of the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe


ALIGNED = re.compile(r"\S {3,}\S")
CODE_SPAN = re.compile(r"(`[^`]*`)")


def plain(text: str) -> str:
    """The docstring `text` with aligned paragraphs fenced and reference-link brackets escaped."""
    paragraphs = re.split(r"(\n\s*\n)", text)
    out = []
    for part in paragraphs:
        lines = part.splitlines()
        if not part.strip() or lines[0].startswith("    "):
            out.append(part)  # a separator, or an indented code block already
        elif any(ALIGNED.search(line) for line in lines):
            out.append("```text\n" + part + "\n```")
        else:
            pieces = CODE_SPAN.split(part)
            out.append("".join(p if p.startswith("`") else p.replace("][", "]\\[") for p in pieces))
    return "".join(out)


class PlainDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded objects with `plain`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain(obj.docstring.value)
