"""The result cache: the aligner's version in its key, a size bound, and the `cache` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import env_for
from supervisor.cache import Pruner, prune, stats

pytestmark = pytest.mark.timeout(60)


def _fill(root, part, n, size, t0=1_000_000.0):
    paths = []
    for i in range(n):
        p = root / part / f"{i:02x}" / f"entry{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * size)
        os.utime(p, (t0 + i, t0 + i))
        paths.append(p)
    return paths


def test_prune_removes_oldest_first_until_under_the_bound(tmp_path):
    results = _fill(tmp_path, "results", 10, 1000)
    audio = _fill(tmp_path, "audio", 2, 3000, t0=1_000_004.5)
    removed, freed = prune(tmp_path, 8000)
    assert sum(s.bytes for s in stats(tmp_path)) <= 8000
    gone = [p for p in results + audio if not p.exists()]
    # the oldest go first, whichever part they are in
    assert gone == results[:5] + audio[:1] and removed == 6 and freed == 8000
    assert prune(tmp_path, None) == (0, 0)


def test_pruner_runs_in_a_thread_at_most_once_per_interval(tmp_path):
    _fill(tmp_path, "results", 10, 1000)
    seen = []
    p = Pruner(tmp_path, 2500, interval_s=3600, on_pruned=lambda n, b: seen.append(n))
    p.maybe(force=True)
    p.join()
    assert seen == [8]
    _fill(tmp_path, "results", 10, 1000, t0=2_000_000.0)
    p.maybe()  # within the interval: nothing
    p.join()
    assert seen == [8]


def test_cache_key_holds_the_aligner_version(monkeypatch):
    from worker import align

    class A(align.SpanAligner):
        name, model, dtype = "whisper", "/m", "fp32"

        def align_span(self, audio, span_start_s, utts):
            return []

    tag = align._cache_tag(A())
    assert tag.endswith("|" + align._aligner_version())
    monkeypatch.setattr(align, "_aligner_version", lambda: "99.0")
    assert align._cache_tag(A()) != tag


def test_cache_key_holds_the_alignment_steps():
    from worker import align
    from worker.engines.whisper import Steps

    class A(align.SpanAligner):
        name, model, dtype = "whisper", "/m", "fp32"

        def __init__(self, steps):
            self.steps = steps

        def align_span(self, audio, span_start_s, utts):
            return []

    assert align._cache_tag(A(Steps())) == align._cache_tag(A(Steps()))
    assert align._cache_tag(A(Steps())) != align._cache_tag(A(Steps(snap_pauses=False)))


def test_cache_command_shows_and_clears(tmp_path):
    state = tmp_path / "state" / "batchalign-supervise"
    _fill(state / "cache", "results", 3, 2048, t0=time.time() - 300)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "supervisor.cli", "cache", *args], cwd=tmp_path,
                              env=env_for(tmp_path), capture_output=True, text=True, timeout=60)

    shown = json.loads(cli("--json").stdout)
    parts = {p["part"]: p for p in shown["parts"]}
    assert parts["results"]["entries"] == 3 and parts["results"]["bytes"] == 6144
    assert shown["max_bytes"] == 2 * 2**30
    lines = cli().stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["part", "entries", "MiB"]
    assert lines[1].startswith("results\t3\t") and "T" in lines[1].split("\t")[3]  # ISO time when piped
    r = cli("clear", "--part", "results")
    assert r.returncode == 0 and r.stdout.startswith("freed 0.0 MiB")
    assert json.loads(cli("--json").stdout)["parts"][0]["entries"] == 0


def test_cache_key_holds_every_candidate_language():
    """With several @Languages a window is forced in whichever of them identification prefers: a
    result made with another candidate list (same first language) is not reused."""
    from worker import align

    class A(align.SpanAligner):
        name, model, dtype, language = "whisper", "/m", "fp32", "it"

        def __init__(self, candidates):
            self.candidates = candidates

        def align_span(self, audio, span_start_s, utts):
            return []

    alone = align._cache_tag(A([]))
    assert align._cache_tag(A(["it", "hr"])) != alone
    assert align._cache_tag(A(["it", "hr"])) != align._cache_tag(A(["it", "sl"]))
    assert align._cache_tag(A(["it", "hr"])) == align._cache_tag(A(["it", "hr"]))
    assert align._cache_tag(A(["it", "hr"])).endswith("|" + align._aligner_version())
