"""``fedhq export SOURCE --format onnx --out FILE``: a registered run's deployed model as ONNX.

SOURCE is an MLflow run id, a version of the registered global model (``3``, ``models:/NAME/3``,
``models:/NAME@champion``) or ``runs:/RUN/model``. The pyfunc's artifacts are read back, exported
(``tasks.onnx_export``), checked with ``onnx.checker``, run in onnxruntime on the run's own test
split (its config from the run's ``summary.json``) against the run's ``final_acc_q`` and the
pyfunc's predictions, and registered with MLflow's onnx flavour as a version of
``<registered_model>-onnx`` in the source run, beside the pyfunc version.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from fedhq_core.errors import ConfigError

FORMATS = ("onnx",)
WEIGHTS = ("auto", "int8")


def resolve_source(source: str, registered_model: str, client: Any) -> tuple[str, str, str | None]:
    """(model URI, run id, model version or None) of SOURCE, or ConfigError naming ``source``."""
    from mlflow.exceptions import MlflowException

    try:
        if source.isdigit():
            source = f"models:/{registered_model}/{source}"
        if source.startswith("models:/"):
            ref = source[len("models:/"):]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = ref.rpartition("/")
                mv = client.get_model_version(name, version)
            return f"models:/{mv.name}/{mv.version}", mv.run_id, str(mv.version)
        if source.startswith("runs:/"):
            run_id = source[len("runs:/"):].split("/", 1)[0]
            client.get_run(run_id)
            return source, run_id, None
        if re.fullmatch(r"[0-9a-f]{32}", source):
            client.get_run(source)
            return f"runs:/{source}/model", source, None
    except MlflowException as err:
        raise ConfigError(f"source: {source}: not found in the tracking store "
                          f"({str(err).splitlines()[0][:160]})") from None
    raise ConfigError(f"source: {source!r} is not a run id, a model version, models:/NAME/VERSION, "
                      f"models:/NAME@ALIAS or runs:/RUN/model")


def _download(uri: str, tracking_uri: str, dst: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        raise ConfigError(f"source: {uri}: cannot read its artifacts ({str(err).splitlines()[0][:160]})") from None


def _test_split(config: dict[str, Any]):
    """The run's test split, from its data fields only (a run's other settings, e.g. a family
    file since moved, do not matter here); a missing data folder is a one-line DataError."""
    from fedhq_core.config import ExperimentConfig
    from fedhq_core.simulation import data_key

    fields = set(ExperimentConfig.__dataclass_fields__)
    return data_key(ExperimentConfig(**{k: v for k, v in config.items() if k in fields})).load().test


def cmd_export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ConfigError(f"format: {args.format!r} is not supported (choose from {', '.join(FORMATS)})")
    if args.weights not in WEIGHTS:
        raise ConfigError(f"weights: {args.weights!r} is not a weight storage (choose from {', '.join(WEIGHTS)})")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"threads: must be at least 1, got {args.threads}")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"out: {out} is a directory; name the .onnx file")
    from flows.commands import _registry_client

    settings, client = _registry_client(args)
    model_uri, run_id, version = resolve_source(args.source, settings.registered_model, client)
    import mlflow
    import numpy as np

    from tasks.onnx_export import export_bundle, verify
    from tasks.tracking import without_type_hint_notice

    with without_type_hint_notice():
        from tasks.pyfunc_model import read_bundle

    mlflow.set_tracking_uri(settings.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(model_uri, settings.tracking_uri, os.path.join(tmp, "model"))
        bundle = read_bundle(str(local / "artifacts" / "weights.safetensors"), str(local / "artifacts" / "meta.json"))
        summary = json.loads(_download(f"runs:/{run_id}/summary.json", settings.tracking_uri, tmp).read_text())
    report = export_bundle(bundle, out, run_id, weights=args.weights, measure_latency=args.latency,
                           threads=args.threads)
    print(f"exported {model_uri} (run {run_id}) -> {out}: {report.onnx_bytes / 1e3:.1f} kB against "
          f"{report.fp32_onnx_bytes / 1e3:.1f} kB in FP32 ({report.size_ratio:.3f}x, weights in "
          f"{report.weight_storage}, opset {report.opset}); {report.quantized_layers} layers with integer weights, "
          f"{report.quantized_inputs} quantized inputs, {report.bn_folded} BatchNorms folded; onnx.checker passed")
    if report.storage_note:
        print(report.storage_note)
    print(f"onnxruntime's optimized graph: {report.integer_ops} integer kernels for {report.quantized_layers} "
          f"quantized layers, {report.float_compute_ops} float convolutions/products ("
          + ", ".join(f"{k} {v}" for k, v in report.op_histogram.items()) + ")")
    lat = report.latency
    if lat:
        ms, ips = lat["latency_ms"], lat["throughput_ips"]
        print(f"onnxruntime {lat['onnxruntime']}, {lat['threads']} threads: batch 1 {ms['int']['b1']:.3f} ms against "
              f"{ms['fp32']['b1']:.3f} ms in FP32 ({lat['speedup_b1']:.2f}x); batch 64 {ips['int']['b64']:,.0f} "
              f"images/s against {ips['fp32']['b64']:,.0f} ({lat['speedup_b64']:.2f}x)")
        if lat.get("speed_note"):
            print(lat["speed_note"])
    result: dict[str, Any] = {"source": model_uri, "run_id": run_id, "model_version": version, **report.to_dict()}
    if args.check:
        test = _test_split(summary["config"])
        x = test.x.numpy()
        with without_type_hint_notice():
            pyfunc_pred = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(x))
        check = verify(out, x, test.y.numpy(), summary.get("final_acc_q"), pyfunc_pred)
        result["check"] = check
        verdict = "met" if check["ok"] else "MISSED"
        print(f"onnxruntime on the run's test split ({check['n']} images): top-1 {check['onnxruntime_acc'] * 100:.2f}% "
              f"against the run's final_acc_q {check['run_final_acc_q'] * 100:.2f}% "
              f"({check['acc_diff_points']:+.2f} points; target within {check['acc_rule']}); agreement with the pyfunc "
              f"{check['agreement'] * 100:.2f}% (target >= 99.5%): {verdict}; with onnxruntime's graph "
              f"optimizations off: {check['onnxruntime_acc_unoptimized'] * 100:.2f}%, agreement "
              f"{check['agreement_unoptimized'] * 100:.2f}%")
    if args.register:
        result["onnx_model"], result["onnx_version"] = register_onnx(client, settings, run_id, out, version, result)
        print(f"registered {result['onnx_model']} version {result['onnx_version']} (onnx flavour) in run {run_id}")
    if args.json:
        from fedhq_core.records import write_json

        write_json(args.json, result)
    return 0 if result.get("check", {}).get("ok", True) else 1


def register_onnx(client: Any, settings: Any, run_id: str, path: Path, pyfunc_version: str | None,
                  result: dict[str, Any]) -> tuple[str, str]:
    """The file saved with ``mlflow.onnx`` into the source run (``onnx-model``) and registered as a
    version of ``<registered_model>-onnx``, tagged with its sizes, its check and its pyfunc twin."""
    import mlflow.onnx
    import onnx
    import onnxruntime

    from tasks.tracking import Tracker

    name = f"{settings.registered_model}-onnx"
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "onnx-model")
        mlflow.onnx.save_model(onnx.load(str(path)), saved, save_as_external_data=False,
                               pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"])
        client.log_artifacts(run_id, saved, "onnx-model")
    check = result.get("check") or {}
    tags = {"pyfunc_version": pyfunc_version or "", "onnx_bytes": result["onnx_bytes"],
            "fp32_onnx_bytes": result["fp32_onnx_bytes"], "size_ratio": round(result["size_ratio"], 4),
            "weight_storage": result["weight_storage"], "integer_ops": result["integer_ops"],
            "quantized_layers": result["quantized_layers"],
            **{k: result["metadata"][k] for k in ("w_bits", "a_bits", "dataset", "model")}}
    if check:
        tags.update(onnxruntime_acc=round(check["onnxruntime_acc"], 5), agreement=round(check["agreement"], 5),
                    acc_rule=check["acc_rule"],
                    check="met" if check["ok"] else "missed")
    tracker = Tracker(settings)
    return name, tracker.register(name, f"runs:/{run_id}/onnx-model", tags, run_id=run_id)
