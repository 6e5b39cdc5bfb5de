"""Dense tensor-core peaks (TFLOP/s) of the GPUs we may be lent, chosen from the device name.

From NVIDIA's data sheets, without sparsity (the sheets' headline figures are 2x these).
float32 convolutions run on TF32 tensor cores when cuDNN may use TF32 (torch's default), so
an fp32 row's MFU is taken against the TF32 peak. An unknown device has no peak: MFU blank.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    model: str  # the table entry that matched the device name
    bf16: float  # TFLOP/s, dense
    tf32: float

    def tflops(self, bf16: bool) -> float:
        return self.bf16 if bf16 else self.tf32


# First match wins, so a more specific name comes first ("H100 PCIe" also holds "H100",
# "L40S" holds "L4"). Every word of an entry must appear in the upper-cased device name.
PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("H200",), Peak("H200 (and GH200)", 989.5, 494.7)),
    (("H100", "PCIE"), Peak("H100 PCIe", 756.0, 378.0)),
    (("H100", "NVL"), Peak("H100 NVL", 835.5, 417.5)),
    (("H100",), Peak("H100 SXM", 989.5, 494.7)),
    (("A100",), Peak("A100", 312.0, 156.0)),
    (("L40S",), Peak("L40S", 362.0, 183.0)),
    (("L40",), Peak("L40", 181.0, 90.5)),
    (("L4",), Peak("L4", 121.0, 60.0)),
)


def peak_for(device_name: str | None) -> Peak | None:
    """The peak of a device name as torch reports it, e.g. "NVIDIA H100 80GB HBM3".

    >>> peak_for("NVIDIA H100 PCIe").bf16, peak_for("NVIDIA H200").bf16
    (756.0, 989.5)
    >>> peak_for("NVIDIA L40S").model, peak_for("cpu") is None
    ('L40S', True)
    """
    name = (device_name or "").upper()
    for words, peak in PEAKS:
        if all(word in name for word in words):
            return peak
    return None
