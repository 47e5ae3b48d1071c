"""Cost estimation maths: the reservoir sampler and the projection, on synthetic data with a known total."""

from __future__ import annotations

import math
import random
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest

from batchgate.estimate import Population, SampleRow, project, reservoir_sample

PRICES = {"m-big": (2.5, 10.0), "m-small": (0.4, 1.6)}  # USD per 1M prompt / completion tokens


def synthetic(
    n: int, seed: int = 1, *, models: tuple[str, ...] = ("m-big", "m-small")
) -> tuple[Population, list[SampleRow]]:
    """A population whose every cost is known: long prompts cost more, max_tokens caps the answer."""
    rng = random.Random(seed)
    pop = Population()
    rows = []
    for i in range(n):
        model = models[0] if rng.random() < 0.6 or len(models) == 1 else models[1]
        job = "chat" if i % 3 else "summarize"
        chars = int(rng.lognormvariate(math.log(400 if job == "chat" else 1500), 0.9)) + 1
        cap = rng.choice([16, 64, 256, None])
        natural = min(600, 8 + chars // 8 + rng.randint(0, 40))
        completion = min(natural, cap or natural)
        prompt_tokens = chars // 4 + 4
        price_in, price_out = PRICES[model]
        cost = (prompt_tokens * price_in + completion * price_out) / 1e6
        pop.add(model, job, chars, cap)
        rows.append(
            SampleRow(
                id=f"p{i}",
                model=model,
                job=job,
                prompt_chars=chars,
                max_tokens=cap,
                status="ok",
                cost_usd=cost,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                latency_s=0.01 + completion * 1e-4,
                capped=cap is not None and natural > cap,
            )
        )
    return pop, rows


def true_cost(rows: list[SampleRow]) -> float:
    return math.fsum(r.cost_usd for r in rows)


# -- reservoir_sample --------------------------------------------------------------------------------


def test_every_item_is_equally_likely_to_be_sampled() -> None:
    n, k, trials = 40, 8, 6000
    counts = Counter(x for seed in range(trials) for x in reservoir_sample(range(n), k, seed))
    expected = trials * k / n
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
    assert chi2 < 72.1  # the 99.9% point of chi-square with 39 degrees of freedom


def test_long_streams_are_sampled_uniformly_across_their_length() -> None:
    # Algorithm L jumps over items: check it lands evenly on every tenth of a long stream.
    n, k, trials = 20_000, 5, 1500
    deciles = Counter(x * 10 // n for seed in range(trials) for x in reservoir_sample(range(n), k, seed))
    expected = trials * k / 10
    chi2 = sum((deciles[d] - expected) ** 2 / expected for d in range(10))
    assert chi2 < 27.9  # 99.9% point, 9 degrees of freedom


def test_sample_is_in_input_order_deterministic_and_seed_dependent() -> None:
    a = reservoir_sample(range(1000), 20, seed=7)
    assert a == sorted(a) and len(set(a)) == 20
    assert reservoir_sample(range(1000), 20, seed=7) == a
    assert reservoir_sample(range(1000), 20, seed=8) != a


def test_short_input_gives_everything_and_the_whole_input_is_always_consumed() -> None:
    seen = []

    def tally(n: int) -> Iterator[int]:
        for i in range(n):
            seen.append(i)
            yield i

    assert reservoir_sample(tally(5), 10, seed=0) == [0, 1, 2, 3, 4]
    seen.clear()
    assert len(reservoir_sample(tally(5000), 3, seed=0)) == 3
    assert len(seen) == 5000  # aggregates gathered alongside see every line
    seen.clear()
    assert reservoir_sample(tally(50), 0, seed=0) == []
    assert len(seen) == 50
    with pytest.raises(ValueError, match="negative"):
        reservoir_sample(range(3), -1, seed=0)


def test_memory_is_bounded_by_the_sample_not_the_input() -> None:
    def lines(n: int) -> Iterator[dict[str, str]]:
        for i in range(n):
            yield {"id": f"q{i}", "prompt": "x" * 200}

    tracemalloc.start()
    try:
        sample = reservoir_sample(lines(200_000), 20, seed=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sample) == 20
    assert peak < 200_000  # bytes; holding the input would take ~100 MB


# -- Population --------------------------------------------------------------------------------------


def test_population_counts_exactly_and_features_are_bin_means() -> None:
    pop = Population()
    pop.add("m", "j", 100, 64)
    pop.add("m", "j", 101, 64)  # same bin as 100
    pop.add("m", "j", 5000, None)
    pop.add("m", "k", 7, 16)
    assert pop.prompts == 4 and pop.prompt_chars == 5208
    assert pop.cells[("m", "j")].prompts == 3
    assert pop.features("m", "j", 100, 64) == (100.5, 64.0)
    assert pop.features("m", "j", 5000, None) == (5000.0, math.inf)
    with pytest.raises(KeyError):
        pop.features("m", "j", 7, 16)  # that prompt is in job k


# -- project -----------------------------------------------------------------------------------------


def test_whole_population_sampled_is_exact_with_zero_width() -> None:
    pop, rows = synthetic(150)
    p = project(rows, pop, concurrency=10)
    assert p.status == "exact" and p.total is not None
    assert p.total.cost_usd == true_cost(rows)
    assert p.total.cost_low_usd == p.total.cost_high_usd == p.total.cost_usd
    assert p.total.total_tokens == sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert p.remaining_prompts == 0 and p.remaining_wall_s == 0.0
    assert all(f.method == "exact" for f in p.by_cell)


def test_projection_is_close_and_its_interval_covers_about_95_percent() -> None:
    pop, rows = synthetic(3000)
    truth = true_cost(rows)
    errors, covered = [], 0
    seeds = 30
    for seed in range(seeds):
        p = project(reservoir_sample(rows, 150, seed), pop, seed=seed, replicates=100)
        assert p.status == "estimated" and p.total is not None
        lo, hi = p.total.cost_low_usd, p.total.cost_high_usd
        assert lo is not None and hi is not None
        errors.append(p.total.cost_usd / truth - 1)
        covered += lo <= truth <= hi
    rms = math.sqrt(sum(e * e for e in errors) / seeds)
    assert rms < 0.03
    assert abs(sum(errors) / seeds) < 0.015  # no systematic bias
    assert covered >= 25  # >= 83%: 95% nominal, binomial noise over 30 seeds


def test_prompt_length_and_max_tokens_make_it_much_tighter_than_counting() -> None:
    pop, rows = synthetic(3000)
    truth = true_cost(rows)
    ours, naive = [], []
    for seed in range(12):
        sample = reservoir_sample(rows, 100, seed)
        p = project(sample, pop, seed=seed, replicates=2)
        assert p.total is not None
        ours.append((p.total.cost_usd / truth - 1) ** 2)
        naive.append((len(rows) * math.fsum(r.cost_usd for r in sample) / len(sample) / truth - 1) ** 2)
    assert sum(ours) < 0.25 * sum(naive)


def test_per_model_and_per_job_figures_add_up_and_cover_their_truth() -> None:
    pop, rows = synthetic(2000)
    p = project(reservoir_sample(rows, 200, 4), pop, seed=4, replicates=100)
    assert p.total is not None
    assert [f.model for f in p.by_model] == ["m-big", "m-small"]
    assert [f.job for f in p.by_job] == ["chat", "summarize"]
    assert math.isclose(sum(f.cost_usd for f in p.by_model), p.total.cost_usd, rel_tol=1e-9)
    assert math.isclose(sum(f.cost_usd for f in p.by_job), p.total.cost_usd, rel_tol=1e-9)
    assert sum(f.prompts for f in p.by_cell) == 2000
    for fig in p.by_model:
        truth = true_cost([r for r in rows if r.model == fig.model])
        assert fig.cost_low_usd is not None and fig.cost_high_usd is not None
        assert fig.cost_low_usd <= truth <= fig.cost_high_usd
        assert abs(fig.cost_usd / truth - 1) < 0.1


def test_failed_rows_are_counted_not_projected_from() -> None:
    pop, rows = synthetic(1000)
    sample = reservoir_sample(rows, 100, 1)
    broken = [replace(r, status="failed", cost_usd=0.0) if i % 10 == 0 else r for i, r in enumerate(sample)]
    p = project(broken, pop, seed=1, replicates=50)
    assert p.total is not None and p.total.sampled == 90
    assert "10 failed of 100 sampled prompts" in p.warnings[0]
    assert abs(p.total.cost_usd / true_cost(rows) - 1) < 0.1  # not dragged towards zero


def test_nothing_answered_is_unavailable_not_a_division_by_zero() -> None:
    pop, rows = synthetic(300)
    failed = [replace(r, status="failed") for r in rows[:20]]
    p = project(failed, pop)
    assert p.status == "unavailable" and p.total is None
    assert p.reason is not None and "none of the 20 sampled prompts got an answer" in p.reason
    assert project([], pop).status == "unavailable"
    assert project([], Population()).reason == "the inputs hold no prompts"


def test_one_answer_gives_a_figure_without_an_interval() -> None:
    pop, rows = synthetic(300, models=("m-big",))
    p = project(rows[1:2], pop)
    assert p.status == "estimated" and p.total is not None
    assert p.total.cost_usd > 0
    assert p.total.cost_low_usd is None and p.total.cost_high_usd is None


def test_unsampled_cells_borrow_from_their_model_and_unsampled_models_are_flagged() -> None:
    pop, rows = synthetic(1200)
    sample = [r for r in reservoir_sample(rows, 200, 2) if not (r.model == "m-small" and r.job == "summarize")]
    p = project(sample, pop, seed=2, replicates=50)
    methods = {(f.model, f.job): f.method for f in p.by_cell}
    assert methods[("m-small", "summarize")] == "borrowed"
    assert methods[("m-big", "chat")] == "sampled"
    assert any("no answer from job summarize with model m-small" in w for w in p.warnings)
    cell = next(f for f in p.by_cell if f.method == "borrowed")
    truth = true_cost([r for r in rows if (r.model, r.job) == ("m-small", "summarize")])
    assert cell.cost_low_usd is not None and cell.cost_high_usd is not None
    assert cell.cost_low_usd <= truth <= cell.cost_high_usd

    only_big = [r for r in sample if r.model == "m-big"]
    p = project(only_big, pop, seed=2, replicates=20)
    assert {f.method for f in p.by_cell if f.model == "m-small"} == {"extrapolated"}
    assert any("no answer for model m-small" in w for w in p.warnings)


def test_cells_answered_in_full_add_no_uncertainty() -> None:
    pop, rows = synthetic(900)
    small = [r for r in rows if (r.model, r.job) == ("m-small", "summarize")]
    sample = small + reservoir_sample([r for r in rows if r not in small], 100, 5)
    p = project(sample, pop, seed=5, replicates=50)
    cell = next(f for f in p.by_cell if (f.model, f.job) == ("m-small", "summarize"))
    assert cell.method == "exact"
    assert cell.cost_usd == cell.cost_low_usd == cell.cost_high_usd == true_cost(small)
    assert p.status == "estimated"


def test_unconfirmed_spend_widens_only_the_upper_bound() -> None:
    pop, rows = synthetic(1000)
    sample = reservoir_sample(rows, 100, 3)
    base = project(sample, pop, seed=3, replicates=50)
    cut = [replace(r, unconfirmed_cost_usd=1e-3) if i % 4 == 0 else r for i, r in enumerate(sample)]
    p = project(cut, pop, seed=3, replicates=50)
    assert base.total is not None and p.total is not None
    assert base.total.unconfirmed_cost_usd == 0.0
    assert p.total.unconfirmed_cost_usd == pytest.approx(1000 * 1e-3 / 4, rel=0.2)
    assert p.total.cost_usd == base.total.cost_usd and p.total.cost_low_usd == base.total.cost_low_usd
    assert base.total.cost_high_usd is not None and p.total.cost_high_usd is not None
    assert p.total.cost_high_usd == pytest.approx(base.total.cost_high_usd + p.total.unconfirmed_cost_usd)


def test_low_bound_never_below_what_the_sample_already_cost() -> None:
    pop, rows = synthetic(400)
    sample = reservoir_sample(rows, 390, 0)
    p = project(sample, pop, seed=0, replicates=50)
    assert p.total is not None and p.total.cost_low_usd is not None
    assert p.total.cost_low_usd >= p.total.sample_cost_usd == true_cost(sample)


def test_wall_time_is_latency_over_concurrency() -> None:
    pop, rows = synthetic(2000)
    sample = reservoir_sample(rows, 200, 6)
    p8 = project(sample, pop, concurrency=8, seed=6, replicates=2)
    p32 = project(sample, pop, concurrency=32, seed=6, replicates=2)
    assert p8.total is not None and p8.wall_s is not None and p32.wall_s is not None
    truth = math.fsum(r.latency_s for r in rows)
    assert p8.total.latency_sum_s == pytest.approx(truth, rel=0.05)
    assert p8.wall_s == pytest.approx(p8.total.latency_sum_s / 8)
    assert p32.wall_s == pytest.approx(p8.wall_s / 4)
    limited = project(sample, pop, concurrency=32, rpm=600, seed=6, replicates=2)
    assert limited.remaining_wall_s == pytest.approx(1800 * 60 / 600)  # the rate limit is slower
