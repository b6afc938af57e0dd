"""Accelerator facts used for efficiency figures: the one table of dense bf16 peaks.

Both the training loop's MFU (:mod:`megareweight.train.throughput`) and the loss-kernel benchmark
(:mod:`megareweight.kernels.weighted_ce.bench`) divide by these numbers, so they live here, in a
module that imports nothing heavy.
"""
from __future__ import annotations

from typing import Optional

#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from NVIDIA's datasheets (which quote
#: twice these numbers "with sparsity"). Matched against ``torch.cuda.get_device_name`` in order:
#: every substring of an entry must occur in the name (case-insensitive); the first match wins.
#: NVL and PCIe boards run at lower clocks and power than SXM ones, hence their own rows.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("GH200",), 989.0),
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),  # H200 SXM
    (("H100", "NVL"), 835.0),
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (("A100",), 312.0),  # SXM and PCIe
)


def lookup_peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a CUDA device by name, or None when it is not in the table."""
    name = device_name.upper()
    for needles, peak in PEAK_BF16_TFLOPS:
        if all(n in name for n in needles):
            return peak
    return None
