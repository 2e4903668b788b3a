"""Build synthetic corpora: valid CHAT transcripts with utterance bullets and WAV media of given lengths.

The synthetic engine reads only the media header, so the audio is low-rate silence written in
chunks: a 10-minute file costs a few MB and milliseconds.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = ("the quick brown fox jumps over the lazy dog and then runs home to see "
         "what the little bird is singing about today").split()


def write_wav(path: Path, seconds: float, rate: int = 8000) -> None:
    frames = int(seconds * rate)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16") as fh:
        chunk = np.zeros(min(frames, rate * 60) or 1, dtype=np.int16)
        left = frames
        while left > 0:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n


def chat_text(name: str, seconds: float, rng: random.Random, utterance_s: float = 4.0) -> str:
    lines = ["@UTF8", "@Begin", "@Languages:\teng", "@Participants:\tPAR Participant, INV Investigator",
             "@ID:\teng|synth|PAR|||||Participant|||", "@ID:\teng|synth|INV|||||Investigator|||",
             f"@Media:\t{name}, audio"]
    t = 0.0
    k = 0
    while t + 1.0 <= seconds:
        end = min(seconds, t + utterance_s)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        speaker = "PAR" if k % 3 else "INV"
        lines.append(f"*{speaker}:\t{words} . \x15{int(t * 1000)}_{int(end * 1000)}\x15")
        t = end
        k += 1
    if k == 0:
        lines.append(f"*PAR:\thello . \x15{0}_{int(seconds * 1000)}\x15")
    lines.append("@End")
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, durations: list[float], *, seed: int = 1, subdirs: int = 0) -> list[Path]:
    """Write one transcript + WAV per duration; returns the transcript paths."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seconds in enumerate(durations):
        folder = root / f"part{i % subdirs}" if subdirs else root
        folder.mkdir(parents=True, exist_ok=True)
        name = f"f{i:03d}"
        write_wav(folder / f"{name}.wav", seconds)
        cha = folder / f"{name}.cha"
        cha.write_text(chat_text(name, seconds, rng), encoding="utf-8")
        paths.append(cha)
    return paths


def skewed_durations(n: int, *, seed: int = 3, short: tuple[float, float] = (5, 30),
                     long: tuple[float, float] = (200, 400), long_share: float = 0.08) -> list[float]:
    """Many short files and a few very long ones, as real corpora have."""
    rng = random.Random(seed)
    return [rng.uniform(*long) if rng.random() < long_share else rng.uniform(*short) for _ in range(n)]
