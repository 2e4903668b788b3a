"""Terminal progress: files and audio done, one ETA, workers running/paused, memory used/budget.

Only used when stderr is a terminal; under systemd the structured log lines are the display. The
frame is two lines that always fit the terminal's width (the bar shrinks, then the least useful
parts go), and the last frame is drawn from the final status, so a finished run shows 100%.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

MIN_BAR = 8


def _clock(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def fraction_done(status: dict[str, Any]) -> tuple[float, bool]:
    """(share of the work finished, whether everything is finished). Audio seconds weigh files
    when known, since a long recording takes longer than a short one."""
    f = status["files"]
    total = max(0, f["total"] - f["skipped"])
    finished = f["done"] + f["failed"] + f["quarantined"]
    complete = f["pending"] == 0 and f["running"] == 0
    if complete:
        return 1.0, True
    audio_total = float(status.get("audio_total_s") or 0.0)
    if audio_total > 0:
        return min(1.0, float(status.get("audio_done_s") or 0.0) / audio_total), False
    return (finished / total if total else 0.0), False


def eta_seconds(status: dict[str, Any], elapsed_s: float) -> float | None:
    """Remaining time at the rate so far; None until something has finished."""
    frac, complete = fraction_done(status)
    if complete:
        return 0.0
    if frac <= 0 or elapsed_s <= 0:
        return None
    return elapsed_s * (1.0 - frac) / frac


def _fit(parts: list[str], width: int, sep: str = "  ") -> str:
    """Join ``parts``, dropping from the end until the line fits ``width``."""
    while parts and len(sep.join(parts)) > width:
        parts = parts[:-1]
    return sep.join(parts)[:width]


def render_lines(status: dict[str, Any], elapsed_s: float, width: int = 80) -> list[str]:
    """The two lines of one frame, each at most ``width`` characters."""
    f = status["files"]
    frac, complete = fraction_done(status)
    total = max(0, f["total"] - f["skipped"])
    finished = f["done"] + f["failed"] + f["quarantined"]
    pct = f"{100 * frac:3.0f}%"
    files = f"{finished}/{total} files"
    audio_total = float(status.get("audio_total_s") or 0.0)
    audio = f"{float(status.get('audio_done_s') or 0) / 60:.1f}/{audio_total / 60:.1f} min audio" if audio_total else ""
    if complete:
        when = f"done in {_clock(elapsed_s)}"
    else:
        eta = eta_seconds(status, elapsed_s)
        when = f"ETA {_clock(eta)}" if eta is not None else "ETA --"
    tail = [p for p in (files, audio, when) if p]
    fixed = len(pct) + 2 + len("  ".join(tail)) + 2  # "NN% [bar]  tail"
    bar_w = width - fixed - 2
    if bar_w >= MIN_BAR:
        filled = int(round(bar_w * frac))
        line1 = f"{pct} [{'#' * filled}{'.' * (bar_w - filled)}]  " + "  ".join(tail)
    else:
        line1 = _fit([pct, files, when, audio], width)
    states: dict[str, int] = {}
    for w in status.get("workers") or ():
        states[w["state"]] = states.get(w["state"], 0) + 1
    m = status["memory"]
    failed = f["failed"] + f["quarantined"]
    line2 = _fit([p for p in (
        f"workers {states.get('busy', 0)} busy {states.get('paused', 0)} paused {states.get('ready', 0)} idle",
        f"mem {m['used_mb'] / 1024:.1f}/{m['budget_mb'] / 1024:.1f} GiB",
        f"{failed} failed" if failed else "",
        f"{f['pending']} queued",
        f"kills {status.get('kills', 0)} pauses {status.get('pauses', 0)}",
    ) if p], width, sep=" | ")
    return [line1[:width], line2[:width]]


class ProgressDisplay:
    def __init__(self, console: Console | None = None, clock=time.monotonic) -> None:
        self.console = console or Console(stderr=True)
        self._clock = clock
        self._t0 = clock()
        self.text = Text("")
        self.live = Live(self.text, console=self.console, refresh_per_second=4, transient=False)
        self._last = -1e9

    def start(self) -> None:
        self._t0 = self._clock()
        self.live.start()

    def _draw(self, status: dict[str, Any]) -> None:
        width = max(20, self.console.width)
        self.text.plain = "\n".join(render_lines(status, self._clock() - self._t0, width))
        self.live.update(self.text, refresh=True)

    def update(self, status: dict[str, Any]) -> None:
        now = self._clock()
        if now - self._last < 0.25:
            return
        self._last = now
        self._draw(status)

    def stop(self, final: dict[str, Any] | None = None) -> None:
        """Draw ``final`` (the run's last status) unthrottled, then leave it on the screen."""
        if final is not None:
            self._draw(final)
        self.live.stop()
        if not self.console.is_terminal:
            self.console.file.write("\n")  # a file or pipe gets the last frame without its line end
            self.console.file.flush()
