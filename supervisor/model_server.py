"""The model server's supervisor side: one process per GPU that holds the model (see worker/model_server.py)."""

from __future__ import annotations

from typing import Any


def use_model_server(settings: Any) -> bool:
    """``--model-server on``, or ``auto`` on a CUDA device with a torch engine."""
    mode = getattr(settings.run, "model_server", "off")
    if mode == "on":
        return settings.engine_name in ("wav2vec", "whisper")
    return mode == "auto" and settings.run.device.startswith("cuda") and settings.engine_name in ("wav2vec", "whisper")
