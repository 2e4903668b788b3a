"""The model server on CPU: one process holds a tiny random model, workers send it spans.

Protocol (emissions and word times identical to a worker's own model, equal-length requests batched),
the supervised run (the server spawned once, READY, its workers CPU-only), and crash handling (the
server SIGKILLed mid-run is restarted and every file still finishes, none failed for it).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.synth_corpus import make_corpus
from helpers import cli_args, events, named, run_cli
from supervisor.model_server import ModelServer, use_model_server
from supervisor.settings import Settings
from worker.align import UttRequest
from worker.model_server import Connection, ServerGone, SpanServer, remote_aligner

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from conftest_models import build_tiny_wav2vec

    return build_tiny_wav2vec(tmp_path_factory.mktemp("tiny") / "w2v")


@pytest.fixture(scope="module")
def local(tiny):
    from worker.engines.wav2vec import Wav2VecEngine

    return Wav2VecEngine({"model": str(tiny), "calibrate": False, "threads": 1}).aligner


def _serve(aligner, path: str, **kw) -> tuple[SpanServer, threading.Event]:
    srv = SpanServer(aligner, **kw)
    srv.listen(path)
    stop = threading.Event()
    threading.Thread(target=srv.run_forever, args=(stop,), daemon=True).start()
    return srv, stop


def _at_once(n: int, call, timeout: float) -> dict[int, object]:
    """``call(i)`` for i < n from n threads at once (requests that wait together in the server)."""
    got: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, call(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return got


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_remote_wav2vec_gives_the_same_emissions_and_times_as_the_local_model(local, tmp_path):
    srv, stop = _serve(local, str(tmp_path / "s.sock"))
    try:
        remote = remote_aligner(Connection(str(tmp_path / "s.sock")))
        # No weights in the worker: its model is a shape on the meta device (but one mask vector).
        held = sum(p.numel() * p.element_size() for p in remote.hf.parameters() if p.device.type != "meta")
        assert held <= 4 * remote.hf.config.hidden_size
        audio = _noise(40.0)  # longer than a chunk: chunked emissions through the server
        remote.max_span_s = local.max_span_s = 15.0
        assert np.array_equal(remote.emissions(audio).numpy(), local.emissions(audio).numpy())
        utts = [UttRequest(0, 0.5, 3.0, ["hello", "world"]), UttRequest(1, 3.5, 6.0, ["good", "day"])]
        assert remote.align_span(audio[:16000 * 7], 0.0, utts) == local.align_span(audio[:16000 * 7], 0.0, utts)
        assert (remote.name, remote.model, remote.dtype) == (local.name, local.model, local.dtype)
    finally:
        stop.set()


def test_equal_length_requests_waiting_together_run_as_one_batch(local, tmp_path):
    srv, stop = _serve(local, str(tmp_path / "s.sock"), batch_wait_s=0.2)
    try:
        audios = [_noise(2.0, seed=i) for i in range(4)]
        got = _at_once(4, lambda i: remote_aligner(Connection(str(tmp_path / "s.sock")))._forward(audios[i]).numpy(),
                       30)
        assert srv.stats["batched"] >= 2 and srv.stats["batches"] >= 1
        for i, a in enumerate(audios):
            assert np.allclose(got[i], local._forward(a).numpy(), atol=1e-4)
    finally:
        stop.set()


def test_a_cuda_oom_in_the_server_is_a_memory_error_for_its_worker(local, tmp_path):
    import torch

    from worker.align import is_out_of_memory

    class Oom:
        name, model, dtype, sample_rate, max_span_s, language = "whisper", "m", "fp32", 16000, 30.0, None

        def use_language(self, code):
            pass

        def align_span(self, audio, start, utts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")

    srv, stop = _serve(Oom(), str(tmp_path / "s.sock"))
    try:
        remote = remote_aligner(Connection(str(tmp_path / "s.sock")))
        with pytest.raises(RuntimeError) as got:
            remote.align_span(_noise(1.0), 0.0, [UttRequest(0, 0.0, 1.0, ["a"])])
        assert is_out_of_memory(got.value) and "CUDA out of memory" in str(got.value)
    finally:
        stop.set()


def test_a_worker_whose_server_is_gone_gives_up_after_its_reconnect_window(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ServerGone):
        Connection(str(tmp_path / "nobody.sock"), reconnect_s=0.5).call({"op": "hello"})
    assert time.monotonic() - t0 < 5


def test_model_server_is_chosen_for_cuda_or_by_the_option():
    s = Settings()
    s.run.engine = "wav2vec"
    assert not use_model_server(s)  # CPU: one model per worker, as before
    s.run.device = "cuda"
    assert use_model_server(s)
    s.run.model_server = "off"
    assert not use_model_server(s)
    s.run.device, s.run.model_server = "cpu", "on"
    assert use_model_server(s)
    s.run.engine = "synthetic"
    assert not use_model_server(s)  # nothing to serve


def test_the_server_process_says_ready_and_is_restarted_when_it_dies(tiny, tmp_path):
    seen: list[tuple[str, dict]] = []

    async def scenario():
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        server = ModelServer("wav2vec", {"model": str(tiny), "threads": 1, "calibrate": False},
                             emit=lambda ev, level="info", **f: seen.append((ev, f)), env=env)
        await server.start()
        await asyncio.wait_for(server.ready.wait(), 90)
        first = server.pid
        remote = await asyncio.to_thread(remote_aligner, Connection(server.socket))
        server.kill()
        # The in-flight call reconnects to the restarted server.
        em = await asyncio.wait_for(asyncio.to_thread(remote._forward, _noise(1.0)), 120)
        assert em.shape[0] > 0
        second = server.pid
        await server.close()
        return first, second, server

    first, second, server = asyncio.run(scenario())
    names = [e for e, _ in seen]
    assert names.count("model_server_ready") == 2 and "model_server_exited" in names
    assert first != second and server.restarts == 1
    assert not os.path.exists(server.socket)


def test_a_server_that_cannot_load_its_model_is_not_restarted(tmp_path):
    seen: list[str] = []

    async def scenario():
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        server = ModelServer("wav2vec", {"model": str(tmp_path / "no-such-model")},
                             emit=lambda ev, level="info", **f: seen.append(ev), env=env)
        await server.start()
        await asyncio.wait_for(server._task, 90)
        await server.close()
        return server

    server = asyncio.run(scenario())
    assert server.failed and server.restarts == 0 and "model_server_failed" in seen


def test_supervised_run_with_the_model_server(tiny, tmp_path):
    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [4, 6, 5])
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    r = run_cli(cli_args(corpus_dir, out, "--model", str(tiny), "--memory-budget", "6GiB", "--workers", "2",
                         "--model-server", "on", "--log-json", str(log), engine="wav2vec"), tmp_path, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = events(log)
    assert len(named(evs, "model_server_ready")) == 1 and len(named(evs, "file_done")) == len(files)
    for cha in files:
        assert "%wor:" in (out / cha.relative_to(corpus_dir)).read_text()
    # The same word times as workers with their own model copies.
    out2, log2 = tmp_path / "out2", tmp_path / "run2.jsonl"
    r = run_cli(cli_args(corpus_dir, out2, "--model", str(tiny), "--memory-budget", "6GiB", "--workers", "2",
                         "--model-server", "off", "--log-json", str(log2), engine="wav2vec"), tmp_path, timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not named(events(log2), "model_server_ready")

    def wor(folder):
        return {p.name: [ln for ln in p.read_text().splitlines() if ln.startswith("%wor")] for p in folder.rglob("*.cha")}

    assert wor(out) == wor(out2)


def test_a_server_killed_mid_run_is_restarted_and_every_file_finishes(tiny, tmp_path):
    import signal as sig

    from helpers import start_cli, wait_for_event

    corpus_dir = tmp_path / "corpus"
    files = make_corpus(corpus_dir, [30] * 8)
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    p = start_cli(cli_args(corpus_dir, out, "--model", str(tiny), "--memory-budget", "6GiB", "--workers", "2",
                           "--model-server", "on", "--log-json", str(log), engine="wav2vec"), tmp_path)
    try:
        ready = wait_for_event(log, "model_server_ready", timeout=120)
        wait_for_event(log, "file_started", timeout=120)
        os.kill(ready["pid"], sig.SIGKILL)
        _, err = p.communicate(timeout=170)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    evs = events(log)
    assert len(named(evs, "model_server_ready")) == 2 and named(evs, "model_server_exited")
    assert len(named(evs, "file_done")) == len(files) and not named(evs, "file_failed")


def test_remote_whisper_spans_give_the_same_times_as_the_local_model(tmp_path):
    from test_whisper import build_tiny_whisper, real_whisper
    from worker.engines.whisper import WhisperAligner

    folder = build_tiny_whisper(tmp_path / "whisper", real_whisper("tiny.en"))
    local = WhisperAligner.load(str(folder), threads=1)
    srv, stop = _serve(local, str(tmp_path / "s.sock"))
    try:
        remote = remote_aligner(Connection(str(tmp_path / "s.sock")))
        audio = _noise(6.0, seed=3)
        utts = [UttRequest(0, 0.5, 2.5, ["hello", "world"]), UttRequest(1, 3.0, 5.5, ["good", "day", "now"])]
        remote.use_language("eng")
        local.use_language("eng")
        assert remote.align_span(audio, 0.0, utts) == local.align_span(audio, 0.0, utts)
        assert remote.transcribe_words(audio, 1.0) == local.transcribe_words(audio, 1.0)
        from worker.align import _cache_tag

        assert _cache_tag(remote) == _cache_tag(local)  # the result cache is shared across modes
    finally:
        stop.set()


@pytest.mark.parametrize("joint", [False, True])
def test_whisper_spans_waiting_together_are_encoded_as_one_batch_with_the_same_times(tmp_path, joint):
    from dataclasses import replace

    from test_whisper import build_tiny_whisper, real_whisper
    from worker.engines.whisper import WhisperAligner

    folder = build_tiny_whisper(tmp_path / "whisper", real_whisper("tiny.en"))
    local = WhisperAligner.load(str(folder), threads=1)
    local.steps = replace(local.steps, joint=joint)  # one window per span, or one per utterance
    local.use_language("eng")
    audios = [_noise(s, seed=i) for i, s in enumerate((6.0, 9.5, 4.0))]
    utts = [[UttRequest(0, 0.5, 2.5, ["hello", "world"]), UttRequest(1, 3.0, 5.5, ["good", "day", "now"])],
            [UttRequest(0, 1.0, 8.0, ["one", "two", "three", "four"])],
            [UttRequest(0, 0.2, 3.5, ["yes", "no"])]]
    windows = 3 if joint else 4
    alone = [local.align_span(a, 0.0, u) for a, u in zip(audios, utts)]
    # In process: the windows encoded ahead in one pass are the ones the spans then use.
    assert local.prepare_spans(list(zip(audios, [0.0] * 3, utts))) == windows and len(local._prepared) == windows
    assert [local.align_span(a, 0.0, u) for a, u in zip(audios, utts)] == alone
    assert local._prepared == {}

    srv, stop = _serve(local, str(tmp_path / "s.sock"), batch_wait_s=0.3)
    try:
        def client(i):
            remote = remote_aligner(Connection(str(tmp_path / "s.sock")))
            remote.use_language("eng")
            return remote.align_span(audios[i], 0.0, utts[i])

        got = _at_once(3, client, 60)
        assert srv.stats["batches"] >= 1 and srv.stats["batched"] >= 2
        assert [got[i] for i in range(3)] == alone
        assert local._prepared == {}  # nothing encoded ahead is kept past its batch
    finally:
        stop.set()


def test_more_whisper_windows_than_one_pass_takes_are_encoded_in_several(tmp_path, monkeypatch):
    from test_whisper import build_tiny_whisper, real_whisper
    from worker.engines import whisper as wmod

    folder = build_tiny_whisper(tmp_path / "whisper", real_whisper("tiny.en"))
    local = wmod.WhisperAligner.load(str(folder), threads=1)
    local.use_language("eng")
    passes = []
    encoder = local.hf.model.encoder
    real_forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda feats, *a, **k: passes.append(len(feats)) or real_forward(feats, *a, **k))
    audios = [_noise(1.5, seed=i) for i in range(wmod.ENCODE_BATCH + 3)]
    utt = [UttRequest(0, 0.1, 1.4, ["hi", "there"])]
    assert local.prepare_spans([(a, 0.0, utt) for a in audios]) == len(audios)
    assert passes == [wmod.ENCODE_BATCH, 3]
    batched = [local.align_span(a, 0.0, utt) for a in audios]
    assert local._prepared == {} and passes == [wmod.ENCODE_BATCH, 3]  # every span took its window
    assert batched == [local.align_span(a, 0.0, utt) for a in audios]
