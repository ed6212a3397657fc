"""The README table of issue 7 from `gan-ray bench --json` lines (benchmarks/gpu_check.sh writes bench.jsonl).

Usage: python benchmarks/gpu_summary.py bench.jsonl
Prints the card, then one Markdown row per configuration. CPU lines (no CUDA-graph baseline) print "-" there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ("| model | batch | DataLoader loop | plain CUDA graph (best plain) | gan-ray in Ray Train | vs DataLoader "
          "| vs best plain | gan-ray path |")


def _rate(row: dict, key: str) -> str:
    return f"{row[key]:,.0f}" if key in row else "-"


def table(rows: list[dict]) -> str:
    if not rows:
        return "no benchmark results"
    lines = [f"card: {rows[0]['device']}", HEADER, "| --- " * 8 + "|"]
    for r in rows:
        path = " ".join(f"{k}={v}" for k, v in r["fast_path"].items())
        best = f"{r['ratio_vs_best_plain']:.2f}x" if "ratio_vs_best_plain" in r else "-"
        lines.append(f"| {r['arch']} {r['image_size']}x{r['image_size']} | {r['batch_size']} | "
                     f"{_rate(r, 'plain_images_per_s')} | {_rate(r, 'plain_graph_images_per_s')} | "
                     f"{_rate(r, 'ray_train_images_per_s')} | {r['ratio']:.2f}x | {best} | {path} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_summary.py BENCH_JSONL", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
