"""What a SIGHUP may change in a running supervisor, decided apart from applying it.

A reload re-reads the layered settings (defaults -> config.toml -> environment -> the command
line the run started with). Every key a running engine or an open resource depends on (the
engine's identity, the state folder, the ledger, the sockets) keeps its running value and is
reported as refused, so nothing is ever filed under a key that is not the running one.
"""

from __future__ import annotations

from supervisor.policy import Bands
from supervisor.settings import Settings, reload_settings

# What a SIGHUP may not change: the running engine's identity and what was set up at start.
RESTART_ONLY = ("run.engine", "run.model", "run.device", "run.dtype", "run.start_method", "run.state_dir",
                "run.telemetry", "run.log_json", "run.media_dir", "memory.ledger", "service.watch",
                "service.control_socket", "service.metrics_port", "service.metrics_host", "engine.")


def bands_from(s: Settings) -> Bands:
    m = s.memory
    return Bands(admit_below=m.admit_below, pause_above=m.pause_above, resume_below=m.resume_below,
                 kill_above=m.kill_above, psi_admit_below=m.psi_admit_below, psi_pause_above=m.psi_pause_above,
                 max_pause_s=m.max_pause, kill_settle_s=m.kill_settle, pause_cooldown_s=m.pause_cooldown)


def settings_diff(old: Settings, new: Settings) -> dict[str, list]:
    changed: dict[str, list] = {}
    for section in ("memory", "run", "service"):
        old_d, new_d = vars(getattr(old, section)), vars(getattr(new, section))
        changed.update({f"{section}.{k}": [old_d[k], new_d[k]] for k in old_d if old_d[k] != new_d[k]})
    for name in old.engine:
        old_d, new_d = vars(old.engine[name]), vars(new.engine.get(name, old.engine[name]))
        changed.update({f"engine.{name}.{k}": [old_d[k], new_d[k]] for k in old_d if old_d[k] != new_d.get(k)})
    return changed


def live_reload(current: Settings, new: Settings) -> tuple[Settings, dict[str, list], dict[str, list]]:
    """``new`` with every restart-only key kept at its running value; returns (settings, applied
    changes, refused changes)."""
    changed = settings_diff(current, new)
    refused = {k: v for k, v in changed.items() if k.startswith(RESTART_ONLY)}
    for key in refused:
        section, _, name = key.partition(".")
        if section == "engine":
            new.engine = current.engine
        else:
            setattr(getattr(new, section), name, getattr(getattr(current, section), name))
    return new, {k: v for k, v in changed.items() if k not in refused}, refused


def reread(current: Settings, cli: dict) -> tuple[Settings, dict[str, list], dict[str, list]]:
    """Re-read the settings for a SIGHUP (raises ``SettingsError`` on a bad file)."""
    return live_reload(current, reload_settings(current, cli=cli))


def shown(changes: dict[str, list]) -> dict[str, list[str]]:
    return {k: [str(a), str(b)] for k, (a, b) in changes.items()}
