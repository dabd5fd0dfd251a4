"""The evidence benches: their measures on known distributions, and every ``--quick`` bench's
files (the report's structure and that its figures are finite, not its conclusions)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sdplug.bench import common, metrics
from sdplug.cli import main as cli_main

# -- measures -------------------------------------------------------------------------------------


def test_wasserstein_1d_of_a_shift_is_the_shift_and_of_itself_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, generator=g)
    assert metrics.wasserstein_1d(a, a) == 0.0
    assert metrics.wasserstein_1d(a, a + 0.7) == pytest.approx(0.7, abs=1e-6)  # a + 0.7 is rounded to float32
    # two samples of N(0, 1) and N(0.5, 1): W1 = 0.5 up to sampling error
    assert metrics.wasserstein_1d(a, torch.randn(3000, generator=g) + 0.5) == pytest.approx(0.5, abs=0.06)


def test_wasserstein_1d_of_unequal_sizes_matches_the_cdf_integral():
    # W1 = integral |F_a - F_b|: a = {0, 1}, b = {0, 0, 3}: F_a - F_b is -1/6 on [0, 1), 1/3 on [1, 3)
    assert metrics.wasserstein_1d([0.0, 1.0], [0.0, 0.0, 3.0]) == pytest.approx(1 / 6 + 2 / 3)
    # N(0, 1) against N(0, 2^2): W1 = E|Z| * (2 - 1) = sqrt(2 / pi)
    g = torch.Generator().manual_seed(1)
    assert metrics.wasserstein_1d(torch.randn(20000, generator=g), 2 * torch.randn(15000, generator=g)) == pytest.approx(
        math.sqrt(2 / math.pi), abs=0.03
    )


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    bandwidths = [metrics.median_distance(x)]
    same = metrics.mmd2(x, y, bandwidths)
    shifted = [metrics.mmd2(x, y + d, bandwidths) for d in (0.25, 0.5, 1.0)]
    assert abs(same) < 0.01
    assert shifted[0] > 0.01 and shifted[0] < shifted[1] < shifted[2]


def test_feature_mmd_standardises_by_the_reference_and_ranks_by_distance():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 3, 4, 4, generator=generator) * 5 + 2  # features far from unit scale
    embed = lambda images: images.flatten(1)[:, :6]  # noqa: E731
    score = metrics.FeatureMMD(embed, reference)
    assert torch.allclose(score.reference.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(score.reference.std(0), torch.ones(6), atol=1e-3)
    same = score(torch.randn(300, 3, 4, 4, generator=generator) * 5 + 2)
    near = score(torch.randn(300, 3, 4, 4, generator=generator) * 5 + 4)
    far = score(torch.randn(300, 3, 4, 4, generator=generator) * 5 + 12)
    assert abs(same) < 0.02 < near < far


def test_speedup_of_a_curve_twice_as_fast_is_two():
    steps = list(range(10, 110, 10))
    baseline = [1.0 / s for s in steps]
    faster = [1.0 / (2 * s) for s in steps]  # reaches at step s what the baseline reaches at 2s
    value, reached = metrics.speedup(steps, baseline, faster, tail=1)
    assert reached and value == pytest.approx(2.0, rel=0.05)
    # a variant that never gets as good: the upper bound baseline steps / last step, flagged
    value, reached = metrics.speedup(steps, baseline, [b + 1.0 for b in baseline], tail=1)
    assert not reached and value == pytest.approx(1.0)
    assert metrics.speedup(steps, baseline, baseline, tail=1) == (1.0, True)


def test_steps_to_reach_interpolates_between_checkpoints():
    assert metrics.steps_to_reach([10, 20, 30], [1.0, 0.5, 0.2], 0.75) == pytest.approx(15.0)
    assert metrics.steps_to_reach([10, 20], [1.0, 0.9], 0.5) is None


def test_out_of_range_share_counts_far_values_and_non_finite_ones():
    x = torch.tensor([0.0, 1.2, -1.6, 2.0, float("nan"), float("inf"), 1.5, -0.3])
    assert metrics.out_of_range_share(x, 1.5) == pytest.approx(4 / 8)


def test_range_share_and_high_frequency_residue():
    data = torch.linspace(-1, 1, 1001)
    assert metrics.range_share(data, data) == pytest.approx(1.0)
    assert metrics.range_share(data * 0.5, data) == pytest.approx(0.5, abs=0.01)
    assert metrics.range_share(data * 0.5 + 5, data) == 0.0
    flat = torch.zeros(2, 3, 8, 8)
    assert metrics.high_frequency_residue(flat) == 0.0
    assert metrics.high_frequency_residue(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))) > 0.3


def test_summary_is_mean_and_sample_std_over_seeds():
    entry = common.summary([1.0, 2.0, 3.0])
    assert entry["mean"] == 2.0 and entry["spread"] == pytest.approx(1.0) and entry["per_seed"] == [1.0, 2.0, 3.0]
    assert common.pm(entry, 1) == "2.0 ± 1.0"
    assert not common.all_finite({"a": [1.0, {"b": float("nan")}]}) and common.all_finite({"a": [1, True, "x"]})


def test_an_option_of_another_bench_is_refused_and_seeds_are_checked(capsys):
    assert cli_main(["bench", "noise-range", "--repeats", "3"]) == 1
    assert "--repeats belongs to another bench" in capsys.readouterr().err
    assert cli_main(["bench", "plan-overhead", "--seeds", "2"]) == 1
    assert "--seeds belongs to another bench" in capsys.readouterr().err
    assert cli_main(["bench", "cfg", "--seeds", "0"]) == 1
    assert "--seeds is 0" in capsys.readouterr().err


# -- every --quick bench, through the command line -------------------------------------------------

PLOTS = {
    "noise-range": ["noise-range-extremes.png", "noise-range-wasserstein.png", "noise-range-samples.png"],
    "min-snr": ["min-snr-quality.png", "min-snr-accuracy.png"],
    "cfg": ["cfg-accuracy.png", "cfg-out-of-range.png", "cfg-mmd.png", "cfg-samples.png"],
    "cost": ["cost-noise.png", "cost-plan-overhead.png"],
    "flow-samplers": ["flow-samplers-quality.png"],
    "flow-weightings": ["flow-weightings-quality.png"],
    "flow-noise-range": ["flow-noise-range-extremes.png", "flow-noise-range-wasserstein.png", "flow-noise-range-samples.png"],
}


def _numbers(value):
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    else:
        for v in value:
            yield from _numbers(v)


def _summaries(value):
    if isinstance(value, dict):
        if {"mean", "spread", "per_seed"} <= set(value):
            yield value
        for v in value.values():
            yield from _summaries(v)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLOTS))
def test_quick_bench_writes_a_report_plots_and_finite_figures(name, tmp_path, capsys):
    out = tmp_path / name
    assert cli_main(["bench", name, "--quick", "--seeds", "2", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    assert lines[0].startswith("# ")
    # the headline table comes first: a header row, its separator, and at least two body rows
    first_table = next(i for i, line in enumerate(lines) if line.startswith("| "))
    assert first_table < 6, "the report must open with its table"
    assert re.match(r"^\|( --- \|)+$", lines[first_table + 1])
    body = []
    for line in lines[first_table + 2 :]:
        if not line.startswith("| "):
            break
        body.append(line)
    assert len(body) >= 2 and all("±" in line for line in body[1:]), "every figure is mean ± spread"
    assert "Seeds [0, 1] (2)" in report
    for plot in PLOTS[name]:
        assert f"`{plot}`" in report
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "figures.json").read_text())
    assert data["bench"] == name and data["mode"] == "quick" and data["seeds"] == [0, 1] and data["plots"] == PLOTS[name]
    numbers = list(_numbers(data["figures"]))
    assert numbers and all(math.isfinite(v) for v in numbers)
    summaries = list(_summaries(data["figures"]))
    assert summaries and all(len(s["per_seed"]) == 2 for s in summaries)
    assert "wrote" in capsys.readouterr().out
