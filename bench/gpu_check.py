"""GPU smoke check: whole supervised runs with CUDA workers, and GPU memory per span length.

Builds small random models (wav2vec2 CTC, and Whisper with a real tokenizer folder if one is given),
runs ``batchalign-supervise`` on the example corpus with ``--device cuda`` in fp32 and bf16, checks
every utterance got a ``%wor`` tier, and prints the GPU memory one worker needs for 60 s vs 10 min of
audio (spans stream, so the long recording must not need more).

    python -m bench.gpu_check [--whisper-tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def run(corpus: Path, out: Path, engine: str, model: Path, dtype: str, work: Path, device: str) -> dict:
    log = out.with_suffix(".jsonl")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "XDG_STATE_HOME": str(work / "state"),
           "BATCHALIGN_SUPERVISE_MEMORY_LEDGER": "off"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", str(corpus), "-o", str(out), "--engine", engine,
                        "--model", str(model), "--device", device, "--dtype", dtype, "--workers", "2",
                        "--progress", "off", "--log-json", str(log), "--memory-budget", "16GiB"],
                       env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    utts = wors = 0
    for cha in out.rglob("*.cha"):
        lines = cha.read_text().splitlines()
        utts += sum(ln.startswith("*") for ln in lines)
        wors += sum(ln.startswith("%wor:") for ln in lines)
    evs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    done = [e for e in evs if e["event"] == "file_done"]
    return {"rc": r.returncode, "wall": wall, "files": len(done), "utts": utts, "wors": wors,
            "peak_mb": max((e["peak_mb"] for e in done), default=0), "stderr": r.stderr[-1500:]}


def gpu_span_memory(model_dir: Path, work: Path) -> None:
    """One engine in this process: GPU peak for 60 s vs 10 min recordings (streamed spans)."""
    import numpy as np
    import soundfile as sf
    import torch

    from bench.synth_corpus import chat_text
    from worker.engines.base import Job
    from worker.engines.wav2vec import Wav2VecEngine
    import random

    engine = Wav2VecEngine({"model": str(model_dir), "device": "cuda", "dtype": "bf16", "span_seconds": 30,
                            "cache_dir": str(work / "cache")})
    for seconds in (60, 600):
        folder = work / f"long{seconds}"
        folder.mkdir()
        rng = np.random.default_rng(0)
        sf.write(folder / "rec.wav", (rng.standard_normal(seconds * 16000) * 0.05).astype(np.float32), 16000)
        (folder / "rec.cha").write_text(chat_text("rec", seconds, random.Random(1)))
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.monotonic()
        engine.run(Job(job="x", input=folder / "rec.cha", output=folder / "out.cha", media=folder / "rec.wav",
                       rel="rec.cha", options={}), lambda f: None)
        peak = torch.cuda.max_memory_allocated() - base
        print(f"  {seconds:>4} s recording: GPU peak above the loaded model {peak / 2**20:7.1f} MiB, "
              f"{time.monotonic() - t0:.2f} s")
        engine.release()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper-tokenizer", type=Path, help="a Whisper folder whose tokenizer files to reuse")
    ap.add_argument("--device", default="cuda", help="cuda (the point of this check) or cpu (to try the script)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'CPU'}")
    from conftest_models import build_tiny_wav2vec
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        tiny = build_tiny_wav2vec(work / "w2v-tiny")
        base = work / "w2v-base"
        shutil.copytree(tiny, base)
        cfg = Wav2Vec2Config.from_pretrained(tiny)
        big = Wav2Vec2Config(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id)
        Wav2Vec2ForCTC(big).save_pretrained(base)
        models = [("wav2vec", base)]
        if args.whisper_tokenizer:
            from test_whisper import build_tiny_whisper

            models.append(("whisper", build_tiny_whisper(work / "whisper-tiny", args.whisper_tokenizer)))
        for engine, model in models:
            for dtype in ("fp32", "bf16"):
                r = run(ROOT / "examples" / "corpus", work / f"out-{engine}-{dtype}", engine, model, dtype, work,
                        args.device)
                ok = r["rc"] == 0 and r["files"] == 4 and r["wors"] == r["utts"] > 0
                print(f"{engine:8} {dtype}: exit {r['rc']}, {r['files']}/4 files, %wor {r['wors']}/{r['utts']} "
                      f"utterances, wall {r['wall']:.1f} s, worker host peak {r['peak_mb']:.0f} MiB "
                      f"-> {'OK' if ok else 'FAILED'}")
                if not ok:
                    print(r["stderr"])
        if args.device.startswith("cuda"):
            print("GPU memory per recording length (wav2vec2-base size, bf16, 30 s spans):")
            gpu_span_memory(base, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
