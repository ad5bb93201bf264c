"""Formats bench_data.py results as a dated section of bench/RESULTS.md (newest first)."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmark results\n\nRe-run: `.venv/bin/python bench/bench_data.py` (writes a new section here).\n"


def _row(name, value, target, ok):
    verdict = "" if ok is None else "met" if ok else "NOT met"
    return f"| {name} | {value} | {target} | {verdict} |"


def write_report(results: dict, path: Path, quick: bool = False) -> None:
    rows = []
    if "packing" in results:
        p = results["packing"]
        rows.append(_row("packing efficiency (real tokens / capacity)", f"{p['efficiency']:.3f} "
                         f"({p['samples']} samples, budget {p['budget']} tokens, {p['packs']} packs)", ">= 0.95",
                         p["efficiency"] >= 0.95))
    if "throughput" in results:
        t = results["throughput"]
        rows.append(_row("training throughput, packed vs one sample per forward",
                         f"{t['packed_tokens_per_s']:.0f} vs {t['single_tokens_per_s']:.0f} tokens/s = "
                         f"{t['speedup']:.2f}x", ">= 1.5x", t["speedup"] >= 1.5))
    if "cache_vs_online" in results:
        c = results["cache_vs_online"]
        rows.append(_row(f"data path, cache vs online decode + full-size Wan2.2 VAE encode ({c['frames']} frames, "
                         f"{c['size']})", f"{c['cached_ms_per_sample']:.2f} vs {c['online_ms_per_sample']:.0f} "
                         f"ms/sample = {c['speedup']:.0f}x", ">= 5x", c["speedup"] >= 5))
    if "data_wait" in results:
        for label, w in results["data_wait"].items():
            cached = label.startswith("cache")
            rows.append(_row(f"training loop waiting on data, {label}", f"{100 * w['data_fraction']:.1f}% of "
                             f"{w['step_ms']:.0f} ms steps", "< 5%" if cached else "(for contrast)",
                             w["data_fraction"] < 0.05 if cached else None))
    section = [f"## {results['date']}{' (quick run)' if quick else ''}", "", f"Machine: {results['machine']}", "",
               "| measure | result | target | |", "|---|---|---|---|", *rows, ""]
    for note in results.get("notes", []):
        section.append(f"- {note}")
    old = path.read_text() if path.exists() else HEADER
    body = old[len(HEADER):] if old.startswith(HEADER) else old
    path.write_text(HEADER + "\n" + "\n".join(section) + "\n" + body.lstrip("\n"))
