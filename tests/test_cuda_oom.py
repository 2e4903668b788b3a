"""A CUDA out-of-memory inside a worker, injected on CPU: a memory failure of that file, never a warning."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.synth_corpus import make_corpus
from helpers import cli_args, events, named, run_cli
from worker import protocol
from worker.align import SpanAligner, align_file, is_out_of_memory
from worker.engines.base import Job, JobError

pytestmark = pytest.mark.timeout(120)
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"


class OomAligner(SpanAligner):
    name, model, dtype = "oom", "oom", "fp32"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def align_span(self, audio, span_start_s, utts):
        raise self.exc


def _one_file(tmp_path: Path) -> Job:
    make_corpus(tmp_path / "c", [4])
    cha = next((tmp_path / "c").rglob("*.cha"))
    media = next(p for p in cha.parent.iterdir() if p.suffix != ".cha" and p.stem == cha.stem)
    return Job(job="j", input=cha, output=tmp_path / "out.cha", media=media, rel=cha.name, options={})


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError(CUDA_OOM), RuntimeError("CUDA error: out of memory")])
def test_cuda_oom_in_a_span_fails_the_file_as_memory(tmp_path, exc):
    assert is_out_of_memory(exc)
    job = _one_file(tmp_path)
    with pytest.raises(JobError) as got:
        align_file(job, OomAligner(exc), lambda f: None)
    assert got.value.kind == "memory" and "out of memory" in str(got.value)
    assert not job.output.exists()  # never written "with warnings"


class _Engine:
    """Raises a CUDA out-of-memory outside any span (e.g. moving a tensor to the device)."""

    def __init__(self):
        self.released = 0

    def run(self, job, progress):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    def release(self):
        self.released += 1


class _Heartbeat:
    job = progress = None


def test_cuda_oom_outside_a_span_is_a_memory_error_and_the_worker_leaves(tmp_path):
    from worker.__main__ import Channel, serve

    job = _one_file(tmp_path)
    stdin = io.BytesIO(protocol.encode({"type": protocol.JOB, "job": "a.cha#1", "input": str(job.input),
                                        "output": str(job.output), "media": str(job.media), "rel": "a.cha",
                                        "options": {}})
                       + protocol.encode({"type": protocol.JOB, "job": "b.cha#1", "input": str(job.input),
                                          "output": str(job.output), "media": str(job.media), "rel": "b.cha",
                                          "options": {}}))
    out = io.BytesIO()
    code = serve(_Engine(), Channel(out), stdin, _Heartbeat(), log=_NoLog())
    assert code == protocol.EXIT_OK  # a fresh process after it: the second job is never taken
    out.seek(0)
    msgs = []
    while (m := protocol.read_frame(out)) is not None:
        msgs.append(m)
    assert [m["type"] for m in msgs] == ["started", "error"]
    assert msgs[1]["kind"] == "memory" and "CUDA out of memory" in msgs[1]["error"]


class _NoLog:
    def __getattr__(self, name):
        return lambda *a, **k: None


class _Source:
    """Loud noise: refinement only runs the aligner where there is speech-like level."""

    def read(self, lo, hi, rate=16000):
        return (np.random.default_rng(0).standard_normal(int((hi - lo) * rate)) * 0.3).astype(np.float32)


def test_timing_refinement_does_not_swallow_a_cuda_oom():
    from types import SimpleNamespace

    from worker.engines.timing import refine_spans

    utts = [SimpleNamespace(index=0, words=["hello", "there"]), SimpleNamespace(index=1, words=["good", "day"])]
    with pytest.raises(torch.OutOfMemoryError):
        refine_spans(_Source(), utts, [(0.5, 2.0), (2.5, 4.0)], OomAligner(torch.cuda.OutOfMemoryError(CUDA_OOM)),
                     duration=5.0)
    # Any other failure of this bonus step still leaves the rough spans standing.
    got = refine_spans(_Source(), utts, [(0.5, 2.0), (2.5, 4.0)], OomAligner(ValueError("no path")), duration=5.0)
    assert got == [(0.5, 2.0), (2.5, 4.0)]


SITE = '''
import os
import worker.engines.synthetic as s
_real = s.SyntheticEngine.run
def run(self, job, progress):
    if os.path.basename(str(job.input)) == os.environ["OOM_FILE"]:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _real(self, job, progress)
s.SyntheticEngine.run = run
'''


def test_supervised_run_requeues_a_cuda_oom_file_and_quarantines_it_after_max_attempts(tmp_path):
    """Real workers over real pipes: the injected CUDA error is a memory failure, retried, then
    quarantined; the other files finish; nothing is "done with warnings"."""
    make_corpus(tmp_path / "corpus", [3, 4, 5])
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "log.jsonl"
    r = run_cli(cli_args(tmp_path / "corpus", tmp_path / "out", "--workers", "2", "--max-attempts", "2",
                         "--log-json", str(log), "--start-method", "spawn"),
                tmp_path, PYTHONPATH=f"{site}:{root}", OOM_FILE="f001.cha")
    assert r.returncode == 1, r.stderr[-2000:]
    evs = events(log)
    failed = named(evs, "file_failed")
    assert [e["kind"] for e in failed] == ["memory", "memory"] and {e["file"] for e in failed} == {"f001.cha"}
    assert all("CUDA out of memory" in e["reason"] for e in failed)
    (q,) = named(evs, "file_quarantined")
    assert q["file"] == "f001.cha"
    assert {e["file"] for e in named(evs, "file_done")} == {"f000.cha", "f002.cha"}
    assert not (tmp_path / "out" / "f001.cha").exists()
    admitted = [e["predicted_mb"] for e in named(evs, "file_admitted") if e["file"] == "f001.cha"]
    assert admitted[1] > admitted[0]  # retried larger
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "run_finished"
