"""GPU benchmark: the worker's own pipeline and post-processing, end to end, per batch size
and per pipeline option.

    python bench/gpu.py                                  # CUDA, 512×512, 30 steps, guidance 7.5
    python bench/gpu.py --device cpu --model tiny        # the same code, quickly, on a CPU
    python bench/gpu.py --variants baseline,worker,fuse_qkv,reduce-overhead --budget 300

In one run, on the same prompts and seeds:

1. ``baseline``, the seed's way of drawing: diffusers' ``StableDiffusionPipeline`` called
   with a prompt one image at a time at its default settings (fp16 on CUDA, fp32 on the
   CPU, its default attention without slicing, PIL images out), each PNG encoded in line;
2. ``worker``: :class:`worker.pipeline.Pipeline` at its default options, per batch size,
   each image encoded to PNG with :mod:`worker.postprocess` on background threads while
   the next batch draws (one batch encoding at a time, as a worker stores one batch while
   the next draws), with peak GPU memory;
3. the variants, at the worker's fastest batch size: the default options plus one or more
   of ``fuse_qkv``, ``tf32``, ``fp32`` (dtype) and a ``torch.compile`` mode (``compile``,
   ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``); join names
   with ``+`` to combine them (``fuse_qkv+reduce-overhead``). Each row gives images/s,
   ms/image, the speed-up over the baseline and over the worker, the share of the physical
   limit and, since an option may change pixels, the largest absolute difference of its
   8-bit pixels from the default worker's images for the same seeds.

Compile variants each run in a child process with a timeout (``--variant-timeout``, and
never past ``--budget``): max-autotune can compile for many minutes, and a run must end in
the time a lent GPU machine gives it. On the CPU the automatic list leaves out ``tf32`` (a
no-op there) and, unless ``--compile-variants`` is given, the compile variants (compiling
there is slow); ``--variants`` runs whatever it names. The JSON is written again after
every step, so a run stopped from outside keeps what it measured (``"complete": false``).

With ``--model auto`` it uses real SD 1.5 weights when the Hugging Face cache holds them,
and otherwise the full-size SD 1.5 architecture (``bench/sd15-architecture.json``) with
random weights: the same shapes and work, meaningless pictures.

It imports torch, diffusers, transformers, Pillow and the worker's pipeline modules only (no
Celery, no database, no S3 client). Prints one JSON object and writes it to
``bench/results/gpu-<device>-<model>-<date>.json`` (or into ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skufleet.schemas.output import OutputSpec  # noqa: E402
from skufleet.worker.pipeline import (  # noqa: E402
    COMPILE_MODES,
    Job,
    Pipeline,
    PipelineOptions,
    quiet_libraries,
    resolve_dtype,
)
from skufleet.worker.postprocess import process  # noqa: E402

ARCHITECTURE = Path(__file__).resolve().parent / "sd15-architecture.json"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROMPT = "professional product photo of a leather hiking boot, white background, studio light"
NEGATIVE = "blurry, low quality, watermark, text"

OPTION_PARTS: dict[str, dict[str, Any]] = {
    "fuse_qkv": {"fuse_qkv": True},
    "tf32": {"tf32": True},
    "fp32": {"dtype": "fp32"},
    "compile": {"compile_mode": "default"},
    **{mode: {"compile_mode": mode} for mode in COMPILE_MODES if mode != "default"},
}
"""A variant name's parts (joined with ``+``) → the PipelineOptions they change."""
PIXEL_EFFECT = {
    "fuse_qkv": "the same weights in wider GEMMs: rounding differences",
    "tf32": "TF32 for fp32 matmuls and convolutions on CUDA: none with fp16 weights, "
    "rounding with fp32; none on the CPU",
    "fp32": "fp32 weights and activations instead of fp16: rounding differences",
    "compile": "Inductor fuses and reorders arithmetic: rounding differences",
}
"""What each part can do to pixels (PipelineOptions' docstrings say more)."""
CPU_VARIANTS = ("baseline", "worker", "fuse_qkv")
CPU_COMPILE_VARIANTS = ("compile", "reduce-overhead")
CUDA_VARIANTS = (
    "baseline",
    "worker",
    "fuse_qkv",
    "tf32",
    "reduce-overhead",
    "fuse_qkv+reduce-overhead",
    "compile",
    "max-autotune",
)
"""In order of value per second spent (the cheap ones first): a budget cuts the list from
its end. fp32 (and fp32+tf32, TF32's real effect) and max-autotune-no-cudagraphs are there
to be named."""
PHYSICAL_TFLOP = 50.7
"""SD 1.5 at 512×512, 30 steps with guidance: TFLOP per image (UNet twice a step, VAE)."""
TARGETS = {"images_per_second": 10.0, "speedup_vs_baseline": 3.0, "share_of_physical_limit": 0.5}


@dataclass(frozen=True)
class Params:
    """What Pipeline.render reads of an item's generation parameters."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str = "default"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_sd15(device: torch.device, dtype: torch.dtype) -> Any:
    """SD 1.5's full architecture with random weights, built on the device (the same
    weights in every process: the seed is fixed)."""
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


def resolve_model(args: argparse.Namespace) -> None:
    if args.model == "auto":
        args.model = SD15 if has_cached_weights(SD15) else "sd15-random"


def describe_weights(model: str) -> str:
    return {
        "sd15-random": "SD 1.5 architecture, random weights",
        "tiny": "tiny random test model",
    }.get(model, "real weights")


def plain_diffusers(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    """The model as the seed loaded it: a diffusers pipeline, nothing of the worker's."""
    from diffusers import StableDiffusionPipeline

    device = torch.device(args.device)
    quiet_libraries()
    if args.model == "sd15-random":
        pipe = random_sd15(device, dtype)
    else:
        source: str | Path = args.model
        if args.model == "tiny":
            from skufleet.worker import tiny

            source = tiny.ensure(Path(args.cache_dir))
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(args: argparse.Namespace, options: PipelineOptions) -> Pipeline:
    device = torch.device(args.device)
    if args.model == "sd15-random":
        pipe = random_sd15(device, resolve_dtype(options.dtype, device))
        return Pipeline.from_pipe(pipe, args.model, device, options)
    return Pipeline.load(args.model, args.device, Path(args.cache_dir), options)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronizer(device: torch.device) -> Callable[[], float]:
    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return sync


class Encoder:
    """PNG encoding with the worker's post-processing, counting bytes."""

    def __init__(self, model: str) -> None:
        self.spec = OutputSpec()
        self.meta = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "model": model}
        self.bytes = 0

    def __call__(self, image: Image.Image) -> None:
        self.bytes += len(process(image, self.spec, self.meta).body)


def rates(
    images: int, seconds: float, stages: dict[str, float], device: torch.device, encoded: int
) -> dict[str, Any]:
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    drawn = sum(stages.values())
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3),
        "seconds_per_image": round(seconds / images, 4),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "stage_seconds_per_image": {k: round(v / images, 4) for k, v in stages.items()},
        "device_busy": round(drawn / seconds, 3),
        "png_mb_per_image": round(encoded / images / 2**20, 3),
    }


def measure(
    pipeline: Pipeline, params: Params, batch_size: int, images: int, keep: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Draw ``images`` images in batches and PNG-encode each on threads, one batch encoding
    while the next draws; images/s end to end, and the first ``keep`` images' pixels."""
    jobs = [Job(PROMPT, NEGATIVE, seed) for seed in range(images)]
    encoder = Encoder(pipeline.model)
    pool = ThreadPoolExecutor(max(2, min(8, (os.cpu_count() or 2) - 1)))
    encoding: list[Future[None]] = []  # the previous batch's images
    # 1. warm-up batch (kernels chosen, caches filled, graph compiled), timed apart
    sync = synchronizer(pipeline.device)
    started = sync()
    pipeline.render(jobs[:batch_size], params)
    warmup = sync() - started
    if pipeline.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # 2. timed batches, PNG encoding overlapped on threads
    stages: dict[str, float] = {}
    kept: list[np.ndarray] = []
    started = time.perf_counter()
    for first in range(0, images, batch_size):
        batch = pipeline.render(jobs[first : first + batch_size], params)
        for stage, seconds in batch.seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        kept.extend(batch.images[: max(0, keep - len(kept))])
        wait(encoding)
        encoding = [pool.submit(encoder, Image.fromarray(pixels)) for pixels in batch.images]
    wait(encoding)
    for future in encoding:
        future.result()
    pool.shutdown()
    seconds = time.perf_counter() - started
    result = {
        "batch_size": batch_size,
        **rates(images, seconds, stages, pipeline.device, encoder.bytes),
        "warmup_seconds": round(warmup, 2),
    }
    return result, np.stack(kept) if kept else np.zeros((0, 1, 1, 3), np.uint8)


def measure_baseline(
    args: argparse.Namespace, params: Params, images: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The seed's loop: ``pipe(prompt, …)`` one image at a time, PIL out, PNG in line."""
    device = torch.device(args.device)
    dtype = resolve_dtype("auto", device)
    pipe = plain_diffusers(args, dtype)
    sync = synchronizer(device)
    stages = dict.fromkeys(("text", "denoise", "decode", "check"), 0.0)

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = sync()
            try:
                return function(*args, **kwargs)
            finally:
                stages[name] += sync() - started

        return wrapper

    # the stages are timed from outside, at the pipeline's own calls; denoise is the rest
    pipe.encode_prompt = timed("text", pipe.encode_prompt)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    pipe.image_processor.postprocess = timed("decode", pipe.image_processor.postprocess)
    pipe.run_safety_checker = timed("check", pipe.run_safety_checker)
    encoder = Encoder(args.model)

    def draw(seed: int) -> Image.Image:
        generator = torch.Generator(device="cpu").manual_seed(seed)  # as the seed did
        with torch.inference_mode():
            output = pipe(
                prompt=[PROMPT],
                negative_prompt=[NEGATIVE],
                width=params.width,
                height=params.height,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                generator=[generator],
                output_type="pil",
            )
        return output.images[0]  # type: ignore[no-any-return]

    started = sync()
    draw(images)  # warm-up, on a seed the timed images do not use
    warmup = sync() - started
    stages.update(dict.fromkeys(stages, 0.0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kept: list[np.ndarray] = []
    drawing = 0.0
    started = time.perf_counter()
    for seed in range(images):
        began = sync()
        image = draw(seed)
        drawing += sync() - began
        kept.append(np.asarray(image.convert("RGB")))
        encoder(image)
    seconds = time.perf_counter() - started
    stages["denoise"] = drawing - stages["text"] - stages["decode"] - stages["check"]
    result = {
        "batch_size": 1,
        **rates(images, seconds, stages, device, encoder.bytes),
        "warmup_seconds": round(warmup, 2),
        "dtype": str(dtype).removeprefix("torch."),
        "setup": f"seed-style: diffusers' StableDiffusionPipeline called with a prompt, "
        f"{str(dtype).removeprefix('torch.')}, default attention with no attention slicing, "
        "batch 1, PNG encoded in line",
    }
    return result, np.stack(kept)  # the caller frees the pipeline's memory


def pixel_difference(images: np.ndarray, reference: np.ndarray) -> dict[str, Any] | None:
    """How far ``images`` are from ``reference`` (the same seeds), in 8-bit steps."""
    count = min(len(images), len(reference))
    if count == 0 or images.shape[1:] != reference.shape[1:]:
        return None
    delta = np.abs(images[:count].astype(np.int16) - reference[:count].astype(np.int16))
    return {
        "images": count,
        "max_abs": int(delta.max()),
        "mean_abs": round(float(delta.mean()), 6),
        "share_differing": round(float((delta > 0).mean()), 6),
    }


def variant_options(name: str) -> PipelineOptions:
    """``fuse_qkv+reduce-overhead`` → PipelineOptions(fuse_qkv=True, compile_mode=…)."""
    changes: dict[str, Any] = {}
    for part in filter(None, name.split("+")):  # "" is the defaults
        if part not in OPTION_PARTS:
            known = ", ".join(["baseline", "worker", *OPTION_PARTS])
            raise SystemExit(f"unknown variant part {part!r} in {name!r}: use {known}")
        changes.update(OPTION_PARTS[part])
    return PipelineOptions(**changes)


def pixel_effect(name: str) -> str:
    parts = name.split("+")
    effects = [PIXEL_EFFECT["compile" if p in COMPILE_MODES else p] for p in parts]
    return "; ".join(effects)


def is_compiled(name: str) -> bool:
    return any(OPTION_PARTS.get(p, {}).get("compile_mode") for p in name.split("+"))


def run_variant(
    args: argparse.Namespace, name: str, params: Params, batch_size: int, images: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Load the pipeline with the variant's options and measure it (in this process)."""
    options = variant_options(name)
    started = time.perf_counter()
    pipeline = load(args, options)
    loaded = time.perf_counter() - started
    try:
        result, kept = measure(pipeline, params, batch_size, images, args.compare_images)
    finally:
        del pipeline
        free(torch.device(args.device))
    result["load_seconds"] = round(loaded, 2)
    result["dtype"] = str(resolve_dtype(options.dtype, torch.device(args.device)))
    result["dtype"] = result["dtype"].removeprefix("torch.")
    return result, kept


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as folder:
        yield Path(folder)


def run_child(
    args: argparse.Namespace,
    name: str,
    params: Params,
    batch_size: int,
    images: int,
    timeout: float,
    folder: Path,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Measure one variant in a child process, killed (with what it started) at
    ``timeout``: compiling cannot be interrupted from inside."""
    result_path = folder / f"{name}.json"
    pixels_path = folder / f"{name}.npy"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--device",
        args.device,
        "--model",
        args.model,
        "--size",
        str(params.width),
        "--steps",
        str(params.steps),
        "--guidance",
        str(params.guidance_scale),
        "--cache-dir",
        args.cache_dir,
        "--compare-images",
        str(args.compare_images),
        "--child",
        json.dumps(
            {
                "variant": name,
                "batch_size": batch_size,
                "images": images,
                "result": str(result_path),
                "pixels": str(pixels_path),
            }
        ),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, start_new_session=True)
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return {
            "timed_out": f"stopped after {timeout:.0f}s (--variant-timeout or --budget), "
            "still compiling or measuring"
        }, None
    finally:
        with contextlib.suppress(ProcessLookupError):  # compile workers it left behind
            os.killpg(child.pid, signal.SIGKILL)
    if code != 0 or not result_path.exists():
        return {"error": f"child process exited with code {code} (its log is above)"}, None
    result = json.loads(result_path.read_text())
    result["child_seconds"] = round(time.perf_counter() - started, 1)
    return result, np.load(pixels_path)


def child_main(args: argparse.Namespace, params: Params) -> None:
    """One variant for the parent's run_child: its figures and pixels to files."""
    job = json.loads(args.child)
    try:
        result, kept = run_variant(args, job["variant"], params, job["batch_size"], job["images"])
    except torch.cuda.OutOfMemoryError as exc:
        result, kept = {"error": f"out of memory: {exc}"[:300]}, np.zeros((0, 1, 1, 3), np.uint8)
    np.save(job["pixels"], kept)
    Path(job["result"]).write_text(json.dumps(result))


def round_up(images: int, batch_size: int) -> int:
    """At least two batches, all full: a smaller last batch is another shape to compile."""
    images = max(images, 2 * batch_size)
    return math.ceil(images / batch_size) * batch_size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--model", default="auto", help="auto, sd15-random, tiny, or a diffusers model id or path"
    )
    parser.add_argument("--batch-sizes", help="worker batch sizes [1,4,8,16,32; CPU: 1,4,8]")
    parser.add_argument("--size", type=int, help="square image side [512; tiny: 64]")
    parser.add_argument("--steps", type=int, help="denoising steps [30; tiny: 8]")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument(
        "--images", type=int, help="timed images per batch size, two batches at least [32; CPU: 16]"
    )
    parser.add_argument("--baseline-images", type=int, default=6)
    parser.add_argument(
        "--variants",
        default="auto",
        help="comma-separated: baseline, worker and option variants (fuse_qkv, tf32, fp32, "
        f"compile, {', '.join(m for m in COMPILE_MODES if m != 'default')}; join with + to "
        "combine); auto: "
        f"{','.join(CUDA_VARIANTS)} on CUDA, {','.join(CPU_VARIANTS)} on the CPU",
    )
    parser.add_argument(
        "--compile-variants",
        action="store_true",
        help=f"on the CPU, add {', '.join(CPU_COMPILE_VARIANTS)} to the auto variants",
    )
    parser.add_argument("--compile", action="store_true", help="same as --compile-variants")
    parser.add_argument("--variant-images", type=int, help="timed images per variant [as --images]")
    parser.add_argument(
        "--variant-batch-size", type=int, help="batch size of the variants [the worker's fastest]"
    )
    parser.add_argument(
        "--compare-images", type=int, default=8, help="images compared pixel by pixel"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run: a variant that would not fit is skipped",
    )
    parser.add_argument(
        "--compile-minimum",
        type=float,
        default=60.0,
        help="seconds of budget a compile variant needs left to start",
    )
    parser.add_argument(
        "--variant-timeout",
        type=float,
        default=600.0,
        help="seconds a compile variant may take, compiling included",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense fp16 peak of the device (H100/H200 SXM: 989)",
    )
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "skufleet"))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def variant_names(args: argparse.Namespace, on_cuda: bool) -> list[str]:
    """What to measure, in order; the worker always (the variants' reference)."""
    if args.variants == "auto":
        names = list(CUDA_VARIANTS if on_cuda else CPU_VARIANTS)
        if not on_cuda and (args.compile_variants or args.compile):
            names += CPU_COMPILE_VARIANTS
    else:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if "worker" not in names:
        names.insert(1 if names[:1] == ["baseline"] else 0, "worker")
    for name in names:
        if name not in ("baseline", "worker"):
            variant_options(name)  # an unknown name stops here, before anything runs
    return names


class Run:
    """One benchmark run: its settings, its figures so far, and the file they go to."""

    def __init__(self, args: argparse.Namespace, params: Params) -> None:
        self.args = args
        self.params = params
        self.begun = time.perf_counter()
        self.deadline = math.inf if args.budget is None else self.begun + args.budget
        self.device = torch.device(args.device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available here")
        spec = args.batch_sizes or ("1,4,8,16,32" if on_cuda else "1,4,8")
        self.batch_sizes = [int(b) for b in spec.split(",") if b.strip()]
        self.images = args.images or (32 if on_cuda else 16)
        self.names = variant_names(args, on_cuda)
        resolve_model(args)
        name = torch.cuda.get_device_name(self.device) if on_cuda else None
        self.tflop = PHYSICAL_TFLOP * (params.steps / 30) * (params.width * params.height / 512**2)
        self.floor = self.tflop / args.peak_tflops if on_cuda and args.model != "tiny" else None
        args.out.mkdir(parents=True, exist_ok=True)
        tag = name.split()[-1].lower() if name else "cpu"
        model = args.model.replace("/", "_")
        self.path = args.out / f"gpu-{tag}-{model}-{datetime.now(UTC):%Y-%m-%d}.json"
        self.references: dict[int, np.ndarray] = {}
        """The worker's pixels per batch size: the first --compare-images images."""
        self.result: dict[str, Any] = {
            "benchmark": "gpu",
            "complete": False,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": name or platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": __import__("diffusers").__version__,
            "model": args.model,
            "weights": describe_weights(args.model),
            "settings": {
                "width": params.width,
                "height": params.height,
                "steps": params.steps,
                "guidance_scale": params.guidance_scale,
                "scheduler": "PNDM (SD 1.5's)",
                "dtype": str(resolve_dtype("auto", self.device)).removeprefix("torch."),
                "end_to_end": "text encoding, denoising, VAE decode, 8-bit pixels to the "
                "host, PNG encoding",
                "variants": self.names,
                "budget_seconds": args.budget,
                "variant_timeout_seconds": args.variant_timeout,
            },
            "baseline": None,
            "runs": [],
            "variants": [],
        }

    def share(self, images_per_second: float) -> float | None:
        """The share of the physical limit this rate reaches (None on a CPU or for tiny)."""
        return None if self.floor is None else round(self.floor * images_per_second, 3)

    def compare(self, row: dict[str, Any], worker: dict[str, Any] | None) -> None:
        """Speed-ups and the share of the physical limit, on a measured row."""
        baseline = self.result["baseline"]
        row["share_of_physical_limit"] = self.share(row["images_per_second"])
        if worker is not None:
            row["speedup_vs_worker"] = round(
                row["images_per_second"] / worker["images_per_second"], 3
            )
        if baseline:
            row["speedup_vs_baseline"] = round(
                row["images_per_second"] / baseline["images_per_second"], 2
            )

    def save(self) -> None:
        self.result["wall_seconds"] = round(time.perf_counter() - self.begun, 1)
        self.path.write_text(json.dumps(self.result, indent=2) + "\n")

    def baseline(self) -> np.ndarray:
        """The seed's way, first: nothing of the worker's (CPU threads, flags) is set yet."""
        count = self.args.baseline_images
        log(f"baseline: {count} images, one at a time …")
        self.result["baseline"], pixels = measure_baseline(self.args, self.params, count)
        free(self.device)
        log(f"  {json.dumps(self.result['baseline'])}")
        self.save()
        return pixels

    def sweep(self) -> dict[str, Any]:
        """The worker at its default options per batch size; returns the fastest row."""
        pipeline = load(self.args, PipelineOptions())
        self.result["settings"]["dtype"] = str(pipeline.dtype).removeprefix("torch.")
        for batch_size in self.batch_sizes:
            images = round_up(self.images, batch_size)
            log(f"worker, batch {batch_size}: {images} images …")
            try:
                run, self.references[batch_size] = measure(
                    pipeline, self.params, batch_size, images, self.args.compare_images
                )
                self.compare(run, None)
            except torch.cuda.OutOfMemoryError as exc:
                pipeline.free_memory()
                run = {"batch_size": batch_size, "error": f"out of memory: {exc}"[:300]}
            self.result["runs"].append(run)
            log(f"  {json.dumps(run)}")
            self.save()
        del pipeline
        free(self.device)
        measured = [r for r in self.result["runs"] if "error" not in r]
        if not measured:
            raise SystemExit("no batch size could be measured (out of memory at each)")
        return max(measured, key=lambda r: r["images_per_second"])

    def variants(self, best: dict[str, Any]) -> None:
        """Each variant at one batch size, against the worker's pixels at that size."""
        args = self.args
        batch_size = args.variant_batch_size or best["batch_size"]
        images = round_up(args.variant_images or self.images, batch_size)
        worker = next(
            (r for r in self.result["runs"] if r["batch_size"] == batch_size and "error" not in r),
            None,
        )
        if worker is None:  # a --variant-batch-size the sweep did not measure
            worker, self.references[batch_size] = run_variant(
                args, "", self.params, batch_size, images
            )
            self.compare(worker, None)
        reference = self.references[batch_size]
        self.result["variants"].append(
            {"variant": "worker", "options": "defaults", **worker, "pixels_vs_worker": None}
        )
        with scratch() as folder:
            for name in self.names:
                if name in ("baseline", "worker"):
                    continue
                row: dict[str, Any] = {
                    "variant": name,
                    "options": variant_options(name).describe(),
                    "pixel_effect": pixel_effect(name),
                }
                self.result["variants"].append(row)
                left = self.deadline - time.perf_counter()
                compiled = is_compiled(name)
                # an in-process variant is bounded by its images: skip it if it would not fit
                estimate = 3 * images * worker["seconds_per_image"] + 10
                needs = self.args.compile_minimum
                if compiled and left < needs:
                    row["skipped"] = (
                        f"over budget ({left:.0f}s left, a compile variant needs {needs:.0f})"
                    )
                elif not compiled and left < estimate:
                    row["skipped"] = f"over budget ({left:.0f}s left, about {estimate:.0f} needed)"
                if "skipped" in row:
                    log(f"{name}: skipped, {row['skipped']}")
                    self.save()
                    continue
                log(f"{name}, batch {batch_size}: {images} images …")
                started = time.perf_counter()
                pixels: np.ndarray | None
                try:
                    if compiled:
                        timeout = min(args.variant_timeout, left)
                        figures, pixels = run_child(
                            args, name, self.params, batch_size, images, timeout, folder
                        )
                    else:
                        figures, pixels = run_variant(args, name, self.params, batch_size, images)
                except torch.cuda.OutOfMemoryError as exc:
                    free(self.device)
                    figures, pixels = {"error": f"out of memory: {exc}"[:300]}, None
                row.update(figures)
                row["variant_seconds"] = round(time.perf_counter() - started, 1)
                if "images_per_second" in row:
                    row["pixels_vs_worker"] = (
                        None if pixels is None else pixel_difference(pixels, reference)
                    )
                    self.compare(row, worker)
                log(f"  {json.dumps(row)}")
                self.save()

    def summarise(self, best: dict[str, Any]) -> None:
        """The fastest of all, against the baseline, the physical limit and the targets."""
        result, baseline = self.result, self.result["baseline"]
        rows = [best, *[v for v in result["variants"][1:] if "images_per_second" in v]]
        fastest = max(rows, key=lambda r: r["images_per_second"])
        name = fastest.get("variant", "worker")
        result["fastest"] = {
            "variant": name,
            "batch_size": fastest["batch_size"],
            "compiled": name != "worker" and is_compiled(name),
            "images_per_second": fastest["images_per_second"],
            "seconds_per_image": fastest["seconds_per_image"],
            "pixels_vs_worker": fastest.get("pixels_vs_worker"),
        }
        result["speedup_vs_baseline"] = (
            round(fastest["images_per_second"] / baseline["images_per_second"], 2)
            if baseline
            else None
        )
        reached = self.share(fastest["images_per_second"])
        result["physical_limit"] = (
            None
            if self.floor is None
            else {
                "tflop_per_image": round(self.tflop, 2),
                "peak_tflops": self.args.peak_tflops,
                "floor_seconds_per_image": round(self.floor, 4),
                "fraction_reached": reached,
            }
        )
        full_size = (self.params.steps, self.params.width * self.params.height) == (30, 512**2)
        measured = {
            "images_per_second": fastest["images_per_second"],
            "speedup_vs_baseline": result["speedup_vs_baseline"],
            "share_of_physical_limit": reached,
        }
        result["targets"] = (
            {
                key: {
                    "target": target,
                    "reached": measured[key],
                    "met": measured[key] is not None and measured[key] >= target,
                }
                for key, target in TARGETS.items()
            }
            if self.floor is not None and full_size
            else None
        )
        fits_24gb = [
            r
            for r in result["runs"]
            if r.get("peak_memory_gib") is not None and r["peak_memory_gib"] <= 22.0
        ]
        result["recommended_batch_size"] = best["batch_size"]
        result["default_batch_size_24gb"] = (
            max(fits_24gb, key=lambda r: r["images_per_second"])["batch_size"]
            if fits_24gb
            else None
        )
        result["complete"] = True
        self.save()


def main() -> None:
    args = parse_args()
    tiny = args.model == "tiny"
    size = args.size or (64 if tiny else 512)
    params = Params(size, size, args.steps or (8 if tiny else 30), args.guidance)
    if args.child:
        child_main(args, params)
        return
    run = Run(args, params)
    baseline_pixels = run.baseline() if "baseline" in run.names else None
    best = run.sweep()
    baseline = run.result["baseline"]
    if baseline is not None and baseline_pixels is not None:
        # against the worker at batch 1 where measured: the same batch, other code
        reference = run.references.get(1, run.references[best["batch_size"]])
        baseline["pixels_vs_worker"] = pixel_difference(baseline_pixels, reference)
        baseline["share_of_physical_limit"] = run.share(baseline["images_per_second"])
    run.variants(best)
    run.summarise(best)
    print(json.dumps(run.result, indent=2))
    log(table(run.result))
    log(f"written to {run.path}")


def table(result: dict[str, Any]) -> str:
    """The variants as a Markdown table, for the README."""
    lines = [
        "| variant | batch | images/s | ms/image | × baseline | share of limit | max pixel diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    baseline = result.get("baseline")
    if baseline:
        diff = (baseline.get("pixels_vs_worker") or {}).get("max_abs", "–")
        lines.append(
            f"| baseline (seed-style) | 1 | {baseline['images_per_second']} | "
            f"{1000 * baseline['seconds_per_image']:.1f} | 1.0 | "
            f"{baseline.get('share_of_physical_limit') or '–'} | {diff} |"
        )
    for row in result["variants"]:
        if "images_per_second" not in row:
            why = row.get("skipped") or row.get("timed_out") or row.get("error")
            lines.append(f"| {row['variant']} | – | {why} | | | | |")
            continue
        diff = (row.get("pixels_vs_worker") or {}).get("max_abs", 0)
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {row['images_per_second']} | "
            f"{1000 * row['seconds_per_image']:.1f} | {row.get('speedup_vs_baseline', '–')} | "
            f"{row.get('share_of_physical_limit') or '–'} | {diff} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
