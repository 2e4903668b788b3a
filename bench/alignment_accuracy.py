"""Word-boundary and utterance-timing accuracy of Whisper forced alignment, on real and synthetic speech.

Synthetic: each ``../shared/synth`` transcript has its ``%wor`` tier removed, so the engine sees only
the utterance bullets; its output ``%wor`` is scored against the synthesizer's word times (words
marked ``merged`` are skipped): the mean absolute difference of word starts and ends, in ms.

Festival: ten sentences of adult read English from festival's HTS voice (``cmu_us_slt_arctic_hts``,
Debian ``festival festvox-us-slt-hts``), nearer natural speech than espeak, made at run time into a
temporary folder with each word's times from the synthesizer's own segments; scored as the synthetic
files are (``f*``), and joined by 0.4 s pauses into one recording (``joinedf``).

Real: every recording of ``../shared/chat`` with its audio (English, French, Spanish, Cantonese,
Venetian/Croatian), read in place (the data are CC BY-NC-SA and stay outside the project):

- ``words``: word boundaries against the reference ``%wor`` inside the human utterance bullets;
- ``joins``: two neighbouring utterances joined into one (bullet spanning both); the first one's last
  word must end at its human bullet's end and the second one's first word start at its start, a
  word boundary with a human reference on every recording that has bullets;
- ``utterances``: every bullet stripped, utterance times recovered from the recording, starts and
  ends scored against the human bullets (share within 250 / 500 ms).

Each figure is mean, median and the share within 20 / 50 / 100 ms, and beside every one stands the
baseline that spreads words (or utterances, over the whole recording) in proportion to their
characters: a model is only useful where it beats that. ``sq`` counts utterances whose output words
are squeezed (``worker.engines.plausibility``), ``impl`` those the engine reported as implausible.
``--ablation`` flips each post-processing step (``worker.engines.whisper.Steps``) in turn.

usage: python -m bench.alignment_accuracy [--models tiny.en base] [--files c1 c2 ...] [--real [NAME ...]]
                                          [--kinds words joins utterances] [--no-synthetic] [--ablation]

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
                times += [None for t in tok.split() if t not in _TERMINATORS]
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
                synth: Path = SYNTH, engine=None) -> list[Score]:
    """Align each synth file (``%wor`` stripped) with the Whisper engine and score it."""
    from worker.engines.base import Job

    engine = engine or load_engine(model, threads, {"cache_dir": str(workdir / "cache")})
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
                 synth: Path = SYNTH, gap_s: float = 1.5) -> Score:
    """The synth files joined by ``gap_s`` pauses into one multi-utterance recording and scored as one.

    With ``bullets`` the utterances keep their true bullets; without, their times are recovered
    from the recording first (``worker.engines.timing``)."""
    from worker.engines.base import Job
    from worker.engines.whisper import WhisperEngine

    label = "joined" if bullets else "untimed"
    cha, _spans, truth = build_recording(files, workdir / label, gap_s=gap_s, bullets=bullets, synth=synth)
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


# -- natural synthetic speech: festival's HTS voice --------------------------------------------

FESTIVAL_VOICE = "voice_cmu_us_slt_arctic_hts"  # Debian: festival festvox-us-slt-hts
FESTIVAL_SENTENCES = [
    "we walked along the narrow path until the sun went down behind the hills",
    "my brother never liked coffee, but he drinks three cups every morning now",
    "could you please send me the report before the meeting on thursday",
    "the children played in the garden while their parents cooked dinner",
    "after the storm, the streets were full of broken branches and leaves",
    "she opened the window and listened to the birds singing outside",
    "i think we should leave early, because the traffic gets worse after five",
    "the old library on the corner closes at noon on saturdays",
    "he forgot his keys, so he waited outside for almost an hour",
    "there is a small cafe next to the station that sells fresh bread",
]


def festival_set(folder: Path, sentences: list[str] = FESTIVAL_SENTENCES) -> list[str] | None:
    """Adult read English from festival's HTS voice (statistical parametric, much nearer natural
    speech than espeak's formants), made at run time into ``folder`` in the layout of
    ``../shared/synth``: ``f<k>.wav`` (16 kHz), ``f<k>.json`` (each word's start and end from the
    synthesizer's own segment times: a word starts where its first segment's predecessor ends) and
    ``f<k>.cha`` (one utterance, its bullet from the first word's start to the last word's end).
    Returns the names, or None when festival or the voice is not installed."""
    import shutil  # noqa: PLC0415

    if shutil.which("festival") is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"f{k + 1}" for k in range(len(sentences))]
    script = [f"({FESTIVAL_VOICE})"]
    for name, text in zip(names, sentences):
        wav = str(folder / f"{name}.wav").replace('"', '\\"')
        script += [
            f'(set! utt (Utterance Text "{text}"))', "(utt.synth utt)", "(utt.wave.resample utt 16000)",
            f'(utt.save.wave utt "{wav}" \'riff)',
            f'(format t "UTT {name}\\n")',
            "(mapcar (lambda (w) (format t \"WORD %s %f %f\\n\" (item.name w) "
            "(item.feat w \"R:SylStructure.daughter1.daughter1.R:Segment.p.end\") (item.feat w \"word_end\"))) "
            "(utt.relation.items utt 'Word))",
        ]
    (folder / "make.scm").write_text("\n".join(script) + "\n")
    proc = subprocess.run(["festival", "-b", str(folder / "make.scm")], capture_output=True, text=True, timeout=600)
    words: dict[str, list[dict]] = {}
    current = None
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["UTT"]:
            current = words.setdefault(parts[1], [])
        elif parts[:1] == ["WORD"] and current is not None and len(parts) == 4:
            current.append({"word": parts[1], "start_ms": round(1000 * float(parts[2]), 1),
                            "end_ms": round(1000 * float(parts[3]), 1)})
    if proc.returncode != 0 or any(not (folder / f"{n}.wav").is_file() or not words.get(n) for n in names):
        return None
    for name, text in zip(names, sentences):
        ws = words[name]
        said = [w.strip(",.?!") for w in text.split()]
        if [w["word"] for w in ws] != said:  # festival normalised a token: score nothing it changed
            return None
        (folder / f"{name}.json").write_text(json.dumps({"audio": f"{name}.wav", "sr": 16000, "words": ws}))
        bullet = f"{int(round(ws[0]['start_ms']))}_{int(round(ws[-1]['end_ms']))}"
        wor = " ".join(f"{w['word']} \x15{int(round(w['start_ms']))}_{int(round(w['end_ms']))}\x15" for w in ws)
        (folder / f"{name}.cha").write_text(
            HEADER + f"@Media:\t{name}, audio\n*PAR:\t{' '.join(said)} . \x15{bullet}\x15\n%wor:\t{wor} .\n@End\n")
    return names


# -- real speech ---------------------------------------------------------------------------------

REAL = SHARED / "chat"
JOIN_GAP_S = 0.5  # utterances this close are joined to score the boundary between them
_TERMINATORS = {".", "?", "!", "+...", "+..?", "+!?", "+/.", "+/?", "+//.", "+//?", "+\"/.", "+\".", "+."}


def real_recordings(names: list[str] | None = None, root: Path = REAL) -> list[tuple[str, Path, Path]]:
    """(name, transcript, media) of every real recording under ``root``: a transcript whose
    ``@Media`` file is there."""
    from worker.chat import read_chat

    out = []
    for cha in sorted(root.glob("*.cha")):
        if names and cha.stem not in names:
            continue
        media = read_chat(cha).media
        found = [root / f"{media.name}{ext}" for ext in (".wav", ".mp3", ".flac")] if media else []
        found = [m for m in found if m.is_file()]
        if found:
            out.append((cha.stem, cha, found[0]))
    return out


def _edit(chat, keep=lambda u: True, main=lambda u, body: body, media: str | None = None) -> str:
    """The transcript with utterances dropped (``keep``), main tiers rewritten and ``%wor`` removed."""
    lines = chat.text.splitlines(keepends=True)
    out, pos = [], 0
    for u in chat.utterances:
        a = u.line - 1
        b = max([u.end_line] + [last for _, _, last in u.dependent])
        out += lines[pos:a]
        if keep(u):
            out.append(main(u, "".join(lines[a:u.end_line])))
            out += [line for line in lines[u.end_line:b] if not line.startswith("%wor:")]
        pos = b
    out += lines[pos:]
    text = "".join(out)
    if media:
        text = re.sub(r"(?m)^@Media:\t[^,\n]*", f"@Media:\t{media}", text)
    return text


def timed_input(chat, media: str) -> str:
    """Only the utterances with bullets, ``%wor`` removed: word alignment inside human bullets."""
    return _edit(chat, keep=lambda u: u.bullet is not None, media=media)


def untimed_input(chat, media: str) -> str:
    """Every bullet and ``%wor`` removed: utterance times must be recovered from the recording."""
    return _edit(chat, main=lambda u, body: re.sub(r" ?\x15\d+_\d+\x15", "", body), media=media)


def joined_input(chat, media: str, offset: int = 0) -> tuple[str, list[tuple[int, float, float]]]:
    """Pairs of neighbouring bulleted utterances (at most ``JOIN_GAP_S`` apart) joined into one, the
    pair's bullet spanning both. The human boundary between them is a real-speech reference for
    one word boundary inside the joined utterance: the first one's last word must end near its
    bullet's end and the second one's first word start near its bullet's start.

    Pairs start at the ``offset``-th bulleted utterance (0 and 1 between them score every
    boundary). Returns the transcript and, per joined utterance, (words of the first part, its
    end, the second's start) in seconds."""
    timed = [u for u in chat.utterances if u.bullet is not None and u.words]
    pairs, k = {}, offset
    while k + 1 < len(timed):
        a, b = timed[k], timed[k + 1]
        if 0 <= b.bullet[0] - a.bullet[1] <= JOIN_GAP_S * 1000 and b.bullet[1] - a.bullet[0] <= 30000:
            pairs[a.index] = b
            k += 2
        else:
            k += 1
    refs = []

    def join(u, body):
        b = pairs[u.index]
        head = u.text.split()
        if head and head[-1] in _TERMINATORS:
            head = head[:-1]
        refs.append((len(u.words), u.bullet[1] / 1000, b.bullet[0] / 1000))
        return f"*{u.speaker}:\t{' '.join(head)} {b.text} \x15{u.bullet[0]}_{b.bullet[1]}\x15\n"

    return _edit(chat, keep=lambda u: u.index in pairs, main=join, media=media), refs


def _wor_of(chat, u) -> list[Span | None] | None:
    """Word times of an utterance's ``%wor`` tier, or None when it has none."""
    lines = chat.text.splitlines()
    for name, a, b in u.dependent:
        if name == "%wor":
            (times,) = read_wor("\n".join(lines[a - 1:b]).replace("\n\t", " "))
            return times
    return None


@dataclass
class RealScore:
    """Errors in seconds, model and character-count baseline, for one kind of reference."""

    kind: str
    model: list[float]
    baseline: list[float]
    items: int = 0  # words or utterances scored
    covered: int = 0  # of those, how many the model placed at all
    squeezed: int = 0  # utterances whose written words are piled into a sliver of the bullet
    implausible: int = 0  # utterances the engine reported as implausible (bullet kept, no %wor)
    squeeze_reported: int = 0  # of those, how many for words squeezed (the path piled them up)
    stretched: int = 0  # utterances written with a word longer than it can be said (a pause handed to it)
    filled: list[float] = field(default_factory=list)  # every item: the model's error where it placed
    # it, the baseline's where it did not (a configuration that reports more is not scored on less)

    def add(self, other: "RealScore") -> None:
        self.model += other.model
        self.baseline += other.baseline
        self.items += other.items
        self.covered += other.covered
        self.squeezed += other.squeezed
        self.implausible += other.implausible
        self.squeeze_reported += other.squeeze_reported
        self.stretched += other.stretched
        self.filled += other.filled


class Run:
    """One engine run over an edited transcript: the parsed output and its warnings."""

    def __init__(self, out, warnings: list[str]) -> None:
        self.out = out
        self.warnings = warnings
        self.implausible = sum(1 for w in warnings if w.startswith("implausible:"))
        self.squeezed = sum(1 for w in warnings if w.startswith("implausible:") and "words squeezed" in w)

    def __iter__(self):  # out, implausible = _run(...)
        return iter((self.out, self.implausible))


def _run(engine, text: str, folder: Path, media: Path, cache: Path):
    """The engine's output for ``text`` (parsed) and how many implausible warnings it gave."""
    from worker.chat import parse_chat
    from worker.engines.base import Job

    folder.mkdir(parents=True, exist_ok=True)
    link = folder / media.name
    if not link.exists():
        link.symlink_to(media)
    cha = folder / f"{media.stem}.cha"
    cha.write_text(text)
    out = folder / f"{media.stem}.out.cha"
    result = engine.run(Job(media.stem, cha, out, None, cha.name, {"cache_dir": str(cache)}), lambda f: None)
    engine.release()
    return Run(parse_chat(out.read_text(), str(out)), list(result.warnings))


def _squeezed(times: list[Span | None], words: list[str]) -> bool:
    from worker.engines.plausibility import squeezed

    kept = [(t, _spoken(w)) for t, w in zip(times, words) if t is not None]
    return squeezed([t for t, _ in kept], [w for _, w in kept])


def _spoken(word: str) -> str:
    """A CHAT word as said, its ``@`` marker (``fiu@s:hun``) dropped, as the engine is given it."""
    return word.split("@", 1)[0] or word


def _stretched(times: list[Span | None], words: list[str]) -> bool:
    from worker.engines.plausibility import stretched

    return bool(stretched(times, [_spoken(w) for w in words]))


def score_real_words(engine, name: str, cha: Path, media: Path, workdir: Path) -> RealScore | None:
    """Word boundaries against the reference ``%wor`` inside the human bullets (None: no reference)."""
    from worker.chat import read_chat

    chat = read_chat(cha)
    refs = [(u, _wor_of(chat, u)) for u in chat.utterances if u.bullet is not None and u.words]
    refs = [(u, w) for u, w in refs if w is not None and len(w) == len(u.words)]
    if not refs:
        return None
    run = _run(engine, timed_input(chat, media.stem), workdir / f"{name}-words", media, workdir / "cache")
    out, implausible = run
    kept = [u for u in chat.utterances if u.bullet is not None]
    pred_of = {u.index: _wor_of(out, o) for u, o in zip(kept, out.utterances)}
    score = RealScore("words", [], [], implausible=implausible, squeeze_reported=run.squeezed)
    for u, truth in refs:
        pred = pred_of.get(u.index) or [None] * len(truth)
        lo, hi = u.bullet[0] / 1000, u.bullet[1] / 1000
        base = spread_baseline(list(u.words), lo, hi)
        score.model += boundary_errors(pred, truth)
        score.baseline += boundary_errors(base, truth)
        score.filled += boundary_errors([p if p is not None else b for p, b in zip(pred, base)], truth)
        score.items += sum(t is not None for t in truth)
        score.covered += sum(t is not None and p is not None for p, t in zip(pred, truth))
        score.squeezed += _squeezed(pred, list(u.words))
        score.stretched += _stretched(pred, list(u.words))
    return score


def score_real_joins(engine, name: str, cha: Path, media: Path, workdir: Path) -> RealScore | None:
    """The boundary between two joined neighbouring utterances against their human bullets."""
    from worker.chat import read_chat

    chat = read_chat(cha)
    score = RealScore("joins", [], [])
    for offset in (0, 1):
        text, refs = joined_input(chat, media.stem, offset)
        if not refs:
            continue
        run = _run(engine, text, workdir / f"{name}-joins{offset}", media, workdir / "cache")
        out, implausible = run
        score.implausible += implausible
        score.squeeze_reported += run.squeezed
        spoken = [u for u in out.utterances if u.words]
        for u, (n_first, end_a, start_b) in zip(spoken, refs):
            pred = _wor_of(out, u) or [None] * len(u.words)
            lo, hi = u.bullet[0] / 1000, u.bullet[1] / 1000
            base = spread_baseline(list(u.words), lo, hi)
            placed = n_first < len(pred) and pred[n_first - 1] is not None and pred[n_first] is not None
            for times, errs in ((pred, score.model), (base, score.baseline), (pred if placed else base, score.filled)):
                if n_first < len(times) and times[n_first - 1] is not None and times[n_first] is not None:
                    errs += [abs(times[n_first - 1][1] - end_a), abs(times[n_first][0] - start_b)]
            score.items += 1
            score.covered += pred[n_first - 1] is not None and pred[n_first] is not None
            score.squeezed += _squeezed(pred, list(u.words))
            score.stretched += _stretched(pred, list(u.words))
    return score if score.items else None


def score_real_utterances(engine, name: str, cha: Path, media: Path, workdir: Path) -> RealScore | None:
    """Utterance times recovered from the recording (every bullet stripped) against the human bullets.

    The baseline lays the transcript's utterances over the whole recording by character count."""
    from worker.chat import parse_chat, read_chat

    chat = read_chat(cha)
    if not any(u.bullet is not None and u.words for u in chat.utterances):
        return None
    text = untimed_input(chat, media.stem)
    plain = parse_chat(text)
    run = _run(engine, text, workdir / f"{name}-untimed", media, workdir / "cache")
    out, implausible = run
    spoken = [u for u in plain.utterances if u.words]
    base = dict(zip([u.index for u in spoken],
                    spread_baseline([" ".join(u.words) for u in spoken], 0.0, _duration(media))))
    score = RealScore("utterances", [], [], implausible=implausible, squeeze_reported=run.squeezed)
    for ref, got in zip(chat.utterances, out.utterances):
        if ref.bullet is None or not ref.words:
            continue
        rs, re_ = ref.bullet[0] / 1000, ref.bullet[1] / 1000
        score.items += 1
        score.baseline += [abs(base[got.index][0] - rs), abs(base[got.index][1] - re_)]
        if got.bullet is not None:
            score.stretched += _stretched(_wor_of(out, got) or [], list(got.words))
            score.covered += 1
            score.model += [abs(got.bullet[0] / 1000 - rs), abs(got.bullet[1] / 1000 - re_)]
            score.filled += score.model[-2:]
        else:
            score.filled += score.baseline[-2:]
    return score


def _duration(media: Path) -> float:
    """Seconds of samples the recording really holds (some headers overstate the length)."""
    import soundfile as sf  # noqa: PLC0415

    n = 0
    with sf.SoundFile(str(media)) as fh:
        for block in fh.blocks(blocksize=1 << 16, dtype="float32"):
            n += len(block)
        return n / fh.samplerate


def score_real(engine, names: list[str] | None, workdir: Path, kinds=("words", "joins", "utterances")) -> dict:
    """Per recording and kind, the :class:`RealScore`; totals under ``"all"``."""
    funcs = {"words": score_real_words, "joins": score_real_joins, "utterances": score_real_utterances}
    table: dict[str, dict[str, RealScore]] = {}
    totals: dict[str, RealScore] = {}
    for name, cha, media in real_recordings(names):
        for kind in kinds:
            s = funcs[kind](engine, name, cha, media, workdir)
            if s is not None:
                table.setdefault(name, {})[kind] = s
                totals.setdefault(kind, RealScore(kind, [], [])).add(
                    RealScore(kind, list(s.model), list(s.baseline), s.items, s.covered, s.squeezed, s.implausible,
                              s.squeeze_reported, s.stretched, list(s.filled)))
    table["all"] = totals
    return table


# -- where recovery's error comes from ----------------------------------------------------------

TILE_S = 0.05  # human bullets this close to their neighbour's edge tile the recording
QUIET_DB = 20.0  # a human boundary whose 100 ms around lies this far under the loud frames is in a pause


def diagnose_recovery(engine, names: list[str] | None, workdir: Path) -> list[dict]:
    """Per human utterance boundary of an untimed run: the human and written times, the error, and
    why recovery put it where it did.

    The recovery's own stages are read as they run (the matched words per utterance, the rough
    span, whether the forcing placed it, whether it was given a gap): ``why`` is ``unrecognised``
    (no recognised word matched the utterance's words), ``gap`` (the forcing did not place it, so
    it got a share of the gap between placed neighbours), ``tiled`` (the human bullet starts where
    the one before ends, or ends where the next starts: its boundary lies in a pause no bullet
    spanning its own words reaches), ``overlap`` (the human bullet overlaps its neighbour's) and
    ``quiet`` (the human time lies in a pause of the recording, ``QUIET_DB`` under its loud frames)."""
    from worker.audio import AudioSource  # noqa: PLC0415
    from worker.chat import read_chat  # noqa: PLC0415
    from worker.engines import timing  # noqa: PLC0415
    from worker.engines.plausibility import frame_levels  # noqa: PLC0415

    seen: dict[str, Any] = {}
    real_spans, real_gaps, real_refine = timing.utterance_spans, timing.place_in_gaps, timing.refine_spans

    def spans_hook(utts, ref, hyp, pairs, duration, *rest):
        seen["matched"] = [sum(1 for i, _ in pairs if ref[i].utt == k) for k in range(len(utts))]
        seen["rough"] = real_spans(utts, ref, hyp, pairs, duration, *rest)
        return seen["rough"]

    def gaps_hook(spans, placed, chars, duration, *rest):
        seen["forced"] = list(placed)
        out = real_gaps(spans, placed, chars, duration, *rest)
        seen["gapped"] = [o != s for o, s in zip(out, spans)]
        return out

    def refine_hook(*a, **k):
        seen["refined"] = real_refine(*a, **k)
        return seen["refined"]

    rows = []
    timing.utterance_spans, timing.place_in_gaps, timing.refine_spans = spans_hook, gaps_hook, refine_hook
    try:
        for name, cha, media in real_recordings(names):
            chat = read_chat(cha)
            if not any(u.bullet is not None and u.words for u in chat.utterances):
                continue
            seen.clear()
            run = _run(engine, untimed_input(chat, media.stem), workdir / f"{name}-diag", media, workdir / "cache")
            with AudioSource.open(media) as src:
                levels = frame_levels(src.read(0.0, _duration(media), rate=16000), 16000)
            loud = float(np.percentile(levels, 99)) if len(levels) else 0.0
            spoken = [(u, o) for u, o in zip(chat.utterances, run.out.utterances) if u.words]
            timed = [u for u, _ in spoken if u.bullet is not None]
            for k, (u, o) in enumerate(spoken):
                if u.bullet is None:
                    continue
                pos = timed.index(u)
                prev = timed[pos - 1].bullet if pos > 0 else None
                nxt = timed[pos + 1].bullet if pos + 1 < len(timed) else None
                for edge, human in (("start", u.bullet[0] / 1000), ("end", u.bullet[1] / 1000)):
                    got = None if o.bullet is None else o.bullet[0 if edge == "start" else 1] / 1000
                    why = []
                    if seen.get("matched") and not seen["matched"][k]:
                        why.append("unrecognised")
                    if seen.get("forced") and not seen["forced"][k]:
                        why.append("gap" if seen["gapped"][k] else "unforced")
                    other = (prev[1] if edge == "start" else nxt[0]) if (prev if edge == "start" else nxt) else None
                    if other is not None:
                        gap = (human - other / 1000) if edge == "start" else (other / 1000 - human)
                        if gap < -TILE_S:
                            why.append("overlap")
                        elif gap <= TILE_S:
                            why.append("tiled")
                    f = int(human / 0.02)
                    near = levels[max(0, f - 2):f + 3]
                    if len(near) and float(near.max()) < loud - QUIET_DB:
                        why.append("quiet")
                    rough = seen.get("rough", [None] * (k + 1))[k]
                    refined = seen.get("refined", [None] * (k + 1))[k]
                    rows.append({"recording": name, "line": u.line, "edge": edge, "human": human, "got": got,
                                 "error": None if got is None else abs(got - human),
                                 "rough": rough, "refined": refined,
                                 "matched": seen.get("matched", [0] * (k + 1))[k], "why": ",".join(why) or "-"})
    finally:
        timing.utterance_spans, timing.place_in_gaps, timing.refine_spans = real_spans, real_gaps, real_refine
    return rows


def print_diagnosis(model: str, rows: list[dict]) -> None:
    """One line per human boundary, then the misses (over 250 ms or unplaced) counted by cause."""
    if not rows:
        return
    print(f"\n{model}: recovered utterance boundaries against the human bullets (s; error ms)")
    print(f"{'recording':21} {'line':>4} {'edge':5} {'human':>7} {'written':>7} {'error':>6} {'rough':>15} "
          f"{'refined':>15} {'match':>5} why")
    for r in rows:
        span = lambda s: "-" if s is None else f"{s[0]:.2f}-{s[1]:.2f}"  # noqa: E731
        got = "-" if r["got"] is None else f"{r['got']:.2f}"
        err = "-" if r["error"] is None else f"{1000 * r['error']:.0f}"
        print(f"{r['recording']:21} {r['line']:4d} {r['edge']:5} {r['human']:7.2f} {got:>7} {err:>6} "
              f"{span(r['rough']):>15} {span(r['refined']):>15} {r['matched']:5d} {r['why']}")
    miss = [r for r in rows if r["error"] is None or r["error"] > 0.25]
    ok = len(rows) - len(miss)
    causes: dict[str, int] = {}
    for r in miss:
        causes[r["why"]] = causes.get(r["why"], 0) + 1
    print(f"{ok} of {len(rows)} within 250 ms; misses by cause: "
          + ", ".join(f"{c} {n}" for c, n in sorted(causes.items(), key=lambda x: -x[1])))


# -- gap placement alone, against known utterance times -----------------------------------------

GAP_RUNS = (1, 2, 3)  # lengths of the runs of utterances taken out and placed again


def gap_placement(recordings: list[tuple[str, Path, list[Span], list[int]]]) -> dict[str, dict[str, list[float]]]:
    """How well ``timing.place_in_gaps`` lays a run of utterances over the gap between known
    neighbours, by characters and by sound (``gaps_by_sound``), with no model at all.

    ``recordings``: (name, media, the utterances' true spans in order, their characters). Every
    run of ``GAP_RUNS`` consecutive utterances is taken out in turn, its neighbours kept at their
    true spans (the recording's edges standing in where there is none), and placed again; the
    errors of its starts and ends are collected per recording and way."""
    from worker.audio import AudioSource  # noqa: PLC0415
    from worker.engines.timing import place_in_gaps, recording_quiet  # noqa: PLC0415

    out: dict[str, dict[str, list[float]]] = {}
    for name, media, truth, chars in recordings:
        with AudioSource.open(media) as src:
            duration = _duration(media)
            quiet = recording_quiet(src, 16000, duration)
        errs = out.setdefault(name, {"chars": [], "sound": []})
        n = len(truth)
        for length in GAP_RUNS:
            for i in range(0, n - length + 1):
                placed = [not (i <= k < i + length) for k in range(n)]
                spans = [t if p else (-1.0, -1.0) for t, p in zip(truth, placed)]  # a run that does not fit
                for way, q in (("chars", None), ("sound", quiet)):
                    got = place_in_gaps(spans, placed, chars, duration, q)
                    for k in range(i, i + length):
                        errs[way] += [abs(got[k][0] - truth[k][0]), abs(got[k][1] - truth[k][1])]
    return out


def gap_recordings(workdir: Path, fest: list[str] | None, fest_dir: Path | None) -> list[tuple[str, Path, list[Span], list[int]]]:
    """The inputs of :func:`gap_placement`: every real recording's bulleted utterances (human
    bullets) and the joined synthetic recordings (true spans)."""
    from worker.chat import read_chat, spoken_text  # noqa: PLC0415

    recs = []
    for name, cha, media in real_recordings():
        timed = [u for u in read_chat(cha).utterances if u.bullet is not None and u.words]
        if len(timed) >= 2:
            recs.append((name, media, [(u.bullet[0] / 1000, u.bullet[1] / 1000) for u in timed],
                         [sum(len(spoken_text(w)) for w in u.words) for u in timed]))
    sets = [("untimed", FILES, SYNTH, 1.5)] + ([("untimedf", fest, fest_dir, 0.4)] if fest else [])
    for label, files, folder, gap in sets:
        cha, spans, _ = build_recording(files, workdir / f"gaps-{label}", gap_s=gap, synth=folder)
        chars = [sum(len(spoken_text(w)) for w in u.words) for u in read_chat(cha).utterances if u.words]
        recs.append((label, cha.with_suffix(".wav"), spans, chars))
    return recs


def print_gap_placement(table: dict[str, dict[str, list[float]]]) -> None:
    print(f"\ngap placement alone (runs of {', '.join(map(str, GAP_RUNS))} utterances placed again between known "
          f"neighbours; starts and ends: mean median ms, share <=250 <=500 ms)")
    print(f"{'recording':21} {'n':>4} | {'by characters':24} | {'by sound':24}")
    for name, errs in table.items():
        print(f"{name:21} {len(errs['chars']):4d} | {stats_utt(errs['chars']):24} | {stats_utt(errs['sound']):24}")


# -- code-switching ----------------------------------------------------------------------------

_AT_S = re.compile(r"\S+@s(?::[a-z]{3})?\b")


def code_switching(engine, names: list[str] | None, workdir: Path) -> list[dict]:
    """Per utterance of every code-switched recording (several ``@Languages``, or words marked
    ``@s``): the languages named, the ``@s`` words, the language the engine forced it in, and
    whether it got word times (inside its human bullet) or was reported."""
    from worker.chat import parse_chat, read_chat  # noqa: PLC0415

    rows = []
    for name, cha, media in real_recordings(names):
        chat = read_chat(cha)
        marked = {u.index: _AT_S.findall(chat.text.splitlines()[u.line - 1]) for u in chat.utterances}
        if len(chat.languages) < 2 and not any(marked.values()):
            continue
        text = timed_input(chat, media.stem)
        run = _run(engine, text, workdir / f"{name}-switching", media, workdir / "cache")
        forced = dict(getattr(engine.aligner, "last_languages", {}))
        kept = [u for u in chat.utterances if u.bullet is not None]
        for u, i, o in zip(kept, parse_chat(text).utterances, run.out.utterances):
            if not u.words:
                continue
            times = _wor_of(run.out, o) or []
            placed = sum(t is not None for t in times)
            said = [w for w in run.warnings if f":{i.line}:" in w]  # warnings name the input's lines
            outcome = (f"{placed}/{len(u.words)} words timed" if placed else
                       ("implausible: " + said[0].split(": ", 2)[-1][:60]) if said else "no times")
            rows.append({"recording": name, "line": u.line, "languages": ",".join(chat.languages),
                         "at_s": " ".join(marked.get(u.index) or []) or "-",
                         "forced": forced.get(o.index, getattr(engine.aligner, "language", None) or "en"),
                         "outcome": outcome, "placed": placed > 0})
    return rows


def print_code_switching(model: str, rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{model}: code-switched recordings, per utterance (human bullets; language the window was forced in)")
    print(f"{'recording':21} {'line':>4} {'@Languages':10} {'forced':6} {'@s words':16} outcome")
    for r in rows:
        print(f"{r['recording']:21} {r['line']:4d} {r['languages']:10} {r['forced']:6} {r['at_s'][:16]:16} {r['outcome']}")
    by = {}
    for r in rows:
        by.setdefault(r["recording"], []).append(r)
    for name, rs in by.items():
        langs = sorted({r["forced"] for r in rs})
        sw = [r for r in rs if r["at_s"] != "-"]
        print(f"{name}: {sum(r['placed'] for r in rs)}/{len(rs)} utterances timed, forced in {'/'.join(langs)}; "
              f"{len(sw)} with @s words, {sum(r['placed'] for r in sw)} of them timed")


def stats_ms(errors: list[float]) -> str:
    """mean / median ms and share within 20, 50, 100 ms, as a table cell."""
    if not errors:
        return "-"
    e = 1000 * np.asarray(errors)
    return (f"{e.mean():5.0f} {np.median(e):5.0f} {np.mean(e <= 20):4.0%} {np.mean(e <= 50):4.0%} "
            f"{np.mean(e <= 100):4.0%}")


def stats_utt(errors: list[float]) -> str:
    """mean / median ms and share within 250, 500 ms."""
    if not errors:
        return "-"
    e = 1000 * np.asarray(errors)
    return f"{e.mean():5.0f} {np.median(e):5.0f} {np.mean(e <= 250):4.0%} {np.mean(e <= 500):4.0%}"


def print_real(model: str, table: dict) -> None:
    """Model figures with the character-count baseline beside every one."""
    print(f"\n{model}: real speech (ms; words/joins: mean median <=20 <=50 <=100 ms; "
          f"utterances: mean median <=250 <=500 ms)")
    print(f"{'recording':21} {'kind':10} {'n':>3} {'placed':>6} {'sq':>3} {'st':>3} {'impl':>4} {'impl sq':>7} | "
          f"{'model':28} | {'baseline':28} | all*")
    for name, kinds in table.items():
        for kind, s in kinds.items():
            fmt = stats_utt if kind == "utterances" else stats_ms
            print(f"{name:21} {kind:10} {s.items:3d} {s.covered:6d} {s.squeezed:3d} {s.stretched:3d} {s.implausible:4d} "
                  f"{s.squeeze_reported:7d} | {fmt(s.model):28} | {fmt(s.baseline):28} | {_mean_ms(s, 'filled'):>4}")
    print("all*: mean ms over every item, the baseline's error standing in where the model placed nothing; "
          "st: utterances written with a word longer than it can be said")


def print_table(model: str, scores: list[Score], extra: list[Score] = ()) -> None:
    """Per file, then means over c* (connected), s* (isolated words) and all, then joined runs."""
    print(f"\n{model}")
    print(f"{'file':6} {'words':>5} {'aligned':>7} {'model ms':>9} {'baseline ms':>12} {'wall s':>7}")
    for s in scores:
        print(f"{s.name:6} {s.words:5d} {s.aligned:7d} {s.model_ms:9.1f} {s.baseline_ms:12.1f} {s.seconds:7.2f}")
    for label, group in (("c*", [s for s in scores if s.name.startswith("c")]),
                         ("s*", [s for s in scores if s.name.startswith("s")]),
                         ("mean", [s for s in scores if not s.name.startswith("f")]),
                         ("f*", [s for s in scores if s.name.startswith("f")])):
        if group:
            print(f"{label:6} {sum(s.words for s in group):5d} {sum(s.aligned for s in group):7d} "
                  f"{np.nanmean([s.model_ms for s in group]):9.1f} {np.mean([s.baseline_ms for s in group]):12.1f}")
    for s in extra:
        print(f"{s.name:7} {s.words:4d} {s.aligned:7d} {s.model_ms:9.1f} {s.baseline_ms:12.1f} {s.seconds:7.2f}")


def load_engine(folder: str, threads: int, options: dict | None = None):
    from worker.engines.whisper import WhisperEngine

    return WhisperEngine({"model": folder, "threads": threads, **(options or {})})


def memoize_encoder(aligner) -> None:
    """Benchmark only: the same window of audio is encoded once however many configurations align
    it (the encoder does not depend on any post-processing step)."""
    import hashlib  # noqa: PLC0415

    real, memo = aligner._encode, {}

    def encode(audio):
        key = hashlib.sha1(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()
        if key not in memo:
            memo[key] = real(audio)
        return memo[key]

    aligner._encode = encode


def ablation(label: str, folder: str, args) -> None:
    """The default steps, then each step flipped, on real speech (joins, ``%wor``, and timing
    recovery for the step that acts on it) and synthetic speech, one table."""
    from dataclasses import fields, replace  # noqa: PLC0415

    from worker.engines.whisper import Steps  # noqa: PLC0415

    engine = load_engine(folder, args.threads)
    memoize_encoder(engine.aligner)
    default = Steps()
    # Whisper's own word timing: each utterance alone, median filter and the softmax restricted to
    # the utterance's frames, DTW, words from token boundaries; nothing else.
    plain = replace(default, onsets=False, joint=False, snap_pauses=False, trim_quiet=False, repair_squeezed=False,
                    repair_stretched=False, retry_sparse=False, refine_recovered=False, share_pauses=False,
                    place_in_gaps=False, gaps_by_sound=False, run_on=False, median_width=7, renormalize=True,
                    span_floor=False)
    configs = [("default", default), ("plain (find_alignment)", plain)]
    for f in fields(Steps):
        if args.steps and f.name not in args.steps:
            continue
        value = getattr(default, f.name)
        flipped = (1 if value != 1 else 7) if f.name == "median_width" else not value
        configs.append((f"{f.name}={flipped}", replace(default, **{f.name: flipped})))
    print(f"\n{label}: ablation (ms; real joins and %wor: mean, median, share <=100 ms; utterances "
          f"recovered: share of starts/ends <=250 / 500 ms; synthetic c*/s*: mean)")
    print(f"{'configuration':22} {'joins':>6} {'med':>5} {'<=100':>6} {'all*':>5} {'placed':>6} {'sq':>3} {'st':>3} "
          f"{'impl':>4} {'%wor':>6} {'utt<=250':>8} {'<=500':>6} {'all*':>5} {'synth c*':>8} {'synth s*':>8} "
          f"{'fest f*':>8} {'wall s':>6}")
    base_row = None
    fest_dir = tempfile.TemporaryDirectory()
    fest = festival_set(Path(fest_dir.name)) if not args.no_festival else None
    for name, steps in configs:
        engine.aligner.steps = steps
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            recover = name.startswith(("default", "plain")) or any(
                step in name for step in ("retry", "refine", "share_pauses", "place_in_gaps", "gaps_by_sound", "run_on",
                                           "span_floor"))
            table = score_real(engine, args.real or None, Path(tmp) / "real", kinds=["joins", "words"])
            if recover:
                rec = score_real(engine, args.recovery or args.real or None, Path(tmp) / "rec", kinds=["utterances"])
                for key, kinds in rec.items():
                    table.setdefault(key, {}).update(kinds)
            synth = score_files(folder, args.files, Path(tmp), threads=args.threads, engine=engine)
            fsc = score_files(folder, fest, Path(tmp) / "fest", threads=args.threads, engine=engine,
                              synth=Path(fest_dir.name)) if fest else []
        tot = table["all"]
        f_m = np.mean([x.model_ms for x in fsc]) if fsc else float("nan")
        j, w, u = tot.get("joins"), tot.get("words"), tot.get("utterances")
        c = [x.model_ms for x in synth if x.name.startswith("c")]
        i = [x.model_ms for x in synth if x.name.startswith("s")]
        row = (f"{name:22} {_mean_ms(j):>6} {_median_ms(j):>5} {_share(j, 0.1):>6} {_mean_ms(j, 'filled'):>5} "
               f"{f'{j.covered}/{j.items}' if j else '-':>6} {j.squeezed if j else 0:3d} {j.stretched if j else 0:3d} "
               f"{j.implausible if j else 0:4d} {_mean_ms(w):>6} {_share(u, 0.25):>8} {_share(u, 0.5):>6} "
               f"{_share(u, 0.25, 'filled'):>5} "
               f"{np.mean(c) if c else float('nan'):8.1f} {np.mean(i) if i else float('nan'):8.1f} {f_m:8.1f} "
               f"{time.perf_counter() - t0:6.0f}")
        print(row, flush=True)
        if base_row is None:
            base_row = (j, w, synth)
            default_table = table
            bj = j
            print(f"{'char-count baseline':22} {_mean_ms(bj, True):>6} {_median_ms(bj, True):>5} "
                  f"{_share(bj, 0.1, True):>6} {'':5} {'':6} {'':3} {'':3} {'':4} "
                  f"{_mean_ms(w, True):>6} {_share(u, 0.25, True):>8} {_share(u, 0.5, True):>6} {'':5} "
                  f"{np.mean([x.baseline_ms for x in synth if x.name.startswith('c')]):8.1f} "
                  f"{np.mean([x.baseline_ms for x in synth if x.name.startswith('s')]):8.1f} "
                  f"{np.mean([x.baseline_ms for x in fsc]) if fsc else float('nan'):8.1f}", flush=True)
    engine.aligner.steps = default
    fest_dir.cleanup()
    print_real(f"{label}, default steps", default_table)
    with tempfile.TemporaryDirectory() as tmp:
        print_code_switching(label, code_switching(engine, args.real or None, Path(tmp)))


def _errors(score, which) -> list[float]:
    """``which``: False (the model), True (the baseline) or ``"filled"``."""
    if not score:
        return []
    return score.filled if which == "filled" else score.baseline if which else score.model


def _mean_ms(score, baseline: bool | str = False) -> str:
    errs = _errors(score, baseline)
    return f"{1000 * np.mean(errs):.0f}" if errs else "-"


def _median_ms(score, baseline: bool | str = False) -> str:
    errs = _errors(score, baseline)
    return f"{1000 * np.median(errs):.0f}" if errs else "-"


def _share(score, within: float, baseline: bool | str = False) -> str:
    errs = _errors(score, baseline)
    return f"{np.mean(np.asarray(errs) <= within):.0%}" if errs else "-"


# -- memory per 30 s span: alignment heads only against output_attentions=True --------------------


def span_30s(synth: Path = SYNTH) -> tuple[np.ndarray, list]:
    """A 30 s span of synthetic speech (the synth files back to back, cut at 30 s) and its
    utterances, each with its own bullet."""
    from worker.align import UttRequest  # noqa: PLC0415

    pieces, utts, t = [], [], 0.0
    for name in FILES:
        audio, rate = sf.read(synth / f"{name}.wav", dtype="float32")
        seconds = len(audio) / rate
        if t + seconds > 29.9:
            break
        words = [w["word"] for w in json.loads((synth / f"{name}.json").read_text())["words"]]
        utts.append(UttRequest(len(utts), t, t + seconds, " ".join(words).split()))
        pieces.append(audio)
        t += seconds
    audio = np.concatenate(pieces)
    return np.pad(audio, (0, max(0, int(29.9 * 16000) - len(audio)))), utts


def full_attention_pass(aligner) -> None:
    """Benchmark only, the way forced alignment used to get its weights: the whole model run with
    ``output_attentions=True`` in eager attention, which also returns every encoder self-attention
    map, and the alignment heads picked out of the returned cross-attentions."""
    import torch  # noqa: PLC0415

    aligner.hf.set_attn_implementation("eager")
    feats_of: dict[int, torch.Tensor] = {}
    real_encode = aligner._encode

    def encode(audio):
        a = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = min(len(a), int(30 * 16000))
        feats = aligner.processor.feature_extractor(a[:n], sampling_rate=16000, return_tensors="pt").input_features
        enc, n_frames = real_encode(audio)
        feats_of[id(enc)] = feats.to(aligner.device, aligner._feat_dtype)
        return enc, n_frames

    def cross_attention(enc, tokens, prefix=None):
        prefix = prefix or aligner.prefix
        ids = prefix + tokens + [aligner.eot]
        out = aligner.hf(input_features=feats_of[id(enc)], decoder_input_ids=torch.tensor([ids]),
                         output_attentions=True, use_cache=False)
        r0 = len(prefix) - 1
        rows = slice(r0, r0 + len(tokens) + 1)
        return torch.stack([out.cross_attentions[layer][0, head, rows] for layer, head in aligner.heads])

    aligner._encode, aligner._cross_attention = encode, cross_attention


def memory_child(folder: str, mode: str, threads: int) -> dict:
    """In a fresh process: load, align the 30 s span once (lazy allocations made), then measure
    the peak RSS (VmHWM cleared) above the RSS before for a second pass of the same span."""
    from worker.engines.loading import configure_threads  # noqa: PLC0415
    from worker.engines.whisper import WhisperAligner  # noqa: PLC0415
    from worker.selfmem import clear_hwm, hwm_mb, rss_mb  # noqa: PLC0415

    configure_threads(threads)
    aligner = WhisperAligner.load(folder, threads=threads)
    if mode == "full":
        full_attention_pass(aligner)
    audio, utts = span_30s()
    first = aligner.align_span(audio, 0.0, utts)
    import gc  # noqa: PLC0415

    gc.collect()
    before = rss_mb()
    clear_hwm()
    t0 = time.perf_counter()
    second = aligner.align_span(audio, 0.0, utts)
    wall = time.perf_counter() - t0
    peak = hwm_mb()
    same = all((a.words == b.words) for a, b in zip(first, second))
    weights = sum(p.numel() * p.element_size() for p in aligner.hf.parameters()) / 2**20
    return {"mode": mode, "rss_before_mb": before, "peak_mb": peak, "growth_mb": peak - before,
            "weights_mb": weights, "wall_s": wall, "utterances": len(utts), "repeatable": same,
            "words": [r.words for r in second]}


def memory_table(models: list[str], threads: int, fetch: bool) -> None:
    """Peak growth of one 30 s span per model, alignment heads only against the whole model's
    attention maps, each in its own fresh process, side by side."""
    print("\nWhisper forced alignment, one 30 s span, CPU fp32: peak RSS growth above the RSS before the "
          "span (VmHWM), fresh process each")
    print(f"{'model':8} {'utts':>4} {'weights MiB':>11} {'heads only MiB':>14} {'output_attentions MiB':>21} "
          f"{'ratio':>6} {'same times':>10}")
    for m in models:
        folder = whisper_dir(m, fetch=fetch) if m in ("tiny.en", "base") else Path(m)
        if folder is None:
            print(f"{m:8} not available, skipped")
            continue
        rows = {}
        for mode in ("heads", "full"):
            proc = subprocess.run([sys.executable, "-m", "bench.alignment_accuracy", "--memory-child", mode,
                                   str(folder), "--threads", str(threads)],
                                  capture_output=True, text=True, cwd=ROOT, timeout=900)
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"memory run {m}/{mode} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
            rows[mode] = json.loads(line[-1])
        h, f = rows["heads"], rows["full"]
        same = all(_close(a, b) for a, b in zip(h["words"], f["words"]))
        print(f"{m:8} {h['utterances']:4d} {h['weights_mb']:11.0f} {h['growth_mb']:14.0f} {f['growth_mb']:21.0f} "
              f"{f['growth_mb'] / max(h['growth_mb'], 1e-9):6.2f} {'yes' if same else 'no':>10}", flush=True)


def _close(a, b, tol: float = 0.021) -> bool:
    """Two utterances' word times equal to within one frame (eager and SDPA round differently)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and abs(x[0] - y[0]) <= tol
                                      and abs(x[1] - y[1]) <= tol) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en", "base"],
                    help="Whisper sizes (tiny.en, base) or model folders / hub ids")
    ap.add_argument("--files", nargs="+", default=FILES, help="synthetic files")
    ap.add_argument("--real", nargs="*", default=None,
                    help="real recordings of ../shared/chat to score (no names: all of them)")
    ap.add_argument("--kinds", nargs="+", default=["words", "joins", "utterances"],
                    help="real-speech references: words (%%wor), joins, utterances (timing recovery)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--no-festival", action="store_true",
                    help="leave out the festival HTS speech set (made at run time into a temporary folder)")
    ap.add_argument("--ablation", action="store_true",
                    help="each post-processing step flipped from the default, on real and synthetic speech")
    ap.add_argument("--memory", action="store_true",
                    help="peak growth of one 30 s span: alignment heads only vs output_attentions=True")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--recovery", nargs="+", default=None,
                    help="with --ablation: the recordings timing recovery is scored on (default: as --real)")
    ap.add_argument("--steps", nargs="+", default=None,
                    help="with --ablation: flip only these steps (default: every one)")
    ap.add_argument("--diagnose", action="store_true",
                    help="with --real: every human utterance boundary of timing recovery, its error and why")
    ap.add_argument("--gaps", action="store_true",
                    help="gap placement alone (no model): runs of utterances placed again between known neighbours")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fetch", action="store_true", help="skip models not already converted")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.memory_child:
        out = memory_child(args.memory_child[1], args.memory_child[0], args.threads)
        print(json.dumps(out))
        return 0
    if args.memory:
        memory_table(args.models, args.threads, not args.no_fetch)
        return 0
    if args.gaps:
        with tempfile.TemporaryDirectory() as tmp:
            fest = None if args.no_festival else festival_set(Path(tmp) / "festival")
            print_gap_placement(gap_placement(gap_recordings(Path(tmp), fest, Path(tmp) / "festival")))
        return 0
    real = [] if args.real is None and args.ablation else args.real
    for m in args.models:
        folder = whisper_dir(m, fetch=not args.no_fetch) if m in ("tiny.en", "base") else Path(m)
        if folder is None:
            print(f"\n{m}: not available, skipped")
            continue
        if args.ablation:
            ablation(m, str(folder), args)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if not args.no_synthetic:
                scores = score_files(str(folder), args.files, Path(tmp), threads=args.threads)
                extra = [score_joined(str(folder), args.files, Path(tmp), threads=args.threads, bullets=b)
                         for b in (True, False)]
                fest = None if args.no_festival else festival_set(Path(tmp) / "festival")
                if fest:
                    scores += score_files(str(folder), fest, Path(tmp) / "fest", threads=args.threads,
                                          synth=Path(tmp) / "festival")
                    joined = score_joined(str(folder), fest, Path(tmp) / "fest", threads=args.threads,
                                          synth=Path(tmp) / "festival", gap_s=0.4)
                    joined.name = "joinedf"
                    extra.append(joined)
                    untimed = score_joined(str(folder), fest, Path(tmp) / "fest", threads=args.threads,
                                           synth=Path(tmp) / "festival", gap_s=0.4, bullets=False)
                    untimed.name = "untimedf"
                    extra.append(untimed)
                elif not args.no_festival:
                    print("festival (Debian: festival festvox-us-slt-hts) not installed: no f* set")
                print_table(m, scores, extra)
            if real is not None:
                engine = load_engine(str(folder), args.threads)
                t0 = time.perf_counter()
                table = score_real(engine, real or None, Path(tmp) / "real", kinds=args.kinds)
                print_real(m, table)
                print_code_switching(m, code_switching(engine, real or None, Path(tmp) / "switching"))
                if args.diagnose:
                    print_diagnosis(m, diagnose_recovery(engine, real or None, Path(tmp) / "diagnosis"))
                print(f"(real speech: {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
