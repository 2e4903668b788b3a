"""The real-speech scoring of ``bench/alignment_accuracy.py``, with an engine whose answers are known.

The fake engine writes every utterance's words spread by character count over its bullet (so the
model's errors must equal the baseline's), except the first one, which it reports as squeezed and
leaves untimed: the scores must count it as reported, leave it out of the model's errors and let
the baseline stand in for it in the every-item figure.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import alignment_accuracy as A
from worker.chat import parse_chat
from worker.engines.base import JobResult

pytestmark = pytest.mark.timeout(120)

REAL = Path(__file__).resolve().parents[2] / "shared" / "chat"


class SpreadEngine:
    """Writes %wor by character count over each bullet; the first utterance is 'squeezed'."""

    def run(self, job, progress):
        text = Path(job.input).read_text()
        chat = parse_chat(text)
        lines = text.splitlines()
        warnings = []
        out = []
        first = min(u.line for u in chat.utterances if u.words and u.bullet)
        by_end = {max([u.end_line] + [b for _, _, b in u.dependent]): u for u in chat.utterances}
        for k, line in enumerate(lines, 1):
            out.append(line)
            u = by_end.get(k)
            if u is None or not u.words or u.bullet is None:
                continue
            if u.line == first:
                warnings.append(f"implausible: {job.rel}:{u.line}: words squeezed: 'x' in 10 ms of the bullet")
                continue
            times = A.spread_baseline(list(u.words), u.bullet[0] / 1000, u.bullet[1] / 1000)
            out.append("%wor:\t" + " ".join(f"{w} \x15{round(s * 1000)}_{round(e * 1000)}\x15"
                                           for w, (s, e) in zip(u.words, times)) + " .")
        Path(job.output).write_text("\n".join(out) + "\n")
        return JobResult(output=Path(job.output), audio_seconds=None, warnings=warnings)

    def release(self):
        pass


def test_joins_count_reported_squeezes_and_fill_unplaced_items_with_the_baseline(tmp_path):
    (name, cha, media), = A.real_recordings(["eng_multi_speaker"], root=REAL)
    score = A.score_real_joins(SpreadEngine(), name, cha, media, tmp_path)
    assert score.items > 2
    assert score.squeeze_reported == 2 and score.implausible == 2  # one per pairing
    assert score.covered == score.items - 2
    assert len(score.filled) == 2 * score.items == len(score.baseline)
    assert len(score.model) == 2 * score.covered
    assert sorted(score.filled) == pytest.approx(sorted(score.baseline), abs=1e-3)
    rest = sorted(score.baseline)
    for e in score.model:  # where the model placed words it is the baseline here, error for error
        match = min(rest, key=lambda b: abs(b - e))
        assert match == pytest.approx(e, abs=1e-3)
        rest.remove(match)


def test_code_switched_utterances_are_listed_with_their_at_s_words(tmp_path):
    class Engine(SpreadEngine):
        aligner = type("A", (), {"last_languages": {}, "language": "en"})()

    rows = A.code_switching(Engine(), ["eng_multi_speaker"], tmp_path)
    marked = [r for r in rows if r["at_s"] != "-"]
    assert [r["at_s"] for r in marked] == ["fiu@s:hun", "fiu@s:hun"]
    assert rows[0]["outcome"].startswith("implausible: words squeezed")
    assert all(r["placed"] for r in rows[1:])
    assert all(re.fullmatch(r"\d+/\d+ words timed", r["outcome"]) for r in rows[1:])


def test_the_festival_set_is_made_at_run_time_with_the_synthesizers_word_times(tmp_path):
    """The HTS voice's set: every sentence's words in order with times that rise inside the audio,
    and a transcript whose bullet runs from the first word's start to the last word's end."""
    import soundfile as sf

    names = A.festival_set(tmp_path, A.FESTIVAL_SENTENCES[:2])
    assert names == ["f1", "f2"]
    for name, text in zip(names, A.FESTIVAL_SENTENCES):
        truth = A.truth_words(name, tmp_path)
        assert len(truth) == len(text.split())
        seconds = sf.info(str(tmp_path / f"{name}.wav")).duration
        assert sf.info(str(tmp_path / f"{name}.wav")).samplerate == 16000
        assert all(0 <= s < e <= seconds + 0.01 for s, e in truth)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(truth, truth[1:]))
        cha = (tmp_path / f"{name}.cha").read_text()
        assert f"\x15{round(truth[0][0] * 1000)}_{round(truth[-1][1] * 1000)}\x15" in cha
        assert A.read_wor(cha)[0] == truth
