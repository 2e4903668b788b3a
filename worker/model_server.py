"""The model server: one process per GPU holds the model; CPU workers send it spans.

With one model copy per worker, every worker on a GPU pays its own CUDA context and its own copy
of the weights, and on a GPU the model is seldom the bottleneck (wav2vec2-base runs thousands of
audio seconds per second) while decoding, resampling, the Viterbi and CHAT I/O are. So the server
runs only the model, and the ordinary workers (``python -m worker`` with a ``model_server`` option)
do everything else and call it over a Unix socket:

* wav2vec2: the worker sends a span's (or chunk's) samples and gets the log-probabilities back;
  CTC forced alignment runs in the worker. Requests of equal length that are waiting together run
  as one batch (a padded batch would change the emissions of a model without an attention mask).
* Whisper and anything else: the worker sends the span with its utterances and gets the word times
  back (the cross-attention DTW runs beside the model in the server). Whisper spans waiting
  together have their first windows encoded in one encoder pass, most of the model's work.

The server speaks the worker protocol to its supervisor on stdout (READY with the socket path, then
heartbeats) and leaves when stdin closes. A worker whose server dies reconnects to the restarted one
and sends its in-flight span again; if no server answers within ``reconnect_s`` the span fails
the file's attempt (retried as a crash). A CUDA out-of-memory in a batch is retried one span at a
time; one span alone that runs out of memory is reported as out-of-memory to its worker, which
fails the file as a memory failure.

Wire format on the socket, each way: 4-byte big-endian length + a JSON header, then an 8-byte
length + raw bytes (float32 samples or log-probabilities, C order).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker import gpumem, protocol
from worker.engines.base import AlignerEngine, BootError, JobError

_H = struct.Struct(">I")
_P = struct.Struct(">Q")
MAX_HEADER = 16 * 1024 * 1024
MAX_PAYLOAD = 1 << 31
MAX_BATCH = 16
BATCH_WAIT_S = 0.002  # after the first request, how long to wait for others to batch with it


# -- wire ------------------------------------------------------------------------------------------

def send_msg(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_H.pack(len(body)) + body + _P.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("model server connection closed")
        buf += chunk
    return buf  # writable: numpy views of it can back torch tensors


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], bytearray]:
    (n,) = _H.unpack(_recv_exact(sock, _H.size))
    if n > MAX_HEADER:
        raise ConnectionError(f"header of {n} bytes")
    header = json.loads(_recv_exact(sock, n))
    (m,) = _P.unpack(_recv_exact(sock, _P.size))
    if m > MAX_PAYLOAD:
        raise ConnectionError(f"payload of {m} bytes")
    return header, _recv_exact(sock, m) if m else bytearray()


# -- the server --------------------------------------------------------------------------------------

@dataclass
class _Request:
    conn: socket.socket
    lock: threading.Lock
    header: dict[str, Any]
    audio: np.ndarray


def _span(header: dict[str, Any]) -> tuple[float, list]:
    """An ``align_span`` request's span start and utterances, as ``SpanAligner.align_span`` takes them."""
    from worker.align import UttRequest  # noqa: PLC0415

    return float(header["span_start_s"]), [UttRequest(int(i), float(s), float(e), list(w))
                                           for i, s, e, w in header["utts"]]


def _is_oom(exc: BaseException) -> bool:
    from worker.align import is_out_of_memory  # noqa: PLC0415

    return is_out_of_memory(exc)


class SpanServer:
    """Runs requests from many workers on one aligner, batching equal-length forwards."""

    def __init__(self, aligner: Any, *, max_batch: int = MAX_BATCH, batch_wait_s: float = BATCH_WAIT_S) -> None:
        self.aligner = aligner
        self.max_batch = max(1, int(max_batch))
        self.batch_wait_s = batch_wait_s
        self.requests: queue.Queue[_Request] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "batched": 0}

    # The hello: what a worker needs to build its side of the aligner.
    def hello(self) -> dict[str, Any]:
        a = self.aligner
        out = {"name": a.name, "model": a.model, "dtype": a.dtype, "sample_rate": a.sample_rate,
               "max_span_s": a.max_span_s, "kind": "span",
               # the result cache keys on the steps' repr: the worker's side must say the same
               "steps": None if getattr(a, "steps", None) is None else repr(a.steps)}
        hf = getattr(a, "hf", None)
        vocab = getattr(a, "vocab", None)
        if a.name == "wav2vec" and hf is not None and vocab is not None:
            out.update(kind="wav2vec", config=hf.config.to_dict(), normalize=a.normalize,
                       vocab={"map": vocab.vocab, "blank": vocab.blank, "separator": vocab.separator,
                              # what CharVocab left out of its tokens: the specials (blank, delimiter too)
                              "specials": sorted(set(vocab.vocab) - set(vocab.tokens))})
        return out

    def listen(self, path: str) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        os.chmod(path, 0o600)
        srv.listen(256)
        threading.Thread(target=self._accept, args=(srv,), name="accept", daemon=True).start()
        return srv

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._reader, args=(conn,), name="conn", daemon=True).start()

    def _reader(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        try:
            while True:
                header, payload = recv_msg(conn)
                if header.get("op") == "hello":
                    with lock:
                        send_msg(conn, {"ok": True, **self.hello()})
                    continue
                if header.get("op") == "language":  # what the model makes of a transcript's language
                    self.requests.put(_Request(conn, lock, header, np.zeros(0, np.float32)))
                    continue
                audio = np.frombuffer(payload, dtype=np.float32) if payload else np.zeros(0, np.float32)
                self.requests.put(_Request(conn, lock, header, audio))
        except (ConnectionError, OSError, ValueError):
            conn.close()
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave the worker waiting forever
            try:
                send_msg(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                conn.close()

    def run_forever(self, stop: threading.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            try:
                first = self.requests.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.requests.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.run_batch(batch)

    def run_batch(self, batch: list[_Request]) -> None:
        self.stats["requests"] += len(batch)
        forwards: dict[int, list[_Request]] = {}
        self._prepare_spans([r for r in batch if r.header.get("op") == "align_span"])
        try:
            for r in batch:
                if r.header.get("op") == "forward":
                    forwards.setdefault(len(r.audio), []).append(r)
                else:
                    self._one(r)
        finally:
            if hasattr(self.aligner, "drop_prepared"):
                self.aligner.drop_prepared()
        for group in forwards.values():
            self._forwards(group)

    def _prepare_spans(self, spans: list[_Request]) -> None:
        """Whisper spans waiting together have their first windows encoded as one batch."""
        prepare = getattr(self.aligner, "prepare_spans", None)
        if prepare is None or len(spans) < 2:
            return
        try:
            n = prepare([(r.audio, *_span(r.header)) for r in spans])
        except Exception as exc:  # noqa: BLE001 - a batch that fails: each span encodes its own
            self.aligner.drop_prepared()
            if _is_oom(exc):
                _empty_cache()
            return
        if n:
            self.stats["batches"] += 1
            self.stats["batched"] += n

    def _forwards(self, group: list[_Request]) -> None:
        if len(group) > 1:
            try:
                outs = self._forward_many([r.audio for r in group])
            except Exception as exc:  # noqa: BLE001 - a batch that fails is retried one by one
                if not _is_oom(exc):
                    raise
                _empty_cache()
            else:
                self.stats["batches"] += 1
                self.stats["batched"] += len(group)
                for r, em in zip(group, outs):
                    self._reply(r, {"ok": True, "shape": list(em.shape)}, em.tobytes())
                return
        for r in group:
            self._one(r)

    def _forward_many(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """Equal-length pieces in one forward pass, each normalised as ``_forward`` does alone."""
        import torch  # noqa: PLC0415

        a = self.aligner
        x = torch.from_numpy(np.stack(audios).astype(np.float32, copy=False))
        if a.normalize:
            x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-7)
        x = x.to(a.device, dtype=a._param_dtype if a._param_dtype.is_floating_point else torch.float32)
        with torch.inference_mode():
            out = torch.log_softmax(a.hf(x).logits.float(), dim=-1).cpu().numpy()
        return [np.ascontiguousarray(o) for o in out]

    def _one(self, r: _Request) -> None:
        h, a = r.header, self.aligner
        try:
            op = h.get("op")
            if op == "forward":
                em = a._forward(r.audio).numpy().astype(np.float32, copy=False)
                self._reply(r, {"ok": True, "shape": list(em.shape)}, np.ascontiguousarray(em).tobytes())
                return
            a.use_language(h.get("language"))
            if op == "language":
                self._reply(r, {"ok": True, "language": a.language})
            elif op == "align_span":
                got = a.align_span(r.audio, *_span(h))
                self._reply(r, {"ok": True, "results": [[u.index, u.words, u.error] for u in got]})
            elif op == "transcribe":
                words = a.transcribe_words(r.audio, float(h["offset_s"]))
                self._reply(r, {"ok": True, "words": [list(w) for w in words]})
            else:
                self._reply(r, {"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
            oom = _is_oom(exc)
            if oom:
                _empty_cache()
            self._reply(r, {"ok": False, "oom": oom, "error": f"{type(exc).__name__}: {exc}"[:2000]})

    @staticmethod
    def _reply(r: _Request, header: dict[str, Any], payload: bytes = b"") -> None:
        try:
            with r.lock:
                send_msg(r.conn, header, payload)
        except OSError:
            pass  # the worker went away; its file is the supervisor's to requeue


def _empty_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the worker's side ---------------------------------------------------------------------------------

class ServerGone(ConnectionError):
    pass


class Connection:
    """One worker's connection; a call that loses the server reconnects and is sent again."""

    def __init__(self, path: str, *, reconnect_s: float = 120.0) -> None:
        self.path = path
        self.reconnect_s = reconnect_s
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.reconnects = 0

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError as exc:
                s.close()
                if time.monotonic() >= deadline:
                    raise ServerGone(f"no model server at {self.path} after {self.reconnect_s:.0f} s: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        with self.lock:
            deadline = time.monotonic() + self.reconnect_s
            while True:
                if self.sock is None:
                    self.sock = self._connect()
                try:
                    send_msg(self.sock, header, payload)
                    return recv_msg(self.sock)
                except (ConnectionError, OSError) as exc:
                    self.sock.close()
                    self.sock = None
                    self.reconnects += 1  # the server died with this request: send it again
                    if time.monotonic() >= deadline:
                        raise ServerGone(f"the model server at {self.path} went away: {exc}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _answer(header: dict[str, Any]) -> dict[str, Any]:
    if header.get("ok"):
        return header
    if header.get("oom"):
        raise RuntimeError(f"out of memory in the model server: {header.get('error')}")
    raise RuntimeError(f"model server: {header.get('error')}")


def remote_aligner(conn: Connection) -> Any:
    """The worker's aligner: wav2vec2's CTC side here with the model's forward on the server, or a
    whole-span proxy for other engines."""
    from worker.align import SpanAligner, UttResult  # noqa: PLC0415

    hello, _ = conn.call({"op": "hello"})
    hello = _answer(hello)

    if hello["kind"] == "wav2vec":
        import torch  # noqa: PLC0415
        from transformers import Wav2Vec2Config, Wav2Vec2ForCTC  # noqa: PLC0415

        from worker.engines.wav2vec import CharVocab, Wav2VecAligner  # noqa: PLC0415

        v = hello["vocab"]
        vocab = CharVocab({t: int(i) for t, i in v["map"].items()}, v["blank"], v["separator"], set(v["specials"]))
        with torch.device("meta"):  # the shape of the model (stride, frames), none of its weights
            shell = Wav2Vec2ForCTC(Wav2Vec2Config.from_dict(hello["config"]))

        class RemoteWav2Vec(Wav2VecAligner):
            def _forward(self, audio: np.ndarray) -> torch.Tensor:
                h, payload = conn.call({"op": "forward"}, np.ascontiguousarray(audio, dtype=np.float32).tobytes())
                h = _answer(h)
                return torch.from_numpy(np.frombuffer(payload, dtype=np.float32).reshape(h["shape"]).copy())

        return RemoteWav2Vec(shell, vocab, model_name=hello["model"], device="cpu", dtype=hello["dtype"],
                             normalize=hello["normalize"], max_span_s=hello["max_span_s"],
                             sample_rate=hello["sample_rate"])

    class RemoteSpans(SpanAligner):
        name, model, dtype = hello["name"], hello["model"], hello["dtype"]
        sample_rate, max_span_s = int(hello["sample_rate"]), float(hello["max_span_s"])
        steps = None if hello.get("steps") is None else _Repr(hello["steps"])

        def use_language(self, code: str | None) -> None:
            self.language = _answer(conn.call({"op": "language", "language": code})[0])["language"]

        def align_span(self, audio, span_start_s, utts):
            h, _ = conn.call({"op": "align_span", "span_start_s": span_start_s, "language": self.language,
                              "utts": [[u.index, u.start_s, u.end_s, list(u.words)] for u in utts]},
                             np.ascontiguousarray(audio, dtype=np.float32).tobytes())
            h = _answer(h)
            return [UttResult(int(i), None if w is None else [None if x is None else tuple(x) for x in w], e)
                    for i, w, e in h["results"]]

        def transcribe_words(self, audio, offset_s):
            h, _ = conn.call({"op": "transcribe", "offset_s": offset_s, "language": self.language},
                             np.ascontiguousarray(audio, dtype=np.float32).tobytes())
            return [(str(w), float(s), float(e)) for w, s, e in _answer(h)["words"]]

    return RemoteSpans()


class _Repr(str):
    """The server aligner's steps as the worker knows them: only their repr (the cache key) matters."""

    def __repr__(self) -> str:
        return str(self)


class ServedEngine(AlignerEngine):
    """A worker's engine when a model server holds the model: this process stays on the CPU."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        from worker.engines.loading import configure_threads  # noqa: PLC0415

        threads = options.get("threads")
        configure_threads(int(threads) if threads else None)
        self.name = name
        self.device = "cpu"
        self.cache_dir = options.get("cache_dir")
        self.conn = Connection(str(options["model_server"]), reconnect_s=float(options.get("server_reconnect_s", 120)))
        try:
            self.aligner = remote_aligner(self.conn)
        except ServerGone as exc:
            raise BootError(str(exc)) from None
        self.model = self.aligner.model

    def run(self, job, progress):
        try:
            return super().run(job, progress)
        except ServerGone as exc:
            raise JobError(f"{job.input}: {exc}", kind="engine") from None


# -- the server's entry -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.model_server", description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--options", default="{}")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH)
    args = ap.parse_args(argv)

    from worker.__main__ import (  # noqa: PLC0415
        Channel, Heartbeat, _own_memory_mb, _set_parent_death_signal, freeze_loaded_objects,
        keep_console_renderers_out, load_engine)

    _set_parent_death_signal()
    out = protocol.take_protocol_stdout()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_console_renderers_out()
    from telemetry.logging import configure_logging, get_logger  # noqa: PLC0415

    configure_logging(json_path=None, console="json", process="model-server")
    log = get_logger("model-server")
    channel = Channel(out)
    options = {k: v for k, v in json.loads(args.options).items() if k != "model_server"}
    t0 = time.monotonic()
    try:
        engine = load_engine(args.engine, options)
        aligner = engine.aligner
        if aligner is None:
            raise BootError(f"engine {args.engine!r} has no span aligner to serve")
    except BootError as exc:
        channel.send({"type": protocol.BOOT_ERROR, "error": str(exc)})
        return protocol.EXIT_BOOT_ERROR
    except Exception as exc:  # noqa: BLE001
        channel.send({"type": protocol.BOOT_ERROR, "error": f"{args.engine}: {type(exc).__name__}: {exc}"})
        log.error("boot_failed", traceback=traceback.format_exc())
        return protocol.EXIT_BOOT_ERROR
    server = SpanServer(aligner, max_batch=args.max_batch)
    server.listen(args.socket)
    freeze_loaded_objects()  # the collector's passes between requests then skip the model
    mem = _own_memory_mb()
    channel.send({"type": protocol.READY, "pid": os.getpid(), "protocol": protocol.PROTOCOL_VERSION,
                  "engine": args.engine, "model": getattr(engine, "model", ""), "role": "model_server",
                  "device": getattr(engine, "device", "cpu"), "startup_s": round(time.monotonic() - t0, 3),
                  "socket": args.socket, "calibration": [], **{k: round(v, 1) for k, v in mem.items()},
                  **({"vram_mb": v} if (v := gpumem.reserved_mb()) is not None else {})})
    heartbeat = Heartbeat(channel, args.heartbeat, int(os.environ.get("BATCHALIGN_SUPERVISE_PARENT_PID") or 0))
    heartbeat.start()
    stop = threading.Event()

    def watch_stdin() -> None:  # stdin closed or shutdown: leave
        stdin = os.fdopen(os.dup(0), "rb", buffering=0)
        try:
            while True:
                msg = protocol.read_frame(stdin)
                if msg is None or msg.get("type") == protocol.SHUTDOWN:
                    break
        except protocol.ProtocolError:
            pass
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    server.run_forever(stop)
    log.info("model_server_stopped", **server.stats)
    return protocol.EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
