"""The results file (``bench/results/quality.json``) and its plot.

Rows from separate invocations merge by method name (a re-run method replaces its old rows). Each row
carries its ``run_id`` and ``machine``; the top level lists the runs the rows came from and says whether
they all come from one run (the final table should: ``--methods all``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

from .context import Row

__all__ = ["family", "goal", "machine", "merge", "plot"]

KL_FLOOR = 1e-4  # plot floor of the KL axis
PPL_TOP = 3.0  # the perplexity axis ends at this multiple of the float model's


def machine() -> str:
    """CPU model, cores and OS, e.g. 'AMD EPYC 9B45, 2 cores, Linux 6.1'."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def merge(path: Path, header: dict, methods: dict[str, list[Row]], run_id: str,
          skipped: list[dict] = ()) -> dict:
    """Write the rows of ``methods`` (registry name -> rows) into ``path``; returns the document.

    Earlier rows of the same method names, or of the same registry entries (so a method that now yields
    fewer rows drops all its old ones), are replaced; other rows stay.
    """
    doc = json.loads(path.read_text()) if path.is_file() else {}
    new = {r.method for rows in methods.values() for r in rows}
    old = [r for r in doc.get("rows", []) if r["method"] not in new and r.get("registry") not in methods]
    if old and _scored_on(doc.get("eval")) != _scored_on(header.get("eval")):
        raise ValueError(
            f"{path} holds rows ({sorted({r['method'] for r in old})[:5]}...) scored on other tokens "
            f"({doc.get('eval')}) than this run ({header.get('eval')}): rows must share their tokens to be "
            "compared; re-run those methods too (--methods all), write to another --out or delete the file"
        )
    here = machine()
    fresh = []
    for name, method_rows in methods.items():
        for r in method_rows:
            fresh.append({**dataclasses.asdict(r), "registry": name, "run_id": run_id, "machine": here})
    all_rows = sorted(old + fresh, key=lambda r: (family(r["method"]), r["bpw"], r["method"]))
    runs = sorted({r["run_id"] for r in all_rows})
    doc = {
        **header,
        "machine": here,
        "runs": runs,
        "single_run": len(runs) == 1,
        "runs_note": ("all rows come from one run" if len(runs) == 1 else
                      f"rows come from {len(runs)} separate invocations (see each row's run_id); "
                      "re-run with --methods all for a single-run table"),
        "rows": all_rows,
        "goal": goal(all_rows),
        "skipped": [s for s in doc.get("skipped", []) if s.get("registry") not in methods]
        + [{**s, "run_id": run_id} for s in skipped],
    }
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.rename(path)
    return doc


GOAL_RATIO = 0.7


def goal(rows: list[dict]) -> list[dict]:
    """Issue 3's goal per qcompile row: KL <= 0.7 x that of the best llama.cpp type at equal or higher bpw.

    "At equal or higher bpw" is read as the llama.cpp types whose bpw is the lowest at or above ours
    (with and without imatrix; the best of them): comparing with every higher type would pit 3 bpw against
    Q8_0. Rows with no llama.cpp type at or above their bpw have no comparison.
    """
    peers = [r for r in rows if r["method"].startswith("llama.cpp") and r["bpw"] < 16]
    out = []
    for r in sorted((r for r in rows if r["method"] == "qcompile"), key=lambda r: r["bpw"]):
        above = [p for p in peers if p["bpw"] >= r["bpw"] - 1e-9]
        if not above:
            out.append({"bpw": r["bpw"], "kld": r["kld"], "peer": None})
            continue
        nearest = min(p["bpw"] for p in above)
        best = min((p for p in above if p["bpw"] == nearest), key=lambda p: p["kld"])
        ratio = r["kld"] / best["kld"]
        out.append({"bpw": r["bpw"], "kld": r["kld"], "peer": best["method"], "peer_bpw": best["bpw"],
                    "peer_kld": best["kld"], "ratio": round(ratio, 3), "met": ratio <= GOAL_RATIO})
    return out


def _scored_on(ev: dict | None) -> tuple:
    """What makes two runs' rows comparable: the same windows of the same token ids (the reference
    file's name also hashes the float model folder's timestamp, which says nothing about the tokens)."""
    ev = ev or {}
    return ev.get("windows"), ev.get("window_tokens"), ev.get("tokens_sha256")


def family(method: str) -> str:
    """Plot series of a method: its first word, plus " imatrix" for llama.cpp's imatrix rows, plus the
    block size for onnxruntime ("ort b32")."""
    words = method.split()
    if words[0] == "ort" and len(words) > 2:
        return f"ort {words[-1]}"
    return words[0] + (" imatrix" if words[-1] == "imatrix" else "")


def plot(doc: dict, out: Path) -> Path:
    """KL divergence (log) and perplexity against bpw, one series per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["method"] != "float" and r["bpw"] < 16]
    floats = [r for r in doc["rows"] if r["method"] == "float"]
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(family(r["method"]), []).append(r)
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(15, 6.5))
    markers = "osD^v<>pPX*h"
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["bpw"])
        # KL below KL_FLOOR (a lossless check such as rtn q4g32 on this Q4_1-grid model) is drawn on the
        # floor as a hollow marker, outside the series' line
        shown = [r for r in points if r["kld"] >= KL_FLOOR]
        style = {"marker": markers[i % len(markers)], "linestyle": "-" if len(shown) > 1 else "none"}
        line, = ax_kl.plot([r["bpw"] for r in shown], [r["kld"] for r in shown], label=name, **style)
        ax_ppl.plot([r["bpw"] for r in points], [r["ppl"] for r in points], label=name,
                    color=line.get_color(), **style)
        for r in points:
            label = r["method"].split(" ", 1)[-1].replace(" imatrix", "").replace("ort ", "")
            if r["kld"] < KL_FLOOR:
                ax_kl.plot([r["bpw"]], [KL_FLOOR], marker=style["marker"], color=line.get_color(),
                           fillstyle="none", linestyle="none")
                label += f" (kld {r['kld']:.0e})"
            ax_kl.annotate(label, (r["bpw"], max(r["kld"], KL_FLOOR)), fontsize=6, alpha=0.7,
                           xytext=(3, 3), textcoords="offset points")
    ppls = [r["ppl"] for r in rows]
    top = max(ppls)
    if floats:
        ax_ppl.axhline(floats[0]["ppl"], color="gray", linestyle=":", label=f"float ({floats[0]['ppl']:.3f})")
        top = min(top, PPL_TOP * floats[0]["ppl"])
        ppls.append(floats[0]["ppl"])
    ax_ppl.set_ylim(0.95 * min(ppls), 1.02 * top)
    ax_kl.set_ylim(bottom=KL_FLOOR / 2)
    ax_kl.set_yscale("log")
    ax_kl.set_xlabel("bits per weight (block linears, every stored bit)")
    ax_kl.set_ylabel("mean KL(float || method), nats/token")
    ax_ppl.set_xlabel("bits per weight (block linears, every stored bit)")
    ax_ppl.set_ylabel(f"perplexity (axis cut at {PPL_TOP:g}x float)")
    for ax in (ax_kl, ax_ppl):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ev = doc.get("eval", {})
    fig.suptitle(f"{doc.get('model', '')}\n{doc.get('text', '')}: {ev.get('windows')} x "
                 f"{ev.get('window_tokens')} tokens; {doc.get('runs_note', '')}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
