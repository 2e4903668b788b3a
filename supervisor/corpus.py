"""Find transcripts and their media, name their outputs, and remember what is already done.

"Done" is recorded in a manifest next to the outputs (``.batchalign-supervise/done.jsonl``) after the
output has been renamed into place: a run killed between the two redoes that one file, never loses it.
A file is skipped when its manifest entry matches the input's content hash and the output on disk still
has the hash that was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from supervisor.paths import is_within
from worker.audio import MEDIA_EXTENSIONS, DirListing, MediaHeader, find_media, fingerprint, probe_media

MANIFEST_DIR = ".batchalign-supervise"
_MEDIA_RE = re.compile(rb"^@Media:\t([^,\r\n]+)", re.MULTILINE)


class CorpusError(ValueError):
    """A corpus argument that cannot be used (missing path, nothing to align)."""


@dataclass
class FileInfo:
    """One transcript to align and everything the scheduler needs to know before running it."""

    rel: str  # path relative to its corpus root (also its path under OUT)
    path: Path  # the transcript
    out: Path  # where the aligned transcript goes
    media: Path | None
    media_error: str | None  # why media could not be found, if it could not
    transcript_bytes: int
    media_bytes: int | None
    audio_seconds: float | None
    input_hash: str  # transcript content + media fingerprint
    header: MediaHeader | None = field(default=None, repr=False, compare=False)  # read once at intake

    @property
    def media_mb(self) -> float | None:
        return None if self.media_bytes is None else self.media_bytes / 2**20


def iter_transcripts(roots: Iterable[Path], listing: DirListing | None = None) -> Iterator[tuple[Path, Path]]:
    """Yield (root, transcript) for every .cha under the given folders or files, sorted. What the
    walk lists goes into ``listing``, so finding media does not list the same folders again.

    Linked folders are followed (a corpus often links in a shared folder of sessions), each real
    folder walked once, so a link back up the tree cannot loop."""
    for root in roots:
        if root.is_file():
            if root.suffix.lower().lstrip(".") in MEDIA_EXTENSIONS:
                continue  # a recording named beside its transcript (``corpus/*``): found through it
            yield root.parent, root
        elif root.is_dir():
            walked: set[tuple[int, int]] = set()
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                try:
                    st = os.stat(dirpath)
                except OSError:
                    dirnames[:] = []
                    continue
                if (st.st_dev, st.st_ino) in walked:  # reached again through a link: walked already
                    dirnames[:] = []
                    continue
                walked.add((st.st_dev, st.st_ino))
                if listing is not None:
                    listing.seed(Path(dirpath), filenames)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.lower().endswith(".cha") and not name.startswith("."):
                        yield root, Path(dirpath) / name
        else:
            raise CorpusError(f"{root}: no such file or folder")


def media_name(transcript: bytes) -> str | None:
    m = _MEDIA_RE.search(transcript)
    if not m:
        return None
    return m.group(1).decode("utf-8", "replace").strip() or None


def media_fingerprint(path: Path) -> str:
    """Size plus the first and last MiB: cheap on multi-GB recordings, still catches real edits."""
    with open(path, "rb") as fh:
        return fingerprint(fh, os.fstat(fh.fileno()).st_size)


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe(root: Path, cha: Path, *, out_root: Path | None, in_place: bool,
             media_dir: Path | None = None, rel_base: Path | None = None,
             listing: DirListing | None = None) -> FileInfo:
    """Read one transcript and its media header (blocking: call it off the loop)."""
    data = cha.read_bytes()
    base = rel_base if rel_base is not None else root
    rel = cha.relative_to(base).as_posix()
    out = cha if in_place else (out_root / rel if out_root is not None else cha)
    media: Path | None = None
    media_error: str | None = None
    header: MediaHeader | None = None
    name = media_name(data)
    if name is None:
        media_error = f"{cha}: no @Media header"
    else:
        media = find_media(cha, name, media_dir, root, listing=listing)
        if media is None:
            where = f" or under {media_dir}" if media_dir else ""
            media_error = (f"{cha}: media {name!r} not found beside the transcript{where} "
                           f"(looked for .{', '.join(MEDIA_EXTENSIONS)})")
        else:
            header = probe_media(media)  # the one opening of the recording at intake
            media_error = header.error
    h = hashlib.sha256(data)
    if header is not None:
        h.update(header.fingerprint.encode())
    return FileInfo(rel=rel, path=cha, out=out, media=media, media_error=media_error,
                    transcript_bytes=len(data), media_bytes=header.size_bytes if header else None,
                    audio_seconds=header.seconds if header else None, input_hash=h.hexdigest(), header=header)


@dataclass(frozen=True)
class Candidate:
    """A transcript found on disk, not yet read."""

    root: Path
    cha: Path
    rel_base: Path | None


def find_transcripts(roots: list[Path], *, out_root: Path | None, in_place: bool,
                     listing: DirListing | None = None) -> list[Candidate]:
    """Every transcript under ``roots`` (a directory walk only: fast, so a run can start at once).

    Relative paths are taken from the single folder given, or from the common parent when several
    paths are given (so outputs never collide). Our own outputs are never taken as inputs, and a
    transcript reached through two of the paths is taken once.
    """
    roots = [r.resolve() for r in roots]
    if not roots:
        raise CorpusError("no corpus given")
    rel_base: Path | None = None
    if len(roots) > 1 or roots[0].is_file():
        parents = [r if r.is_dir() else r.parent for r in roots]
        rel_base = Path(os.path.commonpath([str(p) for p in parents]))
    out_root = out_root.resolve() if out_root is not None else None
    seen: set[Path] = set()  # a file given beside its folder, or a folder inside another: one job each
    found = []
    inside_out = 0
    for root, cha in iter_transcripts(roots, listing):
        try:
            real = cha.resolve()
        except OSError:
            real = cha
        if cha in seen or real in seen:  # the same transcript through a link: one job, the first name
            continue
        seen.update((cha, real))
        if out_root is not None and not in_place and (is_within(cha, out_root) or is_within(real, out_root)):
            inside_out += 1
            continue
        found.append(Candidate(root, cha, rel_base))
    if inside_out and not found:
        raise CorpusError(f"{out_root}: the output folder holds the corpus ({inside_out} transcript"
                          f"{'s' if inside_out != 1 else ''}); give another -o/--out, or --in-place")
    return found


def discover(roots: list[Path], *, out_root: Path | None, in_place: bool,
             media_dir: Path | None = None) -> list[FileInfo]:
    """Every transcript under ``roots``, read and described (blocking)."""
    listing = DirListing()
    out = out_root.resolve() if out_root is not None else None
    return [describe(c.root, c.cha, out_root=out, in_place=in_place, media_dir=media_dir, rel_base=c.rel_base,
                     listing=listing)
            for c in find_transcripts(roots, out_root=out_root, in_place=in_place, listing=listing)]


class Manifest:
    """Append-only record of finished outputs; later lines win, torn last lines are ignored."""

    def __init__(self, path: Path, identity: dict | None = None) -> None:
        self.path = path
        self.identity = identity  # what makes outputs now (supervisor.identity); None: not compared
        self.failed_path = path.with_name("failed.jsonl")
        self._entries: dict[str, dict] = {}
        self._failed: dict[str, dict] = {}
        self._load()

    @classmethod
    def for_run(cls, out_root: Path | None, corpus_root: Path, in_place: bool) -> "Manifest":
        base = corpus_root if in_place or out_root is None else out_root
        return cls(base / MANIFEST_DIR / "done.jsonl")

    def _load(self) -> None:
        for path, entries in ((self.path, self._entries), (self.failed_path, self._failed)):
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                continue
            for line in lines:
                try:
                    entry = json.loads(line)
                    entries[entry["rel"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue

    def failed(self, info: FileInfo) -> dict | None:
        """The failure recorded for this exact input, if it failed for good before."""
        entry = self._failed.get(info.rel)
        if entry is not None and entry.get("input_hash") == info.input_hash:
            return entry
        return None

    def mark_failed(self, info: FileInfo, state: str, reason: str) -> None:
        entry = {"rel": info.rel, "input_hash": info.input_hash, "state": state, "reason": reason}
        self._failed[info.rel] = entry
        self._append(self.failed_path, entry)

    @staticmethod
    def _append(path: Path, entry: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # after a torn last line (a power cut): start a line of our own
            try:
                view = memoryview(line)
                while view:  # a full disk may take part of a line: finish it or take it back
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                # A torn line would swallow the next entry appended after it; cut it off.
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def check(self, info: FileInfo) -> tuple[bool, str | None]:
        """(done, stale reason) for a file: its output is read and hashed once (the sensing), then
        judged against the recorded entry (``judge``, pure)."""
        entry = self._entries.get(info.rel)
        if entry is None:
            return False, None
        try:
            out_hash = hash_bytes(info.out.read_bytes())
        except OSError:
            out_hash = None
        return judge(entry, out_hash, info.input_hash, in_place=info.out == info.path, identity=self.identity)

    def is_done(self, info: FileInfo) -> bool:
        return self.check(info)[0]

    def stale_reason(self, info: FileInfo) -> str | None:
        """Why a finished output must be made again although its inputs are unchanged (a different
        engine, model, device, dtype, option or aligner version), or None."""
        return self.check(info)[1]

    def mark_done(self, info: FileInfo) -> None:
        data = info.out.read_bytes()
        entry = {"rel": info.rel, "input_hash": info.input_hash, "output_hash": hash_bytes(data)}
        if self.identity is not None:
            entry["identity"] = self.identity
        if info.out == info.path:
            h = hashlib.sha256(data)
            if info.media is not None:
                h.update(media_fingerprint(info.media).encode())
            entry["output_input_hash"] = h.hexdigest()
        self._entries[info.rel] = entry
        self._append(self.path, entry)


def judge(entry: dict, out_hash: str | None, input_hash: str, *, in_place: bool,
          identity: dict | None) -> tuple[bool, str | None]:
    """(done, stale reason) from a manifest entry and what is on disk now (pure).

    Done: the output is still there unchanged and was made from these inputs (in place, the input
    is our own output) by the same engine identity. Stale: the same, but made with other settings
    (the reason says which); such a file is aligned again."""
    if out_hash is None or out_hash != entry.get("output_hash"):
        return False, None
    if entry.get("output_input_hash" if in_place else "input_hash") != input_hash:
        return False, None
    if identity is None:
        return True, None
    from supervisor.identity import describe_change

    stale = describe_change(entry.get("identity"), identity)
    return stale is None, stale
