"""The bpw report of an artifact, as text lines and a table (used by the CLI)."""

from __future__ import annotations

from collections import Counter

__all__ = ["summary_lines", "tensor_table"]


def summary_lines(manifest: dict) -> list[str]:
    b = manifest["bpw"]
    t = manifest["target"]
    lines = [f"target: {t['name']} {t['tvm']}"]
    if b["float_weights"]:
        lines.append(f"weights: float ({b['quantized_weights']} weights in quantizable layers, not quantized)")
    else:
        lines.append(
            f"bpw: {b['achieved']:.4f} achieved / {b['target']} target over {b['quantized_weights']:,} weights "
            f"in {len(manifest['tensors'])} tensors ({b['storage_bits']:,} bits, scales and zeros counted)"
        )
        counts = Counter(x["format"] for x in manifest["tensors"])
        lines.append("formats: " + ", ".join(f"{f} x{n}" for f, n in sorted(counts.items())))
        head = b.get("head", {})
        if head.get("tensors"):
            lines.append(f"head (outside the average): {', '.join(head['tensors'])} at "
                         f"{head['storage_bits'] / head['weights']:.3f} bpw")
    lines.append(f"whole params file: {b['file_bits_per_param']:.3f} bits per parameter")
    lines.append("inputs: " + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in manifest["inputs"]))
    lines.append("outputs: " + ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in manifest["outputs"]))
    return lines


def tensor_table(manifest: dict):
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="quantized tensors")
    for col in ("#", "tensor", "op", "shape [N, K]", "format", "bits/weight", "error"):
        table.add_column(col)
    for i, x in enumerate(manifest["tensors"]):
        n = x["shape"][0] * x["shape"][1]
        name = x["name"] + (" (head)" if x.get("head") else "")
        table.add_row(str(i), name, x["op"], str(x["shape"]), x["format"],
                      f"{x['storage_bits']['total'] / n:.3f}", f"{x['rel_error']:.2e}")
    table.caption = f"error: {manifest.get('error_measure', 'relative weight error')}"
    return table
