"""TTA and speed-up arithmetic on hand-made curves."""
import pytest

from fedhq_core.metrics import accuracy_at, mean_std, speedup, time_to_accuracy

FAST = [[1.0, 0.2], [2.0, 0.5], [3.0, 0.8], [4.0, 0.9]]
SLOW = [[2.0, 0.1], [4.0, 0.4], [6.0, 0.7], [8.0, 0.85]]


def test_tta_is_first_time_reaching_target():
    assert time_to_accuracy(FAST, 0.8) == 3.0
    assert time_to_accuracy(SLOW, 0.8) == 8.0
    assert time_to_accuracy(SLOW, 0.95) is None


def test_speedup():
    assert speedup(time_to_accuracy(SLOW, 0.7), time_to_accuracy(FAST, 0.7)) == pytest.approx(2.0)
    assert speedup(None, 3.0) is None and speedup(3.0, None) is None


def test_accuracy_at_equal_time_is_a_step_function():
    assert accuracy_at(FAST, 0.5) == 0.0
    assert accuracy_at(FAST, 2.5) == 0.5
    assert accuracy_at(SLOW, 8.0) == 0.85
    # gain at the baseline's total time
    assert accuracy_at(FAST, SLOW[-1][0]) - SLOW[-1][1] == pytest.approx(0.05)


def test_mean_std_skips_missing():
    assert mean_std([1.0, None, 3.0]) == (2.0, 1.0)
    assert mean_std([None]) == (None, None)
