"""Fork server: import an engine's runtime once, then fork each worker from it on request.

A fresh interpreter holds ~260-290 MiB of private memory for torch, transformers and their heap;
workers forked from one process that imported them and froze its objects (``gc.freeze()``, so no
collector pass in a child writes to, and so copies, the pages those objects sit on) share those
pages copy-on-write. The supervisor never forks workers itself (it holds asyncio state, sockets and
a SQLite connection): it starts this process once and talks to it over a SOCK_SEQPACKET socket.

Requests (supervisor -> zygote): one message, JSON ``{"req": N, "argv": [...], "env": {...},
"cwd": str|null}`` carrying the child ends of the worker's stdin/stdout/stderr pipes (SCM_RIGHTS).
Replies (zygote -> supervisor): ``{"ready": pid}`` once imported, ``{"req": N, "pid": P}`` (or
``"error"``) per request, and ``{"exited": P, "returncode": rc}`` when a worker is reaped (negative
signal number on a signal, as asyncio reports it).

Lifetime: PR_SET_PDEATHSIG kills the zygote when the supervisor dies and each worker when the
zygote dies; the zygote also leaves when its control socket closes or its parent changes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys

from worker.__main__ import _set_parent_death_signal, keep_console_renderers_out

MAX_MESSAGE = 256 * 1024


def import_runtime(engine: str) -> None:
    """Import what every worker of ``engine`` imports, without loading a model or running torch."""
    keep_console_renderers_out()  # as the workers forked from here do
    if engine in ("wav2vec", "whisper"):
        import torch  # noqa: F401
        import transformers  # noqa: F401

        # transformers imports model classes lazily, on first attribute access: touch the ones the
        # engine loads so their modules sit in the shared pages too.
        if engine == "wav2vec":
            import worker.engines.wav2vec  # noqa: F401
            from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC  # noqa: F401
        else:
            import worker.engines.whisper  # noqa: F401
            from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: F401
            from transformers.modeling_outputs import BaseModelOutput  # noqa: F401
    elif engine == "synthetic":
        import worker.engines.synthetic  # noqa: F401
    import telemetry.logging  # noqa: F401
    import telemetry.model  # noqa: F401
    import worker.align  # noqa: F401 - every engine plans spans and reads CHAT with it
    import worker.engines.base  # noqa: F401


def _send(sock: socket.socket, msg: dict) -> None:
    sock.send(json.dumps(msg, separators=(",", ":")).encode())


def _child(fds: list[int], req: dict, zygote_pid: int) -> int:
    """Runs in the forked worker: become a session leader on the given pipes, then run the worker."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process: EPIPE raises instead
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()  # its own process group: the pool's SIGSTOP/SIGKILL reach it and its helpers
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    _set_parent_death_signal()  # the parent is the zygote now
    os.environ.clear()
    os.environ.update(req.get("env") or {})
    os.environ["BATCHALIGN_SUPERVISE_PARENT_PID"] = str(zygote_pid)
    if os.getppid() != zygote_pid:
        return 5  # protocol.EXIT_PARENT_GONE: the zygote died between fork and here
    if req.get("cwd"):
        os.chdir(req["cwd"])
    import worker.__main__ as entry

    sys.argv = [entry.__file__, *req["argv"]]
    return entry.main(list(req["argv"]))


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            _send(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})
        except OSError:
            pass


def serve(sock: socket.socket, parent: int) -> int:
    me = os.getpid()
    children: set[int] = set()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so the wakeup fd is written
    _send(sock, {"ready": me})
    while True:
        if parent and os.getppid() != parent:
            return 0
        readable, _, _ = select.select([sock, wake_r], [], [], 1.0)
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        _reap(sock, children)
        if sock not in readable:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 3)
        except OSError:
            return 0
        if not data:
            return 0  # the supervisor closed the control socket
        try:
            req = json.loads(data)
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            _send(sock, {"req": None, "error": str(exc)})
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(fds, req, me)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                except Exception:
                    pass
                os._exit(code)
        children.add(pid)
        for fd in fds:
            os.close(fd)
        _send(sock, {"req": req.get("req"), "pid": pid})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.zygote", description=__doc__)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--options", default="{}", help="engine options as JSON (unused until a worker loads)")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)

    _set_parent_death_signal()
    parent = int(os.environ.get("BATCHALIGN_SUPERVISE_PARENT_PID") or 0)
    if parent and os.getppid() != parent:
        return 5
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    sock = socket.socket(fileno=args.control_fd)
    sock.setblocking(True)
    import_runtime(args.engine)
    # Objects the workers never free need not be scanned by their collectors: a collection writes
    # to every tracked object's header and so copies the page it sits on.
    gc.collect()
    gc.freeze()
    try:
        return serve(sock, parent)
    except (BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
