"""What would the whole input cost?  Run a random sample for real and project, with honest error bars.

How (and why this way):

* **Sample.** One streaming pass draws a simple random sample of ``k`` prompts (reservoir sampling,
  Algorithm L: memory O(k) whatever the input size) and, in the same pass, gathers per-stratum
  aggregates: a stratum (a *cell*) is one model × one job; per cell the prompt count, the sum of
  ``prompt_chars`` and a log-binned sketch of (``prompt_chars``, ``max_tokens``), 16 bins per
  octave, whose size depends on the spread of the values, never on the number of lines.
* **Project.** Only the sample is bought (a normal run restricted to the sampled ids, so its answers
  land in the ledger and a later ``run`` with the same ``--out`` reuses them).  Per cell, a
  model-assisted difference estimator: a predictor ``f`` fitted per model (prices are per model)
  from prompt length and ``max_tokens`` (completion length ~ min(max_tokens, a + b·prompt_chars),
  ``a``, ``b`` learnt from answers the cap did not cut), then
  ``T_cell = Σ_population f + N_cell/n_cell · Σ_sample (y - f)``.  The correction term keeps the
  estimate unbiased whatever ``f`` gets wrong; a good ``f`` only makes it tighter.  ``f`` is
  cross-fitted (5 folds: a sampled prompt's residual comes from a fit that never saw it) because a
  predictor scored on its own training rows looks better than it is and biases the total low.
  Every prompt's features are its bin's means, so ``Σ_population f`` is exact from the sketch.
* **Interval.** 95%: the estimate ± 1.96 bootstrap standard errors.  The bootstrap resamples the
  answers within each cell and redoes everything (fits included), so the uncertainty of the
  predictor itself is counted; each cell's spread is scaled by its finite population correction
  sqrt(1 - n/N), so a cell run in full contributes none.  The analytic residual variance
  covered the true total only ~90% of the time at n=200 (it ignores the fit's own noise); the
  bootstrap covered it 96% of the time at n=200, 92.5% at n=100 (400 seeds of
  ``benchmarks/bench_estimate.py``).
* **Failures.** A sampled prompt that failed (or never ran because the sample run stopped) is
  missing at random within its cell: the projection is the cost of the whole input *if it all
  succeeds*.  Unconfirmed spend (streams cut before their usage chunk) is projected on its own
  and added to the upper end of the cost interval only: it may or may not have been billed.

Pure parts (:func:`reservoir_sample`, :class:`Population`, :func:`project`) do no I/O; only
:func:`estimate` runs requests and reads the ledger, :func:`write_estimate` writes files.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from statistics import NormalDist
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

from . import jobs
from .config import RunConfig, input_options
from .errors import InputError
from .ledger import LEDGER_NAME, write_atomic
from .models import PromptRecord, RunSummary
from .pricing import PriceBook
from .runner import Runner

__all__ = [
    "CONFIDENCE",
    "ESTIMATE_VERSION",
    "CellTotals",
    "EstimateResult",
    "Figures",
    "Population",
    "Projection",
    "SampleRow",
    "estimate",
    "max_tokens_of",
    "project",
    "read_sample_rows",
    "reservoir_sample",
    "write_estimate",
]

#: Bumped when a field of estimate.json changes meaning.
ESTIMATE_VERSION = 1
CONFIDENCE = 0.95
_Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)

_PER_OCTAVE = 16  # sketch bins per doubling of prompt_chars or max_tokens (~4% wide)
_FOLDS = 5
_MIN_REGRESSION = 12  # fewer training answers than this: a ratio to prompt length instead
_REPLICATES = 200

# Projected quantities, one column each.  Total tokens is its own column so it gets its own interval.
_TARGETS = ("cost_usd", "unconfirmed_cost_usd", "prompt_tokens", "completion_tokens", "total_tokens", "latency_s")
_COST, _UNCONF, _PTOK, _CTOK, _TOK, _LAT = range(len(_TARGETS))

T = TypeVar("T")
_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]
_Cell = tuple[str, str]  # (model, job)


# -- sampling ----------------------------------------------------------------------------------------


def reservoir_sample(records: Iterable[T], k: int, seed: int) -> list[T]:
    """A uniform random sample of ``k`` items (all of them if fewer), in one pass and O(k) memory.

    Algorithm L (Li 1994): after the first ``k`` items it jumps over geometrically many items
    instead of drawing one random number per item.  It always consumes the whole iterable, so a
    generator that tallies what it yields sees every item.  Returns the items in input order;
    the same ``seed`` gives the same sample.  Raises ValueError for a negative ``k``.
    """
    if k < 0:
        raise ValueError(f"sample size must not be negative, got {k}")
    it = iter(records)
    if k == 0:
        for _ in it:
            pass
        return []
    rng = random.Random(seed)
    reservoir: list[tuple[int, T]] = list(enumerate(itertools.islice(it, k)))
    if len(reservoir) < k:
        return [item for _, item in reservoir]

    def uniform() -> float:  # in (0, 1): logarithms below never see 0
        u = rng.random()
        while u == 0.0:
            u = rng.random()
        return u

    # log(W), W the largest of k uniforms; kept in log space so W never rounds to 1.
    log_w = math.log(uniform()) / k
    position = k - 1
    while True:
        skip = int(math.log(uniform()) / math.log(-math.expm1(log_w)))
        landed = list(itertools.islice(it, skip, skip + 1))  # skips without keeping what it skips
        if not landed:
            break
        position += skip + 1
        reservoir[rng.randrange(k)] = (position, landed[0])
        log_w += math.log(uniform()) / k
    reservoir.sort(key=lambda pair: pair[0])
    return [item for _, item in reservoir]


def max_tokens_of(record: PromptRecord) -> int | None:
    """The completion cap a prompt asks for (``max_tokens``, else ``max_completion_tokens``)."""
    value = record.body.get("max_tokens", record.body.get("max_completion_tokens"))
    return value if type(value) is int else None


def _bin(value: int) -> int:
    return int(math.log2(value + 1) * _PER_OCTAVE)


@dataclass(slots=True)
class CellTotals:
    """One stratum's aggregates: exact count and prompt chars, and the binned feature sketch."""

    prompts: int = 0
    prompt_chars: int = 0
    # (chars bin, max_tokens bin or -1 when unset) -> [prompts, sum of prompt_chars, sum of max_tokens]
    bins: dict[tuple[int, int], list[int]] = field(default_factory=dict)


class Population:
    """Per-cell aggregates of every prompt, filled in the sampling pass (memory independent of N)."""

    def __init__(self) -> None:
        self.cells: dict[_Cell, CellTotals] = {}

    def add(self, model: str, job: str, prompt_chars: int, max_tokens: int | None) -> None:
        """Count one prompt."""
        cell = self.cells.get((model, job))
        if cell is None:
            cell = self.cells[(model, job)] = CellTotals()
        cell.prompts += 1
        cell.prompt_chars += prompt_chars
        key = (_bin(prompt_chars), -1 if max_tokens is None else _bin(max_tokens))
        acc = cell.bins.get(key)
        if acc is None:
            cell.bins[key] = [1, prompt_chars, max_tokens or 0]
        else:
            acc[0] += 1
            acc[1] += prompt_chars
            acc[2] += max_tokens or 0

    def add_record(self, record: PromptRecord) -> None:
        """Count one validated prompt record."""
        self.add(record.model, record.job, record.prompt_chars, max_tokens_of(record))

    @property
    def prompts(self) -> int:
        return sum(c.prompts for c in self.cells.values())

    @property
    def prompt_chars(self) -> int:
        return sum(c.prompt_chars for c in self.cells.values())

    def features(self, model: str, job: str, prompt_chars: int, max_tokens: int | None) -> tuple[float, float]:
        """The (prompt_chars, max_tokens) a prompt is predicted from: its bin's means (inf: no cap).

        Raises KeyError for a prompt that was never added.
        """
        key = (_bin(prompt_chars), -1 if max_tokens is None else _bin(max_tokens))
        count, chars, caps = self.cells[(model, job)].bins[key]
        return chars / count, (caps / count if key[1] >= 0 else math.inf)


# -- projection (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One sampled prompt with what its ledger row says it cost.

    ``status`` is ``"ok"``, ``"failed"`` or ``"not_run"`` (the sample run stopped before it);
    only ok rows are projected from.  ``capped`` is ``finish_reason == "length"``.
    """

    id: str
    model: str
    job: str
    prompt_chars: int
    max_tokens: int | None
    status: str
    cost_usd: float = 0.0
    unconfirmed_cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    capped: bool = False


@dataclass(frozen=True, slots=True)
class Figures:
    """Projected figures for the whole input or one model, job or cell.

    Intervals are ``None`` when the sample cannot give one (a single answer to learn from).
    ``cost_high_usd`` includes the projected unconfirmed spend; ``sample_cost_usd`` is what the
    sampled answers already cost (a later run reuses them).
    """

    scope: str  # "total" | "model" | "job" | "cell"
    model: str | None
    job: str | None
    prompts: int
    sampled: int  # sampled prompts with an answer to project from
    method: str  # "exact" | "sampled" | "thin" | "borrowed" | "extrapolated"
    cost_usd: float
    cost_low_usd: float | None
    cost_high_usd: float | None
    unconfirmed_cost_usd: float
    prompt_tokens: float
    completion_tokens: float
    total_tokens: float
    tokens_low: float | None
    tokens_high: float | None
    latency_sum_s: float
    sample_cost_usd: float

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: How a cell was projected, best first; a group takes its worst cell's method.
_METHODS = ("exact", "sampled", "thin", "borrowed", "extrapolated")


@dataclass(slots=True)
class Projection:
    """The outcome of :func:`project`; ``status`` is ``"estimated"``, ``"exact"`` or ``"unavailable"``."""

    status: str
    reason: str | None = None
    total: Figures | None = None
    by_model: list[Figures] = field(default_factory=list)
    by_job: list[Figures] = field(default_factory=list)
    by_cell: list[Figures] = field(default_factory=list)
    wall_s: float | None = None  # the whole input at the given concurrency
    remaining_wall_s: float | None = None  # what a run after the sample still has to do
    remaining_prompts: int = 0
    warnings: list[str] = field(default_factory=list)
    replicates: int = 0


@dataclass(slots=True)
class _Fits:
    """One fitted predictor per replicate (per row of a weight matrix), all fitted at once."""

    regression: npt.NDArray[np.bool_]  # (R,) else a ratio to prompt chars (or a mean)
    g0: _F64  # (R,) completion tokens ~ g0 + g1 * prompt_chars, clipped to [0, top]
    g1: _F64
    top: _F64
    c_scale: _F64
    h_scale: _F64
    coef: _F64  # (R, 3, targets) on [1, chars / c_scale, completion / h_scale]
    ratio: _F64  # (R, targets) per prompt char, or per prompt when ``per_char`` is false
    per_char: npt.NDArray[np.bool_]

    def design(self, c: _F64, t: _F64) -> _F64:
        """(R, m, 3) regressors of m prompts with features ``c`` (chars) and ``t`` (max_tokens)."""
        completion = np.minimum(
            t[None, :], np.clip(self.g0[:, None] + self.g1[:, None] * c[None, :], 0.0, self.top[:, None])
        )
        z = np.empty((len(self.g0), len(c), 3))
        z[..., 0] = 1.0
        z[..., 1] = c[None, :] / self.c_scale[:, None]
        z[..., 2] = completion / self.h_scale[:, None]
        return z

    def predict(self, c: _F64, t: _F64) -> _F64:
        """(R, m, targets) predictions for m prompts."""
        reg = self.design(c, t) @ self.coef
        scale = np.where(self.per_char[:, None], c[None, :], 1.0)  # (R, m)
        alt = scale[:, :, None] * self.ratio[:, None, :]
        return np.where(self.regression[:, None, None], reg, alt)

    def predict_sums(self, w: _F64, c: _F64, t: _F64) -> _F64:
        """(R, H, targets): for each row h of ``w`` (H, bins), the sum over bins of w[h, b] * f(bin b)."""
        reg = (w @ self.design(c, t)) @ self.coef  # the predictor is linear in its regressors
        scale = np.where(self.per_char[:, None], (w @ c)[None, :], w.sum(axis=1)[None, :])  # (R, H)
        alt = scale[:, :, None] * self.ratio[:, None, :]
        return np.where(self.regression[:, None, None], reg, alt)


def _fit(w: _F64, c: _F64, t: _F64, ct: _F64, capped: npt.NDArray[np.bool_], y: _F64) -> _Fits:
    """Fit the per-model predictor of every target once per row of ``w`` (R, n): draws of each answer.

    Completion length is learnt as a line in prompt length from answers no cap could have cut
    (no max_tokens, or one above every answer seen), else from answers that were not cut; the
    targets are then regressed on [1, chars, min(max_tokens, that line)].  Fewer than
    ``_MIN_REGRESSION`` answers: a ratio to prompt chars instead.
    """
    n = w.sum(axis=1)
    top = np.where(w > 0, ct[None, :], -np.inf).max(axis=1)
    free = t[None, :] > top[:, None]
    free = np.where(((w * free).sum(axis=1) < 5)[:, None], ~capped[None, :], free)
    wf = w * free
    nf = wf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc = (wf @ c) / nf
        mct = (wf @ ct) / nf
        dc = c[None, :] - mc[:, None]
        sxx = (wf * dc * dc).sum(axis=1)
        sloped = (nf >= 3) & (sxx > 1e-12 * (wf @ (c * c)))
        g1 = np.where(sloped, (wf * dc) @ ct / sxx, 0.0)
        g0 = np.where(nf > 0, mct - g1 * mc, top)
    fits = _Fits(
        regression=n >= _MIN_REGRESSION,
        g0=g0,
        g1=g1,
        top=top,
        c_scale=np.maximum((w @ c) / n, 1.0),
        h_scale=np.ones_like(n),
        coef=np.empty(0),
        ratio=np.empty(0),
        per_char=(w @ c) > 0,
    )
    z = fits.design(c, t)
    fits.h_scale = np.maximum((w[:, :, None] * z).sum(axis=1)[:, 2] / n, 1.0)
    z[..., 2] /= fits.h_scale[:, None]
    wz = np.swapaxes(z * w[:, :, None], 1, 2)  # (R, 3, n)
    # Normal equations, pseudo-inverted: a regressor collinear with another (no max_tokens set,
    # so completion is a line in chars) just gets no weight.
    fits.coef = np.linalg.pinv(wz @ z, rcond=1e-10, hermitian=True) @ (wz @ y)
    totals = w @ y
    fits.ratio = totals / np.where(fits.per_char, w @ c, n)[:, None]
    return fits


@dataclass(slots=True)
class _Data:
    """Sample answers and population bins as arrays, grouped per model."""

    cells: list[_Cell]
    big_n: _F64  # prompts per cell
    n: _I64  # answers per cell
    exact: npt.NDArray[np.bool_]  # cell answered in full: its totals are sums, not estimates
    exact_totals: _F64  # (cells, targets)
    cell_of: _I64  # per answer
    model_of: _I64  # per answer
    c: _F64
    t: _F64
    ct: _F64
    capped: npt.NDArray[np.bool_]
    y: _F64  # (answers, targets)
    fold: _I64
    models: list[str]
    model_rows: list[_I64]  # answers of each model
    model_cells: list[_I64]  # global cell indices of each model
    bin_c: list[_F64]
    bin_t: list[_F64]
    bin_weights: list[_F64]  # (model's cells, bins): prompts per bin and cell


def _build(rows: list[SampleRow], population: Population, rng: np.random.Generator) -> _Data:
    cells = sorted(population.cells)
    index = {cell: i for i, cell in enumerate(cells)}
    models = sorted({m for m, _ in cells})
    model_index = {m: i for i, m in enumerate(models)}
    feats = [population.features(r.model, r.job, r.prompt_chars, r.max_tokens) for r in rows]
    y = np.array(
        [
            (
                r.cost_usd,
                r.unconfirmed_cost_usd,
                r.prompt_tokens,
                r.completion_tokens,
                r.prompt_tokens + r.completion_tokens,
                r.latency_s,
            )
            for r in rows
        ],
        dtype=np.float64,
    ).reshape(len(rows), len(_TARGETS))
    cell_of = np.array([index[(r.model, r.job)] for r in rows], dtype=np.int64)
    big_n = np.array([population.cells[c].prompts for c in cells], dtype=np.float64)
    n = np.bincount(cell_of, minlength=len(cells)).astype(np.int64)
    exact = n >= big_n
    exact_totals = np.zeros((len(cells), len(_TARGETS)))
    for full in np.flatnonzero(exact):
        members = np.flatnonzero(cell_of == full)
        exact_totals[full] = [math.fsum(y[members, j]) for j in range(len(_TARGETS))]
    model_of = np.array([model_index[r.model] for r in rows], dtype=np.int64)
    fold = np.zeros(len(rows), dtype=np.int64)
    model_rows, model_cells, bin_c, bin_t, bin_weights = [], [], [], [], []
    for i, m in enumerate(models):
        mine = np.flatnonzero(model_of == i)
        fold[mine] = rng.permutation(len(mine)) % _FOLDS
        model_rows.append(mine)
        own = [h for h, cell in enumerate(cells) if cell[0] == m]
        keys = sorted({key for h in own for key in population.cells[cells[h]].bins})
        col = {key: j for j, key in enumerate(keys)}
        w = np.zeros((len(own), len(keys)))
        sums = np.zeros((len(keys), 3))
        for j, h in enumerate(own):
            for key, (count, chars, caps) in population.cells[cells[h]].bins.items():
                w[j, col[key]] = count
                sums[col[key]] += (count, chars, caps)
        model_cells.append(np.array(own, dtype=np.int64))
        bin_c.append(sums[:, 1] / sums[:, 0])
        bin_t.append(np.where([k[1] >= 0 for k in keys], sums[:, 2] / sums[:, 0], np.inf))
        bin_weights.append(w)
    return _Data(
        cells=cells,
        big_n=big_n,
        n=n,
        exact=exact,
        exact_totals=exact_totals,
        cell_of=cell_of,
        model_of=model_of,
        c=np.array([f[0] for f in feats], dtype=np.float64),
        t=np.array([f[1] for f in feats], dtype=np.float64),
        ct=np.array([r.completion_tokens for r in rows], dtype=np.float64),
        capped=np.array([r.capped for r in rows], dtype=np.bool_),
        y=y,
        fold=fold,
        models=models,
        model_rows=model_rows,
        model_cells=model_cells,
        bin_c=bin_c,
        bin_t=bin_t,
        bin_weights=bin_weights,
    )


def _cell_totals(d: _Data, w: _F64) -> tuple[_F64, _F64]:
    """Per-cell projected totals, once per row of ``w`` (R, answers): how often each answer is drawn.

    Row of ones: the estimate itself; multinomial rows: bootstrap replicates.  Returns
    (totals (R, cells, targets), residual variance of the first row per model (models, targets),
    nan where a model has fewer than two answers).
    """
    out = np.zeros((len(w), len(d.cells), len(_TARGETS)))
    s2 = np.full((len(d.models), len(_TARGETS)), np.nan)
    fallback: _Fits | None = None
    for m in range(len(d.models)):
        rows, own, bins = d.model_rows[m], d.model_cells[m], d.bin_weights[m]
        if len(rows) == 0:
            # No answer for this model at all: price it like the others (flagged "extrapolated").
            if fallback is None:
                fallback = _fit(w, d.c, d.t, d.ct, d.capped, d.y)
            out[:, own] = fallback.predict_sums(bins, d.bin_c[m], d.bin_t[m])
            continue
        wm = w[:, rows]
        folds = d.fold[rows]
        c, t = d.c[rows], d.t[rows]
        preds = np.zeros((len(w), len(rows), len(_TARGETS)))
        pop = np.zeros((len(w), len(own), len(_TARGETS)))
        draws = wm.sum(axis=1)
        for k in range(min(_FOLDS, len(rows))):
            # Cross-fitting: fold k's answers are predicted by a fit on the other folds.
            test = folds == k
            train = wm * ~test
            alone = train.sum(axis=1) == 0  # a replicate that drew from this fold only
            if alone.any():
                train = np.where(alone[:, None], wm, train)
            fits = _fit(train, c, t, d.ct[rows], d.capped[rows], d.y[rows])
            preds[:, test] = fits.predict(c[test], t[test])
            share = wm[:, test].sum(axis=1) / draws
            pop += share[:, None, None] * fits.predict_sums(bins, d.bin_c[m], d.bin_t[m])
        resid = d.y[rows][None, :, :] - preds
        if len(rows) >= 2:
            s2[m] = resid[0].var(axis=0, ddof=1)
        weighted = resid * wm[:, :, None]
        cell_of = d.cell_of[rows]
        for i, h in enumerate(own):
            if d.exact[h]:
                out[:, h] = d.exact_totals[h]
            elif d.n[h]:
                out[:, h] = pop[:, i] + d.big_n[h] / d.n[h] * weighted[:, cell_of == h].sum(axis=1)
            else:
                out[:, h] = pop[:, i]
    return out, s2


def project(
    sample: Sequence[SampleRow],
    population: Population,
    *,
    concurrency: int = 16,
    rpm: float | None = None,
    seed: int = 0,
    replicates: int = _REPLICATES,
) -> Projection:
    """Project the totals of ``population`` from the sampled rows (see the module docstring).

    ``sample`` holds every sampled prompt, failed ones too (they are counted, not projected from);
    each must belong to ``population``.  Deterministic for a given ``seed``.  Never raises for
    a sample that cannot be projected from: returns status ``"unavailable"`` with the reason.
    """
    ok = sorted((r for r in sample if r.status == "ok"), key=lambda r: (r.model, r.job, r.id))
    warnings: list[str] = []
    lost = Counter(r.status for r in sample if r.status != "ok")
    if not population.cells:
        return Projection("unavailable", "the inputs hold no prompts")
    if not ok:
        why = (
            "no sampled prompt was drawn" if not sample else f"none of the {len(sample)} sampled prompts got an answer"
        )
        return Projection("unavailable", why + ", so there is no cost to project from")
    if lost:
        parts = [f"{count} {'failed' if status == 'failed' else 'never ran'}" for status, count in sorted(lost.items())]
        warnings.append(
            f"{' and '.join(parts)} of {len(sample)} sampled prompts: the projection assumes they would cost what "
            "the answered prompts like them cost"
        )
    rng = np.random.default_rng(seed)
    d = _build(ok, population, rng)
    # Bootstrap: redraw each cell's answers with replacement (a cell with one answer keeps it) and
    # redo every fit; row 0 of the weights is the sample itself.
    exact_all = bool(d.exact.all())
    by_cell_rows = [np.flatnonzero(d.cell_of == h) for h in range(len(d.cells))]
    boot = replicates if not exact_all and replicates > 1 else 0
    weights = np.ones((1 + boot, len(ok)))
    for rows_h in by_cell_rows:
        if len(rows_h) >= 2 and boot:
            weights[1:, rows_h] = rng.multinomial(len(rows_h), np.full(len(rows_h), 1.0 / len(rows_h)), size=boot)
    # Blocks of replicates keep the (replicates, bins, 3) regressors small whatever the bins.
    widest = max(len(b) for b in d.bin_c) + len(ok)
    block = max(1, 400_000 // max(widest, 1))
    blocks = [_cell_totals(d, weights[i : i + block]) for i in range(0, len(weights), block)]
    totals = np.concatenate([b[0] for b in blocks])
    point, s2 = totals[0], blocks[0][1]
    reps = totals[1:]
    # Per cell: the finite population correction, and n/(n-1) because resampling n of n answers
    # with replacement spreads a mean by only (n-1)/n of its sampling variance.
    scale = np.sqrt(np.clip(1.0 - d.n / d.big_n, 0.0, 1.0) * d.n / np.maximum(d.n - 1, 1))
    centered = (reps - reps.mean(axis=0)) * scale[None, :, None] if len(reps) else reps

    # Cells the bootstrap cannot see the spread of (0 or 1 answer): add the model's residual
    # variance as if one prompt stood for the whole cell.  Generous, and such cells are small.
    method: list[str] = []
    extra = np.zeros((len(d.cells), len(_TARGETS)))
    model_ok = np.bincount(d.model_of, minlength=len(d.models))
    pooled = d.y - d.y.mean(axis=0)
    all_s2 = (pooled**2).sum(axis=0) / (len(ok) - 1) if len(ok) >= 2 else np.full(len(_TARGETS), np.nan)
    for h, (model, job) in enumerate(d.cells):
        m = d.models.index(model)
        if d.exact[h]:
            method.append("exact")
        elif d.n[h] >= 2:
            method.append("sampled")
        else:
            if model_ok[m] == 0:
                method.append("extrapolated")
                var = all_s2
                warnings.append(
                    f"no answer for model {model} in the sample: its {int(d.big_n[h])} prompts of job {job} are "
                    "priced like the other models, which can be far off; use a larger --sample"
                )
            else:
                method.append("thin" if d.n[h] == 1 else "borrowed")
                var = s2[m]
                if d.n[h] == 0:
                    warnings.append(
                        f"no answer from job {job} with model {model} in the sample: its {int(d.big_n[h])} prompts "
                        "are projected from the model's other jobs"
                    )
            extra[h] = d.big_n[h] ** 2 * (1.0 - d.n[h] / d.big_n[h]) * var

    known = np.zeros((len(d.cells), len(_TARGETS)))
    for h in range(len(d.cells)):
        rows_h = by_cell_rows[h]
        known[h] = [math.fsum(d.y[rows_h, j]) for j in range(len(_TARGETS))]

    def figures(scope: str, model: str | None, job: str | None, members: list[int]) -> Figures:
        idx = np.array(members, dtype=np.int64)
        est = point[idx].sum(axis=0)
        var = extra[idx].sum(axis=0)
        if len(centered):
            var = var + (centered[:, idx, :].sum(axis=1) ** 2).sum(axis=0) / (len(centered) - 1)
        floor = known[idx].sum(axis=0)  # the sampled answers are part of the total, known exactly
        est = np.maximum(est, floor)
        half = _Z * np.sqrt(var)
        unconfirmed = max(float(est[_UNCONF]), 0.0)

        def bounds(j: int, plus: float = 0.0) -> tuple[float | None, float | None]:
            if not np.isfinite(half[j]):
                return None, None
            return max(float(est[j] - half[j]), float(floor[j])), float(est[j] + half[j]) + plus

        cost_lo, cost_hi = bounds(_COST, unconfirmed)
        tok_lo, tok_hi = bounds(_TOK)
        return Figures(
            scope=scope,
            model=model,
            job=job,
            prompts=int(d.big_n[idx].sum()),
            sampled=int(d.n[idx].sum()),
            method=max((method[h] for h in members), key=_METHODS.index),
            cost_usd=float(est[_COST]),
            cost_low_usd=cost_lo,
            cost_high_usd=cost_hi,
            unconfirmed_cost_usd=unconfirmed,
            prompt_tokens=float(est[_PTOK]),
            completion_tokens=float(est[_CTOK]),
            total_tokens=float(est[_TOK]),
            tokens_low=tok_lo,
            tokens_high=tok_hi,
            latency_sum_s=max(float(est[_LAT]), 0.0),
            sample_cost_usd=float(floor[_COST]),
        )

    all_cells = list(range(len(d.cells)))
    total = figures("total", None, None, all_cells)
    by_model = [figures("model", m, None, [h for h in all_cells if d.cells[h][0] == m]) for m in d.models]
    job_names = sorted({j for _, j in d.cells})
    by_job = [figures("job", None, j, [h for h in all_cells if d.cells[h][1] == j]) for j in job_names]
    by_cell = [figures("cell", m, j, [h]) for h, (m, j) in enumerate(d.cells)]

    workers = max(1, concurrency)
    remaining = int(d.big_n.sum()) - len(ok)
    longest = float(d.y[:, _LAT].max())
    wall = max(total.latency_sum_s / workers, longest)
    left = max(total.latency_sum_s - float(known[:, _LAT].sum()), 0.0)
    remaining_wall = max(left / workers, longest) if remaining else 0.0
    if rpm:
        wall = max(wall, total.prompts * 60.0 / rpm)
        remaining_wall = max(remaining_wall, remaining * 60.0 / rpm)
    return Projection(
        status="exact" if exact_all else "estimated",
        total=total,
        by_model=by_model,
        by_job=by_job,
        by_cell=by_cell,
        wall_s=wall,
        remaining_wall_s=remaining_wall,
        remaining_prompts=remaining,
        warnings=warnings,
        replicates=len(reps),
    )


# -- the command's library side ------------------------------------------------------------------


@dataclass(slots=True)
class EstimateResult:
    """What ``batchgate estimate`` found: the projection, the sample run's summary, an exit code."""

    projection: Projection
    summary: RunSummary
    prompts: int  # in the inputs
    prompt_chars: int
    sample_requested: int
    sample_drawn: int
    seed: int
    concurrency: int
    budget_usd: float | None = None
    rows: list[SampleRow] = field(default_factory=list)
    stop_message: str | None = None  # the sample run's, when it stopped early

    @property
    def status(self) -> str:
        return self.projection.status

    @property
    def exit_code(self) -> int:
        """The sample run's exit code; 1 at least when there is no estimate."""
        if self.projection.status == "unavailable":
            return self.summary.exit_code or 1
        return self.summary.exit_code

    @property
    def message(self) -> str | None:
        """One sentence for the terminal about what kind of estimate this is, or why there is none."""
        p = self.projection
        if p.status == "unavailable":
            causes = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.summary.failures_by_cause.items()))
            text = f"Estimate unavailable: {p.reason}"
            if causes:
                text += f" (failures: {causes})"
            if self.summary.stop_reason:
                text += f"; the sample run stopped early ({self.summary.stop_reason})"
                if self.stop_message:
                    return f"{text}: {self.stop_message}"
            return text + "."
        if self.prompts <= self.sample_requested:
            text = (
                f"The inputs hold {self.prompts} prompts, no more than --sample {self.sample_requested}: all of them "
                "ran, so "
            )
            if p.status == "exact":
                return text + "these are the actual figures (an interval of zero width)."
            return text + "these are the actual figures except for the prompts that failed, which are estimated."
        return None

    @property
    def notes(self) -> list[str]:
        """Caveats for the reader: the projection's own, then the sample run's."""
        notes = list(self.projection.warnings)
        total = self.projection.total
        if total is not None and total.cost_low_usd is None:
            notes.append("too few answers to give an interval; use a larger --sample")
        s = self.summary
        if s.stop_reason and self.projection.status != "unavailable":
            notes.append(
                f"the sample run stopped early ({s.stop_reason}), so the sampled prompts it ran are the first ones "
                "in the input files and the projection leans on them"
            )
            if self.stop_message:
                notes.append(self.stop_message)
        return notes

    @property
    def budget_verdict(self) -> str | None:
        """Whether a run of what remains fits ``--max-cost``: "fits", "exceeds", "uncertain" (None: no budget)."""
        total = self.projection.total
        if self.budget_usd is None or total is None:
            return None
        paid = total.sample_cost_usd
        high = total.cost_high_usd
        low = total.cost_low_usd if total.cost_low_usd is not None else total.cost_usd
        if high is not None and high - paid <= self.budget_usd:
            return "fits"
        if low - paid > self.budget_usd:
            return "exceeds"
        return "uncertain"

    def as_dict(self) -> dict[str, Any]:
        """Everything in ``estimate.json``."""
        p = self.projection
        total = p.total
        remaining: dict[str, Any] | None = None
        if total is not None:
            paid = total.sample_cost_usd
            remaining = {
                "prompts": p.remaining_prompts,
                "cost_usd": max(total.cost_usd - paid, 0.0),
                "cost_low_usd": None if total.cost_low_usd is None else max(total.cost_low_usd - paid, 0.0),
                "cost_high_usd": None if total.cost_high_usd is None else max(total.cost_high_usd - paid, 0.0),
                "wall_s": p.remaining_wall_s,
            }
        return {
            "version": ESTIMATE_VERSION,
            "status": p.status,
            "message": self.message,
            "confidence": CONFIDENCE,
            "method": (
                "post-stratified (model x job) difference estimator, cross-fitted predictor from prompt_chars and "
                "max_tokens; bootstrap interval with finite population correction"
            ),
            "inputs": {"prompts": self.prompts, "prompt_chars": self.prompt_chars},
            "sample": {
                "requested": self.sample_requested,
                "drawn": self.sample_drawn,
                "answered": sum(r.status == "ok" for r in self.rows),
                "failed": sum(r.status == "failed" for r in self.rows),
                "not_run": sum(r.status == "not_run" for r in self.rows),
                "bought": self.summary.ok,
                "reused": self.summary.skipped,
                "seed": self.seed,
                "replicates": p.replicates,
            },
            "total": total.as_dict() if total else None,
            "remaining": remaining,
            "by_model": [f.as_dict() for f in p.by_model],
            "by_job": [f.as_dict() for f in p.by_job],
            "by_cell": [f.as_dict() for f in p.by_cell],
            "concurrency": self.concurrency,
            "wall_s": p.wall_s,
            "budget_usd": self.budget_usd,
            "budget_verdict": self.budget_verdict,
            "warnings": self.notes,
            "sample_run": self.summary.as_dict(),
            "exit_code": self.exit_code,
        }

    @property
    def table(self) -> str:
        """A short plain-text table for the terminal."""
        return _table(self)


_CSV_FIELDS = tuple(f.name for f in fields(Figures))


def write_estimate(result: EstimateResult, out_dir: Path) -> list[Path]:
    """Write ``estimate.json`` and ``estimate.csv`` (one row per total/model/job/cell) atomically.

    Returns the paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "estimate.json"
    csv_path = out_dir / "estimate.csv"
    write_atomic(json_path, orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    p = result.projection
    for fig in [*([p.total] if p.total else []), *p.by_model, *p.by_job, *p.by_cell]:
        writer.writerow({k: ("" if v is None else v) for k, v in fig.as_dict().items()})
    write_atomic(csv_path, buf.getvalue().encode())
    return [json_path, csv_path]


@dataclass
class SamplePlan:
    """The drawn sample and what the single pass learnt about the whole input."""

    drawn: list[PromptRecord]
    population: Population
    sample: int
    seed: int


def draw_sample(inputs: Sequence[str | Path], config: RunConfig, *, sample: int, seed: int = 0) -> SamplePlan:
    """Validate the inputs and draw ``sample`` prompts in one pass, tallying the population as it goes.

    Raises InputError for a sample below 1, or invalid or empty inputs.
    """
    if sample < 1:
        raise InputError(
            f"--sample {sample}: an estimate needs at least one sampled prompt to run and project from; "
            "try --sample 200"
        )
    report = jobs.validate(inputs, **input_options(config))
    if not report.ok():
        raise InputError(report.format())
    if report.records == 0:
        raise InputError("the inputs hold no prompts: nothing to estimate")
    population = Population()

    def tally() -> Iterator[PromptRecord]:
        for record in jobs.iter_records(inputs, **input_options(config)):
            population.add_record(record)
            yield record

    return SamplePlan(reservoir_sample(tally(), sample, seed), population, sample, seed)


def project_sample(plan: SamplePlan, config: RunConfig, runner: Runner, summary: RunSummary) -> EstimateResult:
    """Read the sampled prompts' rows back from the ledger (earlier runs' too) and project."""
    rows = read_sample_rows(config.out_dir / LEDGER_NAME, plan.drawn)
    projection = project(rows, plan.population, concurrency=config.concurrency, rpm=config.rpm, seed=plan.seed)
    return EstimateResult(
        projection=projection,
        summary=summary,
        prompts=plan.population.prompts,
        prompt_chars=plan.population.prompt_chars,
        sample_requested=plan.sample,
        sample_drawn=len(plan.drawn),
        seed=plan.seed,
        concurrency=config.concurrency,
        budget_usd=config.max_cost_usd,
        rows=rows,
        stop_message=runner.stop_message,
    )


async def estimate(inputs: Sequence[str | Path], config: RunConfig, *, sample: int, seed: int = 0) -> EstimateResult:
    """Validate, draw ``sample`` prompts in one pass, run them for real into ``config.out_dir``, project.

    Sampled prompts already answered in that ledger are not bought again; ``config.max_cost_usd``
    caps the sample run's spend.  Raises InputError for a sample below 1, invalid or empty inputs;
    OutputLocked when another run holds ``config.out_dir``.
    """
    plan = draw_sample(inputs, config, sample=sample, seed=seed)
    runner = Runner(inputs, config, records=plan.drawn)
    summary = await runner.run()
    return project_sample(plan, config, runner, summary)


def read_sample_rows(ledger: Path, records: Collection[PromptRecord]) -> list[SampleRow]:
    """The ledger's word on each sampled prompt: its latest ok row, else its latest failed row.

    Unconfirmed spend the ledger could not price yet (``null``) is priced from the sample's own
    confirmed answers; a prompt with no row at all is ``"not_run"``.
    """
    by_id = {r.id: r for r in records}
    best: dict[str, dict[str, Any]] = {}
    if ledger.exists():
        with ledger.open("rb") as f:
            for line in f:
                try:
                    row = orjson.loads(line)
                    rid = row["id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
                if rid in by_id and (row.get("status") == "ok" or best.get(rid, {}).get("status") != "ok"):
                    best[rid] = row
    prices = PriceBook()
    for rid, row in best.items():
        if (
            row.get("status") == "ok"
            and row.get("prompt_tokens") is not None
            and row.get("completion_tokens") is not None
        ):
            prices.learn(
                row["model"],
                row["prompt_tokens"],
                row["completion_tokens"],
                row.get("total_cost_usd") or 0.0,
                by_id[rid].prompt_chars,
            )
    out = []
    for rec in records:
        row = best.get(rec.id)
        if row is None:
            out.append(SampleRow(rec.id, rec.model, rec.job, rec.prompt_chars, max_tokens_of(rec), "not_run"))
            continue
        unconfirmed = row.get("unconfirmed_cost_usd")
        if unconfirmed is None:
            unconfirmed = prices.estimate(rec.model, rec.prompt_chars, row.get("unconfirmed_completion_tokens") or 0)
        out.append(
            SampleRow(
                id=rec.id,
                model=rec.model,
                job=rec.job,
                prompt_chars=rec.prompt_chars,
                max_tokens=max_tokens_of(rec),
                status="ok" if row.get("status") == "ok" else "failed",
                cost_usd=float(row.get("total_cost_usd") or 0.0),
                unconfirmed_cost_usd=float(unconfirmed or 0.0),
                prompt_tokens=int(row.get("prompt_tokens") or 0),
                completion_tokens=int(row.get("completion_tokens") or 0),
                latency_s=float(row.get("latency_s") or 0.0),
                capped=row.get("finish_reason") == "length",
            )
        )
    return out


# -- the terminal table ------------------------------------------------------------------------------


def _usd(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:,.2f}" if abs(x) >= 100 else f"{x:,.4f}"


def _count(x: float | None) -> str:
    if x is None:
        return "?"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{max(seconds, 0.0):.1f}s" if seconds < 10 else f"{s}s"
    h, rest = divmod(s, 3600)
    return f"{h}h {rest // 60:02d}m" if h else f"{rest // 60}m {rest % 60:02d}s"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(result: EstimateResult) -> str:
    p = result.projection
    s = result.summary
    lines = [
        f"Estimate of {result.prompts:,} prompts from {result.sample_drawn:,} sampled (seed {result.seed}): "
        f"{s.ok} bought now, {s.skipped} reused from the ledger"
    ]
    if result.message:
        lines.append(result.message)
    if p.total is None:
        lines.extend(f"note: {w}" for w in result.notes)
        return "\n".join(lines)
    pct = f"{CONFIDENCE:.0%}"
    lines.append(f"{'':<38} {'prompts':>9} {'cost USD':>11}  {pct + ' interval':<23} {'tokens':>8}")
    groups = [p.total] + (p.by_model if len(p.by_model) > 1 else []) + (p.by_job if len(p.by_job) > 1 else [])
    for fig in groups:
        label = "total" if fig.scope == "total" else f"{fig.scope} {fig.model if fig.scope == 'model' else fig.job}"
        interval = "none" if fig.cost_low_usd is None else f"{_usd(fig.cost_low_usd)} – {_usd(fig.cost_high_usd)}"
        lines.append(
            f"{_short(label, 38):<38} {fig.prompts:>9,} {_usd(fig.cost_usd):>11}  {interval:<23} "
            f"{_count(fig.total_tokens):>8}"
        )
    t = p.total
    if p.status != "exact":
        left = max(t.cost_usd - t.sample_cost_usd, 0.0)
        lines.append(
            f"Still to buy: ~${_usd(left)} for {p.remaining_prompts:,} prompts, about "
            f"{_duration(p.remaining_wall_s)} at concurrency {result.concurrency} "
            f"(the sample's ${_usd(t.sample_cost_usd)} is reused by a run with the same --out)"
        )
    if t.unconfirmed_cost_usd > 0:
        lines.append(f"Unconfirmed spend (cut streams) projected: ${_usd(t.unconfirmed_cost_usd)}, in the upper bound")
    verdict = result.budget_verdict
    if verdict is not None:
        words = {
            "fits": "fits within",
            "exceeds": "would exceed",
            "uncertain": "may exceed",
        }[verdict]
        lines.append(f"What remains {words} --max-cost ${_usd(result.budget_usd)}")
    lines.extend(f"note: {w}" for w in result.notes)
    return "\n".join(lines)
