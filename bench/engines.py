#!/usr/bin/env python3
"""Upscale and erase times by input size, through the engines the worker runs.

By default both models have the real architectures with random weights (Real-ESRGAN x4plus:
64 features, 23 blocks; LaMa: 51 M parameters), written to a temporary folder, so the figures are
those of the real models; ``--esrgan`` and ``--lama`` time real weight files instead. Each size runs
once to warm up, then ``--repeat`` times; the table gives the median and the fastest run. On CUDA
it also gives the peak GPU memory of each size.

    python bench/engines.py [--device auto] [--upscale-sizes 64,128,256] [--erase-sizes 256,512,1024]
                            [--tile 512] [--overlap 32] [--repeat 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fluxworker.engines import RunContext, resolve_device
from fluxworker.engines.esrgan import UpscaleEngine
from fluxworker.engines.lama import EraseEngine
from fluxworker.jobs import Job, JobSpec
from fluxworker.tiny import write_esrgan, write_random_lama

DEFAULT_SIZES = {
    "cpu": {"upscale": "64,128,256", "erase": "256,512,1024"},
    "cuda": {"upscale": "256,512,1024,2048", "erase": "512,1024,2048"},
}


def photo(size: int) -> Image.Image:
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx, yy, (xx + yy) / 2], axis=2) * (200 / size)
    return Image.fromarray((base + rng.normal(0, 20, (size, size, 3))).clip(0, 255).astype(np.uint8))


def centre_mask(size: int) -> Image.Image:
    """A square in the middle covering a quarter of the image, as an object to erase."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def time_runs(engine, job: Job, repeat: int, device: str) -> dict:
    import torch

    engine.run(job, RunContext(seed=None))  # warm-up: kernels, allocator, FFT plans
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        engine.run(job, RunContext(seed=None))
        times.append(time.perf_counter() - started)
    figures = {"median_s": statistics.median(times), "min_s": min(times)}
    if device == "cuda":
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return figures


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--upscale-sizes", help="square input sides for upscaling (default by device)")
    parser.add_argument("--erase-sizes", help="square image sides for erasing (default by device)")
    parser.add_argument("--tile", type=int, default=512, help="upscale.tile_size")
    parser.add_argument("--overlap", type=int, default=32, help="upscale.tile_overlap")
    parser.add_argument("--max-side", type=int, default=2048, help="erase.max_side")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--esrgan", type=Path, help="a Real-ESRGAN x4 file (default: random weights)")
    parser.add_argument("--lama", type=Path, help="a LaMa file (default: random weights)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    import torch

    device = resolve_device(args.device)
    defaults = DEFAULT_SIZES["cuda" if device == "cuda" else "cpu"]
    upscale_sizes = sizes(args.upscale_sizes or defaults["upscale"])
    erase_sizes = sizes(args.erase_sizes or defaults["erase"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        esrgan_file = args.esrgan or write_esrgan(Path(tmp) / "RealESRGAN_x4plus.pth", num_feat=64, num_block=23)
        lama_file = args.lama or write_random_lama(Path(tmp) / "big-lama.pt")

        upscaler = UpscaleEngine(esrgan_file, device=device, tile_size=args.tile, tile_overlap=args.overlap,
                                 max_input_pixels=max(upscale_sizes) ** 2)
        upscaler.load()
        for size in upscale_sizes:
            job = Job(JobSpec(id="bench", type="upscale"), photo(size))
            rows.append({"task": "upscale x4", "input": f"{size}x{size}",
                         **time_runs(upscaler, job, args.repeat, device)})
            print(rows[-1], flush=True)
        upscaler.close()

        eraser = EraseEngine(lama_file, device=device, max_side=args.max_side, crop_margin=256)
        eraser.load()
        for size in erase_sizes:
            job = Job(JobSpec(id="bench", model="lama"), photo(size), centre_mask(size))
            rows.append({"task": "erase", "input": f"{size}x{size}", **time_runs(eraser, job, args.repeat, device)})
            print(rows[-1], flush=True)
        eraser.close()

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}; upscale tile {args.tile}, overlap {args.overlap}; {args.repeat} timed runs per size")
    print(f"{'task':<11} {'input':>10} {'median s':>9} {'min s':>8}" + (f" {'peak GiB':>9}" if device == "cuda" else ""))
    for row in rows:
        line = f"{row['task']:<11} {row['input']:>10} {row['median_s']:>9.3f} {row['min_s']:>8.3f}"
        if "peak_gib" in row:
            line += f" {row['peak_gib']:>9.2f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
