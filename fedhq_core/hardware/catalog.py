"""Catalog of real device classes for the simulated fleet.

Each entry carries published peak FP32 throughput, peak memory bandwidth and a typical uplink
bandwidth, with the source of each figure. Peak FLOP/s are vendor spec-sheet figures or, where
a vendor gives none for FP32, derived from the published core count x clock x FLOP/cycle (the
derivation is written beside it). Uplinks are the access network the device class usually
sits on; they are medians, not maxima.

For the per-op roofline (``speed_model``) every entry also has

* ``executor``: ``cpu`` (ops run one after another on the cores that issue them) or ``gpu``
  (the CPU issues ops asynchronously; see ``speed_model.price_trace``);
* ``eta_c``, ``eta_m``: the share of peak FLOP/s and of peak bandwidth that eager PyTorch
  kernels reach on that class (derivations in :data:`ETA`);
* ``lam_py``, ``lam_eng``: per-op issue latency of an op issued from Python (forward code,
  custom autograd Functions, the optimizer) and of one issued by the C++ autograd engine,
  derived from a reference core scaled by single-thread speed (:func:`issue_latency`).

These constants, not this run's host timings, price every client: the same config and seed
give the same simulated times on any machine. ``fedhq devices --validate`` checks the model's
form against this host; GPU entries are checked only on a lent GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

# --- per-op issue latency ----------------------------------------------------------------
# Reference: one ~3.5 GHz x86 server core (Geekbench 5 single-core ~1,300) running eager PyTorch.
# PyTorch issue #41383: ~7 us per Python-issued op with autograd recording, ~5 us without; a
# maintainer measured ~2 us for ``x*x`` of which half is Python argument parsing, ~1 us through
# the C++ API. CPU executor: Python-issued 5 us, engine-issued (C++ only) 1.5 us. A GPU executor
# adds the CUDA launch on the CPU side: eager PyTorch on a datacenter GPU pays 4-7 us per op
# (issues #41383 and #82793; meta-pytorch/autoparallel's H100 cost model charges >= 7 us), so
# 7 us from Python and 4 us from the engine. Other CPUs scale these by single-thread speed.
ST_REF = 1300.0
LAMBDA_REF = {"cpu": (5e-6, 1.5e-6), "gpu": (7e-6, 4e-6)}   # (python-issued, engine-issued) seconds

# --- kernel efficiencies by class (share of peak) -----------------------------------------
# cpu-arm: HPL on a Raspberry Pi 4 reaches ~8 GFLOP/s of 24 FP64 peak (0.33; feiereisen.net,
#   "Benchmarking the Raspberry Pi 4 with Raspberry Pi OS64", 2022); STREAM copy 5.5 GB/s of
#   12.8 GB/s (0.43; sci-pi.org.uk/bench/stream.html). The Pi 5 is given the same class values.
# igpu (Jetson, phone and laptop GPUs on shared LPDDR): STREAM on LPDDR4 reaches 67-71% of the
#   wire rate (TI SPRACV1B) -> eta_m 0.7; eta_c 0.4 is an assumption (FP32 conv kernels at
#   batch <= 64 on small GPUs), not checked here.
# dgpu (datacenter GPUs, HBM/GDDR): BabelStream-class copy kernels reach ~85% of peak
#   bandwidth -> eta_m 0.85; eta_c 0.5 is an assumption for cuDNN FP32 (no TF32) CIFAR-sized
#   convs, checked only when a GPU is lent (README, "GPU").
ETA = {"cpu-arm": (0.33, 0.43), "igpu": (0.4, 0.7), "dgpu": (0.5, 0.85)}


def issue_latency(executor: str, single_thread: float) -> tuple[float, float]:
    """(python-issued, engine-issued) per-op latency of a core with Geekbench 5 single-core score
    ``single_thread``: the reference latencies scaled by ``ST_REF / single_thread``."""
    py, eng = LAMBDA_REF[executor]
    return py * ST_REF / single_thread, eng * ST_REF / single_thread


@dataclass(frozen=True)
class DeviceClass:
    name: str
    kind: str                 # edge-board | phone | laptop | datacenter-gpu | host
    peak_flops: float         # FP32 FLOP/s
    mem_bw: float             # bytes/s
    uplink_bps: float         # bits/s
    source: str
    executor: str = "gpu"     # cpu | gpu
    eta_c: float = 0.5
    eta_m: float = 0.85
    lam_py: float = 7e-6      # s per Python-issued op
    lam_eng: float = 4e-6     # s per autograd-engine-issued op
    coef_source: str = ""     # where eta and lambda come from


def _device(name: str, kind: str, peak: float, bw: float, up: float, source: str, klass: str,
            single_thread: float, st_source: str) -> DeviceClass:
    executor = "cpu" if klass == "cpu-arm" else "gpu"
    eta_c, eta_m = ETA[klass]
    py, eng = issue_latency(executor, single_thread)
    return DeviceClass(name, kind, peak, bw, up, source, executor, eta_c, eta_m, py, eng,
                       f"eta: class {klass} (catalog.ETA); lambda: reference x {ST_REF:.0f}/{single_thread:.0f} "
                       f"single-thread ({st_source})")


_WIFI = 50e6      # Ookla Speedtest Global Index 2024: fixed-broadband median upload ~50 Mbit/s
_MOBILE = 11e6    # Ookla Speedtest Global Index 2024: mobile median upload ~11 Mbit/s
_DC = 10e9        # 10 GbE, typical datacenter node uplink


def _datacenter_gpu(name: str, peak: float, bw: float, source: str) -> DeviceClass:
    """A datacenter GPU node: 10 GbE uplink, discrete-GPU efficiencies, a reference host core."""
    return _device(name, "datacenter-gpu", peak, bw, _DC, source, "dgpu", ST_REF,
                   "datacenter x86 host core = the reference")


DEVICES: dict[str, DeviceClass] = {d.name: d for d in [
    _device("raspberry-pi-4", "edge-board", 48e9, 12.8e9, _WIFI,
                "Raspberry Pi 4B product brief: 4x Cortex-A72 @1.5 GHz x 8 FP32 FLOP/cycle (NEON FMA) = 48 GFLOP/s; "
                "LPDDR4-3200 x32 = 12.8 GB/s; uplink: Ookla fixed median",
                "cpu-arm", 250, "Cortex-A72 @1.5 GHz, Geekbench 5 ~250, approximate"),
    _device("raspberry-pi-5", "edge-board", 153.6e9, 17.1e9, _WIFI,
                "Raspberry Pi 5 product brief: 4x Cortex-A76 @2.4 GHz x 16 FP32 FLOP/cycle = 153.6 GFLOP/s; "
                "LPDDR4X-4267 x32 = 17.1 GB/s; uplink: Ookla fixed median",
                "cpu-arm", 800, "Cortex-A76 @2.4 GHz, Geekbench 5 ~800, approximate"),
    _device("jetson-nano", "edge-board", 236e9, 25.6e9, _WIFI,
                "NVIDIA Jetson Nano datasheet: 472 GFLOPS FP16 = 236 GFLOP/s FP32 (128 CUDA cores @921 MHz); "
                "25.6 GB/s LPDDR4; uplink: Ookla fixed median",
                "igpu", 230, "Cortex-A57 @1.43 GHz, Geekbench 5 ~230, approximate"),
    _device("jetson-xavier-nx", "edge-board", 845e9, 59.7e9, _WIFI,
                "NVIDIA Jetson Xavier NX datasheet: 384 CUDA cores @1100 MHz x 2 = 845 GFLOP/s FP32; "
                "59.7 GB/s LPDDR4x; uplink: Ookla fixed median",
                "igpu", 450, "Carmel @1.9 GHz, Geekbench 5 ~450, approximate"),
    _device("jetson-agx-orin", "edge-board", 5.3e12, 204.8e9, _WIFI,
                "NVIDIA Jetson AGX Orin 64GB datasheet: 2048 CUDA cores @1.3 GHz = 5.3 TFLOP/s FP32; "
                "204.8 GB/s LPDDR5; uplink: Ookla fixed median",
                "igpu", 750, "Cortex-A78AE @2.2 GHz, Geekbench 5 ~750, approximate"),
    _device("snapdragon-8-gen-2", "phone", 2.0e12, 67.0e9, _MOBILE,
                "Qualcomm Snapdragon 8 Gen 2 (Adreno 740): ~2.0 TFLOP/s FP32 (public GPU benchmarks/spec summaries); "
                "LPDDR5X-4200 x64 = 67 GB/s; uplink: Ookla mobile median",
                "igpu", 1500, "Cortex-X3 @3.2 GHz, Geekbench 5 ~1,500, approximate"),
    _device("apple-m2-laptop", "laptop", 3.6e12, 100e9, _WIFI,
                "Apple M2 press release (June 2022): 10-core GPU 3.6 TFLOP/s; 100 GB/s unified memory; "
                "uplink: Ookla fixed median",
                "igpu", 1900, "Apple M2 P-core, Geekbench 5 ~1,900, approximate"),
    _datacenter_gpu("nvidia-t4", 8.1e12, 320e9, "NVIDIA T4 datasheet: 8.1 TFLOP/s FP32; 320 GB/s GDDR6; uplink: 10 GbE"),
    _datacenter_gpu("nvidia-a6000", 38.7e12, 768e9,
                    "NVIDIA RTX A6000 datasheet: 38.7 TFLOP/s FP32; 768 GB/s GDDR6; uplink: 10 GbE (the paper's GPU)"),
    _datacenter_gpu("nvidia-a100", 19.5e12, 1555e9,
                    "NVIDIA A100 40GB datasheet: 19.5 TFLOP/s FP32; 1555 GB/s HBM2; uplink: 10 GbE"),
    _datacenter_gpu("nvidia-h100", 67e12, 3.35e12,
                    "NVIDIA H100 SXM5 datasheet: 67 TFLOP/s FP32; 3.35 TB/s HBM3; uplink: 10 GbE"),
    _datacenter_gpu("nvidia-h200", 67e12, 4.8e12,
                    "NVIDIA H200 SXM datasheet: 67 TFLOP/s FP32; 4.8 TB/s HBM3e; uplink: 10 GbE"),
]}
