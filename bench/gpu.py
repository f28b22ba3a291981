#!/usr/bin/env python3
"""FLUX on the GPU through the project's own engine, with the upscaler and LaMa beside it.

Builds FLUX.1-schnell's real architecture with random weights on the GPU (bench/flux_model.py),
hands it to ``FluxEngine.from_pipeline`` and measures, at 1024x1024 and 512x512, 4 steps, batch 1:
- seconds per image in fast and balanced mode: the median after warm-up with a repeated prompt
  (cached embeddings), with a new prompt every image, and the first image;
- peak GPU memory of each mode (allocated and reserved; the peak is reset between modes);
- switching modes: the move itself and the first job after it, both ways;
- one transformer forward with each attention kernel;
- the VAE decode in each memory layout, with and without cuDNN's autotuner, and the same two
  candidates for the upscaler and LaMa (speed-ups measured before any is shipped);
- compiled fast mode: warm-up with an empty and with a filled kernel cache, and how many graphs
  compile after warm-up (0 means no job pays for compiling);
- float8 storage: speed in both modes, and its difference from bfloat16 for the same seed;
- float8 compute (torchao, compiled; a candidate, not shipped): speed in fast mode and its difference;
- the upscaler (512 -> 2048) and LaMa (1024x1024), random weights, through their engines;
- host <-> device copy bandwidth, which bounds balanced mode.

    python bench/gpu.py [--tiny] [--json FILE] [--chart FILE] [--baseline FILE] [--budget-s S]
                        [--skip SECTION,...] [--balanced-gib G]

With $OUT set, writes $OUT/gpu_bench.json and $OUT/gpu_bench.png (and reads the reference figures
from $OUT/diffusers_baseline.jsonl for the chart). The JSON is rewritten after every section, so a
run cut short keeps what it measured. --tiny runs every section on the CPU with tiny sizes: a smoke
test of the code paths, whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import engines as engine_bench  # noqa: E402  (bench/engines.py)
from report import chart, print_summary, reference_figures, targets  # noqa: E402
from flux_model import build_flux  # noqa: E402

from fluxworker.config import LimitsConfig, PerformanceConfig  # noqa: E402
from fluxworker.engines import RunContext  # noqa: E402
from fluxworker.engines.flux import FluxEngine  # noqa: E402
from fluxworker.engines.placement import GIB, encoder_places, pipeline_modules  # noqa: E402
from fluxworker.engines.streaming import tensor_bytes  # noqa: E402
from fluxworker.jobs import parse_job  # noqa: E402

SECTIONS = ["bandwidth", "upscale", "erase", "attention", "layouts", "fast", "balanced", "switch", "compile", "fp8",
            "fp8_compute"]
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def layout_variants(module, *, shipped):
    """Puts ``module`` in each memory layout, with cuDNN's autotuner off and on, and yields each
    variant's name while it is set; afterwards the module is in the ``shipped`` layout again and
    the autotuner off."""
    try:
        for layout, memory_format in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            module.to(memory_format=memory_format)
            for tuned in (False, True):
                torch.backends.cudnn.benchmark = tuned
                yield f"{layout}, cudnn benchmark" if tuned else layout
    finally:
        torch.backends.cudnn.benchmark = False
        module.to(memory_format=shipped)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.device = "cpu" if args.tiny else "cuda"
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.precision = "fp32" if args.tiny else "bf16"  # the numerics every variant but fp8 keeps
        self.sizes = [128, 64] if args.tiny else [1024, 512]
        self.repeat, self.fresh, self.warm = (1, 1, 1) if args.tiny else (5, 3, 2)
        self.started = time.monotonic()
        self.skip = set(filter(None, (args.skip or "").split(",")))
        self.results: dict = {"tiny": self.tiny, "errors": {}, "skipped": {}, "flux": []}
        self.pipe = None
        self.engine = None
        self.reference_image = None

    # -- bookkeeping ---------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def section(self, name: str, need_s: float, run) -> None:
        if name in self.skip:
            self.results["skipped"][name] = "--skip"
            return
        if not self.tiny and self.remaining() < need_s:
            self.results["skipped"][name] = f"{self.remaining():.0f}s left of --budget-s, needs ~{need_s:.0f}s"
            return
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            run()
        except Exception as exc:  # one section failing must not lose the others' figures
            traceback.print_exc()
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            self.results.setdefault("section_seconds", {})[name] = round(time.monotonic() - started, 2)
            self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, path)

    # -- measuring -----------------------------------------------------------------------------

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict:
        if self.device != "cuda":
            return {}
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}

    def job(self, prompt: str, size: int, mode: str):
        limits = LimitsConfig(max_width=2048, max_height=2048)
        return parse_job({"prompt": prompt, "width": size, "height": size, "num_inference_steps": 4,
                          "performance_mode": mode}, limits)

    def image(self, prompt: str, size: int, mode: str, seed: int = 7):
        """One job through the engine: (seconds, image)."""
        self.sync()
        started = time.perf_counter()
        image = self.engine.run(self.job(prompt, size, mode), RunContext(seed=seed)).image
        self.sync()
        return time.perf_counter() - started, image

    def streamed(self) -> int:
        placement = self.engine.placement
        return sum(s.bytes_copied for s in placement.streamers) if placement is not None else 0

    def time_mode(self, mode: str, size: int, label: str, *, repeat=None, fresh=None) -> dict:
        """First image, then the median of ``repeat`` with the same prompt and of ``fresh`` new ones."""
        repeat = self.repeat if repeat is None else repeat
        fresh = self.fresh if fresh is None else fresh
        self.reset_peak()
        first, _ = self.image(PROMPT, size, mode)
        for _ in range(self.warm - 1):
            self.image(PROMPT, size, mode)
        copied = self.streamed()
        same = [self.image(PROMPT, size, mode)[0] for _ in range(repeat)]
        per_image = (self.streamed() - copied) / max(repeat, 1)
        new = [self.image(f"{PROMPT}, variation {time.monotonic_ns()}", size, mode)[0] for _ in range(fresh)]
        row = {"variant": label, "mode": mode, "size": size, "steps": 4, "first_s": round(first, 4),
               "median_s": round(statistics.median(same), 4), "min_s": round(min(same), 4), "n": repeat,
               "new_prompt_median_s": round(statistics.median(new), 4) if new else None,
               "streamed_gib_per_image": round(per_image / GIB, 3),
               "text_tokens": self.engine.max_sequence_length, **self.peaks()}
        self.results["flux"].append(row)
        print(json.dumps(row), flush=True)
        return row

    def performance(self, **overrides) -> PerformanceConfig:
        """The engine's settings: the shipped defaults, starting in fast mode, with the benchmark's budget;
        compilation off except where a section turns it on (its own section measures it)."""
        settings = dict(start_mode="fast", compile=False, warmup_sizes=[f"{s}x{s}" for s in self.sizes])
        if self.tiny:  # just under everything resident, so that some transformer blocks stream
            encoder = sum(tensor_bytes(modules[i]) for modules, i in encoder_places(self.pipe.text_encoder_2))
            total = sum(tensor_bytes(module) for module in pipeline_modules(self.pipe))
            reserve = 256 * 1024  # more than T5's ring: the reserve alone covers the encoder pass
            settings.update(balanced_vram_gib=(total - encoder + reserve - 4096) / GIB,
                            balanced_reserve_gib=reserve / GIB)
        elif self.args.balanced_gib:
            settings["balanced_vram_gib"] = self.args.balanced_gib
        settings.update(overrides)
        return PerformanceConfig(**settings)

    def new_engine(self, **overrides) -> float:
        """Release the previous engine's hold on the pipeline, then prepare a new one; returns seconds."""
        if self.engine is not None:
            if self.engine.placement is not None:
                self.engine.placement.release()
            self.engine.close()
        started = time.perf_counter()
        self.engine = FluxEngine.from_pipeline(
            self.pipe, device=self.device, dtype=self.dtype, performance=self.performance(**overrides),
            accelerated=True, compile_backend="eager" if self.tiny else "inductor")
        return time.perf_counter() - started

    # -- sections ------------------------------------------------------------------------------

    def environment(self) -> None:
        import diffusers
        import transformers

        self.results.update({
            "device": torch.cuda.get_device_name() if self.device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda if self.device == "cuda" else None,
        })

    def bandwidth(self) -> None:
        """Host <-> device copies of 1 GiB from page-locked memory: the ceiling of balanced mode."""
        if self.device != "cuda":
            self.results["bandwidth"] = None
            return
        host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
        device = torch.empty(GIB, dtype=torch.uint8, device="cuda")
        figures = {}
        for name, copy in (("h2d_gb_s", lambda: device.copy_(host, non_blocking=True)),
                           ("d2h_gb_s", lambda: host.copy_(device, non_blocking=True))):
            copy()
            self.sync()
            started = time.perf_counter()
            for _ in range(5):
                copy()
            self.sync()
            figures[name] = round(5 * GIB / (time.perf_counter() - started) / 1e9, 1)
        self.results["bandwidth"] = figures

    def upscale(self) -> None:
        from fluxworker.engines.esrgan import UpscaleEngine
        from fluxworker.jobs import Job, JobSpec
        from fluxworker.tiny import write_esrgan

        size = 32 if self.tiny else 512
        with tempfile.TemporaryDirectory() as tmp:
            sizes = dict(num_feat=16, num_block=1) if self.tiny else dict(num_feat=64, num_block=23)
            engine = UpscaleEngine(write_esrgan(Path(tmp) / "x4.pth", **sizes), device=self.device,
                                   tile_size=512, tile_overlap=32, max_input_pixels=size * size)
            engine.load()
            job = Job(JobSpec(id="bench", type="upscale"), engine_bench.photo(size))
            row = engine_bench.time_runs(engine, job, self.repeat, self.device)
            row["candidates"] = self.candidates(engine, job)
            engine.close()
        self.results["upscale"] = {"input": size, "output": size * 4, **row}

    def erase(self) -> None:
        from fluxworker.engines.lama import EraseEngine
        from fluxworker.jobs import Job, JobSpec
        from fluxworker.tiny import write_random_lama

        size = 64 if self.tiny else 1024
        with tempfile.TemporaryDirectory() as tmp:
            engine = EraseEngine(write_random_lama(Path(tmp) / "lama.pth"), device=self.device,
                                 max_side=2048, crop_margin=256)
            engine.load()
            job = Job(JobSpec(id="bench", model="lama"), engine_bench.photo(size), engine_bench.centre_mask(size))
            row = engine_bench.time_runs(engine, job, self.repeat, self.device)
            row["candidates"] = self.candidates(engine, job)
            engine.close()
        self.results["erase"] = {"size": size, **row}

    def fresh_pipeline(self) -> None:
        """Drop the engine and the pipeline, free their memory, and build the pipeline again."""
        import gc

        if self.engine is not None:
            if self.engine.placement is not None:
                self.engine.placement.release()
            self.engine.close()
            self.engine = None
        self.pipe = None
        torch._dynamo.reset()
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.pipe = build_flux("tiny" if self.tiny else "full", self.device, self.dtype)

    def candidates(self, engine, job) -> dict:
        """Median seconds of ``job`` with speed-ups the engine does not apply (yet): its network in
        channels_last, and cuDNN's autotuner (which times the convolution algorithms for each new
        shape once). Measured here first; shipped only if they win. The engine is left as it was."""
        network = engine.model.model  # spandrel's descriptor holds the torch module
        return {name: round(engine_bench.time_runs(engine, job, self.repeat, self.device)["median_s"], 4)
                for name in layout_variants(network, shipped=torch.contiguous_format)}

    def layouts(self) -> None:
        """The VAE decode (the end of every image) in each memory layout, with and without cuDNN's
        autotuner: whether ``vae_channels_last`` pays on this card."""
        vae, size = self.pipe.vae, self.sizes[0]
        latents = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, device=self.device, dtype=self.dtype)
        shipped = self.engine.performance.vae_channels_last and self.device == "cuda"
        figures: dict = {"size": size}
        with torch.inference_mode():
            for name in layout_variants(vae, shipped=torch.channels_last if shipped else torch.contiguous_format):
                times = []
                for attempt in range(2 + self.repeat):
                    self.sync()
                    started = time.perf_counter()
                    vae.decode(latents, return_dict=False)
                    self.sync()
                    if attempt >= 2:
                        times.append(time.perf_counter() - started)
                figures[name] = round(statistics.median(times) * 1000, 2)
        self.results["vae_decode_ms"] = figures

    def build(self) -> None:
        started = time.perf_counter()
        self.pipe = build_flux("tiny" if self.tiny else "full", self.device, self.dtype)
        self.sync()
        self.results["build_s"] = round(time.perf_counter() - started, 1)
        self.results["params"] = {name: sum(p.numel() for p in module.parameters())
                                  for name, module in self.pipe.components.items() if hasattr(module, "parameters")}
        self.results["prepare_s"] = round(self.new_engine(), 2)
        self.results["plan"] = self.engine.placement.plan.summary()
        self.results["tuned"] = self.engine.tuned

    def attention(self) -> None:
        """One transformer forward at the large size with each attention kernel (fast mode)."""
        from fluxworker.engines.tuning import set_attention

        self.engine.placement.use("fast")
        size, transformer = self.sizes[0], self.pipe.transformer
        with torch.inference_mode():
            embeds, pooled = self.engine.embeddings(PROMPT)
            tokens = (size // 16) ** 2
            latents = torch.randn(1, tokens, 64, device=self.device, dtype=self.dtype)
            image_ids = type(self.pipe)._prepare_latent_image_ids(1, size // 16, size // 16, self.device, self.dtype)
            text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
            timestep = torch.full((1,), 1.0, device=self.device, dtype=self.dtype)
            figures = {}
            for name in (["sdpa"] if self.tiny else ["sdpa", "cudnn", "flash", "efficient"]):
                try:
                    set_attention(transformer, name)
                    times = []
                    for attempt in range(3 + self.repeat):
                        self.sync()
                        started = time.perf_counter()
                        transformer(hidden_states=latents, timestep=timestep, guidance=None, pooled_projections=pooled,
                                    encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)
                        self.sync()
                        if attempt >= 3:
                            times.append(time.perf_counter() - started)
                    figures[name] = round(statistics.median(times) * 1000, 2)
                except Exception as exc:  # a kernel this card or build lacks
                    figures[name] = f"{type(exc).__name__}: {exc}"[:300]
            set_attention(transformer, self.engine.performance.attention)
        self.results["attention_forward_ms"] = {"size": size, "text_tokens": embeds.shape[1], **figures}

    def fast(self) -> None:
        for size in self.sizes:
            self.engine.placement.use("fast")
            self.time_mode("fast", size, self.precision)
        _, image = self.image(PROMPT, self.sizes[0], "fast", seed=11)
        self.reference_image = np.asarray(image, dtype=np.float64)
        self.engine.max_sequence_length = 512  # the reference script's token count, for a like-for-like row
        try:
            self.time_mode("fast", self.sizes[0], f"{self.precision}, 512 text tokens")
        finally:
            self.engine.max_sequence_length = 256

    def balanced(self) -> None:
        for size in self.sizes:
            self.engine.placement.use("balanced")
            self.time_mode("balanced", size, self.precision)
        self.results["streamers"] = [s.stats() for s in self.engine.placement.streamers]
        if self.reference_image is not None:
            # Streaming blocks in on a side stream must not change a pixel: a missed wait would
            # show here as a different image, not as a plausible time.
            _, image = self.image(PROMPT, self.sizes[0], "balanced", seed=11)
            self.results["balanced_vs_fast_image"] = self.compare(image)

    def compare(self, image) -> dict:
        """How far ``image`` is from fast mode's seed-11 image (8-bit RGB, same prompt and seed)."""
        difference = np.abs(np.asarray(image, dtype=np.float64) - self.reference_image)
        mse = float((difference ** 2).mean())
        return {"reference": f"fast, {self.precision}", "max_abs_diff": float(difference.max()),
                "mean_abs_diff": round(float(difference.mean()), 3),
                "psnr_db": round(10 * np.log10(255.0 ** 2 / mse), 2) if mse else None}

    def switch(self) -> None:
        """fast -> balanced -> fast, each move and the first job after it, at the large size."""
        size, placement, figures = self.sizes[0], self.engine.placement, {}
        for source, target in (("fast", "balanced"), ("balanced", "fast")):
            placement.use(source)
            self.image(PROMPT, size, source)
            figures[f"{source}_to_{target}_move_s"] = round(placement.use(target), 4)
            figures[f"first_{target}_job_after_s"] = round(self.image(PROMPT, size, target)[0], 4)
        self.results["switch"] = figures
        self.results["engine"] = self.engine.stats()  # every move so far, prompt cache use, plan

    def compile(self) -> None:
        """A fresh engine with compile on and an empty kernel cache: start-up cost, speed, recompiles."""
        from torch._dynamo.utils import counters

        from fluxworker.engines.tuning import uncompile_blocks

        figures: dict = {}
        self.results["compile"] = figures
        with tempfile.TemporaryDirectory() as cache:
            graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
            figures["prepare_with_cold_warmup_s"] = round(
                self.new_engine(compile=True, compile_cache=Path(cache)), 2)
            figures["warmup_cold_s"] = {k: round(v, 2) for k, v in self.engine.warmup_seconds.items()}
            before = graphs()
            for size in self.sizes:
                self.time_mode("fast", size, f"{self.precision} compiled", fresh=0 if self.tiny else 1)
            figures["graphs_compiled_after_warmup"] = graphs() - before
            # A size no warm-up made: does the graph compiled for two sizes fit it, or does its first
            # job pay for compiling?
            other = 192 if self.tiny else 768
            before = graphs()
            figures[f"first_fast_{other}_s"] = round(self.image(PROMPT, other, "fast")[0], 4)
            figures[f"graphs_compiled_by_{other}"] = graphs() - before
            figures[f"second_fast_{other}_s"] = round(self.image(PROMPT, other, "fast")[0], 4)
            # A restart, as far as one process shows it: the compiled graphs are dropped and compiled
            # again from the on-disk cache.
            torch._dynamo.reset()
            hits = counters["inductor"]["fxgraph_cache_hit"]
            figures["warmup_cached_s"] = {k: round(v, 2) for k, v in self.engine.warm_up().items()}
            figures["fx_graph_cache_hits"] = counters["inductor"]["fxgraph_cache_hit"] - hits
            before = graphs()
            self.engine.placement.use("balanced")
            self.time_mode("balanced", self.sizes[0], f"{self.precision} compiled", repeat=1 if self.tiny else 2, fresh=0)
            self.engine.placement.use("fast")
            figures["first_fast_job_after_balanced_s"] = round(self.image(PROMPT, self.sizes[0], "fast")[0], 4)
            figures["graphs_compiled_by_mode_switches"] = graphs() - before
            figures["cache_files"] = sum(1 for path in Path(cache).rglob("*") if path.is_file())
        self.engine.placement.release()
        uncompile_blocks(self.pipe.transformer)

    def fp8(self) -> None:
        """Float8 storage (changes numerics): speed in both modes, and the image against bfloat16.

        Casting to float8 is irreversible, and the sections before leave compiled graphs and freed
        blocks behind: it runs over a pipeline of its own, built after everything else is freed, so
        that its peak memory is its own."""
        self.fresh_pipeline()
        figures: dict = {"prepare_s": round(self.new_engine(fp8_storage=True), 2),
                         "plan": self.engine.placement.plan.summary()}
        self.results["fp8"] = figures
        size = self.sizes[0]
        self.time_mode("fast", size, "fp8 storage", repeat=max(self.repeat - 2, 1), fresh=0)
        if self.reference_image is not None:
            _, image = self.image(PROMPT, size, "fast", seed=11)
            figures["vs_reference_image"] = {
                **self.compare(image), "note": "random weights: a numerics check, not a quality one"}
        self.engine.placement.use("balanced")
        self.time_mode("balanced", size, "fp8 storage", repeat=max(self.repeat - 3, 1), fresh=0)

    def fp8_compute(self) -> None:
        """A candidate not shipped: float8 matrix products in the transformer (torchao's dynamic
        float8 with per-row scales), compiled, in fast mode. It changes the images, as fp8_storage
        does, but computes in float8 where fp8_storage computes in bfloat16. Needs torchao (carried
        by device_prep.sh) and a GPU of compute capability 8.9 or newer (Ada, Hopper)."""
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        except ImportError:
            self.results["skipped"]["fp8_compute"] = "torchao is not installed"
            return
        if self.device != "cuda" or torch.cuda.get_device_capability() < (8, 9):
            self.results["skipped"]["fp8_compute"] = "needs a CUDA GPU of compute capability 8.9 or newer"
            return
        from fluxworker.engines.tuning import fuse_qkv

        self.fresh_pipeline()
        started = time.perf_counter()
        fuse_qkv(self.pipe.transformer)  # before quantizing: fusing concatenates plain weights
        quantize_(self.pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        self.sync()
        figures: dict = {"quantize_s": round(time.perf_counter() - started, 2)}
        self.results["fp8_compute"] = figures
        # Everything resident (the streaming code packs plain tensors only), compiled, warmed up.
        figures["prepare_with_cold_warmup_s"] = round(
            self.new_engine(fuse_qkv=False, compile=True, balanced_vram_gib=1000.0), 2)
        figures["warmup_cold_s"] = {k: round(v, 2) for k, v in self.engine.warmup_seconds.items()}
        figures["compile_error"] = self.engine.compile_error
        for size in self.sizes:
            self.time_mode("fast", size, "fp8 compute compiled", fresh=1)
        if self.reference_image is not None:
            _, image = self.image(PROMPT, self.sizes[0], "fast", seed=11)
            figures["vs_reference_image"] = {
                **self.compare(image), "note": "random weights: a numerics check, not a quality one"}


def main() -> int:
    out = os.environ.get("OUT")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (smoke test)")
    parser.add_argument("--json", default=str(Path(out or ".") / "gpu_bench.json"))
    parser.add_argument("--chart", default=str(Path(out or ".") / "gpu_bench.png"))
    parser.add_argument("--baseline", type=Path, default=Path(out) / "diffusers_baseline.jsonl" if out else None,
                        help="the plain-diffusers reference's JSON lines, for the chart")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip sections that would not fit")
    parser.add_argument("--skip", help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    parser.add_argument("--balanced-gib", type=float, help="performance.balanced_vram_gib (default: the shipped one)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny for the CPU smoke test")
    if args.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and a shared CPU loses a lot
    bench = Bench(args)
    bench.environment()
    bench.results["reference"] = reference_figures(args.baseline)
    bench.section("bandwidth", 10, bench.bandwidth)
    bench.section("upscale", 30, bench.upscale)
    bench.section("erase", 30, bench.erase)
    bench.section("build", 60, bench.build)
    if bench.engine is not None:
        for name, need, run in (("attention", 20, bench.attention), ("layouts", 10, bench.layouts),
                                ("fast", 40, bench.fast),
                                ("balanced", 60, bench.balanced), ("switch", 20, bench.switch),
                                ("compile", 120, bench.compile), ("fp8", 60, bench.fp8),
                                ("fp8_compute", 90, bench.fp8_compute)):
            bench.section(name, need, run)
    if not bench.tiny:
        bench.results["targets"] = targets(bench.results)
    bench.save()
    chart(bench.results, Path(args.chart))
    print_summary(bench.results)
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
