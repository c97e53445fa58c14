"""GPU benchmark: the worker's own pipeline and post-processing, end to end, per batch size.

    python bench/gpu.py                                  # CUDA, 512×512, 30 steps, guidance 7.5
    python bench/gpu.py --device cpu --model tiny        # the same code, quickly, on a CPU

For each batch size it draws images with :class:`worker.pipeline.Pipeline` (fp16, fused
attention, channels-last) and encodes every one to PNG with :mod:`worker.postprocess` on
background threads while the next batch draws (one batch encoding at a time, as a worker
stores one batch while the next draws), and reports images/s end to end and peak GPU
memory. In the same run it measures the classic setup (fp16, attention slicing, one image
at a time, PNG encoded in line) as the baseline, and optionally a ``torch.compile``d UNet at
the fastest batch size.

With ``--model auto`` it uses real SD 1.5 weights when the Hugging Face cache holds them,
and otherwise the full-size SD 1.5 architecture (``bench/sd15-architecture.json``) with
random weights: the same shapes and work, meaningless pictures.

It imports torch, diffusers, transformers, Pillow and the worker's pipeline modules only (no
Celery, no database, no S3 client). Prints one JSON object and writes it to
``bench/results/gpu-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skufleet.schemas.output import OutputSpec  # noqa: E402
from skufleet.worker.pipeline import Job, Pipeline, PipelineOptions  # noqa: E402
from skufleet.worker.postprocess import process  # noqa: E402

ARCHITECTURE = Path(__file__).resolve().parent / "sd15-architecture.json"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROMPT = "professional product photo of a leather hiking boot, white background, studio light"
NEGATIVE = "blurry, low quality, watermark, text"


@dataclass(frozen=True)
class Params:
    """What Pipeline.render reads of an item's generation parameters."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str = "default"


def random_sd15(device: torch.device, dtype: torch.dtype) -> Any:
    """SD 1.5's full architecture with random weights, built on the device."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from skufleet.worker.tiny import write_tokenizer

    config = json.loads(ARCHITECTURE.read_text())
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
    write_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(strip(config["unet"]))
        vae = AutoencoderKL.from_config(strip(config["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig(**strip(config["text_encoder"])))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=PNDMScheduler.from_config(strip(config["scheduler"])),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def has_cached_weights(model: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model, local_files_only=True, allow_patterns=["model_index.json"])
        return True
    except Exception:  # not in the cache, or the hub client is missing
        return False


def load(args: argparse.Namespace, options: PipelineOptions) -> tuple[Pipeline, str]:
    device = torch.device(args.device)
    if args.model == "auto":
        args.model = SD15 if has_cached_weights(SD15) else "sd15-random"
    if args.model == "sd15-random":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = random_sd15(device, dtype)
        return (
            Pipeline.from_pipe(pipe, args.model, device, options),
            "SD 1.5 architecture, random weights",
        )
    pipeline = Pipeline.load(args.model, args.device, Path(args.cache_dir), options)
    return pipeline, "real weights" if args.model != "tiny" else "tiny random test model"


def measure(
    pipeline: Pipeline, params: Params, batch_size: int, images: int, overlap: bool
) -> dict[str, Any]:
    """Draw ``images`` images in batches and PNG-encode each; images/s end to end."""
    jobs = [Job(PROMPT, NEGATIVE, seed) for seed in range(images)]
    spec = OutputSpec()
    meta = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "model": pipeline.model}
    encoded_bytes = [0]

    def encode(pixels: Any) -> None:
        encoded_bytes[0] += len(process(Image.fromarray(pixels), spec, meta).body)

    pool = ThreadPoolExecutor(max(2, min(8, (os.cpu_count() or 2) - 1)))
    encoding: list[Future[None]] = []  # the previous batch's images
    # 1. warm-up batch (kernels chosen, caches filled, graph compiled), not timed
    pipeline.render(jobs[:batch_size], params)
    if pipeline.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # 2. timed batches, PNG encoding overlapped on threads (or in line for the baseline)
    stages: dict[str, float] = {}
    started = time.perf_counter()
    for first in range(0, images, batch_size):
        batch = pipeline.render(jobs[first : first + batch_size], params)
        for stage, seconds in batch.seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        if overlap:
            wait(encoding)  # one batch encodes while the next draws, as in a worker
            encoding = [pool.submit(encode, pixels) for pixels in batch.images]
        else:
            for pixels in batch.images:
                encode(pixels)
    wait(encoding)
    pool.shutdown()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if pipeline.device.type == "cuda" else None
    drawn = sum(stages.values())
    return {
        "batch_size": batch_size,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3),
        "seconds_per_image": round(seconds / images, 4),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "stage_seconds_per_image": {k: round(v / images, 4) for k, v in stages.items()},
        "device_busy": round(drawn / seconds, 3),
        "png_mb_per_image": round(encoded_bytes[0] / images / 2**20, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--model", default="auto", help="auto, sd15-random, tiny, or a diffusers model id or path"
    )
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--size", type=int, help="square image side [512; tiny: 64]")
    parser.add_argument("--steps", type=int, help="denoising steps [30; tiny: 8]")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument(
        "--images", type=int, default=32, help="timed images per batch size (at least two batches)"
    )
    parser.add_argument("--baseline-images", type=int, default=6)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure a torch.compile'd UNet at the fastest batch size",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense fp16 peak of the device (H100/H200 SXM: 989)",
    )
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "skufleet"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    size = args.size or (64 if tiny else 512)
    params = Params(size, size, args.steps or (8 if tiny else 30), args.guidance)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    budget_started = time.perf_counter()

    # 1. the worker's fast path, per batch size
    pipeline, weights = load(args, PipelineOptions())
    device_name = (
        torch.cuda.get_device_name(pipeline.device)
        if pipeline.device.type == "cuda"
        else platform.processor() or "cpu"
    )
    runs = []
    for batch_size in batch_sizes:
        images = max(args.images, 2 * batch_size)
        print(f"batch {batch_size}: {images} images …", file=sys.stderr)
        try:
            runs.append(measure(pipeline, params, batch_size, images, overlap=True))
        except torch.cuda.OutOfMemoryError as exc:
            pipeline.free_memory()
            runs.append({"batch_size": batch_size, "error": f"out of memory: {exc}"[:300]})
        print(f"  {json.dumps(runs[-1])}", file=sys.stderr)
    measured = [r for r in runs if "error" not in r]
    best = max(measured, key=lambda r: r["images_per_second"])

    # 2. the classic setup in the same run: slicing, one image at a time, PNG in line
    print("baseline …", file=sys.stderr)
    pipeline.pipe.enable_attention_slicing()
    baseline = measure(pipeline, params, 1, args.baseline_images, overlap=False)
    pipeline.pipe.disable_attention_slicing()
    print(f"  {json.dumps(baseline)}", file=sys.stderr)

    # 3. optionally a compiled UNet at the best batch size
    compiled = None
    if args.compile:
        print(f"compiled, batch {best['batch_size']} …", file=sys.stderr)
        pipeline.pipe.unet = torch.compile(pipeline.pipe.unet, fullgraph=True)
        compiled = measure(
            pipeline,
            params,
            best["batch_size"],
            max(args.images, 2 * best["batch_size"]),
            overlap=True,
        )
        compiled["compiled"] = True
        print(f"  {json.dumps(compiled)}", file=sys.stderr)
    fastest = max([best, compiled] if compiled else [best], key=lambda r: r["images_per_second"])

    # 4. against the physical limit: SD 1.5 at 512×512 needs 50.7 TFLOP per image at 30
    #    steps with guidance; scale by steps and pixels for other settings
    tflop = 50.7 * (params.steps / 30) * (params.width * params.height / 512**2)
    floor = tflop / args.peak_tflops if pipeline.device.type == "cuda" and not tiny else None
    fits_24gb = [
        r for r in measured if r["peak_memory_gib"] is not None and r["peak_memory_gib"] <= 22.0
    ]
    result = {
        "benchmark": "gpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": __import__("diffusers").__version__,
        "model": args.model,
        "weights": weights,
        "settings": {
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "scheduler": "PNDM (SD 1.5's)",
            "dtype": str(pipeline.dtype).removeprefix("torch."),
            "end_to_end": "text encoding, denoising, VAE decode, 8-bit pixels to the "
            "host, PNG encoding",
        },
        "runs": runs,
        "compiled": compiled,
        "baseline": {
            **baseline,
            "setup": f"{str(pipeline.dtype).removeprefix('torch.')}, "
            "attention slicing, batch 1, PNG encoded in line",
        },
        "fastest": {
            "batch_size": fastest["batch_size"],
            "compiled": bool(fastest.get("compiled")),
            "images_per_second": fastest["images_per_second"],
        },
        "speedup_vs_baseline": round(
            fastest["images_per_second"] / baseline["images_per_second"], 2
        ),
        "physical_limit": None
        if floor is None
        else {
            "tflop_per_image": round(tflop, 2),
            "peak_tflops": args.peak_tflops,
            "floor_seconds_per_image": round(floor, 4),
            "fraction_reached": round(floor * fastest["images_per_second"], 3),
        },
        "default_batch_size_24gb": (
            max(fits_24gb, key=lambda r: r["images_per_second"])["batch_size"]
            if fits_24gb
            else None
        ),
        "wall_seconds": round(time.perf_counter() - budget_started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if pipeline.device.type == "cpu" else device_name.split()[-1].lower()
    path = args.out / f"gpu-{tag}-{args.model.replace('/', '_')}-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
