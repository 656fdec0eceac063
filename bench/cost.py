"""What a jitted computation costs, as XLA counts it: FLOPs and the memory footprint. One home for the bench scripts.

FLOPs are counted on the *lowered* program (`jax.jit(f).lower(...)`): the dots and convolutions the model asks
for. The compiled program's count is not used: on a GPU, XLA hands convolutions and matmuls to cuDNN and cuBLAS
as custom calls that its cost analysis does not count (an H200 run counted 0.18 TFLOP for the ~4.8 TFLOP of a
512² f32c32 encode+decode, and 9 GFLOP for the same program in float32). A custom call in the lowered program
itself (cuDNN's fused attention) is not counted either: `bench.diffusion` counts the XLA-attention twin.
"""

from __future__ import annotations


def flops(lowered) -> float:
    """XLA's FLOP count of a `jax.stages.Lowered` (NaN if it has none)."""
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def footprint(compiled) -> int | None:
    """Device bytes a compiled program needs at its peak: arguments + outputs (less donated ones it reuses) +
    temporaries, from XLA's memory analysis (None where the backend gives none). Unlike the device's
    `peak_bytes_in_use`, it excludes what compilation itself allocated (GPU autotuning scratch) and other
    programs of the process."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
