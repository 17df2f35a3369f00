"""What a newcomer meets first: a dry run that writes nothing, external features that belong to their data, a data
check that names every image it leaves out, an offline answer for pretrained weights, README figures made by the
kit, and the smaller frictions of a first run (help texts, messages, the old zip, the histogram's axis, progress)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from kinret.errors import KinretInputError
from kinret.models.config import TrainConfig
from kinret.models.networks import build_backbone


# ---- pretrained weights offline -------------------------------------------------------------------------------------
def test_pretrained_weights_offline_answer_at_once_without_retries(monkeypatch):
    """The hub client imported online (as when HF_HUB_OFFLINE is unset) and no network: one connection attempt,
    then the clear error; the hub client's download retries would take a minute."""
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    attempts = []
    real = socket.getaddrinfo

    def unreachable(host, *args, **kwargs):
        if "huggingface" in str(host):
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    t0 = time.perf_counter()
    with pytest.raises(KinretInputError, match="offline .* not in the local cache.*--set weights=FILE"):
        build_backbone(TrainConfig(backbone="resnet18", pretrained=True))
    print(f"pretrained=true offline answered in {time.perf_counter() - t0:.2f} s after {len(attempts)} attempt(s)")
    assert len(attempts) <= 1
    assert hub.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # offline only for that call
