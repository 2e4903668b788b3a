"""Status socket: round trip, owner-only modes, SO_PEERCRED refusal, stale sockets, clear errors."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

import supervisor.control as control_mod
from supervisor.control import (
    ControlError,
    ControlPermissionError,
    ControlServer,
    NotListeningError,
    default_socket_path,
    format_status,
    query_status,
)

pytestmark = pytest.mark.timeout(60)

STATUS = {
    "run": "20250314T093000-a1b2",
    "pid": 4242,
    "started": "2025-03-14T09:30:00Z",
    "uptime_s": 3725.0,
    "draining": True,
    "memory": {"used_mb": 9650.5, "budget_mb": 10240.0, "limit_mb": 12288.0, "available_mb": 20480.0,
               "committed_mb": 9900.0},
    "files": {"pending": 14, "running": 2, "done": 12, "failed": 1, "quarantined": 1, "skipped": 2, "total": 32},
    "audio_done_s": 4685.0,
    "audio_total_s": 9000.0,
    "kills": 2,
    "pauses": 5,
    "workers": [
        {"worker": "w0", "pid": 101, "state": "busy", "file": "eng/Brown/Adam/adam01.cha", "uss_mb": 3000.4,
         "pss_mb": 3300.0, "predicted_mb": 3100.0, "since_s": 75.0},
        {"worker": "w3", "pid": 104, "state": "starting", "file": None, "uss_mb": 300.0, "pss_mb": 310.0,
         "predicted_mb": None, "since_s": 2.0},
    ],
    "queue": [{"file": f"eng/q{i:02d}.cha", "predicted_mb": 2000.0 + i, "attempts": i % 2} for i in range(12)],
}


class LoopThread:
    """An event loop in a thread, so blocking clients (and subprocesses) can run in the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def shared():
    """A directory other users can traverse (pytest's tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="bas-ctl-", dir="/tmp"))
    os.chmod(d, 0o755)
    shutil.copy(control_mod.__file__, d / "control_copy.py")
    os.chmod(d / "control_copy.py", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_round_trip_and_owner_only_modes(loop, tmp_path):
    state = tmp_path / "state"  # does not exist yet: created 0700
    path = default_socket_path(state)
    assert path == state / "control" / f"{os.getpid()}.sock"
    calls = []

    def get_status() -> dict:
        calls.append(1)
        return dict(STATUS, where=Path("/srv/x"))  # a Path is sent as its string

    server = ControlServer(path, get_status)
    loop.run(server.start())
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert (os.lstat(path).st_mode & 0o777) == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        got = query_status(path)
        assert got["run"] == STATUS["run"] and got["memory"] == STATUS["memory"]
        assert got["workers"] == STATUS["workers"] and got["where"] == "/srv/x"
        assert len(calls) == 1
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary names left
    finally:
        loop.run(server.stop())
    assert not path.exists()


def test_async_status_and_errors_from_the_snapshot(loop, tmp_path):
    async def good() -> dict:
        await asyncio.sleep(0)
        return {"run": "r", "pid": 1}

    def bad() -> dict:
        raise RuntimeError("queue lock poisoned")

    p1, p2 = tmp_path / "a.sock", tmp_path / "b.sock"
    s1, s2 = ControlServer(p1, good), ControlServer(p2, bad)
    loop.run(s1.start())
    loop.run(s2.start())
    try:
        assert query_status(p1) == {"run": "r", "pid": 1}
        with pytest.raises(ControlError, match="queue lock poisoned"):
            query_status(p2)
        assert query_status(p1)["run"] == "r"  # the server survives both
    finally:
        loop.run(s1.stop())
        loop.run(s2.stop())


def test_protocol_errors_are_answered(loop, tmp_path):
    path = tmp_path / "c.sock"
    server = ControlServer(path, lambda: STATUS)
    loop.run(server.start())
    try:
        for request, expected in ((b"not json\n", "not a JSON line"), (b'{"cmd": "reboot"}\n', "unknown command")):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(5)
                c.connect(str(path))
                c.sendall(request)
                answer = json.loads(c.makefile("rb").readline())
            assert answer["ok"] is False and expected in answer["error"]
    finally:
        loop.run(server.stop())


def test_no_listener_gives_one_clear_line(tmp_path):
    missing = tmp_path / "nothing" / "control.sock"
    with pytest.raises(NotListeningError) as info:
        query_status(missing)
    assert str(info.value) == f"no supervisor is listening on {missing}"
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a supervisor killed with -9 leaves
    with pytest.raises(NotListeningError, match="no supervisor is listening on"):
        query_status(stale)
    assert isinstance(info.value, OSError)  # the CLI catches OSError


def test_stale_socket_is_replaced_but_live_ones_and_files_are_not(loop, tmp_path):
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    server = ControlServer(path, lambda: {"run": "new"})
    loop.run(server.start())
    try:
        assert query_status(path) == {"run": "new"}
        second = ControlServer(path, lambda: {"run": "intruder"})
        with pytest.raises(OSError, match="already listening"):
            loop.run(second.start())
        assert query_status(path) == {"run": "new"}
    finally:
        loop.run(server.stop())
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        loop.run(ControlServer(regular, dict).start())
    assert regular.read_text() == "keep me"


def test_stop_leaves_a_replacement_socket_alone(loop, tmp_path):
    path = tmp_path / "control.sock"
    old = ControlServer(path, lambda: {"run": "old"})
    loop.run(old.start())
    # an operator removes the socket and a new supervisor binds the same name
    os.unlink(path)
    new = ControlServer(path, lambda: {"run": "new"})
    loop.run(new.start())
    try:
        loop.run(old.stop())
        assert query_status(path) == {"run": "new"}
    finally:
        loop.run(new.stop())


def test_format_status_reads_well():
    text = format_status(STATUS)
    assert "\x1b" not in text and all(len(line) <= 120 for line in text.splitlines())
    for expected in ("run 20250314T093000-a1b2", "pid 4242", "up 1h02m", "DRAINING", "9.4 GiB", "10.0 GiB",
                     "12.0 GiB", "12 done", "14 pending", "pauses 5", "kills 2", "eng/Brown/Adam/adam01.cha",
                     "3,000", "3,100", "1m15s", "starting", "eng/q00.cha", "eng/q09.cha", "4 more pending"):
        assert expected in text, expected
    assert "eng/q10.cha" not in text
    assert format_status({})  # tolerant of an empty snapshot


# --------------------------------------------------------------------------------------------
# other users

CLIENT = textwrap.dedent(
    r'''
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("control_copy", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        status = mod.query_status(sys.argv[2], timeout=10)
        print(json.dumps({"ok": True, "run": status.get("run")}))
    except OSError as exc:
        print(json.dumps({"ok": False, "type": type(exc).__name__, "message": str(exc),
                          "permission": isinstance(exc, PermissionError)}))
    '''
)

SERVER = textwrap.dedent(
    r'''
    import asyncio, importlib.util, sys
    spec = importlib.util.spec_from_file_location("control_copy", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    async def main():
        server = mod.ControlServer(sys.argv[2], lambda: {"run": "served-by-nobody"})
        await server.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

    asyncio.run(main())
    '''
)


def _nobody() -> dict:
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process as another user")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this host")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _python_for(user: dict) -> str:
    for exe in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        if not exe:
            continue
        try:
            r = subprocess.run([exe, "-c", "import asyncio, json, socket"], capture_output=True, timeout=30,
                               cwd="/", **user)
        except OSError:
            continue
        if r.returncode == 0:
            return exe
    pytest.skip("no Python interpreter is usable by the unprivileged user")


def _as_nobody(shared: Path, sock: Path) -> dict:
    user = _nobody()
    script = shared / "client.py"
    script.write_text(CLIENT)
    os.chmod(script, 0o644)
    r = subprocess.run([_python_for(user), str(script), str(shared / "control_copy.py"), str(sock)],
                       capture_output=True, text=True, timeout=30, cwd=shared, env={"PATH": "/usr/bin:/bin"},
                       **user)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_other_user_is_refused_by_mode_and_by_peer_credentials(loop, shared):
    _nobody()
    state = shared / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # traversable on purpose: only the socket's own mode protects it now
    path = state / "control.sock"
    server = ControlServer(path, lambda: STATUS)
    loop.run(server.start())
    try:
        first = _as_nobody(shared, path)
        assert first["ok"] is False and first["permission"], first
        assert "permission denied" in first["message"]

        os.chmod(path, 0o666)  # loosened on purpose: the kernel lets nobody connect now
        second = _as_nobody(shared, path)
        assert second["ok"] is False and second["permission"], second
        assert "refused by the supervisor" in second["message"] and "uid" in second["message"]

        assert query_status(path)["run"] == STATUS["run"]  # the owner still gets through
    finally:
        loop.run(server.stop())


def test_root_may_query_another_users_supervisor(shared):
    user = _nobody()
    script = shared / "server.py"
    script.write_text(SERVER)
    os.chmod(script, 0o644)
    state = shared / "nobody-state"
    state.mkdir()
    os.chown(state, user["user"], user["group"])
    path = state / "control.sock"
    proc = subprocess.Popen([_python_for(user), str(script), str(shared / "control_copy.py"), str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=shared, env={"PATH": "/usr/bin:/bin"}, **user)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
        assert os.lstat(path).st_uid == user["user"] and (os.lstat(path).st_mode & 0o777) == 0o600
        assert query_status(path) == {"run": "served-by-nobody"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()
    assert not path.exists()


def test_several_supervisors_each_have_a_socket_and_a_deep_state_dir_still_gets_one(loop, tmp_path):
    from supervisor.control import list_sockets, query_all, select, socket_dir

    state = tmp_path / ("deep" * 20) / "state"  # socket paths may hold 107 bytes only
    d = socket_dir(state)
    assert len(str(d / "4194304.sock")) <= 107 and d == socket_dir(state)
    servers = [ControlServer(default_socket_path(state, pid), lambda pid=pid: {"pid": pid, "run": f"r{pid}"},
                             info={"out": str(tmp_path / f"out{pid}")}) for pid in (os.getpid(), 1)]
    for s in servers:
        loop.run(s.start())
    try:
        assert (d.stat().st_mode & 0o777) == 0o700
        found = list_sockets(state)
        assert [p.name for p in found] == ["1.sock", f"{os.getpid()}.sock"]
        statuses = loop.run(asyncio.to_thread(query_all, state))
        assert sorted(s["pid"] for s in statuses) == sorted([1, os.getpid()])
        assert [s["pid"] for s in select(statuses, str(tmp_path / "out1"))] == [1]
        assert [s["pid"] for s in select(statuses, str(os.getpid()))] == [os.getpid()]
    finally:
        for s in servers:
            loop.run(s.stop())
    # a socket left by a process that is gone is cleaned up, a live one's is not touched
    dead = d / "4194303.sock"
    dead.write_text("")
    assert list_sockets(state) == [] and not dead.exists()


def test_a_supervisor_that_loses_the_race_to_create_the_socket_folder_still_listens(loop, tmp_path, monkeypatch):
    """Two supervisors started together both find no socket folder; the one whose mkdir comes
    second must use the folder the first made, not run without a socket."""
    state = tmp_path / "state"
    path = default_socket_path(state)
    real_mkdir = Path.mkdir

    def first_made_by_another(self, *args, **kwargs):
        if self == path.parent and not self.exists():
            os.mkdir(self, 0o700)  # the other supervisor, just before us
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", first_made_by_another)
    server = ControlServer(path, lambda: {"pid": 7})
    loop.run(server.start())
    try:
        assert query_status(path)["pid"] == 7
        assert (path.parent.stat().st_mode & 0o777) == 0o700
    finally:
        loop.run(server.stop())
