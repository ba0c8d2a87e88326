"""Catalog of real device classes for the simulated fleet.

Each entry carries published peak FP32 throughput, peak memory bandwidth and a typical uplink
bandwidth, with the source of each figure. Peak FLOP/s are vendor spec-sheet figures or, where
a vendor gives none for FP32, derived from the published core count x clock x FLOP/cycle (the
derivation is written beside it). Uplinks are the access network the device class usually
sits on; they are medians, not maxima.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceClass:
    name: str
    kind: str                 # edge-board | phone | laptop | datacenter-gpu
    peak_flops: float         # FP32 FLOP/s
    mem_bw: float             # bytes/s
    uplink_bps: float         # bits/s
    source: str


_WIFI = 50e6      # Ookla Speedtest Global Index 2024: fixed-broadband median upload ~50 Mbit/s
_MOBILE = 11e6    # Ookla Speedtest Global Index 2024: mobile median upload ~11 Mbit/s
_DC = 10e9        # 10 GbE, typical datacenter node uplink

DEVICES: dict[str, DeviceClass] = {d.name: d for d in [
    DeviceClass("raspberry-pi-4", "edge-board", 48e9, 12.8e9, _WIFI,
                "Raspberry Pi 4B product brief: 4x Cortex-A72 @1.5 GHz x 8 FP32 FLOP/cycle (NEON FMA) = 48 GFLOP/s; "
                "LPDDR4-3200 x32 = 12.8 GB/s; uplink: Ookla fixed median"),
    DeviceClass("raspberry-pi-5", "edge-board", 153.6e9, 17.1e9, _WIFI,
                "Raspberry Pi 5 product brief: 4x Cortex-A76 @2.4 GHz x 16 FP32 FLOP/cycle = 153.6 GFLOP/s; "
                "LPDDR4X-4267 x32 = 17.1 GB/s; uplink: Ookla fixed median"),
    DeviceClass("jetson-nano", "edge-board", 236e9, 25.6e9, _WIFI,
                "NVIDIA Jetson Nano datasheet: 472 GFLOPS FP16 = 236 GFLOP/s FP32 (128 CUDA cores @921 MHz); "
                "25.6 GB/s LPDDR4; uplink: Ookla fixed median"),
    DeviceClass("jetson-xavier-nx", "edge-board", 845e9, 59.7e9, _WIFI,
                "NVIDIA Jetson Xavier NX datasheet: 384 CUDA cores @1100 MHz x 2 = 845 GFLOP/s FP32; "
                "59.7 GB/s LPDDR4x; uplink: Ookla fixed median"),
    DeviceClass("jetson-agx-orin", "edge-board", 5.3e12, 204.8e9, _WIFI,
                "NVIDIA Jetson AGX Orin 64GB datasheet: 2048 CUDA cores @1.3 GHz = 5.3 TFLOP/s FP32; "
                "204.8 GB/s LPDDR5; uplink: Ookla fixed median"),
    DeviceClass("snapdragon-8-gen-2", "phone", 2.0e12, 67.0e9, _MOBILE,
                "Qualcomm Snapdragon 8 Gen 2 (Adreno 740): ~2.0 TFLOP/s FP32 (public GPU benchmarks/spec summaries); "
                "LPDDR5X-4200 x64 = 67 GB/s; uplink: Ookla mobile median"),
    DeviceClass("apple-m2-laptop", "laptop", 3.6e12, 100e9, _WIFI,
                "Apple M2 press release (June 2022): 10-core GPU 3.6 TFLOP/s; 100 GB/s unified memory; "
                "uplink: Ookla fixed median"),
    DeviceClass("nvidia-t4", "datacenter-gpu", 8.1e12, 320e9, _DC,
                "NVIDIA T4 datasheet: 8.1 TFLOP/s FP32; 320 GB/s GDDR6; uplink: 10 GbE"),
    DeviceClass("nvidia-a6000", "datacenter-gpu", 38.7e12, 768e9, _DC,
                "NVIDIA RTX A6000 datasheet: 38.7 TFLOP/s FP32; 768 GB/s GDDR6; uplink: 10 GbE (the paper's GPU)"),
    DeviceClass("nvidia-a100", "datacenter-gpu", 19.5e12, 1555e9, _DC,
                "NVIDIA A100 40GB datasheet: 19.5 TFLOP/s FP32; 1555 GB/s HBM2; uplink: 10 GbE"),
]}
