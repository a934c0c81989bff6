"""Test-wide settings: offline, W&B disabled, no network, tiny models only."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest


# Set before diffusers / huggingface_hub / wandb are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test`: a worker per core) each worker, and every process it starts,
# computes on one thread: two threads each would fight over the cores. Set before torch is
# imported, so the worker's own results and its subprocesses' run the same kernels.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> None:
    """Allow Unix sockets and loopback (process groups, local services); refuse the rest."""
    if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        host = str(address[0])
        try:
            is_local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            is_local = host == "localhost"
        if not is_local:
            raise OSError(f"tests must not use the network (attempted connection to {address!r})")
    _real_connect(self, address)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    yield
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
