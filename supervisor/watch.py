"""Watch mode: notice transcripts that land in an inbox once they, and their media, stop changing.

Polling (size + mtime) keeps it dependency-free and works on network filesystems where inotify
does not. A file is handed over once its signature has been stable for ``settle_s``; a later change
makes it new again. What is already done is decided by the supervisor's manifest, so a restart
neither redoes finished files nor forgets ones that landed while it was stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from supervisor.corpus import FileInfo, describe, find_media, iter_transcripts, media_name
from supervisor.paths import is_within
from worker.audio import DirListing


@dataclass
class _Seen:
    signature: tuple
    since: float
    handed: bool = False


class InboxWatcher:
    def __init__(self, inbox: Path, *, out_root: Path | None, in_place: bool, media_dir: Path | None = None,
                 settle_s: float = 10.0, scan_interval: float = 5.0) -> None:
        self.inbox = inbox.resolve()
        self.out_root = out_root.resolve() if out_root is not None else None
        self.in_place = in_place
        self.media_dir = media_dir
        self.settle_s = settle_s
        self.scan_interval = scan_interval
        self._seen: dict[Path, _Seen] = {}
        self._next_scan = float("-inf")
        self.inbox.mkdir(parents=True, exist_ok=True)

    def _signature(self, cha: Path, listing: DirListing) -> tuple | None:
        try:
            st = cha.stat()
            sig: list = [st.st_size, st.st_mtime_ns]
            name = media_name(cha.read_bytes()[:65536])
            if name:
                media = find_media(cha, name, self.media_dir, self.inbox, listing=listing)
                if media is not None:
                    mst = media.stat()
                    sig += [str(media), mst.st_size, mst.st_mtime_ns]
            return tuple(sig)
        except OSError:
            return None

    def poll(self, now: float) -> list[FileInfo]:
        """Files that have settled since the last call (at most one scan per ``scan_interval``).
        Blocking (a folder scan): the supervisor calls it off the loop."""
        if now < self._next_scan:
            return []
        self._next_scan = now + self.scan_interval
        listing = DirListing()  # each folder listed once per scan
        ready = []
        for cha in self.settled(self._scan(listing), now):
            try:
                ready.append(describe(self.inbox, cha, out_root=self.out_root, in_place=self.in_place,
                                      media_dir=self.media_dir, listing=listing))
            except OSError:
                self._seen[cha].handed = False  # read again at the next scan
        return ready

    def _scan(self, listing: DirListing) -> dict[Path, tuple | None]:
        """Each transcript in the inbox (our own outputs left out) and its signature now."""
        return {cha: self._signature(cha, listing) for _root, cha in iter_transcripts([self.inbox])
                if self.out_root is None or self.in_place or not is_within(cha, self.out_root)}

    def settled(self, signatures: dict[Path, tuple | None], now: float) -> list[Path]:
        """Decide from one scan's signatures which files are handed over now: unchanged for
        ``settle_s`` and not handed over before; a change starts the wait again. No I/O."""
        out = []
        for cha, sig in signatures.items():
            if sig is None:
                continue
            seen = self._seen.get(cha)
            if seen is None or seen.signature != sig:
                self._seen[cha] = _Seen(sig, now)
            elif not seen.handed and now - seen.since >= self.settle_s:
                seen.handed = True
                out.append(cha)
        for gone in set(self._seen) - set(signatures):
            del self._seen[gone]
        return out
