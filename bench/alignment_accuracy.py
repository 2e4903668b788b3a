"""Word-boundary accuracy of Whisper forced alignment on synthetic speech with exact word times.

Each ``../shared/synth`` transcript has its ``%wor`` tier removed, so the engine sees only the
utterance bullets; its output ``%wor`` is scored against the synthesizer's word times (words marked
``merged`` are skipped): the mean absolute difference of word starts and ends, in milliseconds.
Beside each model's figure stands the baseline that spreads an utterance's words over its bullet in
proportion to their characters: a model is only useful where it beats that.

usage: python -m bench.alignment_accuracy [--models tiny.en base] [--files c1 c2 ...] [--threads 2]

Models are the real Whisper weights converted by ``../shared/models/get_whisper.sh`` into
``$BATCHALIGN_TEST_CACHE`` (default ``~/.cache/batchalign-supervise-tests``); a missing one is
fetched once, or skipped when it cannot be.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SYNTH = SHARED / "synth"
GET_WHISPER = SHARED / "models" / "get_whisper.sh"
FILES = ["c1", "c2", "c3", "c4", "c5", "s1", "s2", "s3"]
HEADER = ("@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tPAR Participant\n"
          "@ID:\teng|synth|PAR|||||Participant|||\n")

_WOR_WORD = re.compile(r"(\S+) \x15(\d+)_(\d+)\x15")
_BULLET = re.compile(r"\x15(\d+)_(\d+)\x15")

Span = tuple[float, float]


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHALIGN_TEST_CACHE", "~/.cache/batchalign-supervise-tests")).expanduser()


def whisper_dir(size: str, *, fetch: bool = True) -> Path | None:
    """The converted Whisper folder for ``size`` (tiny.en or base), fetched when missing."""
    out = cache_dir() / f"whisper-{size}"
    if (out / "config.json").is_file():
        return out
    if not fetch or not GET_WHISPER.is_file():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["bash", str(GET_WHISPER), sys.executable, str(out), size],
                          capture_output=True, text=True, timeout=900)
    return out if proc.returncode == 0 and (out / "config.json").is_file() else None


# -- inputs and truth ----------------------------------------------------------------------------


def truth_words(name: str, synth: Path = SYNTH) -> list[Span | None]:
    """True (start, end) seconds per transcript word; ``None`` where the synthesizer merged words."""
    out: list[Span | None] = []
    for w in json.loads((synth / f"{name}.json").read_text())["words"]:
        n = len(w["word"].split())
        out += [None] * n if w.get("merged") else [(w["start_ms"] / 1000, w["end_ms"] / 1000)]
    return out


def strip_wor(text: str) -> str:
    """The transcript as an aligner input: ``%wor`` tiers removed, bullets kept."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("%wor:"))


def spread_baseline(words: list[str], start: float, end: float) -> list[Span]:
    """Words laid over [start, end] in proportion to their characters."""
    chars = [len(w) for w in words]
    total = sum(chars) or 1
    out, acc = [], 0
    for c in chars:
        out.append((start + (end - start) * acc / total, start + (end - start) * (acc + c) / total))
        acc += c
    return out


def read_wor(text: str) -> list[list[Span | None]]:
    """Word times per ``%wor`` tier of a CHAT text, ``None`` for a word without a bullet."""
    tiers = []
    for line in text.splitlines():
        if not line.startswith("%wor:"):
            continue
        body = line.split("\t", 1)[1] if "\t" in line else line[5:]
        times: list[Span | None] = []
        for tok in re.split(r"(\S+ \x15\d+_\d+\x15)", body):
            m = _WOR_WORD.fullmatch(tok.strip())
            if m:
                times.append((int(m.group(2)) / 1000, int(m.group(3)) / 1000))
            else:
                times += [None for t in tok.split() if t not in (".", "?", "!")]
        tiers.append(times)
    return tiers


def boundary_errors(pred: list[Span | None], truth: list[Span | None]) -> list[float]:
    """Absolute start and end differences (seconds) of the scored words."""
    out = []
    for p, t in zip(pred, truth):
        if t is None or p is None:
            continue
        out += [abs(p[0] - t[0]), abs(p[1] - t[1])]
    return out


@dataclass
class Score:
    name: str
    model_ms: float
    baseline_ms: float
    words: int
    aligned: int
    seconds: float


def score_files(model: str, files: list[str], workdir: Path, *, threads: int = 2,
                synth: Path = SYNTH) -> list[Score]:
    """Align each synth file (``%wor`` stripped) with the Whisper engine and score it."""
    from worker.engines.base import Job
    from worker.engines.whisper import WhisperEngine

    engine = WhisperEngine({"model": model, "threads": threads, "cache_dir": str(workdir / "cache")})
    scores = []
    for name in files:
        src = (synth / f"{name}.cha").read_text()
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.cha").write_text(strip_wor(src))
        link = folder / f"{name}.wav"
        if not link.exists():
            link.symlink_to(synth / f"{name}.wav")
        out = folder / "out.cha"
        t0 = time.perf_counter()
        engine.run(Job(name, folder / f"{name}.cha", out, None, f"{name}.cha",
                       {"cache_dir": str(workdir / "cache")}), lambda f: None)
        seconds = time.perf_counter() - t0
        engine.release()
        (pred,) = read_wor(out.read_text())
        truth = truth_words(name, synth)
        main = next(line for line in src.splitlines() if line.startswith("*"))
        b = _BULLET.search(main)
        words = main.split("\t", 1)[1].split(" \x15")[0].split()
        words = [w for w in words if w not in (".", "?", "!")]
        base = spread_baseline(words, int(b.group(1)) / 1000, int(b.group(2)) / 1000)
        scores.append(Score(
            name,
            1000 * float(np.mean(boundary_errors(pred, truth))),
            1000 * float(np.mean(boundary_errors(base, truth))),
            len(truth), sum(p is not None for p in pred), seconds,
        ))
    return scores


def score_joined(model: str, files: list[str], workdir: Path, *, threads: int = 2, bullets: bool = True,
                 synth: Path = SYNTH) -> Score:
    """The synth files joined by 1.5 s pauses into one multi-utterance recording and scored as one.

    With ``bullets`` the utterances keep their true bullets; without, their times are recovered
    from the recording first (``worker.engines.timing``)."""
    from worker.engines.base import Job
    from worker.engines.whisper import WhisperEngine

    label = "joined" if bullets else "untimed"
    cha, _spans, truth = build_recording(files, workdir / label, gap_s=1.5, bullets=bullets, synth=synth)
    engine = WhisperEngine({"model": model, "threads": threads, "cache_dir": str(workdir / "cache")})
    out = workdir / label / "out.cha"
    t0 = time.perf_counter()
    engine.run(Job(label, cha, out, None, cha.name, {"cache_dir": str(workdir / "cache")}), lambda f: None)
    seconds = time.perf_counter() - t0
    preds = read_wor(out.read_text())
    errors, base_errors = [], []
    lines = [line for line in cha.read_text().splitlines() if line.startswith("*")]
    for pred, true, line, name in zip(preds, truth, lines, _cycle(files)):
        errors += boundary_errors(pred, true)
        known = [t for t in true if t is not None]
        words = [w for w in line.split("\t", 1)[1].split(" \x15")[0].split() if w not in (".", "?", "!")]
        # the baseline spreads words over the true utterance span (the bullets, when there are any)
        base_errors += boundary_errors(spread_baseline(words, known[0][0], known[-1][1]), true)
    n = sum(len(t) for t in truth)
    return Score(label, 1000 * float(np.mean(errors)), 1000 * float(np.mean(base_errors)), n,
                 sum(p is not None for tier in preds for p in tier), seconds)


def _cycle(items: list[str]):
    while True:
        yield from items


def build_recording(names: list[str], folder: Path, *, gap_s: float = 1.0, bullets: bool = True,
                    total_s: float | None = None, stem: str = "rec",
                    synth: Path = SYNTH) -> tuple[Path, list[Span], list[list[Span | None]]]:
    """A longer recording of synth files joined by silences, with its CHAT transcript.

    With ``total_s`` the list of files is cycled until the recording is that long. Returns the
    transcript, the true span of each utterance and the true word times per utterance. The WAV is
    written in pieces, never held whole.
    """
    folder.mkdir(parents=True, exist_ok=True)
    wav = folder / f"{stem}.wav"
    gap = np.zeros(int(gap_s * 16000), dtype=np.float32)
    lines, spans, words_true = [], [], []
    t = 0.0
    k = 0
    with sf.SoundFile(str(wav), "w", samplerate=16000, channels=1, subtype="PCM_16") as fh:
        while True:
            name = names[k % len(names)]
            audio, rate = sf.read(synth / f"{name}.wav", dtype="float32")
            if total_s is not None and k > 0 and t + (len(audio) + len(gap)) / rate > total_s:
                break
            truth = truth_words(name, synth)
            src = (synth / f"{name}.cha").read_text()
            main = next(line for line in src.splitlines() if line.startswith("*"))
            b = _BULLET.search(main)
            text = main.split("\t", 1)[1].split(" \x15")[0]
            s, e = t + int(b.group(1)) / 1000, t + int(b.group(2)) / 1000
            bullet = f" \x15{int(round(s * 1000))}_{int(round(e * 1000))}\x15" if bullets else ""
            lines.append(f"*PAR:\t{text}{bullet}\n")
            known = [x for x in truth if x is not None]
            spans.append((t + known[0][0], t + known[-1][1]))
            words_true.append([None if x is None else (t + x[0], t + x[1]) for x in truth])
            fh.write(audio)
            fh.write(gap)
            t += (len(audio) + len(gap)) / rate
            k += 1
            if total_s is None and k >= len(names):
                break
    cha = folder / f"{stem}.cha"
    cha.write_text(HEADER + f"@Media:\t{stem}, audio\n" + "".join(lines) + "@End\n")
    return cha, spans, words_true


def print_table(model: str, scores: list[Score], extra: list[Score] = ()) -> None:
    """Per file, then means over c* (connected), s* (isolated words) and all, then joined runs."""
    print(f"\n{model}")
    print(f"{'file':6} {'words':>5} {'aligned':>7} {'model ms':>9} {'baseline ms':>12} {'wall s':>7}")
    for s in scores:
        print(f"{s.name:6} {s.words:5d} {s.aligned:7d} {s.model_ms:9.1f} {s.baseline_ms:12.1f} {s.seconds:7.2f}")
    for label, group in (("c*", [s for s in scores if s.name.startswith("c")]),
                         ("s*", [s for s in scores if s.name.startswith("s")]), ("mean", scores)):
        if group:
            print(f"{label:6} {sum(s.words for s in group):5d} {sum(s.aligned for s in group):7d} "
                  f"{np.mean([s.model_ms for s in group]):9.1f} {np.mean([s.baseline_ms for s in group]):12.1f}")
    for s in extra:
        print(f"{s.name:7} {s.words:4d} {s.aligned:7d} {s.model_ms:9.1f} {s.baseline_ms:12.1f} {s.seconds:7.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en", "base"],
                    help="Whisper sizes (tiny.en, base) or model folders / hub ids")
    ap.add_argument("--files", nargs="+", default=FILES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fetch", action="store_true", help="skip models not already converted")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    for m in args.models:
        folder = whisper_dir(m, fetch=not args.no_fetch) if m in ("tiny.en", "base") else Path(m)
        if folder is None:
            print(f"\n{m}: not available, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            scores = score_files(str(folder), args.files, Path(tmp), threads=args.threads)
            extra = [score_joined(str(folder), args.files, Path(tmp), threads=args.threads, bullets=b)
                     for b in (True, False)]
            print_table(m, scores, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
