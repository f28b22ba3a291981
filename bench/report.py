"""The GPU benchmark's report: its targets, the plain-diffusers reference, a table and a chart.

The chart is drawn with Pillow (no plotting library needed): horizontal bars on a logarithmic axis,
so that a 0.3 s and a 20 s figure both read well, each labelled with its value; the project's bars
are blue, the plain-diffusers reference grey.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OURS = (44, 110, 180)
REFERENCE = (150, 150, 150)
TARGETS = {"fast_1024_s": 0.45, "balanced_1024_s": 2.5, "balanced_1024_peak_gib": 16.0,
           "upscale_512_to_2048_s": 0.1, "erase_1024_s": 0.05}
TICKS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_chart(bars: list[dict], title: str, path: str | Path) -> Path:
    """``bars``: dicts with ``label``, ``seconds`` and ``reference`` (True for the plain-diffusers
    figures). Bars without seconds are left out. Writes a PNG to ``path``."""
    bars = [bar for bar in bars if bar.get("seconds")]
    path = Path(path)
    width, left, right, top, row = 1100, 330, 90, 70, 34
    height = top + row * max(len(bars), 1) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    draw.text((20, 18), title, fill="black", font=_font(18))
    if not bars:
        draw.text((20, top), "no figures", fill="black", font=font)
        image.save(path)
        return path
    low = min(bar["seconds"] for bar in bars)
    high = max(bar["seconds"] for bar in bars)
    ticks = [t for t in TICKS if low / 2 <= t <= high * 2] or [low, high]
    lo, hi = math.log10(min(ticks[0], low)), math.log10(max(ticks[-1], high))
    span = max(hi - lo, 1e-6)

    def x(seconds: float) -> float:
        return left + (math.log10(seconds) - lo) / span * (width - left - right)

    bottom = top + row * len(bars)
    for tick in ticks:
        draw.line([(x(tick), top - 6), (x(tick), bottom)], fill=(225, 225, 225))
        draw.text((x(tick) - 10, bottom + 8), f"{tick:g} s", fill=(90, 90, 90), font=small)
    for number, bar in enumerate(bars):
        y = top + number * row
        colour = REFERENCE if bar.get("reference") else OURS
        draw.rectangle([left, y + 6, max(x(bar["seconds"]), left + 2), y + row - 6], fill=colour)
        draw.text((20, y + 8), bar["label"], fill="black", font=font)
        draw.text((x(bar["seconds"]) + 6, y + 9), f"{bar['seconds']:.3g} s", fill="black", font=small)
    draw.text((left, bottom + 30), "seconds per image (log scale); grey: plain diffusers on the same card",
              fill=(90, 90, 90), font=small)
    image.save(path)
    return path


def reference_figures(path: Path | None) -> dict:
    """The plain-diffusers figures from diffusers_baseline.jsonl, when there is one."""
    if path is None or not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step, res = row.get("step", ""), row.get("res")
        if step.startswith("pipeline fast mode") and row.get("bs") == 1:
            found[f"fast_{res}"] = {"median_s": row.get("median"), "peak_gib": row.get("peak_gib")}
        elif step == "pipeline model_cpu_offload":
            found[f"offload_{res}"] = {"median_s": row.get("median"), "peak_gib": row.get("peak_gib")}
        elif step == "built":
            found["device"] = row.get("gpu")
    return found


def headline(row: dict) -> float:
    """A row's figure to compare: a new prompt every image when measured (the reference encodes
    every prompt too), else the repeated prompt."""
    return row.get("new_prompt_median_s") or row["median_s"]


def targets(results: dict) -> dict:
    """Each target of a full run beside its measured figure."""
    rows = {(row["variant"], row["mode"], row["size"]): row for row in results.get("flux", [])}
    fast = min((headline(row) for key, row in rows.items() if key[1:] == ("fast", 1024)
                and key[0] in ("bf16", "bf16 compiled")), default=None)
    balanced = rows.get(("bf16", "balanced", 1024), {})
    measured = {"fast_1024_s": fast, "balanced_1024_s": headline(balanced) if balanced else None,
                "balanced_1024_peak_gib": balanced.get("peak_allocated_gib"),
                "upscale_512_to_2048_s": results.get("upscale", {}).get("median_s"),
                "erase_1024_s": results.get("erase", {}).get("median_s")}
    return {name: {"measured": value, "target": TARGETS[name], "met": value is not None and value <= TARGETS[name]}
            for name, value in measured.items()}


def chart(results: dict, path: Path) -> None:
    bars = []
    for name, figure in sorted(results.get("reference", {}).items()):
        if isinstance(figure, dict) and figure.get("median_s"):
            mode, size = name.split("_")
            label = "diffusers, all on GPU" if mode == "fast" else "diffusers, model offload"
            bars.append({"label": f"{label} {size}", "seconds": figure["median_s"], "reference": True})
    for row in results["flux"]:
        bars.append({"label": f"{row['mode']} {row['size']} ({row['variant']})", "seconds": headline(row)})
    title = f"FLUX.1-schnell, 4 steps, batch 1, new prompt per image: {results.get('device', '')}"
    draw_chart(bars, title, path)


def print_summary(results: dict) -> None:
    """The figures as a short table, last in the output, where a truncated log still shows them."""
    print(f"\n{results.get('device')}; torch {results.get('torch')}; {results.get('elapsed_s')}s")
    print(f"{'variant':<24} {'mode':<9} {'size':>5} {'median s':>9} {'new prompt s':>13} {'first s':>8} {'peak GiB':>9}")
    for row in results["flux"]:
        new = f"{row['new_prompt_median_s']:.3f}" if row.get("new_prompt_median_s") else "-"
        print(f"{row['variant']:<24} {row['mode']:<9} {row['size']:>5} {row['median_s']:>9.3f} "
              f"{new:>13} {row['first_s']:>8.3f} {row.get('peak_allocated_gib', '-'):>9}")
    for key in ("reference", "bandwidth", "plan", "balanced_vs_fast_image", "switch", "compile", "fp8", "upscale", "erase",
                "attention_forward_ms", "vae_decode_ms", "targets", "errors", "skipped"):
        if results.get(key):
            print(f"{key}: {json.dumps(results[key], default=str)}")


if __name__ == "__main__":  # redraw the chart and the table from a saved run: report.py FILE [--chart PNG]
    import argparse

    parser = argparse.ArgumentParser(description="Print the table and draw the chart of a saved gpu_bench.json.")
    parser.add_argument("json", type=Path)
    parser.add_argument("--chart", type=Path, help="PNG to write (default: beside the JSON)")
    parser.add_argument("--baseline", type=Path,
                        help="the plain-diffusers reference's JSON lines, in place of the saved figures "
                             "(from a run of diffusers_baseline.py on the same kind of card)")
    args = parser.parse_args()
    saved = json.loads(args.json.read_text())
    if args.baseline:
        saved["reference"] = reference_figures(args.baseline)
        if not saved.get("tiny"):
            saved["targets"] = targets(saved)
    chart(saved, args.chart or args.json.with_suffix(".png"))
    print_summary(saved)
