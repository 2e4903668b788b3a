"""Audio access for alignment: read only the span being aligned, as float32 mono at the model's rate.

A worker never decodes a whole recording into memory: memory per file then grows with the span
length, not with the recording length, which keeps the supervisor's per-file predictions small.
Formats libsndfile cannot read (mp4, m4a, ...) are converted once with ffmpeg into a cache folder
keyed by the content hash, so the corpus folder is never written to and a re-run reuses the work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from worker.engines.base import JobError

log = logging.getLogger(__name__)

MEDIA_EXTENSIONS = ("wav", "flac", "mp3", "ogg", "m4a", "mp4")
# Containers libsndfile never reads: go straight to ffmpeg.
_FFMPEG_ONLY = {"m4a", "mp4", "aac", "mov", "m4v", "webm", "mkv", "avi", "wma", "opus", "3gp", "amr"}


# Formats libsndfile reads itself: when it cannot, the file is damaged (or mislabelled), and
# converting it with ffmpeg would only hide that.
_SNDFILE_NATIVE = {"wav", "wave", "flac", "aif", "aiff", "aifc", "w64", "caf"}
# Lossless formats whose header states an exact length that the data must hold.
_CHECK_LENGTH = {"wav", "wave", "flac", "aif", "aiff", "aifc"}
_FINGERPRINT_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchalign-supervise"


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".") or "unknown"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_with_ffmpeg(path: Path, cache_dir: Path | None) -> Path:
    """Decode ``path`` once into ``cache_dir/<sha256>.flac`` (mono, native rate) and return it."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise JobError(
            f"{path}: cannot read {_ext(path)} audio without ffmpeg; install ffmpeg (e.g. apt-get install ffmpeg)",
            kind="media",
        )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "audio"
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise JobError(f"{path}: cannot read media: {exc.strerror or exc}", kind="media") from None
    target = folder / f"{digest}.flac"
    if target.is_file() and target.stat().st_size > 0:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{digest[:16]}.", suffix=".flac", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run(
            [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", "-i", str(path), "-vn", "-ac", "1", "-c:a", "flac", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            last = (proc.stderr.strip().splitlines() or ["no audio stream"])[-1]
            raise JobError(f"{path}: ffmpeg cannot decode it: {last}", kind="media")
        os.replace(tmp, target)  # atomic: concurrent workers converting the same file both succeed
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class AudioSource:
    """An open recording that hands out spans; use as a context manager."""

    def __init__(self, path: Path, readable: Path, handle: sf.SoundFile) -> None:
        self.path = path
        self.readable = readable
        self._sf = handle
        self.native_rate: int = int(handle.samplerate)
        self.channels: int = int(handle.channels)
        frames = int(handle.frames) if handle.frames is not None else 0
        # libsndfile reports 0 or a huge sentinel when a stream's length is unknown.
        self._frames: int | None = frames if 0 < frames < (1 << 62) else None
        self.duration_s: float | None = self._frames / self.native_rate if self._frames else None

    @classmethod
    def open(cls, path: Path | str, *, cache_dir: Path | None = None) -> "AudioSource":
        path = Path(path)
        if not path.is_file():
            raise JobError(f"{path}: media file not found", kind="media")
        if not os.access(path, os.R_OK):
            raise JobError(f"{path}: media file is not readable (permission denied)", kind="media")
        readable = path
        if _ext(path) not in _FFMPEG_ONLY:
            try:
                handle = sf.SoundFile(str(path))
            except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as exc:
                if _ext(path) in _SNDFILE_NATIVE or _looks_like_riff(path):
                    raise JobError(f"{path}: {damaged_reason(path, exc)}", kind="media") from None
                log.debug("soundfile cannot open %s (%s); converting with ffmpeg", path, exc)
            else:
                try:
                    check_length(path, handle)
                except JobError:
                    handle.close()
                    raise
                return cls(path, path, handle)
        readable = convert_with_ffmpeg(path, cache_dir)
        try:
            return cls(path, readable, sf.SoundFile(str(readable)))
        except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as exc:
            raise JobError(f"{path}: cannot read media after conversion: {exc}", kind="media") from None

    def read(self, start_s: float, end_s: float, rate: int = 16000) -> np.ndarray:
        """Samples of ``[start_s, end_s)`` as float32 mono at ``rate``; shorter at the file end."""
        sr = self.native_rate
        start = max(0, int(round(start_s * sr)))
        stop = max(start, int(round(end_s * sr)))
        if self._frames is not None:
            stop = min(stop, self._frames)
        if stop <= start:
            return np.zeros(0, dtype=np.float32)
        try:
            self._sf.seek(start)
            data = self._sf.read(stop - start, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            # Headers can overstate the length (some mp3s): past the real end there is nothing.
            log.debug("read %s [%.3f, %.3f) failed: %s", self.path, start_s, end_s, exc)
            return np.zeros(0, dtype=np.float32)
        if data.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        if sr != rate:
            mono = soxr.resample(mono, sr, rate, quality="HQ").astype(np.float32, copy=False)
        return mono

    def close(self) -> None:
        try:
            self._sf.close()
        except Exception:  # noqa: BLE001 - closing must never mask the real error
            pass

    def __enter__(self) -> "AudioSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _looks_like_riff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"FORM")
    except OSError:
        return False


def damaged_reason(path: Path, exc: BaseException | None = None) -> str:
    """Why libsndfile refuses a file of a format it knows, in words: empty, not audio, damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as err:
        return f"cannot read media: {err.strerror or err}"
    ext = _ext(path)
    if size == 0:
        return "media file is empty (0 bytes)"
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        what = "a damaged WAV file"
    elif head[:4] == b"fLaC":
        what = "a damaged FLAC file"
    elif ext in _SNDFILE_NATIVE:
        what = f"not a {ext.upper()} file (its first bytes are not a {ext.upper()} header)"
    else:
        what = "a damaged or unsupported audio file"
    detail = " ".join(str(exc).split()).split(": ", 1)[-1] if exc is not None else ""
    return f"{what}; the audio library says: {detail}" if detail else what


def wav_declared_seconds(path: Path) -> tuple[float, float] | None:
    """(seconds the RIFF header declares, seconds the file holds) for a PCM/float WAV, else None.

    libsndfile quietly shortens a truncated WAV to what is there, so the header's own data-chunk
    size is read here: an interrupted copy then says so instead of aligning a few milliseconds.
    """
    try:
        with open(path, "rb") as fh:
            return _wav_declared(fh)
    except OSError:
        return None


def _wav_declared(fh: Any) -> tuple[float, float] | None:
    import struct

    fh.seek(0)
    head = fh.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    size = os.fstat(fh.fileno()).st_size
    byte_rate = None
    while True:
        chunk = fh.read(8)
        if len(chunk) < 8:
            return None
        cid, n = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            fmt = fh.read(min(n, 16))
            if len(fmt) < 16:
                return None
            byte_rate = struct.unpack("<I", fmt[8:12])[0]
            fh.seek(n - 16 + (n & 1), os.SEEK_CUR)
        elif cid == b"data":
            if not byte_rate or n in (0, 0xFFFFFFFF):
                return None  # streamed WAVs leave the size unset
            held = max(0, size - fh.tell())
            return n / byte_rate, min(n, held) / byte_rate
        else:
            fh.seek(n + (n & 1), os.SEEK_CUR)


def check_length(path: Path, handle: sf.SoundFile, raw: Any = None) -> None:
    """Refuse a lossless recording that holds less audio than its header says (an interrupted copy).
    ``raw``: the recording already open as a binary file, to read the RIFF header from."""
    ext = _ext(path)
    if ext not in _CHECK_LENGTH:
        return
    rate = float(handle.samplerate)
    if ext in ("wav", "wave"):
        try:
            seconds = _wav_declared(raw) if raw is not None else wav_declared_seconds(path)
        except OSError:
            seconds = None
        if seconds is not None and seconds[1] < seconds[0] - max(0.05, 0.001 * seconds[0]):
            raise JobError(f"{path}: truncated: header says {seconds[0]:.3f} s, file holds {seconds[1]:.3f} s",
                           kind="media")
        return
    frames = int(handle.frames or 0)
    if not 0 < frames < (1 << 62):
        return
    tail = min(frames, int(rate * 0.1) or 1)
    try:
        handle.seek(frames - tail)
        got = handle.read(tail, dtype="float32", always_2d=True).shape[0]
    except (sf.LibsndfileError, RuntimeError):
        got = -1
    finally:
        try:
            handle.seek(0)
        except (sf.LibsndfileError, RuntimeError):
            pass
    if got != tail:
        raise JobError(f"{path}: truncated or damaged: header says {frames / rate:.3f} s, "
                       "but the end of the audio cannot be read", kind="media")


@dataclass(frozen=True)
class MediaHeader:
    """What one opening of a recording tells intake: its size, length, rate and channels, whether
    it is damaged or truncated (one line naming the file) and its content fingerprint."""

    size_bytes: int
    seconds: float | None
    sample_rate: int | None
    channels: int | None
    error: str | None
    fingerprint: str

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 2**20


def fingerprint(fh: Any, size: int) -> str:
    """Size plus the first and last MiB: cheap on multi-GB recordings, still catches real edits."""
    h = hashlib.sha256()
    h.update(str(size).encode())
    fh.seek(0)
    h.update(fh.read(_FINGERPRINT_CHUNK))
    if size > 2 * _FINGERPRINT_CHUNK:
        fh.seek(size - _FINGERPRINT_CHUNK)
        h.update(fh.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()


def probe_media(path: Path | str, *, with_fingerprint: bool = True) -> MediaHeader:
    """Open a recording once: fingerprint, header (libsndfile, or ffprobe for what only ffmpeg
    reads) and the damaged/truncated check (header-only and cheap, for intake). Raises OSError
    when the file cannot be opened at all."""
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fp = fingerprint(fh, size) if with_fingerprint else ""
        seconds = rate = channels = error = None
        if _ext(path) not in _FFMPEG_ONLY:
            fh.seek(0)
            try:
                handle = sf.SoundFile(fh)
            except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as exc:
                if _ext(path) in _SNDFILE_NATIVE or _looks_like_riff(path):
                    error = f"{path}: {damaged_reason(path, exc)}"
            else:
                try:
                    rate, channels, frames = int(handle.samplerate), int(handle.channels), handle.frames
                    if frames and 0 < frames < (1 << 62) and rate:
                        seconds = frames / rate
                    check_length(path, handle, raw=fh)
                except JobError as exc:
                    error = str(exc)
                finally:
                    handle.close()
    if seconds is None and error is None:
        seconds = _ffprobe_seconds(path)
    return MediaHeader(size, seconds, rate, channels, error, fp)


def validate_media(path: Path | str) -> str | None:
    """One line saying what is wrong with a recording (damaged, truncated), or None when it looks
    sound. Formats only ffmpeg reads are checked when decoded."""
    path = Path(path)
    if _ext(path) in _FFMPEG_ONLY or not path.is_file():
        return None
    try:
        return probe_media(path, with_fingerprint=False).error
    except OSError:
        return None


def media_duration(path: Path | str) -> float | None:
    """Duration from the header only (cheap, for scheduling); ``None`` when unknown. May be wrong."""
    try:
        return probe_media(path, with_fingerprint=False).seconds
    except OSError:
        return None


def _ffprobe_seconds(path: Path) -> float | None:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None or not path.is_file():
        return None
    try:
        out = subprocess.run(
            [ffprobe, "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class DirListing:
    """Each folder's file names, listed once: intake of thousands of transcripts in one folder
    must not list that folder once per transcript."""

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}
        self._prefixes: dict[Path, dict[str, list[str]]] = {}

    def seed(self, folder: Path, names: list[str]) -> None:
        """Names a directory walk already listed (non-directories), so the folder is not listed again."""
        self._names.setdefault(Path(folder), frozenset(names))

    def names(self, folder: Path) -> frozenset[str]:
        got = self._names.get(folder)
        if got is None:
            try:
                got = frozenset(e.name for e in os.scandir(folder) if e.is_file())
            except OSError:
                got = frozenset()
            self._names[folder] = got
        return got

    def stems(self, folder: Path) -> dict[str, list[str]]:
        """name without its last extension -> names, for ``@Media`` names given without one."""
        got = self._prefixes.get(folder)
        if got is None:
            got = {}
            for name in self.names(folder):
                stem, dot, _ = name.rpartition(".")
                if dot:
                    got.setdefault(stem, []).append(name)
            self._prefixes[folder] = got
        return got


def _match_in_dir(folder: Path, media_name: str, listing: DirListing) -> Path | None:
    """``media_name`` itself, else ``media_name`` + a known extension (extension case ignored)."""
    entries = listing.names(folder)
    if media_name in entries and Path(media_name).suffix.lower().lstrip(".") in MEDIA_EXTENSIONS:
        return folder / media_name
    by_lower = {name[len(media_name):].lower(): name for name in sorted(listing.stems(folder).get(media_name, ()))}
    for ext in MEDIA_EXTENSIONS:
        hit = by_lower.get(f".{ext}")
        if hit is not None:
            return folder / hit
    if media_name in entries:
        return folder / media_name
    return None


def find_media(
    cha_path: Path, media_name: str, media_dir: Path | None = None, corpus_root: Path | None = None,
    listing: DirListing | None = None,
) -> Path | None:
    """The recording an ``@Media`` header names: beside the .cha, then mirrored under ``media_dir``, then flat.

    Pass one ``listing`` for a whole intake so that each folder is listed once.
    """
    listing = listing if listing is not None else DirListing()
    cha_path = Path(cha_path)
    media_name = media_name.strip()
    if not media_name:
        return None
    if os.sep in media_name or "/" in media_name:
        media_name = Path(media_name).name
    folders = [cha_path.parent]
    if media_dir is not None:
        media_dir = Path(media_dir)
        if corpus_root is not None:
            try:
                rel = cha_path.parent.resolve().relative_to(Path(corpus_root).resolve())
                folders.append(media_dir / rel)
            except ValueError:
                pass
        folders.append(media_dir)
    seen: set[Path] = set()
    for folder in folders:
        if folder in seen:
            continue
        seen.add(folder)
        hit = _match_in_dir(folder, media_name, listing)
        if hit is not None:
            return hit
    return None
