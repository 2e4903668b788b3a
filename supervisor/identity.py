"""What made an output: engine, model (and its revision), device, dtype, the options that change
word times, and this aligner's version. The done-manifest records it beside each output, so a
re-run with anything different re-aligns and says what changed, and the same one skips."""

from __future__ import annotations

from typing import Any

from supervisor import __version__
from supervisor.settings import Settings

# Engine options that change how fast or how much memory, never the word times.
NOT_OUTPUT = {"threads", "share_weights", "baseline_mb", "mb_per_audio_second", "cpu_seconds_per_audio_second"}


def output_identity(s: Settings) -> dict[str, Any]:
    resolved = s.resolved_model
    options = {k: v for k, v in sorted(vars(s.engine_settings).items())
               if not k.startswith("cold_") and k not in NOT_OUTPUT}
    return {
        "engine": s.engine_name,
        "model": resolved.name if resolved is not None else s.model_id,
        "model_revision": resolved.revision if resolved is not None else None,
        "device": s.run.device.split(":")[0],
        "dtype": s.run.dtype,
        "options": options,
        "aligner": __version__,
    }


def describe_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """None when ``old`` made the same output as ``new`` would; else the differences in words."""
    if old is None:
        return "the earlier output does not record what made it"
    diffs = []
    for key in ("engine", "model", "model_revision", "device", "dtype", "aligner"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)} -> {new.get(key)}")
    o, n = old.get("options") or {}, new.get("options") or {}
    for key in sorted(set(o) | set(n)):
        if o.get(key) != n.get(key):
            diffs.append(f"{key} {o.get(key)} -> {n.get(key)}")
    return "; ".join(diffs) or None
