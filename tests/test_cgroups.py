import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from supervisor.cgroups import MemoryCgroup, cgroups_available

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not cgroups_available(),
        reason="needs root and a writable memory cgroup hierarchy (v1 memory controller, or v2 with memory delegated)",
    ),
]

REPORT = textwrap.dedent(
    """
    import dataclasses, json
    from supervisor.sampler import ProcSampler, detect_limits
    limits = dataclasses.asdict(detect_limits())
    print(json.dumps({"limits": limits, "available": ProcSampler().host().available}))
    """
)


def name() -> str:
    return f"bas-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run_inside(cg: MemoryCgroup, code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], preexec_fn=cg.preexec(), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=45, **kw)


def test_limit_seen_from_inside():
    with MemoryCgroup(name(), 256 * MiB) as cg:
        assert cg.path.is_dir()
        result = run_inside(cg, REPORT)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        limits = report["limits"]
        assert limits["limit"] == 256 * MiB
        assert str(cg.path) in limits["source"]
        assert limits["cgroup_path"] == str(cg.path)
        assert limits["reserve"] == 128 * MiB and limits["budget"] == 128 * MiB
        assert report["available"] <= 256 * MiB
        assert cg.max_usage() is None or cg.max_usage() >= 4 * MiB
        assert cg.oom_kills() == 0


def test_overuse_is_oom_killed_and_counted():
    with MemoryCgroup(name(), 256 * MiB) as cg:
        result = run_inside(cg, "x = b'x' * (400 << 20); print('survived')")
        assert result.returncode == -9, (result.returncode, result.stdout, result.stderr)
        assert "survived" not in result.stdout
        assert cg.oom_kills() >= 1
        peak = cg.max_usage()
        assert peak is None or 200 * MiB <= peak <= 256 * MiB


def test_exit_kills_remaining_tasks_and_removes_directory():
    cg = MemoryCgroup(name(), 128 * MiB)
    with cg:
        sleeper = subprocess.Popen(["sleep", "120"], preexec_fn=cg.preexec())
        assert sleeper.pid in cg.pids()
        assert cg.usage() > 0
    assert sleeper.wait(timeout=10) == -9
    assert not cg.path.exists()
    assert not any(p.name.startswith(f"bas-test-{os.getpid()}-") for p in cg.parent.iterdir())


def test_add_moves_a_running_process():
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        with MemoryCgroup(name(), 128 * MiB) as cg:
            cg.add(sleeper.pid)
            assert cg.pids() == [sleeper.pid]
            assert cg.name in Path(f"/proc/{sleeper.pid}/cgroup").read_text()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_caller_added_to_its_own_cgroup_is_moved_out_not_killed():
    before = Path("/proc/self/cgroup").read_text()
    with MemoryCgroup(name(), 1024 * MiB) as cg:
        cg.add(os.getpid())
        assert os.getpid() in cg.pids()
    assert not cg.path.exists()
    assert Path("/proc/self/cgroup").read_text() == before


def test_bad_names_and_taken_names():
    with pytest.raises(ValueError):
        MemoryCgroup("a/b", 64 * MiB)
    with pytest.raises(ValueError):
        MemoryCgroup("..", 64 * MiB)
    with pytest.raises(ValueError):
        MemoryCgroup(name(), 0)
    with MemoryCgroup(name(), 64 * MiB) as cg:
        with pytest.raises(FileExistsError):
            MemoryCgroup(cg.name, 64 * MiB, root=cg.parent).create()
        assert cg.path.is_dir()
    assert not cg.path.exists()
