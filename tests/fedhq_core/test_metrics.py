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


def test_commit_audit_on_known_numbers():
    """The audit of fedhq's commits: evidence is the comparisons' 95% t-interval excluding 0, and a
    commit is right when it names the pure strategy that ended better on validation (not test)."""
    from fedhq_core.metrics import commit_audit, commit_line

    def seed(committed_qat, gain, se, n, val_ptq, val_qat, test_ptq, test_qat):
        return {"fedhq": {"decision": {"committed_qat": committed_qat, "online_gain": gain, "online_se": se,
                                       "online_n": n}},
                "all-ptq": {"tail_acc_q_val": val_ptq, "tail_acc_q": test_ptq},
                "all-qat": {"tail_acc_q_val": val_qat, "tail_acc_q": test_qat}}

    by_seed = {0: seed(1, 0.03, 0.01, 9, 0.40, 0.45, 0.40, 0.45),      # t = 3.0 > t975(8) = 2.306
               1: seed(0, -0.02, 0.01, 9, 0.40, 0.45, 0.50, 0.45),     # t = -2.0: no evidence; wrong on val
               2: seed(1, 0.10, 0.01, 1, 0.40, 0.45, 0.40, 0.45)}      # one comparison: no interval
    a = commit_audit(by_seed, "fedhq", ("all-ptq", "all-qat"))
    assert [r["evidence"] for r in a["per_seed"].values()] == [True, False, False]
    assert [r["right"] for r in a["per_seed"].values()] == [True, False, True]
    assert (a["right"], a["with_evidence"], a["right_with_evidence"], a["n"]) == (2, 1, 1, 3)
    assert a["per_seed"]["1"]["commit"] == "ptq" and a["per_seed"]["1"]["gain_pts"] == pytest.approx(-2.0)
    line = commit_line("s", a)
    assert "seed 1: PTQ on -2.0 +- 1.0 (no evidence) (wrong: all-qat better on validation)" in line
    assert line.endswith("right in 2/3, with evidence in 1/3")
    assert commit_audit({0: {"all-ptq": {}, "all-qat": {}}}, "fedhq", ("all-ptq", "all-qat")) is None
