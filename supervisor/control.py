"""Live status of a running supervisor over a Unix socket that only its owner (and root) may use.

The status names files, users' corpora and memory figures of a shared machine, so access is
limited twice: the socket is mode 0600 in a directory created 0700 (the kernel refuses to connect
anyone else), and the server also checks the peer's uid with ``SO_PEERCRED``, which still holds
when someone loosens the file mode.

Protocol: one request line, one answer line, then the server closes the connection::

    -> {"cmd": "status"}
    <- {"ok": true, "status": {...}}            (the Status snapshot of docs/DESIGN.md)
    <- {"ok": false, "error": "one line"}

The module needs only the standard library unless ``format_status`` is called (rich).
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import os
import re
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

__all__ = [
    "ControlError",
    "ControlPermissionError",
    "ControlServer",
    "NotListeningError",
    "default_socket_path",
    "format_list",
    "format_status",
    "list_sockets",
    "listening_elsewhere",
    "query_all",
    "query_status",
    "select",
    "snapshot_of",
    "socket_dir",
]

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024
MAX_ANSWER = 64 * 1024 * 1024
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL
_UCRED = struct.Struct("3i")  # pid, uid, gid


class ControlError(OSError):
    """The status request failed; ``str(exc)`` is one line fit for a terminal."""


class NotListeningError(ControlError):
    """Nothing accepts connections on the socket (no file, or a stale one)."""


class ControlPermissionError(ControlError, PermissionError):
    """The socket belongs to another user, or the supervisor refused this uid."""


SOCKET_DIR = "control"


def socket_dir(state_dir: Path) -> Path:
    """The folder holding one socket per running supervisor of this state directory.

    Unix socket paths are limited to 107 bytes; a state directory too deep for that gets a short
    folder of its own under the temporary directory instead (named by a hash of the state path, so
    ``status`` finds it the same way, in a parent only this user may enter).
    """
    preferred = Path(state_dir) / SOCKET_DIR
    if len(os.fsencode(str(preferred / "4194304.sock"))) <= _SUN_PATH_MAX:
        return preferred
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.fsencode(str(Path(state_dir).absolute()))).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"batchalign-supervise-{os.geteuid()}" / digest


def default_socket_path(state_dir: Path, pid: int | None = None) -> Path:
    """Where the supervisor with this state directory and ``pid`` (default: this process) listens."""
    return socket_dir(state_dir) / f"{os.getpid() if pid is None else int(pid)}.sock"


def list_sockets(state_dir: Path) -> list[Path]:
    """Every supervisor socket of this state directory, by pid; stale ones of dead processes are
    removed on the way (their pid is in the name, so a live one is never touched)."""
    found = []
    try:
        entries = sorted(socket_dir(state_dir).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    for p in entries:
        if p.suffix != ".sock" or not p.stem.isdigit():
            continue
        if not os.path.exists(f"/proc/{p.stem}"):
            try:
                os.unlink(p)
            except OSError:
                pass
            continue
        found.append(p)
    legacy = Path(state_dir) / SOCKET_NAME  # a fixed path an older release or a config named
    if legacy.exists():
        found.append(legacy)
    return sorted(found, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0))


async def snapshot_of(get_status: Callable[[], dict | Awaitable[dict]]) -> Any:
    """Call a status getter that may be plain or a coroutine function."""
    result = get_status()
    if inspect.isawaitable(result):
        result = await result
    return result


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def _check_length(path: Path) -> None:
    n = len(os.fsencode(str(path)))
    if n > _SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"socket path is {n} bytes, Unix sockets allow {_SUN_PATH_MAX}: {path}")


def _check_private(folder: Path) -> None:
    """Refuse a socket folder that someone else owns (a trap laid in a shared temporary dir)."""
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"{folder} is not a folder of this user; not listening there")


def _private_dir(folder: Path) -> None:
    """Make (or take) a folder of this user's, mode 0700. Two supervisors started at once both
    create it: the one that loses the race uses the other's, once it is checked to be ours."""
    if not folder.parent.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    _check_private(folder)


class ControlServer:
    """Answers status requests from the owner's ``batchalign-supervise status``."""

    READ_TIMEOUT = 5.0

    def __init__(self, socket_path: Path, get_status: Callable[[], dict | Awaitable[dict]],
                 info: dict | None = None) -> None:
        self.path = Path(socket_path)
        self._get_status = get_status
        self._info = dict(info or {})  # added to every snapshot: what this supervisor works on
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self._uid = os.geteuid()

    async def start(self) -> None:
        """Bind, replacing a stale socket of a dead supervisor; refuse if one is still listening."""
        path = self.path
        _check_length(path)
        d = path.parent
        if d.parent.name == f"batchalign-supervise-{os.geteuid()}":
            _private_dir(d.parent)
        _private_dir(d)
        self._refuse_if_taken(path)
        # Bind under a temporary name, restrict it, then rename into place: nobody ever sees the
        # real name with looser permissions, and a stale socket is replaced atomically.
        tmp = d / f".{path.name}.{os.getpid()}"
        _check_length(tmp)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            for p in (tmp,):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            raise
        self._inode = os.stat(path).st_ino

    async def stop(self) -> None:
        """Stop answering and remove the socket file, unless another server has replaced it since."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._inode is not None:
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._inode = None

    @staticmethod
    def _refuse_if_taken(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale: its supervisor is gone
        except PermissionError:
            raise OSError(errno.EACCES, f"{path} belongs to another user; not replacing it") from None
        except OSError:
            pass  # alive but not accepting (backlog full, timeout): treat as taken
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"another supervisor is already listening on {path}")

    async def _status(self) -> Any:
        status = await snapshot_of(self._get_status)
        if isinstance(status, dict) and self._info:
            status = {**self._info, **status, "socket": str(self.path)}
        return status

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            try:
                _, uid, _ = peer_credentials(sock)
            except OSError:
                uid = -1
            if uid not in (self._uid, 0):
                await self._reply(writer, {"ok": False, "error": f"permission denied: uid {uid} is not the "
                                                                 f"supervisor's owner (uid {self._uid}) or root"})
                # Read what the client sent so closing does not turn our answer into a reset.
                try:
                    await asyncio.wait_for(reader.read(MAX_LINE), 1.0)
                except (asyncio.TimeoutError, ConnectionError, OSError):
                    pass
                return
            try:
                line = await asyncio.wait_for(reader.readline(), self.READ_TIMEOUT)
            except asyncio.TimeoutError:
                await self._reply(writer, {"ok": False, "error": "no request line within "
                                                                 f"{self.READ_TIMEOUT:g}s"})
                return
            except ValueError:
                await self._reply(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                return
            if not line.strip():
                return  # a probe (or a client that gave up): nothing to answer
            try:
                req = json.loads(line)
            except ValueError:
                await self._reply(writer, {"ok": False, "error": "bad request: not a JSON line"})
                return
            cmd = req.get("cmd") if isinstance(req, dict) else None
            if cmd == "status":
                try:
                    status = await self._status()
                except Exception as exc:  # the loop's snapshot failing must not kill the server
                    await self._reply(writer, {"ok": False, "error": f"status unavailable: {exc}"})
                    return
                await self._reply(writer, {"ok": True, "status": status})
            elif cmd == "ping":
                await self._reply(writer, {"ok": True, "pid": os.getpid()})
            else:
                await self._reply(writer, {"ok": False, "error": f"unknown command {cmd!r}; known: status, ping"})
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict) -> None:
        data = json.dumps(obj, default=str, separators=(",", ":")).encode("utf-8") + b"\n"
        writer.write(data)
        await writer.drain()


def query_status(socket_path: Path, timeout: float = 5.0) -> dict:
    """Ask the supervisor listening on ``socket_path`` for its status snapshot (blocking).

    Raises NotListeningError ("no supervisor is listening on <path>"), ControlPermissionError, or
    ControlError for timeouts and bad answers; all are OSError, each with a one-line message.
    """
    path = Path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            _check_length(path)
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NotListeningError(f"no supervisor is listening on {path}") from None
        except PermissionError:
            raise ControlPermissionError(
                f"permission denied on {path}: the supervisor belongs to another user (ask as that user or root)"
            ) from None
        except socket.timeout:
            raise ControlError(f"timed out connecting to {path}") from None
        try:
            sock.sendall(b'{"cmd": "status"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass  # a refusing server may already have answered and closed; read its answer
        buf = bytearray()
        try:
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise ControlError(f"answer from {path} is larger than {MAX_ANSWER} bytes")
        except socket.timeout:
            raise ControlError(f"no answer from the supervisor on {path} within {timeout:g}s") from None
        except ConnectionResetError:
            if b"\n" not in buf:
                raise ControlError(f"the supervisor on {path} reset the connection") from None
    finally:
        sock.close()
    line = bytes(buf).split(b"\n", 1)[0]
    if not line:
        raise ControlError(f"the supervisor on {path} closed the connection without answering")
    try:
        resp = json.loads(line)
    except ValueError:
        raise ControlError(f"unreadable answer from {path}") from None
    if not isinstance(resp, dict):
        raise ControlError(f"unreadable answer from {path}")
    if not resp.get("ok"):
        message = str(resp.get("error") or "unknown error")
        if message.startswith("permission denied"):
            raise ControlPermissionError(f"refused by the supervisor on {path}: {message}")
        raise ControlError(f"the supervisor on {path} answered: {message}")
    status = resp.get("status")
    if not isinstance(status, dict):
        raise ControlError(f"the supervisor on {path} sent no status")
    return status


def listening_elsewhere(proc_net_unix: str = "/proc/net/unix") -> list[Path]:
    """Status sockets of this user's running supervisors whatever their state directory (a run
    given ``--state-dir``): listening Unix sockets named as ``default_socket_path`` names them,
    bound by a live process of this user. Empty where /proc cannot be read."""
    try:
        with open(proc_net_unix, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) < 8 or int(fields[3], 16) & 0x10000 == 0:  # __SO_ACCEPTCON: listening
            continue
        # ControlServer binds "<dir>/.<pid>.sock.<pid>" and renames it "<dir>/<pid>.sock": the
        # table keeps the name bound, as given (relative to the supervisor's working folder).
        m = re.fullmatch(r"(.*/)?\.(\d+)\.sock\.\d+", fields[7])
        if m is None:
            continue
        pid = m.group(2)
        path = Path((m.group(1) or "") + f"{pid}.sock")
        private = path.parent.parent.name == f"batchalign-supervise-{os.geteuid()}"
        if not (path.parent.name == SOCKET_DIR or private):
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
                continue
            if not path.is_absolute():
                path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
            if path.stat().st_uid != os.geteuid():
                continue
        except OSError:
            continue
        found.append(path)
    return found


def query_all(state_dir: Path, timeout: float = 5.0, elsewhere: bool = False) -> list[dict]:
    """The status of every running supervisor of this state directory (``elsewhere``: and of this
    user's others, whatever their state directory); one that fails to answer appears as
    ``{"socket": path, "error": "one line"}``."""
    out = []
    paths = list_sockets(state_dir)
    seen = {os.path.realpath(p) for p in paths}
    for p in listening_elsewhere() if elsewhere else ():
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            paths.append(p)
    for path in paths:
        try:
            status = query_status(path, timeout)
            status.setdefault("socket", str(path))
            out.append(status)
        except NotListeningError:
            continue
        except ControlError as exc:
            out.append({"socket": str(path), "error": str(exc)})
    return out


def select(statuses: list[dict], target: str) -> list[dict]:
    """Those of ``statuses`` whose pid is ``target``, or whose output folder (or corpus) is it."""
    if target.isdigit():
        return [s for s in statuses if str(s.get("pid")) == target]
    want = os.path.realpath(target)
    return [s for s in statuses
            if s.get("out") and os.path.realpath(s["out"]) == want
            or any(os.path.realpath(c) == want for c in s.get("corpus") or ())]


def format_list(statuses: list[dict], now: float | None = None) -> str:
    """One line per running supervisor, tab-separated so nothing is cut when piped."""
    rows = [("pid", "run", "started", "files", "memory", "out")]
    for s in statuses:
        if "error" in s:
            rows.append(("?", "-", "-", "-", "-", f"{s['socket']}: {s['error']}"))
            continue
        f = s.get("files") or {}
        mem = s.get("memory") or {}
        rows.append((str(s.get("pid", "?")), str(s.get("run", "?")), str(s.get("started") or "-"),
                     f"{f.get('done', 0)}/{f.get('total', '?')} done, {f.get('running', 0)} running",
                     f"{_size(mem.get('used_mb'))} of {_size(mem.get('budget_mb'))}",
                     str(s.get("out") or ", ".join(s.get("corpus") or ()) or "-")))
    return "\n".join("\t".join(r) for r in rows) + "\n"


# --------------------------------------------------------------------------------------------
# human view


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# The formatters are the shared ones, imported where a status is formatted: the server and the
# client need the standard library only (a query may come from another user's interpreter).
def _mib(v: Any) -> str:
    from supervisor.units import format_count

    return format_count(_num(v))


def _size(v: Any) -> str:
    from supervisor.units import format_mib

    return format_mib(_num(v))


def _dur(v: Any) -> str:
    from supervisor.units import format_duration

    return format_duration(_num(v))


def format_status(status: dict, queue_rows: int = 10) -> str:
    """A plain-text view of a status snapshot for ``batchalign-supervise status``."""
    from rich import box
    from rich.table import Table

    s = status or {}
    mem = s.get("memory") or {}
    files = s.get("files") or {}
    lines = [
        f"run {s.get('run', '?')}  pid {s.get('pid', '?')}  up {_dur(s.get('uptime_s'))}"
        + (f"  (since {s['started']})" if s.get("started") else "")
        + ("  DRAINING" if s.get("draining") else ""),
        f"memory used {_size(mem.get('used_mb'))} / budget {_size(mem.get('budget_mb'))} / "
        f"limit {_size(mem.get('limit_mb'))}"
        + (f"; committed {_size(mem.get('committed_mb'))}" if mem.get("committed_mb") is not None else "")
        + (f"; host available {_size(mem.get('available_mb'))}" if mem.get("available_mb") is not None else ""),
        "files " + ", ".join(f"{files.get(k, 0)} {k}" for k in ("done", "running", "pending", "failed",
                                                               "quarantined", "skipped"))
        + (f" (of {files['total']})" if files.get("total") is not None else ""),
    ]
    if s.get("draining"):
        lines.insert(1, "draining: running files finish, nothing new is admitted")
    audio_done, audio_total = _num(s.get("audio_done_s")), _num(s.get("audio_total_s"))
    if audio_done is not None:
        lines.append(f"audio {audio_done / 3600:.2f} h aligned"
                     + (f" of {audio_total / 3600:.2f} h" if audio_total else ""))
    lines.append(f"pauses {s.get('pauses', 0)}  kills {s.get('kills', 0)}")

    plain = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)
    parts: list[Any] = ["\n".join(lines)]
    workers = [w for w in s.get("workers") or () if isinstance(w, dict)]
    wt = Table(box=plain, title=f"Workers ({len(workers)})", title_justify="left", show_edge=False, pad_edge=False)
    for name, justify in (("worker", "left"), ("pid", "right"), ("state", "left"), ("file", "left"),
                          ("uss MiB", "right"), ("pred MiB", "right"), ("for", "right")):
        wt.add_column(name, justify=justify, overflow="fold")
    for w in workers:
        wt.add_row(str(w.get("worker", "?")), str(w.get("pid", "?")), str(w.get("state", "?")),
                   str(w.get("file") or "-"), _mib(w.get("uss_mb")), _mib(w.get("predicted_mb")),
                   _dur(w.get("since_s")))
    parts.append(wt if workers else "Workers: none")
    queue = [q for q in s.get("queue") or () if isinstance(q, dict)]
    if queue:
        shown = queue[: max(0, queue_rows)]
        qt = Table(box=plain, title="Next in queue", title_justify="left", show_edge=False, pad_edge=False)
        for name, justify in (("file", "left"), ("pred MiB", "right"), ("attempts", "right")):
            qt.add_column(name, justify=justify, overflow="fold")
        for q in shown:
            qt.add_row(str(q.get("file", "?")), _mib(q.get("predicted_mb")), str(q.get("attempts", 0)))
        parts.append(qt)
        pending = _num(files.get("pending"))
        rest = int(pending) - len(shown) if pending is not None else len(queue) - len(shown)
        if rest > 0:
            parts.append(f"... and {rest} more pending")
    from telemetry.report import render_plain

    return render_plain(parts)
