"""Browsing and promoting registered models (aliases, never the deprecated stages)."""
from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

COLUMNS = ("strategy", "xi", "w_bits", "a_bits", "dataset", "final_acc_q_val", "final_acc_q", "final_acc_fp32",
           "total_sim_s")
SELECT_ON = "final_acc_q_val"   # promotion reads the validation split; the test split is only reported


def list_versions(client: MlflowClient, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        try:
            versions = client.search_model_versions(f"name='{name}'")
            registered = client.get_registered_model(name) if versions else None
        except MlflowException:
            continue
        if registered is None:
            continue
        # search results carry no aliases; the registered model has them. `latest` is MLflow's own
        # reserved alias for the newest version (models:/name@latest resolves without being set).
        by_version: dict[str, list[str]] = {}
        for alias, v in (registered.aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        newest = max((int(v.version) for v in versions), default=0)
        for mv in sorted(versions, key=lambda v: int(v.version)):
            aliases = sorted(by_version.get(str(mv.version), [])) + (["latest"] if int(mv.version) == newest else [])
            rows.append({"model": name, "version": int(mv.version), "aliases": ",".join(aliases),
                         "run_id": (mv.run_id or "")[:12], **{k: mv.tags.get(k, "") for k in COLUMNS}})
    return rows


def promote(client: MlflowClient, name: str, version: int | None = None) -> tuple[bool, str]:
    """Move alias ``champion`` to ``version`` (default: newest) if it beats the current champion's
    quantized accuracy on the validation split (``final_acc_q_val``), on the same dataset and
    bits. The test accuracy is never read. Returns (moved, the comparison as text)."""
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        return False, f"{name}: no registered versions"
    cand = max(versions, key=lambda v: int(v.version)) if version is None else \
        next((v for v in versions if int(v.version) == version), None)
    if cand is None:
        return False, f"{name}: no version {version}"
    acc = _val_acc(cand)
    if acc is None:
        return False, (f"version {cand.version} has no validation accuracy ({SELECT_ON}; it was trained with "
                       "val_fraction 0): not comparable; champion unchanged")
    setting = tuple(cand.tags.get(k) for k in ("dataset", "w_bits", "a_bits"))
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    if champ is None:
        client.set_registered_model_alias(name, "champion", cand.version)
        return True, f"version {cand.version} (validation acc_q {acc:.4f}) is the first champion"
    c_acc = _val_acc(champ)
    c_setting = tuple(champ.tags.get(k) for k in ("dataset", "w_bits", "a_bits"))
    head = (f"candidate version {cand.version}: validation acc_q {acc:.4f} on {setting}; champion version "
            f"{champ.version}: " + ("no validation accuracy" if c_acc is None else f"validation acc_q {c_acc:.4f}")
            + f" on {c_setting}")
    if setting != c_setting:
        return False, head + " -> not comparable (different dataset or bits); champion unchanged"
    if c_acc is None or acc > c_acc:
        client.set_registered_model_alias(name, "champion", cand.version)
        gain = "" if c_acc is None else f"+{(acc - c_acc) * 100:.2f} points: "
        return True, head + f" -> {gain}champion moved to version {cand.version}"
    return False, head + " -> does not beat the champion; unchanged"


def _val_acc(version: Any) -> float | None:
    raw = version.tags.get(SELECT_ON, "")
    try:
        return float(raw) if raw != "" else None
    except ValueError:
        return None
