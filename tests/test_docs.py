"""The docs against their JSONs: every headline table row, rendered from the committed JSON behind
it (``flows.doc_tables``), stands verbatim in its document, and every JSON a document links to is
there. A number typed by hand, or a JSON rerun without its table, fails here."""
from __future__ import annotations

import re

import pytest

from flows.doc_tables import ROOT, tables


@pytest.mark.parametrize("doc", sorted(tables()))
def test_headline_tables_match_their_jsons(doc):
    text = (ROOT / doc).read_text()
    missing = [line for line in tables()[doc] if line not in text]
    assert not missing, f"{doc}: rows not as their JSON renders them (python -m flows.doc_tables):\n" + "\n".join(missing)


def test_every_linked_result_json_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    linked = {(d.name, m) for d in docs for m in re.findall(r"results/([\w.\-]+\.json)", d.read_text())}
    absent = sorted(f"{d} -> {m}" for d, m in linked if not (ROOT / "docs" / "results" / m).is_file())
    assert linked and not absent, absent


def test_the_check_fails_on_a_figure_typed_by_hand(tmp_path, monkeypatch):
    """The check itself can fail: one digit changed in a rendered row is caught."""
    import flows.doc_tables as D

    row = D.export_row(*D.EXPORTS[0][:1], D.load(D.EXPORTS[0][1]))
    doctored = re.sub(r"\((\d+\.\d\d)%\)", lambda m: f"({float(m.group(1)) + 0.01:.2f}%)", row, count=1)
    assert doctored != row and doctored not in D.tables()["docs/deploy.md"]
