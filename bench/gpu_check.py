"""GPU check: throughput and VRAM of supervised runs, per-worker models vs the model server.

For each model (random weights, configs built in code: nothing is downloaded) and for 1, 2, 4 and 8
files at once, one supervised run per mode:

* ``naive``: ``--model-server off``, one model copy per worker (each worker its own CUDA context);
* ``server``: ``--model-server on``, one process holds the model, CPU workers send it spans.

It prints audio seconds aligned per second (first file started to last file done, from the run's
log) and the device's peak memory above idle (NVML, polled by this script at 20 Hz), then a run of
8 files in the naive mode under a ``--vram-budget`` below what 8 workers need: every file must end
done with no CUDA out-of-memory. Then Whisper forced alignment's peak beside its weights, in this
process. Finally the targets and their ratios, measured side by side in this run:

    server throughput at 8 files    >= 3x one naive worker
    server VRAM at 8 files          <  1.5x at 1 file
    Whisper FA peak                 <= 1.15x its weights

Models: wav2vec2-base (95 M parameters), Whisper base-sized (74 M) and large-v2-sized (1.55 B, bf16);
Whisper needs a tokenizer folder (``--whisper-tokenizer``: any Whisper checkpoint folder; only its
tokenizer and processor files are read). ``--quick`` uses tiny models, short files and 1 and 2
files at once, and runs on a CPU (``--device cpu``) in about a minute: the tests run it so.

    python -m bench.gpu_check --whisper-tokenizer DIR [--out DIR]        # on a GPU machine
    python -m bench.gpu_check --quick --device cpu [--whisper-tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

MiB = 2**20
TARGET_SPEEDUP = 3.0
TARGET_VRAM_8_OVER_1 = 1.5
TARGET_FA_OVER_WEIGHTS = 1.15


# -- models (random weights, configs in code) ------------------------------------------------------

def build_wav2vec(folder: Path, size: str) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from conftest_models import build_tiny_wav2vec

    tiny = build_tiny_wav2vec(folder)
    if size == "base":  # wav2vec2-base: the defaults of Wav2Vec2Config, with the tiny model's vocabulary
        cfg = Wav2Vec2Config.from_pretrained(tiny)
        Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id)).save_pretrained(folder)
    return folder


WHISPER_SIZES = {
    # d_model, layers (each side), heads, ffn; alignment heads are any few of the upper half
    "tiny": (64, 2, 2, 128),
    "base": (512, 6, 8, 2048),
    "large-v2": (1280, 32, 20, 5120),
}


def build_whisper(folder: Path, size: str, tokenizer: Path, dtype: str) -> Path:
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    d, layers, heads, ffn = WHISPER_SIZES[size]
    real = WhisperConfig.from_pretrained(tokenizer)
    cfg = WhisperConfig(vocab_size=real.vocab_size, num_mel_bins=real.num_mel_bins, d_model=d,
                        encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                        max_source_positions=1500, max_target_positions=448, bos_token_id=real.bos_token_id,
                        eos_token_id=real.eos_token_id, pad_token_id=real.pad_token_id,
                        decoder_start_token_id=real.decoder_start_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # large-v2 initialises fast on a GPU
        model = WhisperForConditionalGeneration(cfg)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    gen = GenerationConfig.from_pretrained(tokenizer)
    gen.alignment_heads = [[layers - 1 - i % max(1, layers // 2), i % heads] for i in range(min(6, heads))]
    model.generation_config = gen
    folder.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(folder, safe_serialization=True)
    WhisperProcessor.from_pretrained(tokenizer).save_pretrained(folder)
    del model
    return folder


# -- one supervised run ----------------------------------------------------------------------------

class VramPoll(threading.Thread):
    """The device's used memory at 20 Hz (NVML); ``peak_mb`` above what was used when it started."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.idle_mb = self.peak_mb = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no GPU or no NVML: nothing to poll
            self.nvml = None

    def used_mb(self) -> float | None:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.h).used / MiB if self.nvml else None

    def run(self) -> None:
        self.idle_mb = self.used_mb()
        while not self.stop.wait(0.05):
            u = self.used_mb()
            if u is not None:
                self.peak_mb = max(self.peak_mb or 0.0, u - (self.idle_mb or 0.0))


@dataclass
class Run:
    model: str
    mode: str
    files: int
    rc: int
    done: int
    audio_s: float
    busy_s: float
    wall_s: float
    peak_vram_mb: float | None
    peak_host_mb: float | None
    cuda_ooms: int
    most_at_once: int
    error: str = ""

    @property
    def throughput(self) -> float:
        return self.audio_s / self.busy_s if self.busy_s > 0 else 0.0


def supervised(corpus: Path, work: Path, *, tag: str, engine: str, model: Path, device: str, dtype: str,
               mode: str, files: int, extra: list[str] | None = None) -> Run:
    out = work / f"out-{tag}"
    log = work / f"{tag}.jsonl"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "XDG_STATE_HOME": str(work / f"state-{tag}"),
           "BATCHALIGN_SUPERVISE_MEMORY_LEDGER": "off"}
    cmd = [sys.executable, "-m", "supervisor.cli", str(corpus), "-o", str(out), "--engine", engine,
           "--model", str(model), "--device", device, "--dtype", dtype, "--workers", str(files),
           "--model-server", "on" if mode == "server" else "off", "--progress", "off", "--log-json", str(log),
           "--memory-budget", "48GiB" if device.startswith("cuda") else "6GiB", *(extra or [])]
    poll = VramPoll()
    poll.start()
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - t0
    poll.stop.set()
    poll.join()
    evs = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")] if log.exists() else []
    done = [e for e in evs if e["event"] == "file_done"]
    started = [e["t"] for e in evs if e["event"] == "file_started"]
    busy = (max(e["t"] for e in done) - min(started)) if done and started else 0.0
    running, most = 0, 0
    for e in evs:  # files at once, from the log's order
        if e["event"] == "file_started":
            running += 1
            most = max(most, running)
        elif e["event"] in ("file_done", "file_failed"):
            running = max(0, running - 1)
    ooms = sum(1 for e in evs if e["event"] == "file_failed" and "cuda out of memory" in str(e.get("reason", "")).lower())
    host = max((e.get("used_mb") or 0 for e in evs if e["event"] == "memory_sample"), default=None)
    return Run(model=tag.split(":")[0], mode=mode, files=files, rc=r.returncode, done=len(done),
               audio_s=sum(e.get("audio_seconds") or 0 for e in done), busy_s=busy, wall_s=wall,
               peak_vram_mb=poll.peak_mb, peak_host_mb=host, cuda_ooms=ooms, most_at_once=most,
               error="" if r.returncode == 0 else r.stderr[-1500:])


def fa_peak(model_dir: Path, device: str, dtype: str, seconds: float) -> tuple[float, float] | None:
    """Whisper forced alignment of one span in this process: (peak allocated, the model loaded included;
    the weights alone) MiB."""
    import numpy as np
    import torch

    from worker.align import UttRequest
    from worker.engines.whisper import WhisperAligner

    if not device.startswith("cuda"):
        return None
    a = WhisperAligner.load(str(model_dir), device=device, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in a.hf.parameters()) / MiB if hasattr(a, "hf") else None
    audio = (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"] * int(max(1, seconds // 4))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    a.align_span(audio, 0.0, [UttRequest(0, 0.0, seconds, words)])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / MiB
    del a
    torch.cuda.empty_cache()
    return peak, weights or 0.0


# -- the check -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whisper-tokenizer", type=Path, help="a Whisper folder whose tokenizer files to reuse")
    ap.add_argument("--device", default="cuda", help="cuda (the point of this check) or cpu (to try it)")
    ap.add_argument("--quick", action="store_true", help="tiny models, short files, 1 and 2 files at once")
    ap.add_argument("--levels", default=None, help="files at once, e.g. 1,2,4,8")
    ap.add_argument("--max-minutes", type=float, default=6.5, help="start no run after this long")
    ap.add_argument("--out", type=Path, help="write the figures here as gpu_check.json")
    args = ap.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (try --quick --device cpu)")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if cuda else 'CPU'}", flush=True)
    levels = [int(x) for x in (args.levels or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    seconds = 20.0 if args.quick else 120.0
    deadline = time.monotonic() + args.max_minutes * 60
    from bench.synth_corpus import make_corpus

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    runs: list[Run] = []
    fa: dict[str, tuple[float, float]] = {}
    skipped: list[str] = []
    try:
        models = [("wav2vec2-base" if not args.quick else "wav2vec2-tiny", "wav2vec",
                   build_wav2vec(work / "w2v", "tiny" if args.quick else "base"), "bf16" if cuda else "fp32")]
        if args.whisper_tokenizer:
            for size in (["tiny"] if args.quick else ["base", "large-v2"]):
                dtype = "bf16" if cuda else "fp32"
                models.append((f"whisper-{size}", "whisper",
                               build_whisper(work / f"whisper-{size}", size, args.whisper_tokenizer, dtype), dtype))
        else:
            print("no --whisper-tokenizer: Whisper models skipped")
        print(f"models built in {time.monotonic() - (deadline - args.max_minutes * 60):.0f} s", flush=True)
        corpora = {n: work / f"corpus-{n}" for n in levels}
        for n, folder in corpora.items():
            make_corpus(folder, [seconds] * n, seed=n)
        print(f"{'model':16} {'mode':7} {'files':>5} {'audio s/s':>10} {'peak VRAM':>10} {'host MiB':>9} "
              f"{'at once':>7} {'done':>5}", flush=True)
        for name, engine, folder, dtype in models:  # alignment peaks first: quick, and a target of their own
            if engine == "whisper" and cuda:
                fa[name] = fa_peak(folder, args.device, dtype, 30.0)
                print(f"{name}: forced-alignment peak {fa[name][0]:.0f} MiB, weights {fa[name][1]:.0f} MiB", flush=True)
        # 1 and the most files at once first: the targets need those, 2 and 4 come after if time allows
        order = sorted(levels, key=lambda n: (n not in (min(levels), max(levels)), n))
        for n in order:
            for name, engine, folder, dtype in models:
                for mode in ("naive", "server"):
                    if time.monotonic() > deadline:
                        skipped.append(f"{name} {mode} {n}")
                        continue
                    r = supervised(corpora[n], work, tag=f"{name}:{mode}:{n}", engine=engine, model=folder,
                                   device=args.device, dtype=dtype, mode=mode, files=n)
                    runs.append(r)
                    vram = f"{r.peak_vram_mb:8.0f} M" if r.peak_vram_mb is not None else "       n/a"
                    print(f"{name:16} {mode:7} {n:>5} {r.throughput:>10.1f} {vram:>10} {r.peak_host_mb or 0:>9.0f} "
                          f"{r.most_at_once:>7} {r.done:>3}/{n}" + (f"  exit {r.rc}: {r.error[-300:]}" if r.rc else ""),
                          flush=True)
        budget_run = _budget_run(models, runs, corpora, levels, work, args, deadline, skipped)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = _targets(runs, fa, budget_run, cuda, levels, skipped)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(
            {"runs": [asdict(r) | {"throughput": r.throughput} for r in runs], "fa": fa,
             "budget_run": asdict(budget_run) if budget_run else None, "skipped": skipped}, indent=1))
    return 0 if ok else 1


def _budget_run(models, runs, corpora, levels, work, args, deadline, skipped) -> Run | None:
    """Naive mode, the most files at once, under a VRAM budget below what they need together."""
    n = max(levels)
    # Whisper base-sized if there is one (per-worker VRAM that 8 workers multiply), else the first
    name, engine, folder, dtype = next((m for m in models if m[0] == "whisper-base"), models[0])
    full = next((r for r in runs if r.model == name and r.mode == "naive" and r.files == n), None)
    if time.monotonic() > deadline:
        skipped.append(f"{name} budget run")
        return None
    cuda = args.device.startswith("cuda")
    if cuda and (full is None or not full.peak_vram_mb):
        skipped.append(f"{name} budget run (no naive {n}-file figure to size it)")
        return None
    budget_mb = int(full.peak_vram_mb * 0.5) if cuda else 1024
    r = supervised(corpora[n], work, tag=f"{name}:budget:{n}", engine=engine, model=folder, device=args.device,
                   dtype=dtype, mode="naive", files=n, extra=["--vram-budget", f"{budget_mb}MiB"])
    print(f"budget run: {name}, {n} files, --vram-budget {budget_mb} MiB"
          + ("" if cuda else " (no GPU: not enforced)")
          + f": {r.done}/{n} done, {r.cuda_ooms} CUDA out-of-memory, at most {r.most_at_once} at once, "
          f"peak VRAM {r.peak_vram_mb or 0:.0f} MiB", flush=True)
    r.model = f"{name} budget {budget_mb}"
    return r


def _targets(runs: list[Run], fa: dict, budget_run: Run | None, cuda: bool, levels: list[int],
             skipped: list[str]) -> bool:
    print("\ntargets (ratios from this run):")
    ok = all(r.rc == 0 and r.done == r.files for r in runs)
    hi = max(levels)
    for model in dict.fromkeys(r.model for r in runs):
        one = next((r for r in runs if r.model == model and r.mode == "naive" and r.files == 1), None)
        srv = next((r for r in runs if r.model == model and r.mode == "server" and r.files == hi), None)
        srv1 = next((r for r in runs if r.model == model and r.mode == "server" and r.files == 1), None)
        if one and srv and one.throughput > 0:
            x = srv.throughput / one.throughput
            print(f"  {model}: server throughput at {hi} files / one naive worker = {x:.2f}x "
                  f"(target >= {TARGET_SPEEDUP:g}x) {'met' if x >= TARGET_SPEEDUP else 'NOT met'}")
        if srv and srv1 and srv.peak_vram_mb and srv1.peak_vram_mb:
            v = srv.peak_vram_mb / srv1.peak_vram_mb
            print(f"  {model}: server VRAM at {hi} files / at 1 file = {v:.2f}x "
                  f"(target < {TARGET_VRAM_8_OVER_1:g}x) {'met' if v < TARGET_VRAM_8_OVER_1 else 'NOT met'}")
    for model, got in fa.items():
        if got:
            peak, weights = got
            x = peak / weights if weights else float("inf")
            print(f"  {model}: forced-alignment peak {peak:.0f} MiB / weights {weights:.0f} MiB = {x:.2f}x "
                  f"(target <= {TARGET_FA_OVER_WEIGHTS:g}x) {'met' if x <= TARGET_FA_OVER_WEIGHTS else 'NOT met'}")
    if budget_run is not None:
        fine = budget_run.rc == 0 and budget_run.done == budget_run.files and budget_run.cuda_ooms == 0
        ok = ok and fine
        print(f"  {budget_run.model}: every file done, no CUDA out-of-memory: {'yes' if fine else 'NO'}")
    if not cuda:
        print("  (CPU: no VRAM figures; the ratios above are not GPU figures)")
    if skipped:
        print(f"  skipped for time: {', '.join(skipped)}")
    print("all runs finished every file" if ok else "SOME RUNS FAILED")
    return ok


if __name__ == "__main__":
    sys.exit(main())
