"""The framed messages supervisor and worker exchange over pipes.

Both sides import this module and nothing else from each other. A frame is a 4-byte big-endian
length followed by that many bytes of UTF-8 JSON holding one object with a ``type`` key. Framing is
strict: a short read, an oversized length or a non-object payload is a ``ProtocolError``, and the
side that sees one discards the peer (a broken worker is killed, never reused).

The worker writes frames on a private duplicate of its original stdout and points fd 1 at stderr,
so stray prints from libraries can never corrupt the stream.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, BinaryIO

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")

# Exit codes are part of the protocol: the supervisor decides from them whether to respawn.
EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # the engine/model cannot be loaded: respawning would fail the same way
EXIT_PROTOCOL_ERROR = 4  # the supervisor sent garbage or the pipe broke mid-frame
EXIT_PARENT_GONE = 5  # the supervisor died; the worker left instead of holding memory

# Message types, worker -> supervisor
LOADED = "loaded"  # {pid, rss_mb, uss_mb, pss_mb, startup_s}: the model is loaded; probes follow, then READY
READY = "ready"  # {pid, rss_mb, uss_mb, pss_mb, engine, model, device, protocol, startup_s,
#                   calibration: [{features{FileFeatures}, growth_mb}] (probe spans measured at load)}
HEARTBEAT = "heartbeat"  # {job, progress (0..1 or null), rss_mb}
STARTED = "started"  # {job}
PROGRESS = "progress"  # {job, spans_done, spans_total, growth_mb (peak so far above the READY RSS)}
RESULT = "result"  # {job, output, audio_seconds, peak_rss_mb, rss_after_mb (after release), wall_s, cpu_s,
#                     stats{...}, warnings[],
#                     features_run: {FileFeatures} of the work the model did, or null (all cached)}
ERROR = "error"  # {job, error (one line), kind: "input" | "media" | "memory" | "engine" | "internal"}
# Error kinds: "input"/"media" fail the file at once (bad input); "memory" (MemoryError, torch
# out-of-memory) is a memory failure of the file, retried with a larger estimate like a guard kill;
# anything else is a crash of the attempt, retried until max_attempts.
BOOT_ERROR = "boot_error"  # {error}; sent just before exiting with EXIT_BOOT_ERROR

# Message types, supervisor -> worker
JOB = "job"  # {job, input, output, media, rel, options{}}
SHUTDOWN = "shutdown"  # finish nothing further; exit 0


class ProtocolError(Exception):
    """The peer broke the framing or sent something that is not a message."""


def encode(msg: dict[str, Any]) -> bytes:
    """One frame for ``msg``."""
    if "type" not in msg:
        raise ProtocolError("message without a type")
    body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse one frame body; anything but a JSON object with a string ``type`` is an error."""
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("frame is not a message object")
    return msg


def frame_length(header: bytes) -> int:
    """Length announced by a 4-byte header, checked against ``MAX_FRAME``."""
    if len(header) != _HEADER.size:
        raise ProtocolError("truncated frame header")
    (n,) = _HEADER.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"announced frame of {n} bytes exceeds {MAX_FRAME}")
    return n


HEADER_SIZE = _HEADER.size


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    """Blocking read of one frame; ``None`` on a clean EOF before any header byte."""
    header = _read_exact(stream, HEADER_SIZE, allow_eof=True)
    if header is None:
        return None
    body = _read_exact(stream, frame_length(header), allow_eof=False)
    assert body is not None
    return decode_body(body)


def write_frame(stream: BinaryIO, msg: dict[str, Any]) -> None:
    stream.write(encode(msg))
    stream.flush()


def _read_exact(stream: BinaryIO, n: int, allow_eof: bool) -> bytes | None:
    chunks = []
    remaining = n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            if allow_eof and remaining == n:
                return None
            raise ProtocolError(f"stream closed mid-frame ({n - remaining}/{n} bytes)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def take_protocol_stdout() -> BinaryIO:
    """Reserve the real stdout for frames and send everything else written to fd 1 to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "wb", buffering=0)
