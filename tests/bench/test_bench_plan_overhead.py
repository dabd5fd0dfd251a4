"""The plan-overhead bench: both sides compute the same step, and the figures it prints are real."""

import math
import re

import pytest

from sdplug.bench import plan_overhead
from sdplug.cli import main as cli_main


def _figure(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"\s+([-+]?\d+(?:\.\d+)?)", text)
    assert match, f"{label!r} missing from the report:\n{text}"
    return float(match.group(1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_plan_and_hand_written_step_agree_and_the_ratios_print(prediction_type):
    result = plan_overhead.measure(steps=2, rounds=2, batch_size=2, prediction_type=prediction_type)
    # the could-fail check: the plan's noise, x_t, target and weighted loss are the hand maths
    assert result.plan_losses[0] == pytest.approx(result.hand_losses[0], rel=1e-5)
    # same draws, same model copies, same optimizer: the sides stay in step for the whole run
    assert result.max_loss_difference <= 1e-5
    text = plan_overhead.result_table(result)
    for label in ("step time ratio plan / hand", "plan calls alone / plan step", "hand-written counterparts / hand step"):
        value = _figure(text, label)
        assert math.isfinite(value) and value > 0, (label, value)
    assert math.isfinite(_figure(text, "overhead (t_plan - t_hand) / t_hand"))
    assert len(result.plan_step) == len(result.hand_step) == 2


def test_an_option_of_the_other_bench_is_refused(capsys):
    assert cli_main(["bench", "pyramid", "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert "--steps belongs to another bench" in err and "pyramid takes --repeats, --threads" in err
