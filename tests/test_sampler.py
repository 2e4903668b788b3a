import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supervisor.sampler import (
    GiB,
    HostMem,
    ProcSampler,
    cgroup_oom_kills,
    clear_hwm,
    default_reserve,
    detect_limits,
    memory_cgroup,
    read_hwm,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"

# A child that obeys one-line commands on stdin, so tests can make it grow, shrink and fork.
CHILD = textwrap.dedent(
    """
    import subprocess, sys
    held = []
    kids = []
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "alloc":
            held.append(b"x" * (int(arg) << 20))  # bytes * n writes every page: resident
        elif cmd == "free":
            held.clear()
        elif cmd == "spawn":
            kid = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
            kid.stdin.write(f"alloc {arg}\\n")
            kid.stdin.flush()
            kid.stdout.readline()
            kids.append(kid)
            print(kid.pid)
            sys.stdout.flush()
            continue
        print("ok", flush=True)
    for kid in kids:
        kid.stdin.close()
        kid.wait()
    """
)


class Child:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid
        assert self.send("free") == "ok"  # the interpreter is up: readings are not of a half-exec'd process

    def send(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def child():
    c = Child()
    yield c
    c.close()


# -- real processes ------------------------------------------------------------------------------


def test_tree_includes_grandchild(child):
    grandchild = int(child.send("spawn 200"))
    sampler = ProcSampler()
    whole = sampler.tree(child.pid, exact=True)
    alone = sampler.tree(grandchild, exact=True)
    assert whole is not None and alone is not None and whole.exact
    assert whole.pid == child.pid
    for m in (whole, alone):
        assert 200 * MiB <= m.uss <= 400 * MiB
        assert m.uss <= m.pss <= m.rss
        assert 200 * MiB <= m.rss <= 500 * MiB
    # The child alone is a small interpreter; the tree is child + grandchild.
    assert whole.uss >= alone.uss + 2 * MiB
    assert whole.uss - alone.uss < 150 * MiB
    # hwm is the root's own peak, not the tree's.
    assert whole.hwm is not None and whole.hwm < 150 * MiB
    assert alone.hwm is not None and alone.hwm >= 200 * MiB


def test_tree_of_dead_and_zombie_pid_is_none():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert ProcSampler().tree(proc.pid) is None

    zombie = subprocess.Popen(["sleep", "30"])
    sampler = ProcSampler()
    assert sampler.tree(zombie.pid) is not None
    zombie.kill()
    deadline = time.monotonic() + 10
    while "State:\tZ" not in Path(f"/proc/{zombie.pid}/status").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert sampler.tree(zombie.pid) is None  # exited, not yet reaped
    finally:
        zombie.wait()
    assert sampler.tree(zombie.pid) is None


def test_hwm_stays_high_until_cleared(child):
    child.send("alloc 200")
    child.send("free")
    current = ProcSampler().tree(child.pid, exact=True)
    assert current is not None and current.rss < 120 * MiB
    hwm = read_hwm(child.pid)
    assert hwm is not None and hwm >= 200 * MiB
    assert clear_hwm(child.pid)
    after = read_hwm(child.pid)
    assert after is not None and after < 120 * MiB
    child.send("alloc 50")
    grown = read_hwm(child.pid)
    assert grown is not None and after + 40 * MiB <= grown < 200 * MiB


def test_hwm_of_missing_process():
    assert read_hwm(2**22 + 12345) is None
    assert clear_hwm(2**22 + 12345) is False


def test_estimate_follows_anonymous_growth_between_walks(child):
    sampler = ProcSampler(min_exact_interval=1000, max_exact_interval=1000)
    first = sampler.tree(child.pid)
    assert first is not None and first.exact
    child.send("alloc 100")
    second = sampler.tree(child.pid)
    assert second is not None and not second.exact
    assert 95 * MiB <= second.uss - first.uss <= 110 * MiB
    assert 95 * MiB <= second.pss - first.pss <= 110 * MiB
    exact = sampler.tree(child.pid, exact=True)
    assert exact is not None and exact.exact
    assert abs(exact.uss - second.uss) < 8 * MiB


def test_new_grandchild_found_after_children_interval(child):
    clock = [0.0]
    sampler = ProcSampler(children_interval=1.0, clock=lambda: clock[0])
    before = sampler.tree(child.pid)
    assert before is not None
    child.send("spawn 64")
    assert sampler.tree(child.pid).uss < before.uss + 32 * MiB  # cached member list
    clock[0] = 1.5
    after = sampler.tree(child.pid)
    assert after.uss >= before.uss + 60 * MiB


def test_real_host_reading():
    host = ProcSampler().host()
    assert isinstance(host, HostMem)
    assert 0 < host.available <= host.total
    assert host.swap_free >= 0
    if Path("/proc/pressure/memory").exists():
        try:
            Path("/proc/pressure/memory").read_text()
        except OSError:
            return
        assert host.psi_some_avg10 is not None and host.psi_some_avg10 >= 0


# -- fake /proc ------------------------------------------------------------------------------------

MEMINFO = "MemTotal:       {total} kB\nMemFree:         1000 kB\nMemAvailable:   {avail} kB\nSwapTotal: 0 kB\nSwapFree:       {swap} kB\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_proc(tmp_path: Path, *, total=16 * GiB, avail=12 * GiB, swap=0, cgroup="0::/\n", psi=None) -> Path:
    proc = tmp_path / "proc"
    write(proc / "meminfo", MEMINFO.format(total=total // 1024, avail=avail // 1024, swap=swap // 1024))
    write(proc / "self" / "cgroup", cgroup)
    if psi is not None:
        write(proc / "pressure" / "memory", psi)
    return proc


def fake_process(proc: Path, pid: int, ppid: int, *, anon_mb: int, file_mb: int = 0, uss_mb: int, pss_mb: int,
                 swap_mb: int = 0, hwm_mb: int = 0, children=(), state="S (sleeping)", children_files=True) -> None:
    d = proc / str(pid)
    kb = 1024
    write(d / "status", f"Name:\tfake\nUmask:\t0022\nState:\t{state}\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t{ppid}\n"
          f"VmPeak:\t 999 kB\nVmHWM:\t{hwm_mb * kb} kB\nVmRSS:\t{(anon_mb + file_mb) * kb} kB\n"
          f"RssAnon:\t{anon_mb * kb} kB\nRssFile:\t{file_mb * kb} kB\nRssShmem:\t0 kB\n"
          f"VmSwap:\t{swap_mb * kb} kB\nThreads:\t1\n")
    write(d / "smaps_rollup", f"00400000-7fff0000 ---p 00000000 00:00 0    [rollup]\n"
          f"Rss:  {(anon_mb + file_mb) * kb} kB\nPss:  {pss_mb * kb} kB\nShared_Clean: 0 kB\n"
          f"Private_Clean:  {(uss_mb // 2) * kb} kB\nPrivate_Dirty:  {(uss_mb - uss_mb // 2) * kb} kB\n"
          f"Swap:  {swap_mb * kb} kB\nSwapPss: 0 kB\n")
    write(d / "stat", f"{pid} (fake (x) y) S {ppid} {pid} {pid} 0 -1 0 0 0\n")
    (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
    if children_files:
        write(d / "task" / str(pid) / "children", "".join(f"{c} " for c in children))


@pytest.mark.parametrize("children_files", [True, False], ids=["task-children", "stat-scan"])
def test_fake_tree_sums_descendants_and_skips_vanished(tmp_path, children_files):
    proc = fake_proc(tmp_path)
    fake_process(proc, 100, 1, anon_mb=300, file_mb=100, uss_mb=280, pss_mb=330, hwm_mb=500,
                 children=(101, 999), children_files=children_files)
    fake_process(proc, 101, 100, anon_mb=50, uss_mb=45, pss_mb=48, swap_mb=7, children=(102,),
                 children_files=children_files)
    fake_process(proc, 102, 101, anon_mb=20, uss_mb=20, pss_mb=20, children_files=children_files)
    fake_process(proc, 200, 1, anon_mb=10, uss_mb=10, pss_mb=10, children_files=children_files)
    # 999 is listed as a child of 100 but has no /proc entry: it vanished mid-read.
    m = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg").tree(100)
    assert m is not None and m.exact
    assert m.pid == 100
    assert m.rss == (400 + 50 + 20) * MiB
    assert m.uss == (280 + 45 + 20) * MiB
    assert m.pss == (330 + 48 + 20) * MiB
    assert m.swap == 7 * MiB
    assert m.hwm == 500 * MiB


def test_fake_estimates_between_walks_and_walk_when_due(tmp_path):
    proc = fake_proc(tmp_path)
    fake_process(proc, 100, 1, anon_mb=300, file_mb=100, uss_mb=280, pss_mb=330)
    clock = [0.0]
    s = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg", clock=lambda: clock[0],
                    min_exact_interval=5.0, max_exact_interval=5.0)
    assert s.tree(100).uss == 280 * MiB
    # Anonymous growth of 50 MiB: private, so USS and PSS both move; smaps is not re-read yet.
    fake_process(proc, 100, 1, anon_mb=350, file_mb=100, uss_mb=1, pss_mb=1)
    clock[0] = 1.0
    m = s.tree(100)
    assert not m.exact
    assert (m.uss, m.pss, m.rss) == (330 * MiB, 380 * MiB, 450 * MiB)
    # File-backed growth below the drift threshold: PSS takes it whole, USS does not.
    fake_process(proc, 100, 1, anon_mb=350, file_mb=164, uss_mb=1, pss_mb=1)
    m = s.tree(100)
    assert (m.uss, m.pss) == (330 * MiB, 444 * MiB)
    # Past the schedule the walk happens and the estimate is replaced.
    clock[0] = 6.0
    m = s.tree(100)
    assert m.exact and (m.uss, m.pss) == (1 * MiB, 1 * MiB)


def test_fake_large_file_mapping_brings_walk_forward(tmp_path):
    proc = fake_proc(tmp_path)
    fake_process(proc, 100, 1, anon_mb=100, file_mb=0, uss_mb=100, pss_mb=100)
    clock = [0.0]
    s = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg", clock=lambda: clock[0],
                    min_exact_interval=1.0, max_exact_interval=100.0, shared_drift=128 * MiB)
    s.tree(100)
    fake_process(proc, 100, 1, anon_mb=100, file_mb=2000, uss_mb=100, pss_mb=700)  # a shared model mapped
    clock[0] = 0.5
    assert not s.tree(100).exact  # not before min_exact_interval
    clock[0] = 1.5
    m = s.tree(100)
    assert m.exact and m.pss == 700 * MiB and m.uss == 100 * MiB


def test_fake_root_exit_brings_other_walks_forward(tmp_path):
    proc = fake_proc(tmp_path)
    for pid in (100, 200, 300):
        fake_process(proc, pid, 1, anon_mb=10, file_mb=500, uss_mb=10, pss_mb=260)
    clock = [0.0]
    s = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg", clock=lambda: clock[0],
                    min_exact_interval=100.0, max_exact_interval=100.0)
    for pid in (100, 200, 300):
        s.tree(pid)
    shutil.rmtree(proc / "100")
    for pid in (200, 300):  # the shared pages are now split two ways, not three
        fake_process(proc, pid, 1, anon_mb=10, file_mb=500, uss_mb=10, pss_mb=385)
    clock[0] = 1.0
    assert s.tree(100) is None
    clock[0] = 2.0
    assert s.tree(200).pss == 385 * MiB and s.tree(300).pss == 385 * MiB


def test_fake_zombie_root_is_none(tmp_path):
    proc = fake_proc(tmp_path)
    write(proc / "100" / "status", "Name:\tx\nState:\tZ (zombie)\nPPid:\t1\n")
    assert ProcSampler(proc=proc, cgroup_root=tmp_path / "cg").tree(100) is None
    assert ProcSampler(proc=proc, cgroup_root=tmp_path / "cg").tree(101) is None


# -- PSI and host ---------------------------------------------------------------------------------


def test_psi_parsed(tmp_path):
    psi = "some avg10=1.25 avg60=0.50 avg300=0.10 total=12345\nfull avg10=0.75 avg60=0.20 avg300=0.00 total=678\n"
    proc = fake_proc(tmp_path, total=16 * GiB, avail=12 * GiB, swap=GiB, psi=psi)
    host = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg").host()
    assert host == HostMem(total=16 * GiB, available=12 * GiB, psi_some_avg10=1.25, psi_full_avg10=0.75,
                           swap_free=GiB, mem_available=12 * GiB)


def test_psi_absent(tmp_path):
    proc = fake_proc(tmp_path)
    host = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg").host()
    assert host.psi_some_avg10 is None and host.psi_full_avg10 is None


def test_psi_without_full_line(tmp_path):
    proc = fake_proc(tmp_path, psi="some avg10=3.00 avg60=0.00 avg300=0.00 total=1\n")
    host = ProcSampler(proc=proc, cgroup_root=tmp_path / "cg").host()
    assert host.psi_some_avg10 == 3.0 and host.psi_full_avg10 is None


def v1_tree(tmp_path, cgroup_path="/a/b", limits=None, usage=None, inactive=None):
    """cgroup v1 memory hierarchy at cg/memory with per-directory limits (relative path -> bytes)."""
    root = tmp_path / "cg"
    mount = root / "memory"
    d = mount / cgroup_path.strip("/")
    while True:
        write(d / "memory.limit_in_bytes", V1_UNLIMITED + "\n")
        if d == mount:
            break
        d = d.parent
    for rel, value in (limits or {}).items():
        write(mount / rel / "memory.limit_in_bytes", f"{value}\n")
    for rel, value in (usage or {}).items():
        write(mount / rel / "memory.usage_in_bytes", f"{value}\n")
    for rel, value in (inactive or {}).items():
        write(mount / rel / "memory.stat", f"cache 0\nrss 0\ninactive_file 1\ntotal_cache 0\n"
              f"total_inactive_file {value}\ntotal_active_file 0\n")
    return root


def v2_tree(tmp_path, dirs, files):
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        write(root / rel, text)
    return root


def test_v1_limit_at_leaf(tmp_path):
    proc = fake_proc(tmp_path, cgroup="12:pids:/a/b\n4:memory:/a/b\n0::/\n")
    cg = v1_tree(tmp_path, limits={"a/b": GiB})
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == GiB
    assert lim.reserve == GiB // 2  # 2 GiB would leave nothing: capped at half
    assert lim.budget == GiB // 2
    assert lim.cgroup_limit == GiB
    assert lim.cgroup_path == str(cg / "memory" / "a" / "b")
    assert lim.source == f"cgroup v1 {cg / 'memory' / 'a' / 'b'} (memory.limit_in_bytes)"
    assert lim.host_total == 16 * GiB


def test_v1_smaller_parent_limit_wins(tmp_path):
    proc = fake_proc(tmp_path, cgroup="4:memory:/a/b\n")
    cg = v1_tree(tmp_path, limits={"a/b": 8 * GiB, "a": 6 * GiB})
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 6 * GiB
    assert lim.cgroup_path == str(cg / "memory" / "a")
    assert lim.reserve == 2 * GiB and lim.budget == 4 * GiB


def test_v1_unlimited_is_host(tmp_path):
    proc = fake_proc(tmp_path, total=64 * GiB, cgroup="4:memory:/a/b\n")
    cg = v1_tree(tmp_path)
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 64 * GiB
    assert lim.source == "host MemTotal"
    assert lim.cgroup_limit is None
    assert lim.reserve == 64 * GiB // 10
    assert lim.budget == 64 * GiB - lim.reserve


def test_v1_limit_above_host_is_reported_but_host_wins(tmp_path):
    proc = fake_proc(tmp_path, total=16 * GiB, cgroup="4:memory:/a/b\n")
    cg = v1_tree(tmp_path, limits={"a": 32 * GiB})
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 16 * GiB and lim.source == "host MemTotal"
    assert lim.cgroup_limit == 32 * GiB


def test_v1_missing_path_uses_mount_root(tmp_path):
    # A container: /proc/self/cgroup names the host-side path, the mount shows only our own subtree.
    proc = fake_proc(tmp_path, cgroup="4:memory:/docker/0123abcd\n")
    cg = tmp_path / "cg"
    write(cg / "memory" / "memory.limit_in_bytes", f"{3 * GiB}\n")
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 3 * GiB
    assert lim.cgroup_path == str(cg / "memory")


def test_v1_mountinfo_root_is_stripped(tmp_path):
    cg = tmp_path / "cg"
    proc = fake_proc(tmp_path, cgroup="4:memory:/docker/abc/sub\n")
    write(proc / "self" / "mountinfo",
          "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
          f"30 22 0:26 /docker/abc {cg / 'memory'} ro,nosuid - cgroup cgroup rw,memory\n"
          f"31 22 0:27 /docker/abc {cg / 'cpu'} ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n")
    write(cg / "memory" / "memory.limit_in_bytes", f"{8 * GiB}\n")
    write(cg / "memory" / "sub" / "memory.limit_in_bytes", f"{5 * GiB}\n")
    view = memory_cgroup(proc, cg)
    assert view is not None and view.version == 1
    assert view.path == cg / "memory" / "sub"
    assert view.lineage() == [cg / "memory" / "sub", cg / "memory"]
    assert detect_limits(proc=proc, cgroup_root=cg).limit == 5 * GiB


def test_v2_smallest_of_max_and_high_along_path(tmp_path):
    proc = fake_proc(tmp_path, cgroup="0::/user.slice/job.scope\n")
    cg = v2_tree(tmp_path, ["user.slice/job.scope"], {
        "user.slice/job.scope/memory.max": "max\n",
        "user.slice/job.scope/memory.high": f"{7 * GiB}\n",
        "user.slice/memory.max": f"{5 * GiB}\n",
        "user.slice/memory.high": "max\n",
    })
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 5 * GiB
    assert lim.source == f"cgroup v2 {cg / 'user.slice'} (memory.max)"
    write(cg / "user.slice/job.scope/memory.high", f"{3 * GiB}\n")
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 3 * GiB
    assert lim.source == f"cgroup v2 {cg / 'user.slice' / 'job.scope'} (memory.high)"


def test_v2_all_max_is_host(tmp_path):
    proc = fake_proc(tmp_path, total=32 * GiB, cgroup="0::/a\n")
    cg = v2_tree(tmp_path, ["a"], {"a/memory.max": "max\n", "a/memory.high": "max\n"})
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 32 * GiB and lim.source == "host MemTotal" and lim.cgroup_limit is None


def test_v2_missing_path_uses_mount_root(tmp_path):
    proc = fake_proc(tmp_path, cgroup="0::/kubepods/pod1/ctr\n")
    cg = v2_tree(tmp_path, [], {"memory.max": f"{2 * GiB}\n"})
    lim = detect_limits(proc=proc, cgroup_root=cg)
    assert lim.limit == 2 * GiB and lim.cgroup_path == str(cg)


def test_v2_without_memory_controller_is_host(tmp_path):
    proc = fake_proc(tmp_path, total=8 * GiB, cgroup="0::/a\n")
    cg = tmp_path / "cg"
    write(cg / "cgroup.controllers", "cpu io pids\n")
    write(cg / "a" / "memory.max", f"{GiB}\n")
    assert detect_limits(proc=proc, cgroup_root=cg).limit == 8 * GiB


def test_no_cgroup_info_is_host(tmp_path):
    proc = fake_proc(tmp_path, total=8 * GiB)
    (proc / "self" / "cgroup").unlink()
    lim = detect_limits(proc=proc, cgroup_root=tmp_path / "nothing")
    assert lim.limit == 8 * GiB and lim.source == "host MemTotal"


def test_explicit_budget_within_and_clamped(tmp_path):
    proc = fake_proc(tmp_path, total=32 * GiB)
    cg = tmp_path / "none"
    within = detect_limits(budget=20 * GiB, proc=proc, cgroup_root=cg)
    assert within.budget == 20 * GiB and within.limit == 20 * GiB
    assert within.reserve == int(3.2 * GiB)  # still kept free on the host
    assert within.source.startswith("--memory-budget")
    over = detect_limits(budget=31 * GiB, proc=proc, cgroup_root=cg)
    assert over.limit == 32 * GiB
    assert over.budget == 32 * GiB - int(3.2 * GiB)
    assert "clamped" in over.source and over.source.startswith("host MemTotal")
    with pytest.raises(ValueError):
        detect_limits(budget=0, proc=proc, cgroup_root=cg)


def test_explicit_reserve(tmp_path):
    proc = fake_proc(tmp_path, total=32 * GiB)
    cg = tmp_path / "none"
    lim = detect_limits(reserve=GiB, proc=proc, cgroup_root=cg)
    assert lim.reserve == GiB and lim.budget == 31 * GiB
    too_big = detect_limits(reserve=40 * GiB, proc=proc, cgroup_root=cg)
    assert too_big.reserve == default_reserve(32 * GiB) and "reserve" in too_big.source
    with pytest.raises(ValueError):
        detect_limits(reserve=-1, proc=proc, cgroup_root=cg)


@pytest.mark.parametrize(
    ("limit", "reserve"),
    [(256 * MiB, 128 * MiB), (3 * GiB, int(1.5 * GiB)), (16 * GiB, 2 * GiB), (64 * GiB, int(6.4 * GiB))],
)
def test_default_reserve(limit, reserve):
    assert default_reserve(limit) == reserve


def test_host_available_capped_by_v1_cgroup_headroom(tmp_path):
    proc = fake_proc(tmp_path, total=16 * GiB, avail=10 * GiB, cgroup="4:memory:/a/b\n")
    cg = v1_tree(tmp_path, limits={"a/b": GiB}, usage={"a/b": 800 * MiB}, inactive={"a/b": 100 * MiB})
    host = ProcSampler(proc=proc, cgroup_root=cg).host()
    assert host.total == 16 * GiB
    assert host.available == GiB - 800 * MiB + 100 * MiB
    # A tighter parent counts too.
    write(cg / "memory" / "a" / "memory.limit_in_bytes", f"{2 * GiB}\n")
    write(cg / "memory" / "a" / "memory.usage_in_bytes", f"{1900 * MiB}\n")
    assert ProcSampler(proc=proc, cgroup_root=cg).host().available == 148 * MiB


def test_host_available_capped_by_v2_cgroup_headroom(tmp_path):
    proc = fake_proc(tmp_path, total=16 * GiB, avail=10 * GiB, cgroup="0::/job\n")
    cg = v2_tree(tmp_path, ["job"], {
        "job/memory.max": f"{4 * GiB}\n",
        "job/memory.high": "max\n",
        "job/memory.current": f"{3 * GiB}\n",
        "job/memory.stat": f"anon {2 * GiB}\nfile {GiB}\ninactive_anon 0\nactive_anon 0\ninactive_file {512 * MiB}\n",
    })
    assert ProcSampler(proc=proc, cgroup_root=cg).host().available == GiB + 512 * MiB


def test_host_available_is_host_when_cgroup_has_room(tmp_path):
    proc = fake_proc(tmp_path, total=16 * GiB, avail=3 * GiB, cgroup="4:memory:/a/b\n")
    cg = v1_tree(tmp_path, limits={"a/b": 12 * GiB}, usage={"a/b": GiB}, inactive={"a/b": 0})
    assert ProcSampler(proc=proc, cgroup_root=cg).host().available == 3 * GiB


def test_oom_kill_counters(tmp_path):
    v1 = tmp_path / "v1"
    write(v1 / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert cgroup_oom_kills(v1) == 3
    v2 = tmp_path / "v2"
    write(v2 / "memory.events", "low 0\nhigh 12\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert cgroup_oom_kills(v2) == 2
    assert cgroup_oom_kills(tmp_path / "missing") == 0
