"""FedHQ from a notebook or script: no Prefect, no MLflow.

    python -m examples.library_run            # from the repository root

Runs FedHQ on the embedded digits with the network of ``examples/tiny_resnet.py``, prints the
summary's figures, writes the deployed quantized model as ONNX and checks it in onnxruntime.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(out_dir: str | None = None, rounds: int = 4) -> dict:
    from fedhq_core import run_experiment

    config = {"strategy": "fedhq", "model": "examples.tiny_resnet:build", "rounds": rounds, "clients": 10,
              "fraction": 0.5, "w_bits": 4, "a_bits": 8, "first_last_bits": 8, "seed": 0}
    summary, sim = run_experiment(config, return_simulation=True,
                                  on_round=lambda r: print(f"round {r.round}: acc_q {r.acc_q:.3f}, "
                                                           f"{r.n_qat} QAT / {r.n_ptq} PTQ, {r.sim_round_s:.2f} sim s"))
    print(f"final quantized accuracy {summary['final_acc_q']:.4f} (FP32 master {summary['final_acc_fp32']:.4f}), "
          f"{summary['total_sim_s']:.2f} simulated s")

    from tasks.onnx_export import export_bundle, verify   # needs onnx + onnxruntime, not Prefect or MLflow

    out = Path(out_dir or tempfile.mkdtemp()) / "tiny_resnet.onnx"
    report = export_bundle(sim.deployed_bundle(), out)
    test = sim.server.test
    check = verify(out, test.x.numpy(), test.y.numpy(), summary["final_acc_q"], None)
    print(f"{out}: {report.onnx_bytes} bytes ({report.size_ratio:.2f}x the FP32 file); onnxruntime top-1 "
          f"{check['onnxruntime_acc']:.4f} against the run's {summary['final_acc_q']:.4f}")
    return {"summary": summary, "export": report.to_dict(), "check": check}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
