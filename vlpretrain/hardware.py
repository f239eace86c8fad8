"""Dense bf16 peak TFLOP/s per device (vendor datasheets): the MFU denominator and the pipeline cost model's
time scale. Below both train/ (metrics) and parallel/ (pipeline_cost), so neither imports the other for it."""
from __future__ import annotations

import torch

from vlpretrain.config import Config

PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0,
         "A10": 125.0, "V100": 125.0}
UNKNOWN_GPU_PEAK = 312.0  # a GPU the table does not name
CPU_DEFAULT_PEAK = 1.0  # TFLOP/s: a placeholder; set logging.peak_tflops to your CPU's fp32 peak


def device_peak_tflops(cfg: Config, device: torch.device) -> float:
    """``logging.peak_tflops`` if set, else the GPU's datasheet peak, else ``CPU_DEFAULT_PEAK``."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS.items():
            if key in name:
                return peak
        return UNKNOWN_GPU_PEAK
    return CPU_DEFAULT_PEAK
