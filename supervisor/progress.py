"""Terminal progress: files, audio hours, ETA, workers running/paused, memory used/budget.

Only used when stderr is a terminal; under systemd the structured log lines are the display.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class ProgressDisplay:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console)
        self.files = self.progress.add_task("files", total=None, detail="")
        self.audio = self.progress.add_task("audio", total=None, detail="")
        self.line = Text("")
        self.live = Live(Group(self.progress, self.line), console=self.console, refresh_per_second=4, transient=False)
        self._last = 0.0

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def update(self, status: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        f = status["files"]
        total = f["total"] - f["skipped"]
        finished = f["done"] + f["failed"] + f["quarantined"]
        self.progress.update(self.files, total=max(total, 1), completed=finished,
                             detail=f"{f['done']} done, {f['failed'] + f['quarantined']} failed, {f['pending']} queued")
        audio_total = status.get("audio_total_s") or 0.0
        self.progress.update(self.audio, total=max(audio_total, 1.0), completed=status.get("audio_done_s", 0.0),
                             detail=f"{status.get('audio_done_s', 0) / 3600:.2f}/{audio_total / 3600:.2f} h")
        states: dict[str, int] = {}
        for w in status["workers"]:
            states[w["state"]] = states.get(w["state"], 0) + 1
        m = status["memory"]
        self.line.plain = (f"workers: {states.get('busy', 0)} running, {states.get('paused', 0)} paused, "
                           f"{states.get('ready', 0)} idle, {states.get('starting', 0)} starting | "
                           f"memory {m['used_mb'] / 1024:.2f}/{m['budget_mb'] / 1024:.2f} GiB | "
                           f"kills {status['kills']} pauses {status['pauses']}")
