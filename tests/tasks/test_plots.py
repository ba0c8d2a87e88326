"""The allocation scatter shows the clients the sign of their predicted gain excluded."""
from __future__ import annotations


def test_scatter_marks_sign_excluded_clients(tmp_path, monkeypatch):
    import tasks.plots as P

    seen = {}

    def capture(fig, path):
        seen["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        P.plt.close(fig)
        return path

    monkeypatch.setattr(P, "save_figure", capture)
    data = {"cids": [0, 1, 2, 3], "s_hat": [0.0, 0.3, 0.7, 1.0], "a_hat": [0.0, 0.0, 1.0, 0.4],
            "gain": [-0.1, 0.0, 0.2, 0.05], "qat": [False, False, True, True], "free": [False, False, False, True],
            "coarse": [False, False, True, True], "xi": 0.2, "round": 0}
    P.allocation_scatter(data, str(tmp_path / "s.png"))
    assert "PTQ: predicted gain ≤ 0 (2)" in seen["labels"]
    assert not any(label.startswith("PTQ (below") for label in seen["labels"])   # nobody else got PTQ


def test_scatter_of_a_large_round_draws_a_labelled_sample(tmp_path, monkeypatch):
    import numpy as np

    import tasks.plots as P

    seen = {}

    def capture(fig, path):
        ax = fig.axes[0]
        from matplotlib.collections import PathCollection

        seen["points"] = sum(len(c.get_offsets()) for c in ax.collections
                             if isinstance(c, PathCollection) and c.get_label() != "flipped by fine search")
        seen["title"] = ax.get_title()
        seen["texts"] = len(ax.texts)
        P.plt.close(fig)
        return path

    monkeypatch.setattr(P, "save_figure", capture)
    n = 1000
    rng = np.random.default_rng(0)
    gain = rng.normal(size=n)
    qat = list((rng.random(n) < 0.6) & (gain > 0))                 # the sign sends gain <= 0 to PTQ
    data = {"cids": list(range(n)), "s_hat": list(rng.random(n)), "a_hat": list(rng.random(n)),
            "gain": list(gain), "qat": qat, "free": [False] * n, "coarse": qat, "xi": 0.5, "round": 3}
    P.allocation_scatter(data, str(tmp_path / "s.png"))
    assert seen["points"] == P.SCATTER_MAX_POINTS and seen["texts"] == 0
    assert f"a random {P.SCATTER_MAX_POINTS} of the round's 1000 clients shown" in seen["title"]
    sub, total = P.scatter_sample(data)
    assert total == n and len(sub["cids"]) == P.SCATTER_MAX_POINTS and sub["xi"] == 0.5
    assert sub["cids"] == P.scatter_sample(data)[0]["cids"]              # seeded: the same sample again
