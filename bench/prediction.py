"""Prediction error of the memory model, measured through real supervised runs.

For each engine/model: a run over 20 training recordings (3-60 s) teaches the model; a second run
over 10 other recordings (3-120 s) is admitted on what it learned, and each file's predicted peak
(what admission reserved) is set against the peak it really reached. Then, from a fresh store, a
run over eight recordings of at most 10 s and a run over one 10-minute recording: how far the
model extrapolates. One worker at a time, so every figure is one file's own. ``file CPU s`` is the
CPU the 30 training and test files took: what a worker setting (``--mmap-threshold``) costs.

    python -m bench.prediction                                  # all four; ~6 min on 2 cores
    python -m bench.prediction --engines synthetic-streaming whisper
    python -m bench.prediction --engines wav2vec --mmap-threshold glibc   # glibc's sliding threshold

Engines: the synthetic engine's two profiles (``total``: growth with the recording's length, as an
engine that loads whole files; ``streaming``: growth with the longest span), wav2vec2 with random
weights (``--wav2vec-size small``: 6 layers of 384; ``base``: 94 M parameters; memory does not
depend on what the weights are) and Whisper
with real weights (``--whisper-size tiny.en`` or ``base``; ``../shared/models/get_whisper.sh``, cached). Speech comes from
``../shared/synth`` (the synthetic engine reads only headers: silent WAVs stand in).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synth_corpus import make_corpus  # noqa: E402
from telemetry.model import quantile  # noqa: E402

SHORT = ["c1", "c2", "c3", "c4", "c5", "s1", "s2", "s3"]
MARGIN = 0.10  # the default memory.margin
ENGINES = ("synthetic-total", "synthetic-streaming", "wav2vec", "whisper")


def speech_corpus(folder: Path, durations: list[float], seed: int) -> None:
    """Recordings of the shared synthetic speech, joined to about the given lengths, with bullets;
    each dithered with its own noise (seeded by corpus and file), so no two share an utterance."""
    import zlib

    from bench.alignment_accuracy import build_recording

    rng = random.Random(seed)
    for i, total in enumerate(durations):
        names = SHORT[:]
        rng.shuffle(names)
        cha, _, _ = build_recording(names, folder, gap_s=rng.uniform(0.3, 1.5), total_s=total, stem=f"r{i:02d}")
        dither(cha.with_suffix(".wav"), zlib.crc32(f"{folder.name}/{i}/{seed}".encode()))


def dither(wav: Path, seed: int) -> None:
    """Faint noise on a recording, so no utterance's samples repeat another file's: the result
    cache would answer repeated utterances, and only real work is a memory sample."""
    import numpy as np
    import soundfile as sf

    audio, rate = sf.read(str(wav), dtype="float32")
    audio += np.random.default_rng(seed).standard_normal(len(audio)).astype(np.float32) * 1e-4
    sf.write(str(wav), audio, rate, subtype="PCM_16")


def run(corpus: Path, work: Path, tag: str, engine: str, extra: list[str], env: dict) -> list[dict]:
    """One supervised run; (predicted, observed) per finished file, from its event log."""
    log = work / f"{tag}.jsonl"
    cmd = [sys.executable, "-m", "supervisor.cli", str(corpus), "-o", str(work / f"out-{tag}"), "--engine", engine,
           "--progress", "off", "--workers", "1", "--log-json", str(log), "--state-dir", str(work / "state"),
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    evs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    adm = {e["file"]: e for e in evs if e["event"] == "file_admitted"}
    rows = []
    for e in evs:
        if e["event"] == "file_done" and e["file"] in adm:
            a = adm[e["file"]]
            if (e.get("stats") or {}).get("cached_utterances"):
                print(f"    {tag}/{e['file']}: {e['stats']['cached_utterances']} utterances came from the result "
                      f"cache: not a measurement of the model's work")
            rows.append({"file": e["file"], "audio_s": e["audio_seconds"], "predicted": a["predicted_mb"],
                         "observed": e["peak_mb"], "pred_growth": a["predicted_growth_mb"],
                         "growth": e["growth_mb"], "source": a["estimate_source"], "cpu_s": e.get("cpu_s") or 0.0,
                         "uncertain": a.get("estimate_uncertain")})
    kills = sum(1 for e in evs if e["event"] == "worker_killed")
    failed = [e for e in evs if e["event"] in ("file_failed", "file_quarantined")]
    if proc.returncode != 0 or failed or kills:
        print(f"    {tag}: exit {proc.returncode}, {kills} kills, {len(failed)} failed "
              f"{[f.get('reason') for f in failed][:2]} {proc.stderr.strip().splitlines()[-1:] if proc.returncode else ''}")
    return rows


WAV2VEC_SIZE = "small"
MMAP_THRESHOLD: str | None = None  # None: the configured default; "": glibc's sliding threshold
WHISPER_SIZE = "tiny.en"


def random_wav2vec(folder: Path) -> Path:
    """A random wav2vec2 CTC checkpoint: base size (94 M parameters) or a small one (6 layers of
    384, 22 M) that runs four times faster on a shared 2-core machine; memory follows the same
    span shape either way (what the weights are does not matter)."""
    from bench.worker_memory import build_wav2vec

    if WAV2VEC_SIZE == "base":
        return build_wav2vec(folder, "fp32")
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    build_wav2vec(folder, "fp32")  # tokenizer, feature extractor (and a base model, replaced below)
    torch.manual_seed(0)
    config = Wav2Vec2Config.from_pretrained(folder)
    config.update({"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536})
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    Wav2Vec2ForCTC(config).save_pretrained(folder, safe_serialization=True)
    return folder


def setup(engine: str, work: Path) -> tuple[str, list[str], dict, bool]:
    """(engine name for the CLI, extra CLI args, environment, speech corpora?) for one contender."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "BATCHALIGN_SUPERVISE_MEMORY_LEDGER": "off"}
    env = {k: v for k, v in env.items() if not k.startswith("BATCHALIGN_SUPERVISE_") or k.endswith("LEDGER")}
    if MMAP_THRESHOLD is not None:
        env[f"BATCHALIGN_SUPERVISE_ENGINE_{engine.split('-')[0].upper()}_MMAP_THRESHOLD"] = MMAP_THRESHOLD
    if engine.startswith("synthetic"):
        env.update(BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_PROFILE=engine.split("-")[1],
                   BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_BASELINE_MB="100",
                   BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_MB_PER_AUDIO_SECOND="1.5",
                   BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_CPU_SECONDS_PER_AUDIO_SECOND="0.004")
        return "synthetic", [], env, False
    if engine == "wav2vec":
        return "wav2vec", ["--model", str(random_wav2vec(work.parent / f"wav2vec-{WAV2VEC_SIZE}-random"))], env, True
    from bench.alignment_accuracy import whisper_dir

    folder = whisper_dir(WHISPER_SIZE)
    if folder is None:
        raise SystemExit(f"cannot fetch Whisper {WHISPER_SIZE} (../shared/models/get_whisper.sh)")
    return "whisper", ["--model", str(folder)], env, True


def measure(engine: str, top: Path, seed: int) -> dict:
    work = top / engine
    work.mkdir(parents=True)
    name, extra, env, speech = setup(engine, work)
    rng = random.Random(seed)
    train = [rng.uniform(3, 60) for _ in range(20)]
    test = [rng.uniform(3, 120) for _ in range(10)]
    short = [rng.uniform(3, 10) for _ in range(8)]

    def corpus(tag: str, durations: list[float]) -> Path:
        folder = work / tag
        if speech:
            speech_corpus(folder, durations, seed)
        else:
            make_corpus(folder, durations, seed=seed)
        return folder

    store = ["--telemetry", str(work / "learn.sqlite")]
    trained = run(corpus("train", train), work, "train", name, extra + store, env)
    rows = run(corpus("test", test), work, "test", name, extra + store, env)
    store = ["--telemetry", str(work / "extrapolate.sqlite")]
    learned = run(corpus("short", short), work, "short", name, extra + store, env)
    (long,) = run(corpus("long", [600.0]), work, "long", name, extra + store, env) or [None]
    err = [abs(r["predicted"] - r["observed"]) / r["observed"] for r in rows]
    under = [max(0.0, (r["observed"] - r["predicted"]) / r["observed"]) for r in rows]
    gerr = [abs(r["pred_growth"] - r["growth"]) / max(r["growth"], 1.0) for r in rows]
    return {"engine": engine, "n": len(rows), "p90": quantile(err, 0.9) if err else float("nan"),
            "worst_under": max(under) if under else float("nan"), "p90_growth": quantile(gerr, 0.9) if gerr else 0,
            "long": long, "short": learned, "rows": rows,
            "cpu_s": sum(r["cpu_s"] for r in trained + rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores) and print its path")
    ap.add_argument("--wav2vec-size", choices=("small", "base"), default="small")
    ap.add_argument("--whisper-size", choices=("tiny.en", "base"), default="tiny.en")
    ap.add_argument("--mmap-threshold", default=None,
                    help="the workers' mmap_threshold (e.g. 128KiB); 'glibc' for glibc's own sliding threshold")
    args = ap.parse_args(argv)
    global WAV2VEC_SIZE, WHISPER_SIZE, MMAP_THRESHOLD
    WAV2VEC_SIZE, WHISPER_SIZE = args.wav2vec_size, args.whisper_size
    MMAP_THRESHOLD = "" if args.mmap_threshold == "glibc" else args.mmap_threshold
    top = Path(tempfile.mkdtemp(prefix="bench-prediction-"))
    results = []
    try:
        for engine in args.engines:
            print(f"{engine}: 20 training files, 10 test files; 8 files <= 10 s then one of 10 min ...", flush=True)
            r = measure(engine, top, args.seed)
            results.append(r)
            for row in r["rows"]:
                print(f"    {row['file']:<10} {row['audio_s']:7.1f} s  predicted {row['predicted']:7.1f}  "
                      f"observed {row['observed']:7.1f} MiB  (growth {row['pred_growth']:6.1f} / {row['growth']:6.1f}, "
                      f"{row['source']})")
            if r["long"]:
                print("    learned on: " + ", ".join(f"{s['audio_s']:.1f} s -> {s['growth']:.1f}" for s in r["short"]))
                lg = r["long"]
                print(f"    10-minute file: predicted {lg['predicted']:.1f}, observed {lg['observed']:.1f} MiB "
                      f"(growth {lg['pred_growth']:.1f} / {lg['growth']:.1f}, {lg['source']})")
        print()
        head = (f"{'engine / model':<22} {'files':>5} {'p90 |err|/obs':>14} {'worst under':>12} "
                f"{'p90 growth err':>15} {'10 min: pred/obs':>17} {'file CPU s':>11}")
        print(head)
        print("-" * len(head))
        for r in results:
            lg = r["long"]
            ratio = f"{lg['predicted'] / lg['observed']:.2f}x" if lg else "failed"
            print(f"{r['engine']:<22} {r['n']:>5} {r['p90']:>13.1%} {r['worst_under']:>11.1%} "
                  f"{r['p90_growth']:>14.1%} {ratio:>17} {r['cpu_s']:>11.1f}")
        print(f"targets: p90 |predicted - observed| / observed <= 15% after 20 files; never under by more than the "
              f"margin ({MARGIN:.0%}); 10-minute file from files <= 10 s within 1.3x (peaks, baseline included)")
    finally:
        if args.keep:
            print(f"work folder: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
