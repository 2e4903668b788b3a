"""The memory predictor: features in, bound out. Pure tests on recorded and modelled samples."""

from __future__ import annotations

import random

import pytest

from telemetry.model import (Defaults, Estimate, FileFeatures, MemoryModel, Predictor, bump_after_kill, describe,
                             quantile, remaining_growth)
from telemetry.store import TelemetryStore

pytestmark = pytest.mark.timeout(60)

DEFAULTS = Defaults(baseline_mb=800.0, intercept_mb=500.0, mb_per_span_second=10.0, mb_per_audio_second=0.0,
                    mb_per_media_mb=20.0)


def streaming(audio_s: float, span_cap: float = 30.0) -> FileFeatures:
    """A timed recording cut into spans of at most ``span_cap`` (utterances back to back)."""
    span = min(audio_s, span_cap)
    n = max(1, int(-(-audio_s // span_cap)))
    return FileFeatures(audio_s=audio_s, media_mb=audio_s * 0.03, longest_span_s=span,
                        longest_span_chars=int(span * 14), n_spans=n, windows=0, sample_rate=16000, channels=1)


def whole(audio_s: float) -> FileFeatures:
    """An engine that holds the whole file: one span as long as the recording."""
    return FileFeatures(audio_s=audio_s, longest_span_s=audio_s, n_spans=1, windows=0)


def true_growth(f: FileFeatures) -> float:
    return 15.0 + 40.0 * f.longest_span_s


def trained(seed: int, n: int, noise: float, lo: float = 5.0, hi: float = 120.0,
            shape=whole) -> tuple[MemoryModel, random.Random]:
    rng = random.Random(seed)
    model = MemoryModel(DEFAULTS)
    for _ in range(n):
        f = shape(rng.uniform(lo, hi))
        model.observe(f, true_growth(f) * (1.0 + rng.gauss(0.0, noise)))
    return model, rng


def test_features_round_trip_and_tolerate_bad_values() -> None:
    f = streaming(600.0)
    assert FileFeatures.from_dict(f.to_dict()) == f
    g = FileFeatures.from_dict({"audio_s": "12.5", "longest_span_s": -3, "n_spans": 2.0, "junk": 1, "windows": "x"})
    assert g.audio_s == 12.5 and g.longest_span_s is None and g.n_spans == 2 and g.windows is None
    assert g.span_s == 12.5  # no plan: the whole recording stands in for the span
    assert FileFeatures.from_dict(None) == FileFeatures()
    assert "longest span 30.0 s (420 chars) of 20 spans" in f.words()


def test_noise_free_profile_is_learned_within_margin() -> None:
    model, _ = trained(seed=1, n=40, noise=0.0)
    for x in range(5, 121, 5):
        upper, central = model.predict_growth(whole(float(x)))
        truth = true_growth(whole(x))
        assert central == pytest.approx(truth, rel=1e-6)
        assert truth <= upper <= 1.2 * truth


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noisy_profile_accuracy_and_coverage(seed: int) -> None:
    """5% multiplicative noise: estimates stay within 20% of the truth and cover the real growth."""
    model, rng = trained(seed=seed, n=200, noise=0.05)
    durations = [5.0 + i * 115.0 / 199 for i in range(200)]
    within = covered = 0
    for x in durations:
        upper, central = model.predict_growth(whole(x))
        truth = true_growth(whole(x))
        actual = truth * (1.0 + rng.gauss(0.0, 0.05))
        within += abs(upper - truth) <= 0.2 * truth
        covered += upper >= actual
        assert upper >= central >= 0
        assert upper <= 1.3 * truth
    assert within / len(durations) >= 0.9
    assert covered / len(durations) >= 0.9


# Samples shaped like Whisper tiny.en's (worker growth above READY, MiB, on short synthetic-speech
# files of one span each) and a 10-minute recording of the same speech (20 spans of up to 30 s).
WHISPER_SHORT = [(3.1, 41.0), (4.4, 43.5), (5.2, 47.0), (6.0, 47.9), (7.3, 51.2), (8.1, 52.0), (9.0, 55.3),
                 (9.8, 57.1)]
WHISPER_LONG = (600.0, 29.6, 93.0)  # audio s, longest span s, growth MiB
WHISPER_BASELINE = 310.0


def test_learned_on_short_files_a_long_file_is_predicted_within_1_3x_of_its_peak() -> None:
    model = MemoryModel(DEFAULTS)
    for seconds, growth in WHISPER_SHORT:
        model.observe(streaming(seconds), growth)
    predictor = Predictor(model, WHISPER_BASELINE)
    audio, span, growth = WHISPER_LONG
    est = predictor.estimate(FileFeatures(audio_s=audio, longest_span_s=span, longest_span_chars=410, n_spans=20))
    real_peak = WHISPER_BASELINE + growth
    assert real_peak <= est.peak_mb <= 1.3 * real_peak, est.explain
    # Spans longer than any seen are an extrapolation: trusted less, said so.
    assert est.uncertain and "extrapolated" in est.explain
    # The old shape (growth per second of the whole recording) would have asked for several GiB.
    slope = (WHISPER_SHORT[-1][1] - WHISPER_SHORT[0][1]) / (WHISPER_SHORT[-1][0] - WHISPER_SHORT[0][0])
    assert WHISPER_BASELINE + slope * audio > 3 * real_peak


def test_cold_defaults_have_the_span_shape() -> None:
    model = MemoryModel(DEFAULTS)
    short, long = model.predict(streaming(10.0)), model.predict(streaming(600.0))
    assert short.source == long.source == "cold" and long.uncertain
    assert long.upper == pytest.approx(500.0 + 10.0 * 30.0)  # the span, not the 600 s recording
    assert short.upper == pytest.approx(500.0 + 10.0 * 10.0)
    # Only the media size known: the media default stands in.
    assert model.predict(FileFeatures(media_mb=3.0)).upper == pytest.approx(500.0 + 20.0 * 3)


def test_calibration_probes_replace_the_defaults_before_any_file() -> None:
    predictor = Predictor(MemoryModel(DEFAULTS), 300.0)
    probes = [{"features": streaming(5.0).to_dict(), "growth_mb": 70.0},
              {"features": streaming(30.0).to_dict(), "growth_mb": 195.0},
              {"features": "nonsense", "growth_mb": 1.0}, {"growth_mb": 5.0}, "junk",
              {"features": {"longest_span_s": 10}, "growth_mb": float("nan")}]
    assert predictor.calibrate(probes) == 2
    est = predictor.estimate(streaming(600.0))
    assert est.source == "calibrated" and est.uncertain  # no real file yet
    assert 195.0 <= est.growth_mb <= 195.0 * 1.15
    assert "2 probe spans" in est.explain
    # Many workers report the same probe lengths: one point per length, the highest of the recent ones.
    for _ in range(5):
        predictor.calibrate([{"features": streaming(30.0).to_dict(), "growth_mb": 190.0}])
    assert predictor.model.n_probes == 2
    assert predictor.estimate(streaming(600.0)).growth_mb == pytest.approx(est.growth_mb)
    for _ in range(20):
        predictor.calibrate([{"features": streaming(30.0).to_dict(), "growth_mb": 190.0}])
    assert predictor.estimate(streaming(600.0)).growth_mb == pytest.approx(190.0 * 1.1)
    # Once real files have finished the model is learned (and trusted inside what it has seen).
    for x in (8.0, 12.0, 20.0, 28.0):
        predictor.observe_growth(streaming(x), 45.0 + 5.0 * x)
    learned = predictor.estimate(streaming(25.0))
    assert learned.source == "learned" and not learned.uncertain


def test_audio_beyond_the_span_is_fitted_only_within_what_was_seen() -> None:
    model = MemoryModel(DEFAULTS)
    rng = random.Random(2)
    for _ in range(30):
        a = rng.uniform(60.0, 300.0)
        f = streaming(a)
        model.observe(f, 20.0 + 4.0 * f.longest_span_s + 0.1 * (a - f.longest_span_s))
    p = model.params()
    assert p["mb_per_audio_second"] == pytest.approx(0.1, rel=0.05)
    at_seen = model.predict(streaming(300.0))
    far = model.predict(streaming(3000.0))
    # Not extrapolated past the most seen (270 s beyond the span): the same growth, flagged uncertain.
    assert far.central == pytest.approx(at_seen.central, rel=1e-6)
    assert far.uncertain and not at_seen.uncertain
    assert "capped at the" in far.explain


def test_params_round_trip_and_old_versions_start_cold(tmp_path) -> None:
    model, _ = trained(seed=3, n=80, noise=0.05, shape=streaming)
    model.calibrate(streaming(30.0), 1300.0)
    model.observe_kill(streaming(200.0), 5000.0)
    clone = MemoryModel.from_params(model.params(), DEFAULTS)
    assert clone.n_samples == model.n_samples and clone.n_probes == 1
    for x in (5.0, 33.0, 120.0, 600.0):
        assert clone.predict_growth(streaming(x)) == pytest.approx(model.predict_growth(streaming(x)))
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        store.save_model("synthetic", "m", "cpu", model.params())
    with TelemetryStore(tmp_path / "t.sqlite") as store:
        warm = MemoryModel.from_params(store.load_model("synthetic", "m", "cpu"), DEFAULTS)
    assert warm.predict_growth(streaming(60.0)) == pytest.approx(model.predict_growth(streaming(60.0)))
    # A model of total audio seconds (version 1) taught nothing about spans: it is not reused.
    old = {"version": 1, "samples": [[10.0, 1.0, 100.0]] * 10}
    assert MemoryModel.from_params(old, DEFAULTS).n_samples == 0
    assert MemoryModel.from_params(None, DEFAULTS).n_samples == 0


def test_window_keeps_recent_samples() -> None:
    model = MemoryModel(DEFAULTS, window=50)
    for _ in range(100):
        model.observe(whole(10.0), 5000.0)  # an old regime
    for x in range(5, 121, 2):
        model.observe(whole(float(x)), true_growth(whole(x)))
    assert model.n_samples == 50
    _, central = model.predict_growth(whole(60.0))
    assert central == pytest.approx(true_growth(whole(60.0)), rel=1e-6)


def test_a_sample_above_the_bound_refits_at_once_and_ones_under_it_wait_their_share() -> None:
    model, rng = trained(seed=3, n=200, noise=0.05)
    before, _ = model.predict_growth(whole(60.0))  # upper line and margin
    fitted = model.fit()
    # Under the line: the fit waits (a refit of a full window costs the loop milliseconds)...
    for _ in range(int(200 * 0.05) - 1):
        f = whole(rng.uniform(5.0, 120.0))
        model.observe(f, true_growth(f) * 0.9)
        assert model.fit() is fitted
    # ...until the waiting samples are a twentieth of the window.
    model.observe(whole(30.0), true_growth(whole(30.0)) * 0.9)
    refitted = model.fit()
    assert refitted is not fitted and refitted.n_files == 210
    # A file that grew past the fitted upper line is taken at once: the bound may be too low.
    for k in range(1, 4):
        model.observe(whole(60.0), before * 1.05)
        assert model.fit() is not refitted and model.fit().n_files == 210 + k
        refitted = model.fit()


def test_bump_after_kill() -> None:
    assert bump_after_kill(1000.0, 0.0) == 1256.0  # +256 MiB dominates small peaks
    assert bump_after_kill(4000.0, 0.0) == 4800.0  # x1.2 dominates large ones
    assert bump_after_kill(4000.0, 9000.0) == 9000.0  # never lowers an estimate


def test_a_kill_is_a_lower_bound_for_that_file_and_larger_ones_never_a_sample() -> None:
    model, _ = trained(seed=5, n=50, noise=0.0)
    predictor = Predictor(model, 800.0)
    plain = predictor.estimate(whole(30.0))
    assert plain.source == "learned" and plain.lower_bound_mb is None
    killed_at = plain.peak_mb + 1000.0
    est = predictor.estimate(whole(30.0), lower_bound_mb=killed_at)
    assert est.source == "lower_bound"
    assert est.peak_mb == pytest.approx(max(killed_at * 1.2, killed_at + 256.0))
    assert est.central_mb > killed_at  # a file known to need more than this cannot be judged smaller
    assert est.growth_mb == pytest.approx(est.peak_mb - est.baseline_mb)
    low = predictor.estimate(whole(30.0), lower_bound_mb=100.0)
    assert low.peak_mb == pytest.approx(plain.peak_mb) and low.source == "learned"
    # Model-wide: a file killed at some growth bounds every file at least as large, not smaller ones.
    predictor.observe_kill(whole(40.0), 4000.0)
    assert model.n_samples == 50
    assert predictor.estimate(whole(50.0)).growth_mb >= 4000.0
    assert predictor.estimate(whole(20.0)).growth_mb == pytest.approx(predictor.estimate(whole(20.0)).growth_mb)
    assert predictor.estimate(whole(20.0)).growth_mb < 2000.0


def test_an_outlier_does_not_move_the_bound_for_everyone() -> None:
    rng = random.Random(11)
    clean = MemoryModel(DEFAULTS)
    dirty = MemoryModel(DEFAULTS)
    for _ in range(20):
        f = streaming(rng.uniform(5.0, 120.0))
        g = true_growth(f) * (1.0 + rng.gauss(0.0, 0.03))
        clean.observe(f, g)
        dirty.observe(f, g)
    dirty.observe(streaming(20.0), 20_000.0)  # one pathological file
    for x in (5.0, 30.0, 60.0, 120.0):
        c_up, c_mid = clean.predict_growth(streaming(x))
        d_up, d_mid = dirty.predict_growth(streaming(x))
        assert d_mid == pytest.approx(c_mid, rel=0.05)
        assert d_up <= 1.05 * c_up


def test_many_outliers_do_not_blow_up_the_fit() -> None:
    rng = random.Random(12)
    clean = MemoryModel(DEFAULTS)
    dirty = MemoryModel(DEFAULTS)
    for _ in range(100):
        f = whole(rng.uniform(5.0, 120.0))
        g = true_growth(f) * (1.0 + rng.gauss(0.0, 0.05))
        clean.observe(f, g)
        dirty.observe(f, g)
    for x, g in ((8.0, 200_000.0), (60.0, 50_000.0), (110.0, 150_000.0)):
        dirty.observe(whole(x), g)
    for x in (5.0, 30.0, 60.0, 120.0):
        c_up, c_mid = clean.predict_growth(whole(x))
        d_up, d_mid = dirty.predict_growth(whole(x))
        assert d_mid == pytest.approx(c_mid, rel=0.1)
        assert d_up <= 1.15 * c_up


def test_negative_and_invalid_observations() -> None:
    model = MemoryModel(DEFAULTS)
    model.observe(whole(10.0), float("nan"))
    model.observe(None, 10.0)  # type: ignore[arg-type]
    assert model.n_samples == 0
    model.observe(FileFeatures(), -30.0)  # a shrinking worker records zero growth, size unknown
    assert model.n_samples == 1
    for x in (10.0, 20.0, 40.0):
        model.observe(whole(x), 0.0)
    upper, central = model.predict_growth(whole(10.0))
    assert upper >= central >= 0.0


def _est(growth: float, accumulating: float) -> Estimate:
    return Estimate(peak_mb=100.0 + growth, growth_mb=growth, baseline_mb=100.0, source="learned",
                    lower_bound_mb=None, central_mb=100.0 + growth, uncertain=False, accumulating_mb=accumulating)


def test_remaining_growth_corrects_a_file_running_hot() -> None:
    streaming_est = _est(200.0, 0.0)
    accumulating_est = _est(200.0, 200.0)
    # No progress: what the prediction has left.
    assert remaining_growth(streaming_est, None, 50.0) == 150.0
    assert remaining_growth(streaming_est, None, 250.0) == 0.0
    # On track: nothing changes.
    on_track = {"spans_done": 5, "spans_total": 10, "growth_mb": 100.0}
    assert remaining_growth(accumulating_est, on_track, 90.0) == pytest.approx(100.0)
    # Growing twice as fast as predicted half way: the rest is projected at the same rate.
    hot = {"spans_done": 5, "spans_total": 10, "growth_mb": 200.0}
    assert remaining_growth(accumulating_est, hot, 150.0) == pytest.approx(200.0)
    # A streaming file over its span prediction after a few spans: its peak is what it reached.
    assert remaining_growth(streaming_est, {"spans_done": 2, "spans_total": 10, "growth_mb": 260.0}, 0) == 0.0
    # Garbage in the message never breaks the policy.
    assert remaining_growth(streaming_est, {"spans_done": "x", "spans_total": None}, 50.0) == 150.0
    assert remaining_growth(streaming_est, {"spans_done": 3, "spans_total": 0, "growth_mb": 10}, 50.0) == 150.0


def test_estimate_accumulating_share_follows_the_shape() -> None:
    model, _ = trained(seed=6, n=30, noise=0.0)
    p = Predictor(model, 100.0)
    one_span = p.estimate(whole(60.0))
    many = p.estimate(streaming(600.0))
    assert one_span.accumulating_mb == pytest.approx(one_span.growth_mb, rel=0.2)
    assert many.accumulating_mb == pytest.approx(0.0, abs=1e-6)


def test_describe_says_the_terms_in_words() -> None:
    model, _ = trained(seed=7, n=30, noise=0.02, shape=streaming)
    model.calibrate(streaming(30.0), 1300.0)
    lines = describe(model.params())
    text = "\n".join(lines)
    assert "MiB per second of the longest span" in text and "from 30 files and 1 probe spans" in text
    assert "30 s -> 1300 MiB" in text
    assert describe(None) == ["nothing learned yet"]
    assert "cold defaults" in describe(None, DEFAULTS)[0]


def test_baseline_quantile_follows_workers() -> None:
    predictor = Predictor(MemoryModel(DEFAULTS), baseline_mb=800.0)
    assert predictor.estimate(whole(10.0)).baseline_mb == 800.0
    for uss in (900.0, 910.0, 905.0, 1200.0, 902.0):
        predictor.observe_baseline(uss)
    expected = quantile([800.0, 900.0, 910.0, 905.0, 1200.0, 902.0], 0.9)
    assert predictor.baseline_mb == pytest.approx(expected)
    # A configured guess counts only until the first worker is measured.
    guess = Predictor(MemoryModel(DEFAULTS), baseline_mb=1100.0, baseline_measured=False)
    assert guess.baseline_mb == 1100.0
    guess.observe_baseline(176.0)
    assert guess.baseline_mb == 176.0
    predictor.observe_growth(whole(10.0).to_dict(), 415.0)
    predictor.observe_growth(None, 415.0)  # nothing ran through the model: not a sample
    assert predictor.model.n_samples == 1


def test_quantile_helper() -> None:
    assert quantile([1.0], 0.9) == 1.0
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_workers_measure_their_probes_until_the_learned_model_holds_probes_and_files() -> None:
    from supervisor.estimates import Estimator  # noqa: PLC0415
    from supervisor.queue import WorkQueue  # noqa: PLC0415

    def learned(probes: bool, files: int) -> Estimator:
        model = MemoryModel(DEFAULTS, min_samples=3)
        if probes:
            for x, g in ((5.0, 60.0), (30.0, 190.0)):
                model.calibrate(streaming(x), g)
        for k in range(files):
            model.observe(streaming(6.0 + 3 * k), 65.0 + 15 * k)
        # as a later run finds it: through the store's parameters
        return Estimator(Predictor(MemoryModel.from_params(model.params(), DEFAULTS), 300.0), WorkQueue(3))

    assert learned(probes=True, files=4).probes_learned(30.0)
    assert not learned(probes=True, files=2).probes_learned(30.0)  # too few files to trust
    assert not learned(probes=False, files=4).probes_learned(30.0)  # never measured on probes
    assert not learned(probes=False, files=0).probes_learned(30.0)  # cold

    # What a starting worker's probes may take: once measured (even with too few files to trust
    # the model for files) the measured span says it, margin included; cold nothing says it.
    measured = learned(probes=True, files=0).probe_growth_mb(30.0)
    assert measured is not None and 190.0 <= measured <= 190.0 * 1.5
    assert learned(probes=True, files=2).probe_growth_mb(30.0) is not None
    assert learned(probes=False, files=0).probe_growth_mb(30.0) is None


def test_model_version_moves_only_when_a_prediction_may_have():
    model, rng = trained(5, 40, 0.05)
    model.predict(whole(30.0))  # fitted now
    v = model.version
    # a sample well under the fitted line waits for a later refit: every estimate stands
    model.observe(whole(30.0), true_growth(whole(30.0)) * 0.9)
    assert model.version == v and model.predict(whole(30.0)) is not None
    # one above it moves the fit at once
    model.observe(whole(30.0), true_growth(whole(30.0)) * 3)
    assert model.version > v
    v = model.version
    model.observe_kill(whole(60.0), true_growth(whole(60.0)) * 2)
    assert model.version > v
    v = model.version
    model.calibrate(FileFeatures(longest_span_s=30.0), 100.0)
    assert model.version > v
