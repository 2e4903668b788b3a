"""Memory and speed of real alignment workers: one vs four, fp32 vs bf16, shared vs private weights,
a 60 s vs a 10 min recording, fresh interpreters vs workers forked from a loaded runtime.

Each worker is a separate process that loads the model folder through the engine's own loading
path, aligns a short warm-up file (so its weights are paged in and lazy allocations made, as in a
worker that has served one file), reports its memory, waits until every worker of its group is
ready, then aligns its recordings. Figures per worker: RSS, USS (private pages) and PSS (private
pages plus a fair share of the shared ones) when ready, and per file the peak RSS (VmHWM, reset when
the file starts), peak USS, wall and CPU time. For a group: the sum of PSS when all are ready, its
peak while they work, and after; a page shared by four workers counts once in that sum.

Models: a base-size wav2vec2 CTC model (``Wav2Vec2Config()`` defaults, 94 M parameters, random
weights with a character vocabulary: memory and time do not depend on the weights' values) and real
Whisper base weights (``../shared/models/get_whisper.sh``). bf16 runs load a bf16 copy of the
checkpoint, so bf16 weights can be shared too; ``--bf16-from-fp32`` adds bf16 converted at load
(private weights). Recordings are synth speech looped into a 60 s and a 10 min WAV with utterance
bullets every few seconds. ``fork`` groups fork their workers from one process that imported torch
and transformers (and ran nothing), so the runtime's own pages are shared as well as the weights.

    python -m bench.worker_memory                      # the default matrix (about 10 min, 2 cores)
    python -m bench.worker_memory --engines whisper --workers 1 --lengths 60 --start spawn
    python -m bench.worker_memory --json out.json      # also write every figure as JSON

Targets printed beside the figures: four workers of one model cost under 1.5x one worker (sum of
PSS); a 10 min recording peaks no higher than a 60 s one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.selfmem import clear_hwm, own_memory_mb, read_status_kb  # noqa: E402

MiB = 1 << 20
CHAR_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


# -- /proc readings ---------------------------------------------------------------------------------


def proc_mem(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) in MiB from smaps_rollup, and VmHWM (the worker's
    own readers, so the benchmark measures what a worker reports)."""
    m = own_memory_mb(pid)
    hwm = read_status_kb("VmHWM", pid)
    out = {"rss": m["rss_mb"], "pss": m["pss_mb"], "uss": m["uss_mb"]}
    if hwm is not None:
        out["hwm"] = hwm / 1024
    return out


# -- the worker process -------------------------------------------------------------------------------


def wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.05)


def child(args: argparse.Namespace) -> int:
    """One worker: load, warm up on a short file, report, wait for the group, align, report, wait."""
    t0 = time.perf_counter()
    opts = {"model": args.model, "dtype": args.dtype, "threads": args.threads,
            "share_weights": args.weights == "shared"}
    if args.engine == "whisper":
        from worker.engines.whisper import WhisperEngine as EngineCls
    else:
        from worker.engines.wav2vec import Wav2VecEngine as EngineCls
    from worker.engines.base import Job

    out = Path(args.out) / f"w{args.worker}"
    out.mkdir(parents=True, exist_ok=True)

    def job(k: int, cha: str) -> Job:
        # No cache_dir: the result cache would answer the looped recordings' repeated utterances
        # without running the model.
        return Job(f"j{k}", Path(cha), out / f"out{k}.cha", None, Path(cha).name)

    engine = EngineCls(opts)
    hf = engine.aligner.hf
    emit({"event": "loaded", "worker": args.worker, "pid": os.getpid(), "load_s": time.perf_counter() - t0,
          **proc_mem(), "shared_mb": getattr(hf, "_shared_bytes", 0) / MiB,
          "private_mb": getattr(hf, "_private_bytes", 0) / MiB})
    # A worker's steady state: weights paged in, lazy allocations made, heap trimmed.
    engine.run(job(-1, args.warmup), lambda f: None)
    engine.release()
    emit({"event": "ready", "worker": args.worker, "pid": os.getpid(), **proc_mem()})
    wait_for(args.go)
    for k, cha in enumerate(args.files):
        before = proc_mem()
        clear_hwm()
        peak = {"uss": before["uss"], "pss": before["pss"]}
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.1):
                m = proc_mem()
                for key in peak:
                    peak[key] = max(peak[key], m.get(key, 0.0))

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        t, c = time.perf_counter(), time.process_time()
        res = engine.run(job(k, cha), lambda f: None)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        stop.set()
        th.join()
        after = proc_mem()
        engine.release()
        emit({"event": "file", "worker": args.worker, "file": Path(cha).stem, "audio_s": res.audio_seconds,
              "wall_s": wall, "cpu_s": cpu, "uss_before": before["uss"], "rss_before": before["rss"],
              "peak_rss": after.get("hwm", 0.0), "peak_uss": max(peak["uss"], after["uss"]),
              "peak_pss": max(peak["pss"], after["pss"]), "aligned_words": res.stats.get("aligned_words"),
              "words": res.stats.get("words")})
    emit({"event": "done", "worker": args.worker, "pid": os.getpid(), **proc_mem()})
    wait_for(args.stop)
    return 0


def zygote(args: argparse.Namespace) -> int:
    """Import the runtime once, then fork the workers: they share its pages copy-on-write.

    Nothing here runs a torch operation, so no thread pool exists at fork time.
    """
    import transformers  # noqa: F401
    import worker.align  # noqa: F401

    if args.engine == "whisper":
        import transformers.models.whisper.modeling_whisper  # noqa: F401
        import worker.engines.whisper  # noqa: F401
    else:
        import transformers.models.wav2vec2.modeling_wav2vec2  # noqa: F401
        import worker.engines.wav2vec  # noqa: F401
    # Objects the children never free need not be scanned by their collectors: a collection
    # writes to every tracked object's header and so copies the page it sits on.
    gc.collect()
    gc.freeze()
    emit({"event": "zygote", "pid": os.getpid(), **proc_mem()})
    pids = []
    for k in range(args.workers):
        pid = os.fork()
        if pid == 0:
            args.worker = k
            code = 1
            try:
                code = child(args)
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    status = 0
    for pid in pids:
        _, st = os.waitpid(pid, 0)
        status = status or os.waitstatus_to_exitcode(st)
    return status


def emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


# -- building inputs ------------------------------------------------------------------------------------


def build_wav2vec(folder: Path, dtype: str) -> Path:
    """A base-size random wav2vec2 CTC checkpoint (safetensors) with a character vocabulary."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CHAR_VOCAB)}))
    Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                         word_delimiter_token="|", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(CHAR_VOCAB), pad_token_id=0))
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def whisper_copy(src: Path, folder: Path, dtype: str) -> Path:
    """``src`` as is for fp32; a bf16 copy (weights, processor, generation config) for bf16."""
    if dtype == "fp32":
        return src
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if not (folder / "config.json").is_file():
        model = WhisperForConditionalGeneration.from_pretrained(src).to(torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        WhisperProcessor.from_pretrained(src).save_pretrained(folder)
    return folder


def model_folder(engine: str, ckpt: str, workdir: Path) -> Path | None:
    if engine == "wav2vec":
        return build_wav2vec(workdir / f"wav2vec-base-{ckpt}", ckpt)
    from bench.alignment_accuracy import whisper_dir

    base = whisper_dir("base")
    return None if base is None else whisper_copy(base, workdir / f"whisper-base-{ckpt}", ckpt)


def recordings(workdir: Path, lengths: list[int]) -> dict[int, Path]:
    from bench.alignment_accuracy import FILES, build_recording

    out = {}
    for sec in lengths:
        cha, _, _ = build_recording(FILES, workdir / f"rec{sec}", gap_s=1.0, total_s=float(sec), stem=f"rec{sec}")
        out[sec] = cha
    return out


# -- running groups -----------------------------------------------------------------------------------------


@dataclass
class Group:
    engine: str
    dtype: str
    weights: str
    workers: int
    files: list[str]
    checkpoint: str = ""
    start: str = "spawn"
    loaded: list[dict[str, float]] = field(default_factory=list)
    ready: list[dict[str, float]] = field(default_factory=list)
    done: list[dict[str, float]] = field(default_factory=list)
    files_out: list[list[dict[str, Any]]] = field(default_factory=list)
    zygote: dict[str, float] = field(default_factory=dict)
    sum_pss_ready: float = 0.0
    sum_pss_peak: float = 0.0
    sum_pss_done: float = 0.0
    wall_s: float = 0.0
    error: str | None = None

    @property
    def label(self) -> str:
        ckpt = f", {self.checkpoint} ckpt" if self.checkpoint and self.checkpoint != self.dtype else ""
        fork = " fork" if self.start == "fork" else ""
        return f"{self.engine} {self.dtype}{ckpt} {self.weights} x{self.workers}{fork}"


def run_group(g: Group, model: str, files: list[Path], warmup: Path, workdir: Path, threads: int) -> Group:
    """Start the group's workers, take the joint readings, and collect every worker's figures."""
    import queue

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    tag = f"{g.engine}-{g.dtype}-{g.checkpoint}-{g.weights}-{g.workers}-{g.start}"
    out = workdir / "out" / tag
    out.mkdir(parents=True, exist_ok=True)
    go, stop = out / "go", out / "stop"
    for f in (go, stop):
        f.unlink(missing_ok=True)
    common = ["--engine", g.engine, "--model", model, "--dtype", g.dtype, "--weights", g.weights,
              "--threads", str(threads), "--out", str(out), "--go", str(go), "--stop", str(stop),
              "--warmup", str(warmup), "--files", *map(str, files)]
    base = [sys.executable, "-m", "bench.worker_memory"]
    if g.start == "fork":
        cmds = [base + ["zygote", "--workers", str(g.workers), *common]]
    else:
        cmds = [base + ["child", "--worker", str(k), *common] for k in range(g.workers)]
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=str(ROOT)) for c in cmds]
    messages: queue.Queue = queue.Queue()

    def reader(p: subprocess.Popen) -> None:
        for line in p.stdout:
            try:
                messages.put(json.loads(line))
            except ValueError:
                pass
        err = p.stderr.read().strip().splitlines()
        messages.put({"event": "exit", "error": err[-1] if err else f"exited with {p.wait()}"})

    for p in procs:
        threading.Thread(target=reader, args=(p,), daemon=True).start()

    def collect(event: str) -> dict[int, dict[str, Any]]:
        got: dict[int, dict[str, Any]] = {}
        while len(got) < g.workers:
            msg = messages.get(timeout=3600)
            if msg["event"] == "exit":
                raise RuntimeError(msg["error"])
            if msg["event"] == "zygote":
                g.zygote = msg
            elif msg["event"] == "loaded":
                g.loaded.append(msg)
            elif msg["event"] == "file":
                g.files_out[msg["worker"]].append(msg)
            elif msg["event"] == event:
                got[msg["worker"]] = msg
        return got

    def sum_pss(pids: list[int]) -> float:
        return sum(proc_mem(pid).get("pss", 0.0) for pid in pids)

    g.files_out = [[] for _ in range(g.workers)]
    try:
        ready = collect("ready")
        g.ready = [ready[k] for k in sorted(ready)]
        pids = [m["pid"] for m in g.ready] + ([g.zygote["pid"]] if g.zygote else [])
        time.sleep(1.0)
        g.sum_pss_ready = sum_pss(pids)
        g.sum_pss_peak = g.sum_pss_ready
        halt = threading.Event()

        def poll() -> None:
            while not halt.wait(0.25):
                g.sum_pss_peak = max(g.sum_pss_peak, sum_pss(pids))

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        t1 = time.perf_counter()
        go.touch()
        done = collect("done")
        g.wall_s = time.perf_counter() - t1
        halt.set()
        th.join()
        g.done = [done[k] for k in sorted(done)]
        g.sum_pss_done = sum_pss(pids)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the other groups still run
        g.error = str(exc)
    finally:
        stop.touch()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return g


# -- report -------------------------------------------------------------------------------------------------


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def print_groups(groups: list[Group]) -> None:
    print("\nper group (MiB; per-worker means; 'ready' = after loading and one short warm-up file, weights paged in)")
    print(f"{'group':38} {'load s':>6} {'RSS':>5} {'USS':>5} {'PSS':>5} {'ΣPSS ready':>10} {'ΣPSS peak':>9} "
          f"{'ΣPSS done':>9}")
    for g in groups:
        if g.error:
            print(f"{g.label:38} failed: {g.error}")
            continue
        r = g.ready
        print(f"{g.label:38} {mean([x['load_s'] for x in g.loaded]):6.1f} {mean([x['rss'] for x in r]):5.0f} "
              f"{mean([x['uss'] for x in r]):5.0f} {mean([x['pss'] for x in r]):5.0f} {g.sum_pss_ready:10.0f} "
              f"{g.sum_pss_peak:9.0f} {g.sum_pss_done:9.0f}")
    print("\nper file (MiB; peak RSS = VmHWM reset at the file's start; growth = peak USS - USS before the file;"
          " s/min = seconds per audio minute)")
    print(f"{'group':38} {'file':6} {'audio s':>7} {'wall s':>7} {'wall s/min':>10} {'cpu s/min':>9} "
          f"{'pk RSS':>6} {'pk USS':>6} {'growth':>6} {'words':>9}")
    for g in groups:
        if g.error or not g.files_out or not g.files_out[0]:
            continue
        names = [f["file"] for f in g.files_out[0]]
        for i, name in enumerate(names):
            rows = [fs[i] for fs in g.files_out if len(fs) > i]
            audio = mean([f["audio_s"] or 0.0 for f in rows])
            minutes = max(audio, 1e-9) / 60
            words = f"{sum(f['aligned_words'] or 0 for f in rows)}/{sum(f['words'] or 0 for f in rows)}"
            print(f"{g.label:38} {name:6} {audio:7.0f} {mean([f['wall_s'] for f in rows]):7.1f} "
                  f"{mean([f['wall_s'] for f in rows]) / minutes:10.1f} "
                  f"{mean([f['cpu_s'] for f in rows]) / minutes:9.1f} "
                  f"{mean([f['peak_rss'] for f in rows]):6.0f} {mean([f['peak_uss'] for f in rows]):6.0f} "
                  f"{mean([f['peak_uss'] - f['uss_before'] for f in rows]):6.0f} {words:>9}")


def print_targets(groups: list[Group]) -> None:
    print("\ntargets")
    ok = [g for g in groups if not g.error and g.files_out and g.files_out[0]]
    for many in [g for g in ok if g.workers > 1]:
        key = (many.engine, many.dtype, many.start)
        ones = [g for g in ok if g.workers == 1 and (g.engine, g.dtype, g.start) == key]
        ones = ones or [g for g in ok if g.workers == 1 and (g.engine, g.dtype) == (many.engine, many.dtype)]
        if not ones:
            continue
        one = ones[0]
        r_ready = many.sum_pss_ready / max(one.sum_pss_ready, 1e-9)
        one_peak = one.files_out[0][0]["peak_pss"]
        r_peak = many.sum_pss_peak / max(one_peak, 1e-9)
        verdict = "meets" if r_ready < 1.5 else "misses"
        print(f"  {many.label} vs {one.label}: ΣPSS ready {many.sum_pss_ready:.0f} vs {one.sum_pss_ready:.0f} MiB "
              f"= {r_ready:.2f}x ({verdict} < 1.5x); all aligning {one.files_out[0][0]['file']}: "
              f"{many.sum_pss_peak:.0f} vs {one_peak:.0f} MiB = {r_peak:.2f}x")
    for one in [g for g in ok if g.workers == 1]:
        files = one.files_out[0]
        short = [f for f in files if (f["audio_s"] or 0) <= 120]
        long = [f for f in files if (f["audio_s"] or 0) > 120]
        if short and long:
            s, lg = short[0], long[0]
            verdict = "meets" if lg["peak_rss"] <= s["peak_rss"] * 1.02 else "misses"
            print(f"  {one.label}: {lg['audio_s']:.0f} s recording peak RSS {lg['peak_rss']:.0f} MiB vs "
                  f"{s['audio_s']:.0f} s {s['peak_rss']:.0f} MiB = {lg['peak_rss'] / s['peak_rss']:.2f}x "
                  f"({verdict}: no higher, 2% tolerance); peak USS {lg['peak_uss']:.0f} vs {s['peak_uss']:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    for name in ("child", "zygote"):
        c = sub.add_parser(name)
        c.add_argument("--worker", type=int, default=0)
        c.add_argument("--workers", type=int, default=1)
        c.add_argument("--engine", required=True)
        c.add_argument("--model", required=True)
        c.add_argument("--dtype", default="fp32")
        c.add_argument("--weights", default="shared")
        c.add_argument("--threads", type=int, default=1)
        c.add_argument("--out", required=True)
        c.add_argument("--go", required=True)
        c.add_argument("--stop", required=True)
        c.add_argument("--warmup", required=True)
        c.add_argument("--files", nargs="+", required=True)
    ap.add_argument("--engines", nargs="+", default=["wav2vec", "whisper"], choices=["wav2vec", "whisper"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--weights", nargs="+", default=["shared", "private"], choices=["shared", "private"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[60, 600],
                    help="recording lengths in seconds; single workers align all, groups only the shortest")
    ap.add_argument("--bf16-workers", nargs="+", type=int, default=[1],
                    help="group sizes for bf16 (default: one worker, to keep the default run short)")
    ap.add_argument("--start", nargs="+", default=["spawn", "fork"], choices=["spawn", "fork"],
                    help="spawn: each worker a fresh interpreter (as the supervisor starts them); fork: workers "
                         "forked from one process that imported torch and transformers first")
    ap.add_argument("--bf16-from-fp32", action="store_true",
                    help="also run bf16 from the fp32 checkpoint (converted at load, private weights)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / workers, >= 1)")
    ap.add_argument("--workdir", type=Path, help="keep models and recordings here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    if args.cmd == "child":
        return child(args)
    if args.cmd == "zygote":
        return zygote(args)

    cores = os.cpu_count() or 1
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    workdir = args.workdir or Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recs = recordings(workdir, sorted(args.lengths))
    shortest = [recs[min(recs)]]
    from bench.alignment_accuracy import build_recording

    warmup, _, _ = build_recording(["c1", "s3"], workdir / "warmup", gap_s=0.5, stem="warmup")
    groups: list[Group] = []
    for engine in args.engines:
        for dtype in args.dtypes:
            for weights in args.weights:
                # bf16 weights are shareable from a bf16 checkpoint; "private" bf16 is the fp32
                # checkpoint converted at load, run only when asked for.
                ckpt = "fp32" if dtype == "bf16" and weights == "private" else dtype
                if ckpt != dtype and not args.bf16_from_fp32:
                    continue
                model = model_folder(engine, ckpt, workdir)
                if model is None:
                    print(f"{engine}: model not available, skipped")
                    break
                for start in args.start:
                    for n in sorted(args.workers if dtype == "fp32" else args.bf16_workers):
                        if n == 1 and weights == "private" and dtype == "fp32":
                            continue  # one worker holds the same resident pages either way
                        if start == "fork" and (n == 1 or weights == "private"):
                            continue  # forking pays off only between workers, and for the runtime's pages
                        longest = n == 1 and dtype == "fp32" and start == "spawn"
                        files = [recs[k] for k in sorted(recs)] if longest else shortest
                        threads = args.threads or max(1, cores // n)
                        g = Group(engine, dtype, weights, n, [f.stem for f in files], checkpoint=ckpt, start=start)
                        print(f"running {g.label} on {', '.join(g.files)} ({threads} threads each) ...", flush=True)
                        groups.append(run_group(g, str(model), files, warmup, workdir, threads))
    print(f"\nmachine: {cores} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB; "
          f"total bench time {time.perf_counter() - t0:.0f} s")
    print_groups(groups)
    print_targets(groups)
    if args.json:
        args.json.write_text(json.dumps([g.__dict__ for g in groups], indent=1, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
