"""The memory predictor: how much a worker will grow on a file, from what drives its memory.

Pure code, no I/O: the supervisor feeds it observations and persists ``params()`` through the
telemetry store, so a run starts from what earlier runs learned.

What drives memory is stated by the engine before a file starts (``FileFeatures``, from the file's
plan: see ``worker.align.plan_features``). The engines stream a recording span by span, so a
worker's peak depends on the largest span it will run (and that span's transcript), not on the
length of the recording; an engine that holds a whole file states the whole file as one span. Peak
growth (MiB above the worker's READY baseline) is therefore modelled as

    growth = a + b * longest_span_s + e * min(audio beyond the longest span, the most seen)

The span line starts from Theil–Sen (median of pairwise slopes) and is refined by a Huber
M-estimate, so the odd pathological file cannot drag it while clean files are used almost as
efficiently as by least squares; it is then lifted to an upper quantile of the residuals so that
most files fit under their estimate, and a margin on top absorbs drift. Extrapolating along the
span is physical (a span is the unit of work, capped by the engine), so it is allowed but marked
``uncertain`` beyond what has been seen; the term in the rest of the audio is fitted only from files
that had audio beyond their longest span and never extrapolated past the most that was seen.

Residual spread in memory use usually scales with the span (a long span allocates proportionally
larger buffers, and their jitter scales with them), but a fixed overhead jitter is also common. Both
are tried: residuals taken absolutely (the quantile is added to the intercept) and relative to the
fitted value (the line is scaled), and the pinball (quantile) loss on the window picks one, with a
lean toward the proportional reading. Either way the lifted prediction is itself a line.

Three kinds of evidence enter: finished files (``observe``), probe spans a worker measured on
itself at READY (``calibrate``: figures from this hardware before any file has finished), and
killed attempts, which only show that a file needs *more* than it reached: they never enter the
fit, they bound the estimate of that file (``bump_after_kill``) and of every file at least as
large (``observe_kill``). Cold-start defaults of the same shape are the last resort.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

PARAMS_VERSION = 2
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


# A prediction past this multiple of the largest span (or excess audio) seen is an extrapolation.
_EXTRAPOLATION = 1.25
# The term in audio beyond the longest span is fitted only when files spread over this many seconds.
_MIN_EXCESS_RANGE_S = 20.0
# Samples under the fitted upper line wait for a refit until they are this share of the window.
_REFIT_SHARE = 0.05
# Probe growths kept per probe length (one per recent worker); the fit takes their maximum.
_PROBES_KEPT = 8


@dataclass(frozen=True)
class FileFeatures:
    """What a file's memory depends on, stated from its plan before it runs (any may be None).

    ``longest_span_s`` and ``longest_span_chars``: the largest piece of audio the model will hold
    at once and its transcript; ``n_spans``: how many such pieces; ``windows``: timing-recovery
    windows for an untimed transcript (0 when timed); ``audio_s``, ``media_mb``, ``sample_rate``
    and ``channels`` describe the recording.
    """

    audio_s: float | None = None
    media_mb: float | None = None
    longest_span_s: float | None = None
    longest_span_chars: int | None = None
    n_spans: int | None = None
    windows: int | None = None
    sample_rate: int | None = None
    channels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FEATURE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FileFeatures":
        """Tolerant of missing, unknown and unusable values (they become None)."""
        d = d or {}
        out: dict[str, Any] = {}
        for f in _FEATURE_FIELDS:
            v = _size(d.get(f))
            if v is not None and f in _INT_FIELDS:
                v = int(v)
            out[f] = v
        return cls(**out)

    @property
    def span_s(self) -> float | None:
        """The span that drives memory: the longest span, else (no plan) the whole recording."""
        if self.longest_span_s is not None:
            return self.longest_span_s
        return self.audio_s

    @property
    def excess_s(self) -> float | None:
        """Audio beyond the longest span (what a streaming engine only reads past), when known."""
        if self.audio_s is None or self.longest_span_s is None:
            return None
        return max(0.0, self.audio_s - self.longest_span_s)

    def words(self) -> str:
        """The features as a user reads them in ``--dry-run``."""
        parts = []
        if self.longest_span_s is not None:
            span = f"longest span {self.longest_span_s:.1f} s"
            if self.longest_span_chars is not None:
                span += f" ({self.longest_span_chars} chars)"
            if self.n_spans is not None:
                span += f" of {self.n_spans} span{'s' if self.n_spans != 1 else ''}"
            parts.append(span)
        if self.audio_s is not None:
            parts.append(f"{self.audio_s:.1f} s audio")
        elif self.media_mb is not None:
            parts.append(f"{self.media_mb:.1f} MiB media, duration unknown")
        if self.windows:
            parts.append(f"{self.windows} timing-recovery windows")
        return ", ".join(parts) or "nothing known"


_FEATURE_FIELDS = tuple(FileFeatures.__dataclass_fields__)
_INT_FIELDS = {"longest_span_chars", "n_spans", "windows", "sample_rate", "channels"}


@dataclass
class Defaults:
    """Cold-start guesses of the model's own shape, the last resort before any file or probe.

    ``mb_per_span_second`` is growth per second of the longest span; ``mb_per_audio_second`` per
    second of audio beyond it (near zero for streaming engines); ``mb_per_media_mb`` stands in for
    the span when nothing but the media size is known.
    """

    baseline_mb: float
    intercept_mb: float
    mb_per_span_second: float
    mb_per_audio_second: float = 0.0
    mb_per_media_mb: float = 0.0


@dataclass
class Estimate:
    """One file's memory estimate.

    ``peak_mb`` is what admission reserves; ``central_mb`` is the estimate before quantile and
    margin (but never below a known lower bound) and decides whether a file cannot fit even alone.
    ``uncertain``: the model for this key is not trusted yet for this file (cold defaults, too few
    samples, or extrapolating past what was seen). ``accumulating_mb``: the part of the growth that
    builds up over the file's spans rather than recurring in each (see ``remaining_growth``).
    """

    peak_mb: float
    growth_mb: float
    baseline_mb: float
    source: str  # "cold" | "calibrated" | "learned" | "lower_bound"
    lower_bound_mb: float | None
    central_mb: float
    uncertain: bool = True
    explain: str = ""
    accumulating_mb: float = 0.0
    features: FileFeatures | None = None


@dataclass(frozen=True)
class _Sample:
    features: FileFeatures
    growth_mb: float


@dataclass
class Growth:
    """A growth prediction with the reasons a user can check."""

    upper: float
    central: float
    source: str
    uncertain: bool
    explain: str
    accumulating: float


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
    q = min(max(q, 0.0), 1.0)
    if isinstance(values, np.ndarray):
        if values.size == 0:
            raise ValueError("quantile of an empty collection")
        return float(np.quantile(values, q))
    xs = sorted(values)  # a short list: cheaper than a round trip through numpy
    if not xs:
        raise ValueError("quantile of an empty collection")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _median(values: Sequence[float] | np.ndarray) -> float:
    return quantile(values, 0.5)


def _pinball(residuals: np.ndarray, q: float) -> float:
    """Quantile loss of predicting an upper line with these (observed - predicted) residuals."""
    return float(np.where(residuals >= 0, q * residuals, (q - 1.0) * residuals).sum())


def _upper_quantile(residuals: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q`` quantile of the residuals after setting aside a few gross outliers on the high side.

    One pathological file (a corrupt recording that made the engine balloon) would otherwise lift
    the bound of every file on a small window; it is the file's own problem, and its kill bounds
    that file. At most a tenth of the points (and only when there are five or more) are set aside,
    and only those further than eight robust standard deviations above the median.
    """
    xs = np.sort(np.asarray(residuals, dtype=float))
    n = xs.size
    if n >= 5:
        med = float(np.median(xs))
        mad = float(np.median(np.abs(xs - med))) * 1.4826
        cut = med + 8.0 * mad if mad > 0 else float("inf")
        drop = 0
        while drop < max(1, n // 10) and xs[n - 1 - drop] > cut:
            drop += 1
        xs = xs[: n - drop]
    return quantile(xs, q)


def theil_sen(
    xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray,
    fallback_slope: float,
    *,
    clamp: bool = True,
) -> tuple[float, float]:
    """Median-of-pairwise-slopes line through the points, slope clamped at zero.

    ``fallback_slope`` is used when every x is the same (no slope can be measured). Memory does not
    shrink with larger files, so a negative slope (noise on a narrow range) is read as flat unless
    ``clamp`` is off (for transformed coordinates where the slope is an intercept).
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    n = x.size
    span = float(x.max() - x.min()) if n else 0.0
    eps = 1e-9 * max(1.0, span)
    if n <= _ALL_PAIRS_UPTO:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(n)
        i = rng.integers(0, n, _PAIR_SAMPLE)
        j = rng.integers(0, n, _PAIR_SAMPLE)
    dx = x[j] - x[i]
    keep = np.abs(dx) > eps
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep])) if keep.any() else float(fallback_slope)
    if clamp:
        slope = max(slope, 0.0)
    intercept = float(np.median(y - slope * x)) if n else 0.0
    return intercept, slope


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float] | None:
    """Weighted least-squares line, slope clamped at zero; None when x carries no information."""
    total = float(w.sum())
    if total <= 0:
        return None
    mx = float((w * x).sum()) / total
    my = float((w * y).sum()) / total
    sxx = float((w * (x - mx) ** 2).sum())
    if sxx <= 1e-12 * max(1.0, mx * mx) * total:
        return None
    b = float((w * (x - mx) * (y - my)).sum()) / sxx
    if b < 0:
        return my, 0.0
    return my - b * mx, b


def huber_refine(
    xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray,
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
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    a, b = start
    xmax = float(x.max()) if x.size else 1.0
    for _ in range(iterations):
        s = np.maximum(a + b * x, floor) if proportional else np.ones_like(x)
        z = (y - (a + b * x)) / s
        az = np.abs(z)
        spread = float(np.median(az)) * 1.4826 if az.size else 0.0
        if spread <= 0:
            break
        cut = _HUBER_K * spread
        with np.errstate(divide="ignore"):
            w = np.where(z != 0, np.minimum(1.0, cut / az), 1.0) / (s * s)
        line = _wls(x, y, w)
        if line is None:
            break
        done = abs(line[0] - a) + abs(line[1] - b) * xmax < 1e-6 * (1.0 + abs(a))
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
    fxa, fya = np.asarray(fx, dtype=float), np.asarray(fy, dtype=float)
    xa, ya = fxa[:n], fya[:n]  # the real samples: the prior points come after them

    start = theil_sen(fxa, fya, prior_slope)

    a, b = huber_refine(fxa, fya, start, proportional=False)
    res_abs = ya - (a + b * xa)
    q_abs = _upper_quantile(res_abs, quantile_q)
    loss_abs = _pinball(res_abs - q_abs, quantile_q)
    absolute = LineFit(n, a, b, a + q_abs, b, "absolute", q_abs)

    floor = max(_REL_FLOOR_MB, _REL_FLOOR_FRACTION * _median(np.abs(ya)))
    ar, br = huber_refine(fxa, fya, start, proportional=True, floor=floor)
    scales = np.maximum(ar + br * xa, floor)
    res_rel = ya - (ar + br * xa)
    q_rel = _upper_quantile(res_rel / scales, quantile_q)
    loss_rel = _pinball(res_rel - q_rel * scales, quantile_q)
    relative = LineFit(n, ar, br, ar * (1.0 + q_rel), br * (1.0 + q_rel), "relative", q_rel)

    return absolute if loss_abs < _ABSOLUTE_PREFERENCE * loss_rel else relative


@dataclass(frozen=True)
class _Fit:
    """The fitted model: a span line (with its upper line) and the excess-audio term."""

    line: LineFit
    excess_slope: float
    excess_seen_s: float
    span_seen_s: tuple[float, float]
    n_files: int
    n_probes: int


class MemoryModel:
    """Peak growth per file for one (engine, model, device, dtype), updated as files finish."""

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
        self._probes: dict[float, deque[float]] = {}
        self._kills: deque[_Sample] = deque(maxlen=self.window)
        self._fit_cache: _Fit | None = None
        self._dirty = True
        self._unfitted = 0  # samples observed since the last fit
        self._version = 0
        self._top_growth = 0.0

    @property
    def version(self) -> int:
        """Changes whenever a prediction may have: a sample that moves the fit or tops every growth
        seen (what files of unknown duration are charged), a probe, a kill. A sample the fit
        absorbs later leaves it as it was, and estimates made before stay right."""
        return self._version

    @property
    def n_samples(self) -> int:
        return len(self._samples)

    @property
    def n_probes(self) -> int:
        return len(self._probes)

    # -- evidence ----------------------------------------------------------------------------

    def observe(self, features: FileFeatures, growth_mb: float) -> None:
        """Record a finished file's growth. Only real work belongs here, never killed attempts."""
        g = _finite(growth_mb)
        if g is None or not isinstance(features, FileFeatures):
            return
        self._samples.append(_Sample(features, max(g, 0.0)))
        self._unfitted += 1
        if not self._dirty and not self._still_fits(features, g):
            self._dirty = True
        if self._dirty or g > self._top_growth:
            self._version += 1
        self._top_growth = max(self._top_growth, g)

    def _still_fits(self, features: FileFeatures, growth_mb: float) -> bool:
        """Whether the current fit may wait for this sample: it lies under the fitted upper line
        and few samples are waiting. A sample above the line is taken at once (the bound may be
        too low, which is what costs kills); one under it shifts a fit of many files by little, so
        refits of a full window (milliseconds of loop time each) come every few percent of it."""
        if self._fit_cache is None or features.span_s is None:
            return False
        if self._unfitted >= max(1, int(_REFIT_SHARE * len(self._samples))):
            return False
        return growth_mb <= self.predict(features).upper / (1.0 + self.margin)

    def calibrate(self, features: FileFeatures, growth_mb: float) -> None:
        """A probe span a worker measured on itself at READY; recent probes of a length are kept."""
        g = _finite(growth_mb)
        x = features.span_s if isinstance(features, FileFeatures) else None
        if g is None or x is None:
            return
        key = round(float(x), 1)
        self._probes.setdefault(key, deque(maxlen=_PROBES_KEPT)).append(max(g, 0.0))
        self._dirty = True
        self._version += 1

    def observe_kill(self, features: FileFeatures, growth_mb: float) -> None:
        """An attempt killed at ``growth_mb``: that file, and any at least as large, needs more."""
        g = _finite(growth_mb)
        if g is None or g <= 0 or not isinstance(features, FileFeatures) or features.span_s is None:
            return
        self._kills.append(_Sample(features, g))
        self._version += 1

    # -- fitting -----------------------------------------------------------------------------

    def fit(self) -> _Fit | None:
        """The current fit; None until ``min_samples`` files finished or probes were measured."""
        if self._dirty:
            self._fit_cache = self._fit()
            self._dirty = False
            self._unfitted = 0
        return self._fit_cache

    def _points(self) -> tuple[list[float], list[float], list[float], int, int]:
        xs: list[float] = []
        es: list[float] = []
        ys: list[float] = []
        files = 0
        for s in self._samples:
            x = s.features.span_s
            if x is None:
                continue
            xs.append(x)
            es.append(s.features.excess_s or 0.0)
            ys.append(s.growth_mb)
            files += 1
        for x, growths in self._probes.items():
            xs.append(x)
            es.append(0.0)
            ys.append(max(growths))
        return xs, es, ys, files, len(self._probes)

    def _fit(self) -> _Fit | None:
        xs, es, ys, files, probes = self._points()
        if files < self.min_samples and not (probes and len(xs) >= 2):
            return None
        # Cold defaults join as pseudo-samples only while nothing measured on this machine does.
        prior_points = 0 if probes else self.min_samples
        d = self.defaults

        def line_on(targets: Sequence[float]) -> LineFit:
            return fit_line(xs, targets, quantile_q=self.quantile, prior_intercept=d.intercept_mb,
                            prior_slope=d.mb_per_span_second, prior_points=prior_points)

        line = line_on(ys)
        excess_slope = 0.0
        file_es = [e for e, k in zip(es, range(len(es))) if k < files]
        spread = (max(file_es) - min(file_es)) if file_es else 0.0
        if files >= self.min_samples and spread >= _MIN_EXCESS_RANGE_S:
            resid = [y - line.central(x) for x, y in zip(xs[:files], ys[:files])]
            _, slope = theil_sen(file_es, resid, 0.0)
            if slope > 0:
                excess_slope = slope
                line = line_on([y - slope * e for y, e in zip(ys, es)])
        return _Fit(line=line, excess_slope=excess_slope, excess_seen_s=max(file_es, default=0.0),
                    span_seen_s=(min(xs), max(xs)), n_files=files, n_probes=probes)

    # -- predicting --------------------------------------------------------------------------

    def predict(self, features: FileFeatures) -> Growth:
        """Upper and central growth (MiB) for a file, with its source and the reasons in words."""
        x = features.span_s
        excess = features.excess_s or 0.0
        one_span = (features.n_spans or 1) <= 1
        fit = self.fit()
        if x is None:
            return self._predict_sizeless(features, fit)
        if fit is None:
            d = self.defaults
            span_part = d.intercept_mb + d.mb_per_span_second * x
            central = max(span_part + d.mb_per_audio_second * excess, 0.0)
            accumulating = d.mb_per_audio_second * excess + (span_part if one_span else 0.0)
            explain = (f"cold defaults: {d.intercept_mb:.0f} MiB + {d.mb_per_span_second:g} MiB per span second"
                       f" x {x:.1f} s" + (f" + {d.mb_per_audio_second:g} MiB per further audio second x {excess:.0f} s"
                                         if d.mb_per_audio_second and excess else ""))
            return self._bounded(features, Growth(central, central, "cold", True, explain, accumulating))
        line = fit.line
        e_used = min(excess, fit.excess_seen_s)
        excess_part = fit.excess_slope * e_used
        central = max(line.central(x) + excess_part, 0.0)
        lift = line.upper(x) / line.central(x) if line.residual_mode == "relative" and line.central(x) > 0 else 1.0
        upper = max((line.upper(x) + excess_part * lift) * (1.0 + self.margin), central)
        lo, hi = fit.span_seen_s
        beyond_span = x > hi * _EXTRAPOLATION + 1.0
        beyond_excess = fit.excess_slope > 0 and excess > fit.excess_seen_s * _EXTRAPOLATION + 30.0
        few = fit.n_files < self.min_samples
        source = "learned" if not few else "calibrated"
        uncertain = few or beyond_span or beyond_excess
        words = [f"{source} from {fit.n_files} file{'s' if fit.n_files != 1 else ''}"
                 + (f" and {fit.n_probes} probe span{'s' if fit.n_probes != 1 else ''}" if fit.n_probes else ""),
                 f"{line.intercept:.0f} MiB + {line.slope:.2f} MiB per span second x {x:.1f} s"]
        if fit.excess_slope > 0:
            words.append(f"+ {fit.excess_slope:.3f} MiB per further audio second x {e_used:.0f} s"
                         + (f" (capped at the {fit.excess_seen_s:.0f} s seen)" if excess > fit.excess_seen_s else ""))
        words.append(f"upper {int(round(self.quantile * 100))}% + {int(round(self.margin * 100))}% margin")
        if beyond_span:
            words.append(f"extrapolated: spans seen {lo:.1f}-{hi:.1f} s")
        accumulating = excess_part + (max(line.central(x), 0.0) if one_span else 0.0)
        return self._bounded(features, Growth(upper, central, source, uncertain, "; ".join(words), accumulating))

    def _predict_sizeless(self, features: FileFeatures, fit: _Fit | None) -> Growth:
        """No span and no duration: the media size stands in when defaults say how, else the worst
        growth seen (with the margin) is the honest answer."""
        m = features.media_mb
        if self._samples:
            top = max(s.growth_mb for s in self._samples)
            central = _median([s.growth_mb for s in self._samples])
            upper = max(top * (1.0 + self.margin), central)
            if m is not None and self.defaults.mb_per_media_mb:
                upper = max(upper, self.defaults.intercept_mb + self.defaults.mb_per_media_mb * m)
            return Growth(upper, central, "learned" if fit else "cold", True,
                          "duration unknown: the largest growth seen, with the margin", upper)
        d = self.defaults
        g = max(d.intercept_mb + (d.mb_per_media_mb * m if m is not None else 0.0), 0.0)
        return Growth(g, g, "cold", True, "duration unknown: cold defaults on the media size", g)

    def _bounded(self, features: FileFeatures, g: Growth) -> Growth:
        """Kills of files no larger than this one are lower bounds for it too."""
        x = features.span_s or 0.0
        e = features.excess_s or 0.0
        floor = 0.0
        for k in self._kills:
            if (k.features.span_s or 0.0) <= x + 1e-9 and (k.features.excess_s or 0.0) <= e + 1e-9:
                floor = max(floor, k.growth_mb)
        if floor <= g.upper:
            return g
        return Growth(floor * (1.0 + self.margin), max(g.central, floor), g.source, True,
                      g.explain + f"; raised past a kill at {floor:.0f} MiB growth on a file no larger", g.accumulating)

    def predict_growth(self, features: FileFeatures) -> tuple[float, float]:
        """(upper, central) growth in MiB; upper includes quantile and margin, never below central."""
        g = self.predict(features)
        return g.upper, g.central

    def source(self, features: FileFeatures) -> str:
        return self.predict(features).source

    # -- persistence -------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """JSON-ready state: the fitted terms (for display) and the evidence (to keep learning)."""
        out: dict[str, Any] = {
            "version": PARAMS_VERSION,
            "quantile": self.quantile,
            "margin": self.margin,
            "min_samples": self.min_samples,
            "window": self.window,
            "n_samples": self.n_samples,
            "n_probes": self.n_probes,
            "intercept_mb": None,
            "mb_per_span_second": None,
            "mb_per_audio_second": None,
            "mb_per_media_mb": None,
            "upper_intercept_mb": None,
            "upper_mb_per_span_second": None,
            "upper_mb_per_audio_second": None,
            "upper_mb_per_media_mb": None,
            "span_seen_s": None,
            "excess_seen_s": None,
            "residual_mode": None,
            "residual_quantile": None,
        }
        fit = self.fit()
        if fit is not None:
            k = 1.0 + self.margin
            line = fit.line
            lift = (line.upper_slope / line.slope) if line.residual_mode == "relative" and line.slope > 0 else 1.0
            out.update(
                intercept_mb=line.intercept, mb_per_span_second=line.slope, mb_per_audio_second=fit.excess_slope,
                upper_intercept_mb=line.upper_intercept * k, upper_mb_per_span_second=line.upper_slope * k,
                upper_mb_per_audio_second=fit.excess_slope * lift * k, span_seen_s=list(fit.span_seen_s),
                excess_seen_s=fit.excess_seen_s, residual_mode=line.residual_mode,
                residual_quantile=line.residual_quantile, n_fit=line.n)
        out["samples"] = [[s.features.to_dict(), s.growth_mb] for s in self._samples]
        out["probes"] = [[x, list(g)] for x, g in self._probes.items()]
        out["kills"] = [[s.features.to_dict(), s.growth_mb] for s in self._kills]
        return out

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, defaults: Defaults, **kw: Any) -> "MemoryModel":
        """Rebuild a model from ``params()``; settings come from ``kw``. Params of another version
        (the model of total audio seconds) start cold: their samples lack what drives memory."""
        model = cls(defaults, **kw)
        if not params or params.get("version") != PARAMS_VERSION:
            return model
        for row in params.get("samples") or []:
            try:
                feats, growth = row
                model.observe(FileFeatures.from_dict(feats), growth)
            except (TypeError, ValueError, AttributeError):
                continue
        for row in params.get("probes") or []:
            try:
                x, growths = row
                for g in growths:
                    model.calibrate(FileFeatures(longest_span_s=float(x)), g)
            except (TypeError, ValueError):
                continue
        for row in params.get("kills") or []:
            try:
                feats, growth = row
                model.observe_kill(FileFeatures.from_dict(feats), growth)
            except (TypeError, ValueError, AttributeError):
                continue
        return model


def describe(params: dict[str, Any] | None, defaults: Defaults | None = None) -> list[str]:
    """The learned model in words a user can check (``ratios``, ``--dry-run``)."""
    if not params or params.get("version") != PARAMS_VERSION:
        if defaults is None:
            return ["nothing learned yet"]
        return [f"cold defaults: growth = {defaults.intercept_mb:.0f} MiB + {defaults.mb_per_span_second:g} MiB "
                f"per second of the longest span + {defaults.mb_per_audio_second:g} MiB per further audio second"]
    if params.get("intercept_mb") is None:
        return [f"{params.get('n_samples', 0)} files, {params.get('n_probes', 0)} probe spans: "
                f"not enough to fit (cold defaults in use)"]
    lo, hi = params.get("span_seen_s") or (0.0, 0.0)
    lines = [
        f"growth = {params['intercept_mb']:.0f} MiB + {params['mb_per_span_second']:.2f} MiB per second of the "
        f"longest span" + (f" + {params['mb_per_audio_second']:.3f} MiB per further audio second "
                           f"(up to the {params['excess_seen_s']:.0f} s seen)"
                           if params.get("mb_per_audio_second") else ""),
        f"upper bound = {params['upper_intercept_mb']:.0f} MiB + {params['upper_mb_per_span_second']:.2f} MiB per "
        f"span second ({int(round(params['quantile'] * 100))}% quantile of {params.get('residual_mode')} residuals "
        f"+ {int(round(params['margin'] * 100))}% margin)",
        f"from {params.get('n_samples', 0)} files and {params.get('n_probes', 0)} probe spans; spans seen "
        f"{lo:.1f}-{hi:.1f} s (longer spans are extrapolated and marked uncertain)",
    ]
    probes = params.get("probes") or []
    if probes:
        lines.append("probes at READY: " + ", ".join(f"{x:g} s -> {max(g):.0f} MiB" for x, g in sorted(probes) if g))
    kills = params.get("kills") or []
    if kills:
        lines.append(f"{len(kills)} killed attempts bound files at least as large")
    return lines


def bump_after_kill(observed_mb: float, previous_estimate_mb: float) -> float:
    """Next estimate for a file killed at ``observed_mb``: it needs more than it got to."""
    return max(observed_mb * 1.2, observed_mb + 256.0, previous_estimate_mb)


def remaining_growth(estimate: Estimate, progress: dict[str, Any] | None, current_growth_mb: float) -> float:
    """What a running file may still grow by (MiB), corrected from its progress.

    Without progress it is the predicted growth less what has been seen. With ``spans_done`` of
    ``spans_total``, a file that has already grown past what its prediction allows at that point is
    projected forward by the same ratio: the part of the growth that accumulates over spans
    (``estimate.accumulating_mb``) scales with the spans done, the part that recurs in each span is
    reached in the first. A file running hot is then seen before the guard has to kill it.
    """
    predicted = max(float(estimate.growth_mb), 0.0)
    seen = max(float(current_growth_mb or 0.0), 0.0)
    if progress:
        seen = max(seen, _finite(progress.get("growth_mb")) or 0.0)
    base = max(0.0, predicted - seen)
    if not progress or predicted <= 0:
        return base
    try:
        done, total = int(progress.get("spans_done") or 0), int(progress.get("spans_total") or 0)
    except (TypeError, ValueError):
        return base
    if total <= 0 or done <= 0 or done >= total:
        return base
    f = done / total
    share = min(max(estimate.accumulating_mb / predicted, 0.0), 1.0)
    expected_so_far = predicted * ((1.0 - share) + share * f)
    if seen <= expected_so_far or expected_so_far <= 0:
        return base
    projected = predicted * (seen / expected_so_far)
    return max(base, projected - seen)


class Predictor:
    """Combines the model, worker baselines and per-file lower bounds into one estimate per file."""

    BASELINE_QUANTILE = 0.9
    BASELINE_WINDOW = 50

    def __init__(self, model: MemoryModel, baseline_mb: float, *, baseline_measured: bool = True) -> None:
        self.model = model
        self._initial_baseline = float(baseline_mb)
        self._initial_measured = baseline_measured
        self._baselines: deque[float] = deque(maxlen=self.BASELINE_WINDOW - 1)
        self._baseline_mb = self._initial_baseline

    @property
    def baseline_mb(self) -> float:
        """A high quantile of recent READY baselines: workers differ, admission must not undercount.
        A configured guess (``baseline_measured=False``) counts only until a worker is measured."""
        return self._baseline_mb

    def observe_baseline(self, uss_mb: float) -> None:
        v = _finite(uss_mb)
        if v is not None and v >= 0:
            self._baselines.append(v)
            first = [self._initial_baseline] if self._initial_measured else []
            self._baseline_mb = quantile([*first, *self._baselines], self.BASELINE_QUANTILE)

    def observe_growth(self, features: FileFeatures | dict | None, growth_mb: float) -> None:
        """A finished file's growth on the work its model really did (``result.features_run``);
        killed attempts go to ``observe_kill``, cached or failed-early files nowhere."""
        if isinstance(features, dict):
            features = FileFeatures.from_dict(features)
        if features is not None:
            self.model.observe(features, growth_mb)

    def observe_kill(self, features: FileFeatures | dict | None, growth_mb: float) -> None:
        if isinstance(features, dict):
            features = FileFeatures.from_dict(features)
        if features is not None:
            self.model.observe_kill(features, growth_mb)

    def calibrate(self, probes: Iterable[dict[str, Any]] | None) -> int:
        """Probe spans from a READY message (``[{"features": {...}, "growth_mb": float}]``); returns
        how many were usable. Malformed entries are ignored: a worker cannot poison the model."""
        n = 0
        for p in probes or []:
            if not isinstance(p, dict):
                continue
            feats = p.get("features")
            if not isinstance(feats, dict):
                continue
            g = _finite(p.get("growth_mb"))
            f = FileFeatures.from_dict(feats)
            if g is None or f.span_s is None:
                continue
            self.model.calibrate(f, g)
            n += 1
        return n

    def estimate(self, features: FileFeatures, lower_bound_mb: float | None = None) -> Estimate:
        """Peak estimate for one file. ``lower_bound_mb`` is a peak (baseline included) at which an
        earlier attempt on this file was killed; the estimate then rises past it."""
        if isinstance(features, dict):
            features = FileFeatures.from_dict(features)
        baseline = self.baseline_mb
        g = self.model.predict(features)
        peak = baseline + g.upper
        central_peak = baseline + g.central
        source = g.source
        explain = g.explain
        uncertain = g.uncertain
        lb = _finite(lower_bound_mb) if lower_bound_mb is not None else None
        if lb is not None:
            bumped = bump_after_kill(lb, peak)
            if bumped > peak:
                peak = bumped
                source = "lower_bound"
                explain += f"; this file was killed at {lb:.0f} MiB: now {peak:.0f} MiB"
            # Killed while still growing: it needs more than the last reading showed, by at least
            # what a poll interval of growth adds (a small step, never the full bump).
            central_peak = max(central_peak, lb * 1.02, lb + 8.0)
        growth = max(peak - baseline, 0.0)
        return Estimate(
            peak_mb=peak,
            growth_mb=growth,
            baseline_mb=baseline,
            source=source,
            lower_bound_mb=lb,
            central_mb=central_peak,
            uncertain=uncertain,
            explain=f"peak {peak:.0f} MiB = worker {baseline:.0f} + growth {growth:.0f} ({features.words()}): {explain}",
            accumulating_mb=min(g.accumulating * (growth / g.upper) if g.upper > 0 else 0.0, growth),
            features=features,
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

