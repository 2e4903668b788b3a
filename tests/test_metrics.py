"""Prometheus exposition: format validity (checked by a strict parser), textfile atomicity, HTTP."""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.error
import urllib.request

import pytest

from supervisor.metrics import CONTENT_TYPE, MIB, MetricsServer, render_prometheus, write_textfile

pytestmark = pytest.mark.timeout(60)

STATUS = {
    "run": "20250314T093000-a1b2",
    "pid": 4242,
    "started": "2025-03-14T09:30:00Z",
    "uptime_s": 754.5,
    "draining": False,
    "memory": {"used_mb": 9650.5, "budget_mb": 10240.0, "limit_mb": 12288.0, "available_mb": 20480.0,
               "committed_mb": 9900.0},
    "files": {"pending": 7, "running": 3, "done": 12, "failed": 1, "quarantined": 1, "skipped": 2, "total": 26},
    "audio_done_s": 4685.0,
    "audio_total_s": 9000.0,
    "kills": 2,
    "pauses": 5,
    "workers": [
        {"worker": "w0", "pid": 101, "state": "busy", "file": "a.cha", "uss_mb": 3000.0, "pss_mb": 3300.0,
         "predicted_mb": 3100.0, "since_s": 12.0},
        {"worker": "w1", "pid": 102, "state": "busy", "file": "b.cha", "uss_mb": 2500.0, "pss_mb": 2800.0,
         "predicted_mb": 2600.0, "since_s": 40.0},
        {"worker": "w2", "pid": 103, "state": "paused", "file": "c.cha", "uss_mb": 2000.0, "pss_mb": 2300.0,
         "predicted_mb": 2100.0, "since_s": 5.0},
        {"worker": "w3", "pid": 104, "state": "starting", "file": None, "uss_mb": 300.0, "pss_mb": 310.0,
         "predicted_mb": None, "since_s": 1.0},
    ],
    "queue": [{"file": "d.cha", "predicted_mb": 2000.0, "attempts": 0}],
}

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? (\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    """A strict reader of text format 0.0.4: fails on anything Prometheus would reject or warn about."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, tuple], float] = {}
    finished: set[str] = set()
    current: str | None = None
    for line in text.splitlines():
        assert line.strip() == line and line, f"blank or padded line: {line!r}"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helps
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "untyped", "histogram", "summary")
            assert name not in types, f"TYPE twice for {name}"
            assert name in helps, f"HELP missing before TYPE for {name}"
            types[name] = kind
            if kind == "counter":
                assert name.endswith("_total")
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert name in types, f"sample before TYPE: {name}"
        if current != name:
            assert name not in finished, f"samples of {name} are not contiguous"
            if current is not None:
                finished.add(current)
            current = name
        pairs = tuple(sorted(_LABEL_RE.findall(labels)))
        key = (name, pairs)
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_full_status_renders_valid_exposition():
    s = parse_exposition(render_prometheus(STATUS))
    assert value(s, "batchalign_up") == 1
    for state in ("done", "failed", "quarantined", "pending", "running", "skipped"):
        assert value(s, "batchalign_files", state=state) == STATUS["files"][state]
    assert value(s, "batchalign_workers", state="busy") == 2
    assert value(s, "batchalign_workers", state="paused") == 1
    assert value(s, "batchalign_workers", state="starting") == 1
    assert value(s, "batchalign_workers", state="killed") == 0
    assert value(s, "batchalign_memory_used_bytes") == 9650.5 * MIB
    assert value(s, "batchalign_memory_budget_bytes") == 10240 * MIB
    assert value(s, "batchalign_memory_limit_bytes") == 12288 * MIB
    assert value(s, "batchalign_memory_available_bytes") == 20480 * MIB
    assert value(s, "batchalign_kills_total") == 2
    assert value(s, "batchalign_pauses_total") == 5
    assert value(s, "batchalign_worker_uss_bytes", worker="w1", pid="102") == 2500 * MIB
    assert value(s, "batchalign_run_info", run=STATUS["run"], pid="4242") == 1


def test_sparse_status_is_still_valid():
    s = parse_exposition(render_prometheus({}))
    assert value(s, "batchalign_up") == 1
    assert value(s, "batchalign_files", state="done") == 0
    assert value(s, "batchalign_kills_total") == 0
    assert not any(name.startswith("batchalign_memory") for name, _ in s)
    partial = dict(STATUS, memory={"used_mb": 10.0, "available_mb": None})
    s = parse_exposition(render_prometheus(partial))
    assert value(s, "batchalign_memory_used_bytes") == 10 * MIB
    assert ("batchalign_memory_available_bytes", ()) not in s


def test_label_values_are_escaped():
    odd = dict(STATUS, run='we"ird\\run\nid', workers=[{"worker": 'w"0', "pid": 1, "state": "busy", "uss_mb": 1}])
    s = parse_exposition(render_prometheus(odd))
    assert value(s, "batchalign_run_info", run='we\\"ird\\\\run\\nid', pid="4242") == 1


def test_textfile_is_replaced_atomically(tmp_path):
    target = tmp_path / "textfile" / "batchalign.prom"
    write_textfile(target, STATUS)
    assert target.read_text() == render_prometheus(STATUS)
    assert (target.stat().st_mode & 0o777) == 0o644

    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_textfile(target, dict(STATUS, kills=i, run="r" * (i % 50)))

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(300):
            try:
                parse_exposition(target.read_text())
            except BaseException as exc:  # collected so the writer thread is always stopped
                errors.append(exc)
                break
    finally:
        stop.set()
        t.join()
    assert not errors
    assert [p.name for p in target.parent.iterdir()] == ["batchalign.prom"]


def _fetch(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_http_server_serves_live_snapshots_taken_on_the_loop():
    calls = {"n": 0, "threads": set()}

    def get_status() -> dict:
        calls["n"] += 1
        calls["threads"].add(threading.get_ident())
        if calls["n"] == 3:
            raise RuntimeError("snapshot broke")
        return dict(STATUS, kills=calls["n"])

    async def main() -> None:
        server = MetricsServer(None, 0, get_status)
        await server.start()
        assert server.host == "127.0.0.1" and server.port > 0
        base = f"http://127.0.0.1:{server.port}"
        loop = asyncio.get_running_loop()
        try:
            code, headers, body = await loop.run_in_executor(None, _fetch, base + "/metrics")
            assert code == 200 and headers["Content-Type"] == CONTENT_TYPE
            s = parse_exposition(body.decode())
            assert value(s, "batchalign_kills_total") == 1
            code, _, body = await loop.run_in_executor(None, _fetch, base + "/metrics?x=1")
            assert code == 200 and value(parse_exposition(body.decode()), "batchalign_kills_total") == 2
            code, _, body = await loop.run_in_executor(None, _fetch, base + "/metrics")
            assert code == 500  # a broken snapshot fails that scrape only
            code, _, _ = await loop.run_in_executor(None, _fetch, base + "/metrics")
            assert code == 200
        finally:
            port = server.port
            await server.stop()
        assert calls["threads"] == {threading.get_ident()}  # every snapshot was taken by the loop's thread
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())


def test_http_server_accepts_async_get_status():
    async def get_status() -> dict:
        await asyncio.sleep(0)
        return STATUS

    async def main() -> None:
        server = MetricsServer("127.0.0.1", 0, get_status)
        await server.start()
        try:
            loop = asyncio.get_running_loop()
            code, _, body = await loop.run_in_executor(None, _fetch, f"http://127.0.0.1:{server.port}/metrics")
            assert code == 200 and value(parse_exposition(body.decode()), "batchalign_pauses_total") == 5
        finally:
            await server.stop()

    asyncio.run(main())
