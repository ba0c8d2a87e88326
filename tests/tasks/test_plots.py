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
