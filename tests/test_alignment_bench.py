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


class BulletEngine(SpreadEngine):
    """Writes every spoken utterance a bullet of one second, one after another from 0 s."""

    def run(self, job, progress):
        text = Path(job.input).read_text()
        chat = parse_chat(text)
        lines = text.splitlines()
        spoken = [u for u in chat.utterances if u.words]
        for k, u in enumerate(spoken):
            lines[u.end_line - 1] += f" \x15{1000 * k}_{1000 * (k + 1)}\x15"
        Path(job.output).write_text("\n".join(lines) + "\n")
        return JobResult(output=Path(job.output), audio_seconds=None, warnings=[])


def test_the_diagnosis_scores_every_human_boundary_and_names_tiled_bullets(tmp_path):
    from worker.chat import read_chat

    (name, cha, media), = A.real_recordings(["biling_vec_hrv_timed"], root=REAL)
    rows = A.diagnose_recovery(BulletEngine(), [name], tmp_path)
    human = [u for u in read_chat(cha).utterances if u.bullet is not None and u.words]
    assert len(rows) == 2 * len(human)
    for k, u in enumerate(human):  # every utterance is spoken and bulleted here: the k-th second
        start, end = rows[2 * k], rows[2 * k + 1]
        assert start["got"] == pytest.approx(k) and end["got"] == pytest.approx(k + 1)
        assert start["error"] == pytest.approx(abs(k - u.bullet[0] / 1000))
        assert end["error"] == pytest.approx(abs(k + 1 - u.bullet[1] / 1000))
    # the human bullets of this recording tile it: each starts where the one before ends
    assert all("tiled" in r["why"] for r in rows[1:-1])
    assert "tiled" not in rows[0]["why"] and "tiled" not in rows[-1]["why"]


def test_gap_placement_by_sound_finds_utterances_between_known_neighbours(tmp_path):
    cha, spans, _ = A.build_recording(["c1", "c2", "c3", "s1"], tmp_path / "rec", gap_s=1.5)
    from worker.chat import read_chat, spoken_text  # noqa: PLC0415

    chars = [sum(len(spoken_text(w)) for w in u.words) for u in read_chat(cha).utterances if u.words]
    table = A.gap_placement([("joined", cha.with_suffix(".wav"), spans, chars)])
    errs = table["joined"]
    n = len(spans)
    assert len(errs["chars"]) == len(errs["sound"]) == 2 * sum(L * (n - L + 1) for L in A.GAP_RUNS)
    within = lambda e: sum(x <= 0.25 for x in e) / len(e)  # noqa: E731
    # 1.5 s of silence between the utterances: the sound finds them, characters do not
    assert within(errs["sound"]) >= 0.75 and within(errs["sound"]) > within(errs["chars"]) + 0.3
