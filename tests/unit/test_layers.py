"""The import structure: the import-linter contracts of pyproject.toml hold (layers import
downward only, no entry point imports another, only the app layer and the entry points see
Hydra), and no module of obsdiff imports itself through others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest


pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_no_module_imports_itself_through_others() -> None:
    """No circle of imports between two modules, direct or through others (imports made only
    for type checking count: they tie the modules together all the same)."""
    graph = grimp.build_graph("obsdiff")
    circles = [
        " -> ".join(graph.find_shortest_chain(importer=imported, imported=importer) or ())
        + f" -> {imported}"
        for importer in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if graph.chain_exists(importer=imported, imported=importer)
    ]
    assert not circles, "\n".join(circles)
