"""The memory predictor: how much a worker will grow on a file, learned from finished files.

Pure code, no I/O: the supervisor feeds it observations and persists ``params()`` through the
telemetry store, so a run starts from what earlier runs learned.

Peak growth (MiB above the worker's READY baseline) is modelled as a line in the file's size:
``growth = a + b * audio_seconds``, or ``a + b * media_mb`` when the duration is unknown (two
separate fits over the same window of samples). The line starts from Theil–Sen (median of pairwise
slopes) and is refined by a Huber M-estimate, so the odd pathological file cannot drag it while
clean files are used almost as efficiently as by least squares. It is then lifted to an upper
quantile of the residuals so that most files fit under their estimate; a margin on top absorbs
drift.

Residual spread in memory use usually scales with the file (a long file allocates proportionally
larger buffers, and their jitter scales with them), but a fixed overhead jitter is also common. Both
are tried: residuals taken absolutely (the quantile is added to the intercept) and relative to the
fitted value (the line is scaled), and the pinball (quantile) loss on the window picks one, with a
lean toward the proportional reading. Either way the lifted prediction is itself a line.

A killed attempt only shows that the file needs *more* than it reached, so it never enters the fit;
it becomes a per-file lower bound (see ``bump_after_kill`` and ``Predictor.estimate``).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

PARAMS_VERSION = 1
# Above this many points the Theil–Sen slope is taken over a fixed-seed sample of pairs, which keeps
# a refit to a few milliseconds while staying deterministic.
_ALL_PAIRS_UPTO = 200
_PAIR_SAMPLE = 20_000
# Fitted values below this fraction of the median growth (and below 1 MiB) are raised to it when
# scaling residuals, so near-empty files neither turn small absolute jitter into huge relative
# residuals nor dominate a proportionally weighted fit.
_REL_FLOOR_FRACTION = 0.02
_REL_FLOOR_MB = 1.0
# Huber's tuning constant: 95% efficiency under Gaussian noise, bounded pull from outliers.
_HUBER_K = 1.345
# Constant-spread residuals win only with a pinball loss below this fraction of the proportional one.
_ABSOLUTE_PREFERENCE = 0.85


@dataclass
class Defaults:
    """Cold-start guesses used until enough files have finished (typically from settings)."""

    baseline_mb: float
    intercept_mb: float
    mb_per_audio_second: float
    mb_per_media_mb: float


@dataclass
class Estimate:
    """One file's memory estimate.

    ``peak_mb`` is what admission reserves; ``central_mb`` is the estimate before quantile and
    margin (but never below a known lower bound) and decides whether a file cannot fit even alone.
    """

    peak_mb: float
    growth_mb: float
    baseline_mb: float
    source: str  # "cold" | "learned" | "lower_bound"
    lower_bound_mb: float | None
    central_mb: float


@dataclass(frozen=True)
class _Sample:
    audio_seconds: float | None
    media_mb: float | None
    growth_mb: float


@dataclass(frozen=True)
class LineFit:
    """A fitted line and its quantile-lifted upper line (before the margin)."""

    n: int
    intercept: float
    slope: float
    upper_intercept: float
    upper_slope: float
    residual_mode: str  # "absolute" | "relative"
    residual_quantile: float

    def central(self, x: float) -> float:
        return self.intercept + self.slope * x

    def upper(self, x: float) -> float:
        return self.upper_intercept + self.upper_slope * x


def quantile(values: Iterable[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty collection."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of an empty collection")
    q = min(max(q, 0.0), 1.0)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def _pinball(residuals: Iterable[float], q: float) -> float:
    """Quantile loss of predicting an upper line with these (observed - predicted) residuals."""
    return sum(q * r if r >= 0 else (q - 1.0) * r for r in residuals)


def theil_sen(
    xs: Sequence[float],
    ys: Sequence[float],
    fallback_slope: float,
    *,
    clamp: bool = True,
) -> tuple[float, float]:
    """Median-of-pairwise-slopes line through the points, slope clamped at zero.

    ``fallback_slope`` is used when every x is the same (no slope can be measured). Memory does not
    shrink with larger files, so a negative slope (noise on a narrow range) is read as flat unless
    ``clamp`` is off (for transformed coordinates where the slope is an intercept).
    """
    n = len(xs)
    span = (max(xs) - min(xs)) if n else 0.0
    eps = 1e-9 * max(1.0, span)
    slopes: list[float] = []
    if n <= _ALL_PAIRS_UPTO:
        for i in range(n):
            xi, yi = xs[i], ys[i]
            for j in range(i + 1, n):
                dx = xs[j] - xi
                if abs(dx) > eps:
                    slopes.append((ys[j] - yi) / dx)
    else:
        rng = random.Random(n)
        for _ in range(_PAIR_SAMPLE):
            i = rng.randrange(n)
            j = rng.randrange(n)
            dx = xs[j] - xs[i]
            if abs(dx) > eps:
                slopes.append((ys[j] - ys[i]) / dx)
    slope = _median(slopes) if slopes else fallback_slope
    if clamp:
        slope = max(slope, 0.0)
    intercept = _median([y - slope * x for x, y in zip(xs, ys)])
    return intercept, slope


def _wls(xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]) -> tuple[float, float] | None:
    """Weighted least-squares line, slope clamped at zero; None when x carries no information."""
    total = sum(ws)
    if total <= 0:
        return None
    mx = sum(w * x for w, x in zip(ws, xs)) / total
    my = sum(w * y for w, y in zip(ws, ys)) / total
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    if sxx <= 1e-12 * max(1.0, mx * mx) * total:
        return None
    b = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx
    if b < 0:
        return my, 0.0
    return my - b * mx, b


def huber_refine(
    xs: Sequence[float],
    ys: Sequence[float],
    start: tuple[float, float],
    *,
    proportional: bool,
    floor: float = _REL_FLOOR_MB,
    iterations: int = 30,
) -> tuple[float, float]:
    """Huber M-estimate of the line by reweighted least squares, starting from a robust fit.

    Theil–Sen alone wastes much of the data when noise grows with the file (its intercept is an
    extrapolation dominated by long files); Huber weights keep least squares' efficiency on clean
    points while capping the pull of outliers. With ``proportional`` each residual is scaled by the
    fitted value (at least ``floor``), which is the right weighting when spread grows with size.
    """
    a, b = start
    for _ in range(iterations):
        scales = [max(a + b * x, floor) if proportional else 1.0 for x in xs]
        z = [(y - (a + b * x)) / s for x, y, s in zip(xs, ys, scales)]
        spread = _median([abs(v) for v in z]) * 1.4826
        if spread <= 0:
            break
        cut = _HUBER_K * spread
        ws = [min(1.0, cut / abs(v)) / (s * s) if v else 1.0 / (s * s) for v, s in zip(z, scales)]
        line = _wls(xs, ys, ws)
        if line is None:
            break
        done = abs(line[0] - a) + abs(line[1] - b) * (max(xs) if xs else 1.0) < 1e-6 * (1.0 + abs(a))
        a, b = line
        if done:
            break
    return a, b


def fit_line(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    quantile_q: float,
    prior_intercept: float,
    prior_slope: float,
    prior_points: int,
) -> LineFit:
    """Fit ``y = a + b x`` robustly and lift it to the ``quantile_q`` quantile of the residuals.

    The cold defaults join the fit as ``prior_points`` pseudo-samples on the default line, spread
    over the observed range of x: with few files they pull the line toward the defaults, and once
    real files dominate the medians ignore them. Residuals come from real samples only.

    Two noise models compete: constant spread (quantile added to the intercept) and spread
    proportional to the fitted value (the line is scaled by the relative quantile); each is fitted
    by ``huber_refine`` from a Theil–Sen start. Constant spread must beat proportional spread
    clearly on pinball loss to win: on a small window the losses are noisy, and misreading
    proportional noise as constant would shave the headroom of exactly the large files that
    exhaust memory.
    """
    fx = list(xs)
    fy = list(ys)
    if prior_points > 0 and xs:
        lo, hi = min(xs), max(xs)
        for k in range(prior_points):
            x = lo + (hi - lo) * (k + 0.5) / prior_points
            fx.append(x)
            fy.append(prior_intercept + prior_slope * x)
    n = len(xs)

    start = theil_sen(fx, fy, prior_slope)

    a, b = huber_refine(fx, fy, start, proportional=False)
    res_abs = [y - (a + b * x) for x, y in zip(xs, ys)]
    q_abs = quantile(res_abs, quantile_q)
    loss_abs = _pinball((r - q_abs for r in res_abs), quantile_q)
    absolute = LineFit(n, a, b, a + q_abs, b, "absolute", q_abs)

    floor = max(_REL_FLOOR_MB, _REL_FLOOR_FRACTION * _median([abs(y) for y in ys]))
    ar, br = huber_refine(fx, fy, start, proportional=True, floor=floor)
    scales = [max(ar + br * x, floor) for x in xs]
    res_rel = [y - (ar + br * x) for x, y in zip(xs, ys)]
    q_rel = quantile([r / s for r, s in zip(res_rel, scales)], quantile_q)
    loss_rel = _pinball((r - q_rel * s for r, s in zip(res_rel, scales)), quantile_q)
    relative = LineFit(n, ar, br, ar * (1.0 + q_rel), br * (1.0 + q_rel), "relative", q_rel)

    return absolute if loss_abs < _ABSOLUTE_PREFERENCE * loss_rel else relative


class MemoryModel:
    """Peak growth per file for one (engine, model, device), updated as files finish."""

    def __init__(
        self,
        defaults: Defaults,
        *,
        quantile: float = 0.9,
        margin: float = 0.1,
        min_samples: int = 3,
        window: int = 500,
    ) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError("quantile must lie strictly between 0 and 1")
        if margin < 0:
            raise ValueError("margin must not be negative")
        self.defaults = defaults
        self.quantile = quantile
        self.margin = margin
        self.min_samples = max(1, int(min_samples))
        self.window = max(self.min_samples, int(window))
        self._samples: deque[_Sample] = deque(maxlen=self.window)
        self._fits: dict[str, LineFit | None] = {}
        self._dirty = True

    @property
    def n_samples(self) -> int:
        return len(self._samples)

    def observe(self, audio_seconds: float | None, media_mb: float | None, growth_mb: float) -> None:
        """Record a finished file's growth. Only completed files belong here, never killed ones."""
        g = _finite(growth_mb)
        if g is None:
            return
        self._samples.append(_Sample(_size(audio_seconds), _size(media_mb), max(g, 0.0)))
        self._dirty = True

    def fit(self, feature: str) -> LineFit | None:
        """The current fit on ``"audio"`` or ``"media"``; None below ``min_samples`` samples."""
        if self._dirty:
            self._fits = {"audio": self._fit("audio"), "media": self._fit("media")}
            self._dirty = False
        return self._fits[feature]

    def _fit(self, feature: str) -> LineFit | None:
        if feature == "audio":
            pts = [(s.audio_seconds, s.growth_mb) for s in self._samples if s.audio_seconds is not None]
            prior = (self.defaults.intercept_mb, self.defaults.mb_per_audio_second)
        else:
            pts = [(s.media_mb, s.growth_mb) for s in self._samples if s.media_mb is not None]
            prior = (self.defaults.intercept_mb, self.defaults.mb_per_media_mb)
        if len(pts) < self.min_samples:
            return None
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        return fit_line(
            xs,
            ys,
            quantile_q=self.quantile,
            prior_intercept=prior[0],
            prior_slope=prior[1],
            prior_points=self.min_samples,
        )

    def source(self, audio_seconds: float | None, media_mb: float | None) -> str:
        """``"learned"`` when the fit a prediction would use has enough samples, else ``"cold"``."""
        feature = _feature(_size(audio_seconds), _size(media_mb))
        if feature is None:
            return "learned" if self.n_samples >= self.min_samples else "cold"
        return "learned" if self.fit(feature) is not None else "cold"

    def predict_growth(self, audio_seconds: float | None, media_mb: float | None) -> tuple[float, float]:
        """(upper, central) growth in MiB; upper includes quantile and margin, never below central.

        Without any size the file could be anything: the largest growth in the window (with the
        margin) is the honest answer, or the default intercept before any file has finished.
        """
        a = _size(audio_seconds)
        m = _size(media_mb)
        feature = _feature(a, m)
        if feature is None:
            if self.n_samples >= self.min_samples:
                top = max(s.growth_mb for s in self._samples)
                central = _median([s.growth_mb for s in self._samples])
                return max(top * (1.0 + self.margin), central), central
            d = max(self.defaults.intercept_mb, 0.0)
            return d, d
        x = a if feature == "audio" else m
        assert x is not None
        fit = self.fit(feature)
        if fit is None:
            slope = self.defaults.mb_per_audio_second if feature == "audio" else self.defaults.mb_per_media_mb
            d = max(self.defaults.intercept_mb + slope * x, 0.0)
            return d, d
        central = max(fit.central(x), 0.0)
        upper = max(fit.upper(x) * (1.0 + self.margin), central)
        return upper, central

    def params(self) -> dict[str, Any]:
        """JSON-ready state: the fitted lines (for display) and the window (to keep learning)."""
        out: dict[str, Any] = {
            "version": PARAMS_VERSION,
            "quantile": self.quantile,
            "margin": self.margin,
            "min_samples": self.min_samples,
            "window": self.window,
            "n_samples": self.n_samples,
            "intercept_mb": None,
            "mb_per_audio_second": None,
            "mb_per_media_mb": None,
            "upper_intercept_mb": None,
            "upper_mb_per_audio_second": None,
            "upper_mb_per_media_mb": None,
        }
        for feature, key in (("audio", "mb_per_audio_second"), ("media", "mb_per_media_mb")):
            fit = self.fit(feature)
            out[feature] = None
            if fit is None:
                continue
            k = 1.0 + self.margin
            out[feature] = {
                "n": fit.n,
                "intercept_mb": fit.intercept,
                "slope": fit.slope,
                "upper_intercept_mb": fit.upper_intercept * k,
                "upper_slope": fit.upper_slope * k,
                "residual_mode": fit.residual_mode,
                "residual_quantile": fit.residual_quantile,
            }
            out[key] = fit.slope
            out["upper_" + key] = fit.upper_slope * k
            if out["intercept_mb"] is None or feature == "audio":
                out["intercept_mb"] = fit.intercept
                out["upper_intercept_mb"] = fit.upper_intercept * k
        out["samples"] = [[s.audio_seconds, s.media_mb, s.growth_mb] for s in self._samples]
        return out

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, defaults: Defaults, **kw: Any) -> "MemoryModel":
        """Rebuild a model from ``params()``; settings come from ``kw``, unreadable params start cold."""
        model = cls(defaults, **kw)
        if not params or params.get("version") != PARAMS_VERSION:
            return model
        for row in params.get("samples") or []:
            try:
                audio, media, growth = row
            except (TypeError, ValueError):
                continue
            model.observe(audio, media, growth)
        return model


def bump_after_kill(observed_mb: float, previous_estimate_mb: float) -> float:
    """Next estimate for a file killed at ``observed_mb``: it needs more than it got to."""
    return max(observed_mb * 1.2, observed_mb + 256.0, previous_estimate_mb)


class Predictor:
    """Combines the model, worker baselines and per-file lower bounds into one estimate per file."""

    BASELINE_QUANTILE = 0.9
    BASELINE_WINDOW = 50

    def __init__(self, model: MemoryModel, baseline_mb: float) -> None:
        self.model = model
        self._initial_baseline = float(baseline_mb)
        self._baselines: deque[float] = deque(maxlen=self.BASELINE_WINDOW - 1)

    @property
    def baseline_mb(self) -> float:
        """A high quantile of recent READY baselines: workers differ, admission must not undercount."""
        if not self._baselines:
            return self._initial_baseline
        return quantile([self._initial_baseline, *self._baselines], self.BASELINE_QUANTILE)

    def observe_baseline(self, uss_mb: float) -> None:
        v = _finite(uss_mb)
        if v is not None and v >= 0:
            self._baselines.append(v)

    def observe_growth(self, audio_seconds: float | None, media_mb: float | None, growth_mb: float) -> None:
        """A finished file's growth; killed attempts go to lower bounds instead."""
        self.model.observe(audio_seconds, media_mb, growth_mb)

    def estimate(
        self,
        audio_seconds: float | None,
        media_mb: float | None,
        lower_bound_mb: float | None = None,
    ) -> Estimate:
        """Peak estimate for one file. ``lower_bound_mb`` is a peak (baseline included) at which an
        earlier attempt on this file was killed; the estimate then rises past it."""
        baseline = self.baseline_mb
        upper, central = self.model.predict_growth(audio_seconds, media_mb)
        peak = baseline + upper
        central_peak = baseline + central
        source = self.model.source(audio_seconds, media_mb)
        lb = _finite(lower_bound_mb) if lower_bound_mb is not None else None
        if lb is not None:
            bumped = bump_after_kill(lb, peak)
            if bumped > peak:
                peak = bumped
                source = "lower_bound"
            central_peak = max(central_peak, lb)
        return Estimate(
            peak_mb=peak,
            growth_mb=max(peak - baseline, 0.0),
            baseline_mb=baseline,
            source=source,
            lower_bound_mb=lb,
            central_mb=central_peak,
        )


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _size(v: Any) -> float | None:
    """A usable size: finite and non-negative, else unknown."""
    if v is None:
        return None
    f = _finite(v)
    return f if f is not None and f >= 0 else None


def _feature(audio_seconds: float | None, media_mb: float | None) -> str | None:
    if audio_seconds is not None:
        return "audio"
    if media_mb is not None:
        return "media"
    return None
