"""Rho schedules: values per epoch against hand-written tables, argument errors, use by the SAM callback."""

import math

import pytest

from lightning_lt.callbacks import SAM
from lightning_lt.optim import ConstantRho, LinearRho, RhoSchedule, StepRho

# ----------------------------------------------------------------------------------------- ConstantRho


@pytest.mark.parametrize("rho", [0.0, 0.05, 0.8, 2])
def test_constant_rho_is_the_same_every_epoch(rho):
    schedule = ConstantRho(rho)
    values = [schedule(e) for e in (0, 1, 5, 159, 160, 199, 1000)]
    assert values == [float(rho)] * 7
    assert all(isinstance(v, float) for v in values)


def test_constant_rho_default_is_sam_default():
    assert ConstantRho()(0) == 0.05


# -------------------------------------------------------------------------------------------- StepRho

STEP_TABLE = {  # epoch -> rho for StepRho(values=[0.05, 0.1, 0.2], milestones=[5, 60])
    0: 0.05, 1: 0.05, 4: 0.05,
    5: 0.1, 6: 0.1, 59: 0.1,
    60: 0.2, 61: 0.2, 199: 0.2, 10_000: 0.2,
}


def test_step_rho_matches_hand_table():
    schedule = StepRho(values=[0.05, 0.1, 0.2], milestones=[5, 60])
    assert {e: schedule(e) for e in STEP_TABLE} == STEP_TABLE


def test_step_rho_every_epoch_of_a_short_run():
    # values[k] from epoch milestones[k - 1] on: a milestone is the first epoch of the new value
    schedule = StepRho(values=[0.0, 0.5, 0.8], milestones=[2, 4])
    assert [schedule(e) for e in range(7)] == [0.0, 0.0, 0.5, 0.5, 0.8, 0.8, 0.8]


def test_step_rho_without_milestones_is_constant():
    schedule = StepRho(values=[0.3], milestones=[])
    assert [schedule(e) for e in (0, 10, 200)] == [0.3, 0.3, 0.3]


def test_step_rho_milestone_zero_skips_the_first_value():
    schedule = StepRho(values=[0.05, 0.1], milestones=[0])
    assert [schedule(e) for e in range(3)] == [0.1, 0.1, 0.1]


@pytest.mark.parametrize(
    ("values", "milestones", "match"),
    [
        ([0.05, 0.1], [5, 10], "one more value than milestones"),
        ([0.05, 0.1, 0.2], [5], "one more value than milestones"),
        ([], [], "one more value than milestones"),
        ([0.05, 0.1, 0.2], [10, 5], "strictly increasing"),
        ([0.05, 0.1, 0.2], [5, 5], "strictly increasing"),
        ([0.05, 0.1], [-1], "strictly increasing epochs >= 0"),
        ([0.05, -0.1], [5], r"values\[1\].*>= 0"),
        ([math.nan, 0.1], [5], r"values\[0\].*finite"),
        ([0.05, math.inf], [5], r"values\[1\].*finite"),
        ([True, 0.1], [5], r"values\[0\]"),
        (["0.1", 0.1], [5], r"values\[0\]"),
    ],
)
def test_step_rho_errors(values, milestones, match):
    with pytest.raises(ValueError, match=match):
        StepRho(values=values, milestones=milestones)


# ------------------------------------------------------------------------------------------ LinearRho


def test_linear_rho_matches_hand_table():
    schedule = LinearRho(start=0.0, end=0.2, epochs=5)
    expected = [0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2, 0.2]  # epochs 0..4 ramp, then held
    assert [schedule(e) for e in range(8)] == pytest.approx(expected, abs=1e-12)


def test_linear_rho_can_decrease():
    schedule = LinearRho(start=0.1, end=0.0, epochs=3)
    assert [schedule(e) for e in range(5)] == pytest.approx([0.1, 0.05, 0.0, 0.0, 0.0], abs=1e-12)


def test_linear_rho_over_the_cifar_schedule():
    schedule = LinearRho(start=0.05, end=0.8, epochs=200)
    assert schedule(0) == pytest.approx(0.05)
    assert schedule(199) == pytest.approx(0.8)
    assert schedule(250) == pytest.approx(0.8)
    # exactly linear: equal steps of (0.8 - 0.05) / 199
    steps = [schedule(e + 1) - schedule(e) for e in range(199)]
    assert steps == pytest.approx([0.75 / 199] * 199, abs=1e-12)


def test_linear_rho_clamps_negative_epochs_to_start():
    assert LinearRho(start=0.02, end=0.2, epochs=10)(-3) == pytest.approx(0.02)


def test_linear_rho_one_epoch_is_end():
    schedule = LinearRho(start=0.0, end=0.3, epochs=1)
    assert [schedule(e) for e in range(3)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start=0.0, end=0.1, epochs=0), "`epochs` to be an integer >= 1"),
        (dict(start=0.0, end=0.1, epochs=-5), "`epochs` to be an integer >= 1"),
        (dict(start=0.0, end=0.1, epochs=2.5), "`epochs` to be an integer >= 1"),
        (dict(start=0.0, end=0.1, epochs=True), "`epochs` to be an integer >= 1"),
        (dict(start=-0.1, end=0.1, epochs=10), "`start`.*>= 0"),
        (dict(start=0.0, end=math.nan, epochs=10), "`end`.*finite"),
        (dict(start=0.0, end=math.inf, epochs=10), "`end`.*finite"),
    ],
)
def test_linear_rho_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearRho(**kwargs)


@pytest.mark.parametrize("rho", [-0.01, math.nan, math.inf, True, None])
def test_constant_rho_errors(rho):
    with pytest.raises(ValueError, match="`rho`"):
        ConstantRho(rho)


def test_base_schedule_is_abstract():
    with pytest.raises(NotImplementedError, match="__call__"):
        RhoSchedule()(0)


# ---------------------------------------------------------------------------------- with the callback


def test_sam_callback_reads_the_schedule():
    callback = SAM(rho=0.5, rho_schedule=StepRho(values=[0.05, 0.1, 0.2], milestones=[5, 60]))
    assert {e: callback.rho_at(e) for e in STEP_TABLE} == STEP_TABLE  # the schedule wins over `rho`


def test_sam_callback_without_schedule_is_constant():
    callback = SAM(rho=0.8)
    assert [callback.rho_at(e) for e in (0, 160, 199)] == [0.8, 0.8, 0.8]
