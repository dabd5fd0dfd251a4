"""Bench reports and plots: a quick run gives no verdict; axes have round, labelled ticks and a
share stays within [0, 1]. Built from made-up curves, so no bench has to train (seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from sdplug.bench import cfg, common, min_snr, plots


def options(tmp_path, quick: bool) -> common.Options:
    out = tmp_path / ("quick" if quick else "full")
    out.mkdir()
    return common.Options("min-snr", quick=quick, seeds=2, output=out, progress=False)


def min_snr_report(opts: common.Options) -> common.Report:
    """Curves where min-SNR-5 is no faster than the baseline: a full run's verdict says the 3.4x claim fails."""
    checkpoints = [8, 16, 24]
    falling = [[0.30, 0.20, 0.10], [0.32, 0.21, 0.11]]
    curves = {
        name: {"mmd": [list(c) for c in falling], "accuracy": [[0.2, 0.5, 0.98], [0.1, 0.4, 0.9]]} for name in min_snr.WEIGHTINGS
    }
    return min_snr._report(opts, min_snr.QUICK, checkpoints, curves, classifier_accuracy=0.9)


def test_a_quick_min_snr_report_gives_no_verdict(tmp_path):
    opts = options(tmp_path, quick=True)
    report = min_snr_report(opts)
    text = common.write(report, opts, seconds=1.0)[0].read_text()
    assert "Verdict" not in text and "does not reproduce" not in text
    assert common.NO_VERDICT in text
    assert "far too short to judge" in text


def test_a_full_report_gives_its_verdict(tmp_path):
    opts = options(tmp_path, quick=False)
    text = common.write(min_snr_report(opts), opts, seconds=1.0)[0].read_text()
    assert "**Verdict: min-SNR-5 speed-up here" in text and common.NO_VERDICT not in text


def test_a_quick_run_prints_no_verdict_and_keeps_the_benchs_own_checks(tmp_path, capsys):
    failed = "**Check failed: the twin no longer matches.**"
    report = common.Report(
        title="t", claim="c", headline="| a |\n| --- |\n| 1 |", verdict=["**Verdict: the claim holds.**"], sections=[],
        figures={}, plots=[], setup=[], checks=[failed],
    )  # fmt: skip
    opts = options(tmp_path, quick=True)
    assert common.main(lambda _: report, opts) == 0
    printed = capsys.readouterr().out
    assert failed in printed and common.NO_VERDICT in printed and "the claim holds" not in printed
    assert failed in (opts.output / "report.md").read_text()


def test_a_quick_cfg_table_has_no_verdict_column(tmp_path):
    labels = torch.arange(12).repeat_interleave(2)
    results = {
        name: {
            g: {"accuracy": [0.5, 0.6], "out_of_range": [0.0, 0.3], "mmd": [0.1, 0.2], "max_abs": [1.0, 2.0]}
            for g in cfg.GUIDANCE
        }
        for name in cfg.TRAININGS
    }
    grids = {(name, g): torch.zeros(len(labels), 3, 16, 16) for name in cfg.TRAININGS for g in cfg.GUIDANCE}
    dropout = {name: [0.1, 0.1] for name in cfg.TRAININGS}
    for quick in (True, False):
        opts = options(tmp_path, quick)
        headline = cfg._report(opts, cfg.QUICK, results, grids, labels, dropout, 0.9).headline
        assert ("verdict" in headline.splitlines()[0]) is not quick
        assert ("broken" in headline) is not quick


# -- plots ------------------------------------------------------------------------------------
def round_step(values):
    step = values[1] - values[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(abs(mantissa - m) < 1e-9 for m in (1, 2, 2.5, 5))


@pytest.mark.parametrize("lo,hi", [(-6.53, 24.1), (0.0121, 0.0187), (-0.019, 1.02), (48, 480), (1, 20), (3.3, 3.3)])
def test_ticks_are_round_and_cover_the_values(lo, hi):
    values = plots.ticks(lo, hi)
    assert values[0] <= lo and values[-1] >= hi and 3 <= len(values) <= 8
    assert round_step(values)
    steps = {round(b - a, 12) for a, b in zip(values, values[1:], strict=False)}
    assert len(steps) == 1  # evenly spaced
    labels = [plots.tick_label(v, values) for v in values]
    assert all(float(label) == pytest.approx(v) for label, v in zip(labels, values, strict=True))
    assert all(len(label.split(".")[-1]) <= 4 for label in labels if "." in label)  # no 24.0999999


def test_a_share_axis_stays_within_zero_and_one():
    values = plots.ticks(-0.019, 1.04, bounds=(0.0, 1.0))
    assert values[0] == 0.0 and values[-1] == 1.0
    assert [plots.tick_label(v, values) for v in values] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]


def test_accuracy_plots_are_bounded_and_labelled(tmp_path, monkeypatch):
    drawn = {}
    original = plots.lines

    def recording(path, *args, **kwargs):
        drawn[path.name] = kwargs
        original(path, *args, **kwargs)

    monkeypatch.setattr(plots, "lines", recording)
    min_snr_report(options(tmp_path, quick=True))
    accuracy = drawn["min-snr-accuracy.png"]
    assert accuracy["bounds"] == (0.0, 1.0) and accuracy["ylabel"] == "class accuracy" and accuracy["xlabel"] == "training step"
    assert drawn["min-snr-quality.png"].get("bounds") is None  # an unbiased MMD² estimate can be below 0
