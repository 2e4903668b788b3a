"""Host ledger: real processes sharing one file, dead and reused pids, staleness, other users."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import supervisor.ledger as ledger_mod
from supervisor.ledger import HostLedger, default_ledger_path, proc_start_time

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024

CHILD = textwrap.dedent(
    r'''
    import json, sys, time
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])  # a copy of the ledger and what it imports, readable by any user
    import supervisor.ledger as mod
    mode, path, owner, value = sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    MIB = 1024 * 1024
    ledger = mod.HostLedger(path)

    def wait_all(tag, peers, barrier):
        (barrier / f"{tag}.{owner}").touch()
        deadline = time.monotonic() + 30
        while not all((barrier / f"{tag}.{p}").exists() for p in peers):
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out at barrier {tag}")
            time.sleep(0.01)

    if mode == "concurrent":
        barrier, peers = Path(sys.argv[6]), sys.argv[7].split(",")
        ledger.register(owner)
        wait_all("ready", peers, barrier)
        seen_max, lost = 0, 0
        for i in range(200):
            ledger.update(owner, value + (i % 7) * 2 * MIB)  # always more than 1 MiB away: a real write
            seen_max = max(seen_max, ledger.others(owner))
            if owner not in {e["owner"] for e in ledger.entries()}:
                lost += 1
        ledger.update(owner, value)
        wait_all("done", peers, barrier)
        final = ledger.others(owner)
        wait_all("read", peers, barrier)
        print(json.dumps({"final": final, "seen_max": seen_max, "lost": lost}))
    elif mode == "claim":
        barrier, peers, room = Path(sys.argv[6]), sys.argv[7].split(","), int(sys.argv[8])
        ledger.register(owner)
        wait_all("ready", peers, barrier)
        ok, others = ledger.claim(owner, value, room,
                                  lambda rs: sum(r.reserved_bytes for r in rs) + value <= room)
        wait_all("claimed", peers, barrier)
        print(json.dumps({"ok": ok, "others": sum(r.reserved_bytes for r in others)}))
    elif mode == "once":
        ledger.update(owner, value)
        print(json.dumps({"pid": __import__("os").getpid()}))
    elif mode == "hold":
        ledger.update(owner, value)
        print(json.dumps({"others": ledger.others(owner)}), flush=True)
        for line in sys.stdin:  # one command per line until the parent closes stdin
            new = int(line)
            ledger.update(owner, new)
            print(json.dumps({"others": ledger.others(owner)}), flush=True)
    '''
)


# The ledger's own imports: stdlib only beyond these, so any user's python3 can run the copy.
LEDGER_FILES = ("supervisor/__init__.py", "supervisor/ledger.py", "supervisor/sampler.py", "supervisor/units.py",
                "supervisor/paths.py", "worker/__init__.py", "worker/output.py")


@pytest.fixture
def shared(tmp_path_factory):
    """A directory every user can reach (pytest's tmp dirs are 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="bas-ledger-", dir="/tmp"))
    os.chmod(d, 0o755)
    root = Path(ledger_mod.__file__).resolve().parents[1]
    for rel in LEDGER_FILES:
        (d / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.chmod((d / "pkg" / rel).parent, 0o755)
        shutil.copy(root / rel, d / "pkg" / rel)
        os.chmod(d / "pkg" / rel, 0o644)
    os.chmod(d / "pkg", 0o755)
    (d / "child.py").write_text(CHILD)
    os.chmod(d / "child.py", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _spawn(shared: Path, mode: str, path: Path, owner: str, value: int, *extra: str, python: str | None = None,
           user: dict | None = None, stdin=None) -> subprocess.Popen:
    args = [python or sys.executable, str(shared / "child.py"), str(shared / "pkg"), mode, str(path),
            owner, str(value), *extra]
    return subprocess.Popen(args, cwd=shared, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=stdin, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, **(user or {}))


def _nobody() -> dict:
    if os.geteuid() != 0:
        pytest.skip("needs root to start a child as another user")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this host")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _python_for(user: dict) -> str:
    """An interpreter the demoted child can execute (a venv under /root is out of its reach)."""
    for exe in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]):
        if not exe:
            continue
        try:
            r = subprocess.run([exe, "-c", "import fcntl, json, pwd"], capture_output=True, timeout=30, cwd="/",
                               **user)
        except OSError:
            continue
        if r.returncode == 0:
            return exe
    pytest.skip("no Python interpreter is usable by the unprivileged user")


def test_two_processes_see_each_other_concurrently(shared):
    path = shared / "run" / "ledger.json"
    barrier = shared / "barrier"
    barrier.mkdir()
    peers = "alice,bob"
    a = _spawn(shared, "concurrent", path, "alice", 100 * MIB, str(barrier), peers)
    b = _spawn(shared, "concurrent", path, "bob", 300 * MIB, str(barrier), peers)
    out_a, err_a = a.communicate(timeout=50)
    out_b, err_b = b.communicate(timeout=50)
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    ra, rb = json.loads(out_a), json.loads(out_b)
    assert ra["final"] == 300 * MIB and rb["final"] == 100 * MIB
    assert ra["seen_max"] >= 300 * MIB and rb["seen_max"] >= 100 * MIB
    assert ra["lost"] == 0 and rb["lost"] == 0  # no write ever dropped another process's entry
    assert (path.parent.stat().st_mode & 0o7777) == 0o1777
    assert (path.stat().st_mode & 0o777) == 0o666
    # both are gone now: their entries are removed by the next reader
    assert HostLedger(path).others("someone-else") == 0
    assert json.loads(path.read_text())["entries"] == {}


def test_of_two_supervisors_claiming_the_same_free_memory_at_once_exactly_one_gets_it(shared):
    """Each of two processes, released together, claims 600 of 1000 MiB free: reading the other's
    promise and writing its own are one step under the lock, so one is granted and the other sees
    the winner's promise; a read at one moment and a write at another would let both in."""
    room, want = 1000 * MIB, 600 * MIB
    for round_ in range(8):
        path = shared / f"claim{round_}" / "ledger.json"
        barrier = shared / f"barrier{round_}"
        barrier.mkdir()
        procs = [_spawn(shared, "claim", path, name, want, str(barrier), "a,b", str(room)) for name in ("a", "b")]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=40)
            assert p.returncode == 0, err
            outs.append(json.loads(out))
        assert sorted(o["ok"] for o in outs) == [False, True], outs
        (loser,) = [o for o in outs if not o["ok"]]
        assert loser["others"] == want  # it saw the winner's promise, and wrote none of its own
        entries = json.loads(path.read_text())["entries"]
        assert sorted(e["reserved_bytes"] for e in entries.values()) == [0, want]


def test_dead_process_entry_is_removed(shared):
    path = shared / "ledger.json"
    p = _spawn(shared, "once", path, "ghost", 512 * MIB)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    raw = json.loads(path.read_text())["entries"]
    assert raw["ghost"]["reserved_bytes"] == 512 * MIB and raw["ghost"]["pid"] == json.loads(out)["pid"]
    mine = HostLedger(path)
    mine.register("me")
    assert mine.others("me") == 0
    assert [e["owner"] for e in mine.entries()] == ["me"]


def test_reused_pid_is_detected_by_start_time(shared):
    path = shared / "ledger.json"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        real_start = proc_start_time(sleeper.pid)
        assert real_start is not None
        ledger = HostLedger(path)
        ledger.register("me")
        entries = json.loads(path.read_text())["entries"]
        now = time.time()
        base = {"user": "x", "uid": os.getuid(), "updated": now}
        entries["reused"] = dict(base, owner="reused", pid=sleeper.pid, pid_start_time=real_start - 1,
                                 reserved_bytes=700 * MIB)
        entries["genuine"] = dict(base, owner="genuine", pid=sleeper.pid, pid_start_time=real_start,
                                  reserved_bytes=200 * MIB)
        path.write_text(json.dumps({"version": 1, "entries": entries}))
        assert ledger.others("me") == 200 * MIB
        assert sorted(e["owner"] for e in ledger.entries()) == ["genuine", "me"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ledger.others("me") == 0  # the genuine owner died too


def test_entries_not_refreshed_go_stale():
    now = [1000.0]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "l" / "ledger.json"
        a = HostLedger(path, stale_after=60, clock=lambda: now[0])
        b = HostLedger(path, stale_after=60, clock=lambda: now[0])
        a.update("a", 64 * MIB)
        assert b.others("b") == 64 * MIB
        now[0] += 59
        assert b.others("b") == 64 * MIB
        now[0] += 2
        assert b.others("b") == 0
        assert "a" not in {e["owner"] for e in b.entries()}


def test_unchanged_values_skip_the_write(tmp_path):
    now = [0.0]
    path = tmp_path / "ledger.json"
    ledger = HostLedger(path, stale_after=60, clock=lambda: now[0])
    ledger.update("me", 100 * MIB)
    ino = path.stat().st_ino
    for delta in (0, MIB // 2, -MIB):
        now[0] += 1
        ledger.update("me", 100 * MIB + delta)
        assert path.stat().st_ino == ino
    now[0] += 1
    ledger.update("me", 103 * MIB)
    assert path.stat().st_ino != ino
    ino = path.stat().st_ino
    now[0] += 16  # past stale_after / 4: refreshed even though the value is the same
    ledger.update("me", 103 * MIB)
    assert path.stat().st_ino != ino
    (entry,) = ledger.entries()
    assert entry["updated"] == now[0] and entry["reserved_bytes"] == 103 * MIB
    assert entry["pid"] == os.getpid() and entry["pid_start_time"] == proc_start_time(os.getpid())
    assert entry["user"] == pwd.getpwuid(os.geteuid()).pw_name


def test_corrupt_ledger_is_rebuilt(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "entries": {"x": {"pid"')
    ledger = HostLedger(path)
    assert ledger.others("me") == 0
    ledger.register("me")
    assert [e["owner"] for e in ledger.entries()] == ["me"]
    ledger.unregister("me")
    assert ledger.entries() == []


def test_another_user_can_update_the_same_ledger(shared):
    user = _nobody()
    python = _python_for(user)
    path = shared / "run" / "ledger.json"
    mine = HostLedger(path)
    mine.update("root-run", 50 * MIB)  # root creates the file: the child must write into root's file
    assert path.stat().st_uid == 0
    child = _spawn(shared, "hold", path, "nobody-run", 200 * MIB, python=python, user=user, stdin=subprocess.PIPE)
    try:
        first = json.loads(child.stdout.readline() or "{}")
        assert first.get("others") == 50 * MIB, child.stderr.read() if child.poll() is not None else first
        assert mine.others("root-run") == 200 * MIB
        users = {e["owner"]: e["user"] for e in mine.entries()}
        assert users["nobody-run"] == "nobody"
        # nobody may not rename over root's file in the sticky directory: it rewrote it in place
        assert path.stat().st_uid == 0 and (path.stat().st_mode & 0o777) == 0o666
        # root writes again (a rename: the file is root's), then the child updates in place once more
        mine.update("root-run", 80 * MIB)
        child.stdin.write(f"{900 * MIB}\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline())["others"] == 80 * MIB
        assert mine.others("root-run") == 900 * MIB
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0, child.stderr.read()
    assert mine.others("root-run") == 0  # the child exited


def test_default_path_is_a_shared_run_dir():
    p = default_ledger_path()
    assert p.name == "ledger.json"
    assert p.parent in (Path("/run/batchalign-supervise"), Path("/tmp/batchalign-supervise"))
    if os.access("/run", os.W_OK):
        assert p.parent == Path("/run/batchalign-supervise")


# -- scope and trust ------------------------------------------------------------------------------


def _scope(uid, cgroup=None, headroom=None):
    from supervisor.sampler import ProcScope

    return lambda pid: ProcScope(pid=pid, uid=uid, start_time=None, cgroup=cgroup, headroom=headroom)


def _forge(path: Path, **entry) -> None:
    data = json.loads(path.read_text())
    base = {"owner": "forged", "user": "x", "updated": time.time(), "pid_start_time": None}
    data["entries"][entry.get("owner", "forged")] = {**base, **entry}
    path.write_text(json.dumps(data))


def test_an_entry_is_believed_only_for_the_uid_that_owns_its_pid(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = HostLedger(path)
    ledger.register("me")
    # A live pid (ours, uid 0 here) claimed by another uid: a forged line, not believed.
    _forge(path, pid=os.getpid(), uid=os.getuid() + 1234, reserved_bytes=100 << 30)
    assert ledger.others("me") == 0
    _forge(path, pid=os.getpid(), uid=os.getuid(), reserved_bytes=300 * MIB)
    assert ledger.others("me") == 300 * MIB


def test_a_reservation_counts_for_at_most_what_its_process_could_still_take(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = HostLedger(path, scope=_scope(os.getuid(), "/sys/fs/cgroup/box", headroom=2 << 30))
    ledger.register("me")
    _forge(path, pid=os.getpid(), uid=os.getuid(), reserved_bytes=100 << 30)  # "100 GiB reserved"
    (r,) = ledger.reservations("me", host_available=8 << 30)
    assert r.claimed_bytes == 100 << 30 and r.reserved_bytes == 2 << 30  # its cgroup's headroom
    assert r.cgroup == "/sys/fs/cgroup/box"
    free = HostLedger(path, scope=_scope(os.getuid()))
    assert free.others("me", host_available=8 << 30) == 8 << 30  # no cgroup: the host's MemAvailable


def test_entries_record_their_cgroup(tmp_path):
    from supervisor.sampler import memory_cgroup

    ledger = HostLedger(tmp_path / "ledger.json")
    ledger.register("me")
    (entry,) = ledger.entries()
    view = memory_cgroup()
    assert entry["cgroup"] == (str(view.path) if view is not None else None)


def test_promises_take_room_only_from_the_memory_they_would_come_from():
    from supervisor.ledger import Reservation, charged

    def res(mb, cg):
        return Reservation(owner="o", pid=1, uid=0, cgroup=cg, claimed_bytes=mb * MIB, reserved_bytes=mb * MIB)

    host, headroom = 20_000 * MIB, 3000 * MIB
    # Another supervisor on the host, outside our cgroup: the host has plenty, our cgroup is untouched.
    assert charged([res(5000, "/cg/other")], host_available=host, cgroup_headroom=headroom, own_cgroup="/cg/mine") == 0
    # Inside our cgroup (or a child of it): it comes out of our headroom.
    assert charged([res(1000, "/cg/mine/child")], host_available=host, cgroup_headroom=headroom,
                   own_cgroup="/cg/mine") == 1000 * MIB
    # Outside, but the host itself runs short: the host's share limits us.
    assert charged([res(18_000, "/cg/other")], host_available=host, cgroup_headroom=headroom,
                   own_cgroup="/cg/mine") == 1000 * MIB
    # A supervisor outside any limited cgroup: every promise comes from the host.
    assert charged([res(700, "/cg/mine")], host_available=host, cgroup_headroom=None, own_cgroup=None) == 700 * MIB


def test_a_supervisor_in_its_own_cgroup_is_not_held_back_by_a_host_supervisors_promises(tmp_path):
    """Two real supervisors: A on the host promises far more than B's cgroup holds; B, inside a
    real memory cgroup, must not subtract A's promise from its cgroup headroom."""
    from helpers import cli_args, env_for, events, named, wait_for_event

    from bench.synth_corpus import make_corpus
    from supervisor.cgroups import MemoryCgroup

    ledger = tmp_path / "ledger" / "ledger.json"
    make_corpus(tmp_path / "a", [60, 60], seed=1)
    make_corpus(tmp_path / "b", [10, 10, 10, 10, 10, 10], seed=2)
    common = dict(BATCHALIGN_SUPERVISE_MEMORY_LEDGER=str(ledger),
                  BATCHALIGN_SUPERVISE_MEMORY_SAMPLE_LOG_INTERVAL="0.25s",
                  BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_MB_PER_AUDIO_SECOND="0.5")
    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    # A: cold estimate 20 MiB per audio second (1.2 GiB promised per file), real growth tiny, slow.
    a = subprocess.Popen(cli_args(tmp_path / "a", tmp_path / "out-a", "--memory-budget", "3GiB", "--workers", "2",
                                  "--log-json", str(a_log), "--state-dir", str(tmp_path / "sa")),
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env_for(tmp_path, **common,
                                     BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_COLD_MB_PER_SPAN_SECOND="20",
                                     BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CALIBRATE="false",
                                     BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.3"))
    try:
        wait_for_event(a_log, "file_admitted", timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # A's promise is in the ledger
            entries = json.loads(ledger.read_text())["entries"] if ledger.exists() else {}
            if any(e.get("reserved_bytes", 0) > 1000 * MIB for e in entries.values()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("supervisor A never published its promise")
        with MemoryCgroup(f"bas-scope-{os.getpid()}", 900 * MIB) as cg:
            b = subprocess.run(cli_args(tmp_path / "b", tmp_path / "out-b", "--reserve", "100MiB", "--workers", "2",
                                        "--log-json", str(b_log), "--state-dir", str(tmp_path / "sb")),
                               cwd=tmp_path, preexec_fn=cg.preexec(), capture_output=True, text=True, timeout=120,
                               env=env_for(tmp_path, **common,
                                           BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_COLD_MB_PER_SPAN_SECOND="9",
                                           BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.02"))
        a_running = a.poll() is None
    finally:
        a.kill()
        a.wait()
    assert b.returncode == 0, b.stderr[-3000:]
    assert a_running, "A finished before B: the test did not overlap the two runs"
    b_evs = events(b_log)
    assert named(b_evs, "run_started")[0]["limit_mb"] == 900.0
    assert len(named(b_evs, "file_done")) == 6
    assert all(e.get("others_reserved_mb", 0) == 0 for e in named(b_evs, "memory_sample"))
    assert not named(b_evs, "worker_paused")


def test_belief_in_an_entry_is_decided_from_what_was_sensed():
    from supervisor.ledger import alive, believe
    from supervisor.sampler import ProcScope

    entry = {"pid": 4242, "uid": 1000, "reserved_bytes": 100 << 30, "pid_start_time": 77}
    mine = ProcScope(pid=4242, uid=1000, start_time=77, cgroup="/lab/a", headroom=2 << 30)
    r = believe("a", entry, mine, host_available=8 << 30)
    assert r is not None and r.claimed_bytes == 100 << 30 and r.reserved_bytes == 2 << 30  # capped
    assert believe("a", entry, ProcScope(4242, 0, 77, None, None), 8 << 30) is None  # another uid's pid
    assert believe("a", entry, None, 8 << 30) is None  # cannot be checked
    assert believe("a", {"pid": "x"}, mine, None) is None
    assert alive(entry, 77, True) and not alive(entry, 78, True)  # a reused pid is another process
    assert alive(entry, None, True) and not alive(entry, None, False)
