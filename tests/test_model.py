"""The memory predictor: accuracy and coverage on synthetic profiles, cold start, persistence."""

from __future__ import annotations

import random

import pytest

from telemetry.model import Defaults, MemoryModel, Predictor, bump_after_kill, quantile
from telemetry.store import Attempt, TelemetryStore

pytestmark = pytest.mark.timeout(60)

DEFAULTS = Defaults(baseline_mb=800.0, intercept_mb=500.0, mb_per_audio_second=10.0, mb_per_media_mb=20.0)


def true_growth(audio_s: float) -> float:
    return 40.0 * audio_s + 15.0


def trained(seed: int, n: int, noise: float) -> tuple[MemoryModel, random.Random]:
    rng = random.Random(seed)
    model = MemoryModel(DEFAULTS)
    for _ in range(n):
        x = rng.uniform(5.0, 120.0)
        model.observe(x, None, true_growth(x) * (1.0 + rng.gauss(0.0, noise)))
    return model, rng


def test_noise_free_profile_is_learned_within_margin() -> None:
    model, _ = trained(seed=1, n=40, noise=0.0)
    for x in range(5, 121, 5):
        upper, central = model.predict_growth(float(x), None)
        truth = true_growth(x)
        assert central == pytest.approx(truth, rel=1e-6)
        assert truth <= upper <= 1.2 * truth


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noisy_profile_accuracy_and_coverage(seed: int) -> None:
    """5% multiplicative noise: estimates stay within 20% of the truth and cover the real growth."""
    model, rng = trained(seed=seed, n=200, noise=0.05)
    durations = [5.0 + i * 115.0 / 199 for i in range(200)]
    within = covered = 0
    for x in durations:
        upper, central = model.predict_growth(x, None)
        truth = true_growth(x)
        actual = truth * (1.0 + rng.gauss(0.0, 0.05))
        within += abs(upper - truth) <= 0.2 * truth
        covered += upper >= actual
        assert upper >= central >= 0
        assert upper <= 1.3 * truth
    assert within / len(durations) >= 0.9
    assert covered / len(durations) >= 0.9


def test_cold_start_uses_defaults_then_learns() -> None:
    model = MemoryModel(DEFAULTS, min_samples=3)
    assert model.predict_growth(60.0, None) == (500.0 + 10.0 * 60, 500.0 + 10.0 * 60)
    assert model.predict_growth(None, 3.0) == (500.0 + 20.0 * 3, 500.0 + 20.0 * 3)
    predictor = Predictor(model, DEFAULTS.baseline_mb)
    est = predictor.estimate(60.0, None)
    assert est.source == "cold"
    assert est.peak_mb == pytest.approx(800.0 + 1100.0)
    assert est.central_mb == pytest.approx(800.0 + 1100.0)

    for x in (10.0, 50.0):
        model.observe(x, None, true_growth(x))
    assert model.predict_growth(60.0, None)[0] == 1100.0  # still below min_samples
    model.observe(90.0, None, true_growth(90.0))
    assert predictor.estimate(60.0, None).source == "learned"
    # Three real files against three pseudo-samples from the defaults: between the two lines.
    _, central = model.predict_growth(60.0, None)
    assert min(true_growth(60.0), 1100.0) <= central <= max(true_growth(60.0), 1100.0)
    for x in (20.0, 30.0, 40.0, 70.0, 80.0, 100.0, 110.0):
        model.observe(x, None, true_growth(x))
    _, central = model.predict_growth(60.0, None)
    assert central == pytest.approx(true_growth(60.0), rel=0.02)


def test_media_fit_is_used_when_duration_is_unknown() -> None:
    model = MemoryModel(DEFAULTS)
    rng = random.Random(7)
    for _ in range(60):
        media_mb = rng.uniform(1.0, 40.0)
        # Audio growth follows one line, media-only files another: both must be learned separately.
        model.observe(None, media_mb, 100.0 + 60.0 * media_mb)
        x = rng.uniform(5.0, 120.0)
        model.observe(x, None, true_growth(x))
    upper_media, central_media = model.predict_growth(None, 20.0)
    assert central_media == pytest.approx(100.0 + 60.0 * 20.0, rel=1e-6)
    assert central_media <= upper_media <= 1.2 * central_media
    _, central_audio = model.predict_growth(30.0, 20.0)  # duration known: the audio fit wins
    assert central_audio == pytest.approx(true_growth(30.0), rel=1e-6)
    p = model.params()
    assert p["mb_per_media_mb"] == pytest.approx(60.0, rel=1e-6)
    assert p["mb_per_audio_second"] == pytest.approx(40.0, rel=1e-6)
    # No size at all: the largest growth seen, with the margin.
    upper_none, _ = model.predict_growth(None, None)
    assert upper_none >= max(true_growth(120.0), 100.0 + 60.0 * 40.0) * 0.95


def test_params_round_trip() -> None:
    model, _ = trained(seed=3, n=80, noise=0.05)
    clone = MemoryModel.from_params(model.params(), DEFAULTS)
    assert clone.n_samples == model.n_samples
    for x in (5.0, 33.0, 120.0):
        assert clone.predict_growth(x, None) == pytest.approx(model.predict_growth(x, None))
    assert MemoryModel.from_params(None, DEFAULTS).n_samples == 0
    assert MemoryModel.from_params({"version": -1, "samples": [[1, 1, 1]]}, DEFAULTS).n_samples == 0


def test_params_round_trip_through_store(tmp_path) -> None:
    model, _ = trained(seed=4, n=120, noise=0.05)
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        store.save_model("synthetic", "m", "cpu", model.params())
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        warm = MemoryModel.from_params(store.load_model("synthetic", "m", "cpu"), DEFAULTS)
    assert warm.n_samples == 120
    for x in (5.0, 60.0, 120.0):
        assert warm.predict_growth(x, None) == pytest.approx(model.predict_growth(x, None))
    assert Predictor(warm, 800.0).estimate(60.0, None).source == "learned"


def test_window_keeps_recent_samples() -> None:
    model = MemoryModel(DEFAULTS, window=50)
    for _ in range(100):
        model.observe(10.0, None, 5000.0)  # an old regime
    for x in range(5, 121, 2):
        model.observe(float(x), None, true_growth(x))
    assert model.n_samples == 50
    _, central = model.predict_growth(60.0, None)
    assert central == pytest.approx(true_growth(60.0), rel=1e-6)


def test_bump_after_kill() -> None:
    assert bump_after_kill(1000.0, 0.0) == 1256.0  # +256 MiB dominates small peaks
    assert bump_after_kill(4000.0, 0.0) == 4800.0  # x1.2 dominates large ones
    assert bump_after_kill(4000.0, 9000.0) == 9000.0  # never lowers an estimate


def test_lower_bound_raises_estimate_without_entering_fit() -> None:
    model, _ = trained(seed=5, n=50, noise=0.0)
    predictor = Predictor(model, 800.0)
    plain = predictor.estimate(30.0, None)
    assert plain.source == "learned" and plain.lower_bound_mb is None
    killed_at = plain.peak_mb + 1000.0
    est = predictor.estimate(30.0, None, lower_bound_mb=killed_at)
    assert est.source == "lower_bound"
    assert est.peak_mb == pytest.approx(max(killed_at * 1.2, killed_at + 256.0))
    assert est.central_mb >= killed_at  # a file known to need this much cannot be judged smaller
    assert est.lower_bound_mb == killed_at
    assert est.growth_mb == pytest.approx(est.peak_mb - est.baseline_mb)
    # A lower bound far below the estimate changes nothing.
    low = predictor.estimate(30.0, None, lower_bound_mb=100.0)
    assert low.peak_mb == pytest.approx(plain.peak_mb) and low.source == "learned"
    assert model.n_samples == 50


def test_censored_kills_do_not_reach_samples(tmp_path) -> None:
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        base = dict(run_id="r", path="/c/a.cha", input_hash="h", engine="e", model="m", device="cpu",
                    media_bytes=None, transcript_bytes=10, worker_baseline_mb=800.0, predicted_mb=2000.0,
                    wall_s=1.0, cpu_s=1.0, reason=None, worker_pid=1, started_at=1.0, finished_at=2.0)
        store.record_attempt(Attempt(file="a.cha", audio_seconds=30.0, peak_mb=9000.0, growth_mb=8200.0,
                                     outcome="killed", **base))
        store.record_attempt(Attempt(file="b.cha", audio_seconds=30.0, peak_mb=2015.0, growth_mb=1215.0,
                                     outcome="done", **base))
        samples = store.samples("e", "m", "cpu")
    assert [s.growth_mb for s in samples] == [1215.0]


def test_outliers_do_not_blow_up_the_fit() -> None:
    rng = random.Random(11)
    clean = MemoryModel(DEFAULTS)
    dirty = MemoryModel(DEFAULTS)
    for _ in range(100):
        x = rng.uniform(5.0, 120.0)
        g = true_growth(x) * (1.0 + rng.gauss(0.0, 0.05))
        clean.observe(x, None, g)
        dirty.observe(x, None, g)
    for x, g in ((8.0, 200_000.0), (60.0, 50_000.0), (110.0, 150_000.0)):
        dirty.observe(x, None, g)
    for x in (5.0, 30.0, 60.0, 120.0):
        c_up, c_mid = clean.predict_growth(x, None)
        d_up, d_mid = dirty.predict_growth(x, None)
        assert d_mid == pytest.approx(c_mid, rel=0.1)
        assert d_up <= 1.15 * c_up


def test_negative_and_invalid_observations() -> None:
    model = MemoryModel(DEFAULTS)
    model.observe(10.0, None, float("nan"))
    assert model.n_samples == 0
    model.observe(-5.0, None, -30.0)  # a shrinking worker records zero growth, size unknown
    assert model.n_samples == 1
    for x in (10.0, 20.0, 40.0):
        model.observe(x, None, 0.0)
    upper, central = model.predict_growth(10.0, None)
    assert upper >= central >= 0.0


def test_baseline_quantile_follows_workers() -> None:
    predictor = Predictor(MemoryModel(DEFAULTS), baseline_mb=800.0)
    assert predictor.estimate(10.0, None).baseline_mb == 800.0
    for uss in (900.0, 910.0, 905.0, 1200.0, 902.0):
        predictor.observe_baseline(uss)
    expected = quantile([800.0, 900.0, 910.0, 905.0, 1200.0, 902.0], 0.9)
    assert predictor.baseline_mb == pytest.approx(expected)
    predictor.observe_growth(10.0, None, 415.0)
    assert predictor.model.n_samples == 1


def test_quantile_helper() -> None:
    assert quantile([1.0], 0.9) == 1.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        quantile([], 0.5)
