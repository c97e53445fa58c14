"""One diffusers Stable Diffusion pipeline, loaded once per process and pinned to its device.

Real model ids and local paths load with ``from_pretrained``; ``tiny`` is built locally
(``worker.tiny``) and then loaded the same way. A batch is drawn in four timed stages:

1. text: the prompts and negative prompts through CLIP, once for the batch;
2. denoise: the pipeline's own sampling loop, one generator per image seeded from its item,
   so an image depends on its seed and parameters, never on the batch it landed in;
3. decode: the VAE, a slice of images at a time for large batches, then conversion to
   8-bit pixels on the device (only bytes cross to the host);
4. check (optional): the safety checker's verdict per image.

Half precision and PyTorch's fused scaled-dot-product attention on CUDA, channels-last
tensors, optional ``torch.compile``. This module imports torch, diffusers and Pillow only
(no Celery, no pydantic), so the GPU benchmark can drive it as it is.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from skufleet.schemas.errors import ConfigError, DeviceError, ModelLoadError
from skufleet.schemas.names import SCHEDULERS, TINY_MODEL

if TYPE_CHECKING:
    from skufleet.schemas.params import GenerationParams

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# scheduler name → (diffusers class, extra config); "default" keeps the model's own
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
assert set(_SCHEDULERS) | {"default"} == set(SCHEDULERS)


@dataclass(frozen=True)
class Job:
    """One image to draw."""

    prompt: str
    negative_prompt: str
    seed: int


@dataclass(frozen=True)
class PipelineOptions:
    """How a worker holds its pipeline. The defaults are the fast path."""

    dtype: str = "auto"
    """auto (fp16 on CUDA, fp32 on CPU), fp16, bf16 or fp32."""
    compile: bool = False
    """torch.compile the UNet (slow first batch of each shape, faster after)."""
    safety_checker: bool = False
    """Run the model's safety checker; flagged images are recorded, never uploaded."""
    vae_batch: int = 8
    """Images decoded by the VAE at once: bounds decode memory for large batches."""
    channels_last: bool = True
    batch_invariant: bool | None = None
    """Bit-identical pixels whatever the batch: None means on for CPU, off for CUDA.

    Standard kernels pick algorithms by problem size, so a row of a batch can round
    differently from the same row alone. This mode uses only batch-invariant paths: linear
    layers in fixed 16-row blocks, native (non-oneDNN) convolutions, single-threaded
    reductions and the VAE one image at a time. On CUDA, without it, an image may differ
    by a rounding step in a few pixels between batch sizes.
    """


@dataclass
class Batch:
    """A drawn batch: 8-bit RGB pixels on the host, verdicts, and where the time went."""

    images: np.ndarray
    """(N, H, W, 3) uint8."""
    flagged: list[bool]
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage: text, denoise, decode, check."""
    nonfinite: list[bool] = field(default_factory=list)
    """Per image: the decoder's output held NaN or infinity (the fp16 VAE overflow), which
    the 8-bit pixels hide; empty means none did."""

    @classmethod
    def concat(cls, parts: Sequence[Batch]) -> Batch:
        seconds: dict[str, float] = {}
        for part in parts:
            for stage, value in part.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        return cls(
            np.concatenate([p.images for p in parts]),
            [f for p in parts for f in p.flagged],
            seconds,
            [bad for p in parts for bad in (p.nonfinite or [False] * len(p.images))],
        )


class ImageModel(Protocol):
    """What the renderer needs of a pipeline; test fixtures provide stand-ins."""

    model: str

    def describe_device(self) -> str: ...

    def render(self, jobs: Sequence[Job], params: GenerationParams) -> Batch: ...

    def free_memory(self) -> None: ...


class BatchInvariantLinear(torch.nn.Linear):
    """A linear layer computed as a plain multiply-and-sum over the input features.

    A matrix-multiply library picks its kernels and tiling by the number of rows, so one
    row's result can round differently in a batch of 9 than alone; a reduction over the last
    dimension runs the same code for every output element, whatever the rows around it.
    Slower than a GEMM: meant for the CPU, where it keeps tests and audits exact.
    """

    CHUNK_ELEMENTS = 1 << 24
    """Bounds the temporary (rows × outputs × inputs) product to 64 MB of floats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rows_per_chunk = max(1, self.CHUNK_ELEMENTS // self.weight.numel())
        out = torch.cat(
            [
                (chunk.unsqueeze(1) * self.weight.unsqueeze(0)).sum(-1)
                for chunk in flat.split(rows_per_chunk)
            ]
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


def make_batch_invariant(pipe: Any) -> None:
    """Switch a pipeline to batch-invariant computation (see PipelineOptions)."""
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # oneDNN: by batch size
    torch.backends.nnpack.set_flags(False)  # so does NNPACK, for batches of 16 and more
    torch.set_num_threads(1)  # reductions split across threads by size
    for component in (pipe.text_encoder, pipe.unet, pipe.vae):
        for module in component.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = BatchInvariantLinear


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:n]``; a CUDA device that is not there is a :class:`DeviceError`."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {device!r}: use cpu or cuda")
    return resolved


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 is not supported on the CPU: use fp32 or bf16")
    return DTYPES[name]


def _quiet_libraries() -> None:
    """Loading bars and per-load notices would drown the worker's own log lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


class Pipeline:
    """A Stable Diffusion pipeline held on one device for the life of the worker process."""

    def __init__(
        self, pipe: Any, model: str, device: torch.device, options: PipelineOptions
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.device = device
        self.options = options
        self.dtype: torch.dtype = pipe.unet.dtype
        self._default_scheduler = pipe.scheduler
        self._schedulers: dict[str, Any] = {"default": pipe.scheduler}

    @classmethod
    def load(
        cls, model: str, device: str, cache_dir: Path, options: PipelineOptions | None = None
    ) -> Pipeline:
        """Load ``model`` (hub id, local path or ``tiny``) onto ``device``."""
        from diffusers import StableDiffusionPipeline

        options = options or PipelineOptions()
        _quiet_libraries()
        target = resolve_device(device)
        dtype = resolve_dtype(options.dtype, target)
        source: str | Path = model
        if model == TINY_MODEL:
            from skufleet.worker import tiny

            source = tiny.ensure(cache_dir)
        extra: dict[str, Any] = {}
        if not options.safety_checker:
            extra = {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc
        if options.safety_checker and getattr(pipe, "safety_checker", None) is None:
            raise ModelLoadError(f"model {model!r} has no safety checker to enable")
        return cls.from_pipe(pipe, model, target, options)

    @classmethod
    def from_pipe(
        cls, pipe: Any, model: str, device: torch.device, options: PipelineOptions
    ) -> Pipeline:
        """Pin an already built diffusers pipeline to ``device`` with ``options``."""
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        invariant = (
            device.type == "cpu" if options.batch_invariant is None else options.batch_invariant
        )
        if invariant:
            make_batch_invariant(pipe)
            options = dataclasses.replace(options, vae_batch=1, batch_invariant=True)
        if options.compile:
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        log.info(
            "loaded %s on %s (%s%s%s%s)",
            model,
            device,
            str(pipe.unet.dtype).split(".")[-1],
            ", compiled" if options.compile else "",
            ", safety checker" if options.safety_checker else "",
            ", batch-invariant" if options.batch_invariant else "",
        )
        return cls(pipe, model, device, options)

    def describe_device(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    def free_memory(self) -> None:
        """Return cached device memory after an out-of-memory error."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _scheduler(self, name: str) -> Any:
        found = self._schedulers.get(name)
        if found is None:
            import diffusers

            class_name, extra = _SCHEDULERS[name]
            found = getattr(diffusers, class_name).from_config(
                self._default_scheduler.config, **extra
            )
            self._schedulers[name] = found
        return found

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.inference_mode()
    def render(self, jobs: Sequence[Job], params: GenerationParams) -> Batch:
        """Draw one image per job, in one batch (see the module docstring for the stages)."""
        pipe = self.pipe
        guided = params.guidance_scale > 1.0
        started = self._sync()

        # 1. text
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            [job.prompt for job in jobs],
            self.device,
            1,
            guided,
            negative_prompt=[job.negative_prompt for job in jobs] if guided else None,
        )
        encoded = self._sync()

        # 2. denoise; CPU generators make the starting noise the same on every machine
        pipe.scheduler = self._scheduler(params.scheduler)
        generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs]
        latents = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=generators,
            output_type="latent",
        ).images
        denoised = self._sync()

        # 3. decode, a slice at a time, to 8-bit pixels on the device
        vae = pipe.vae
        decoded = torch.cat(
            [
                vae.decode(part / vae.config.scaling_factor, return_dict=False)[0]
                for part in latents.split(max(1, self.options.vae_batch))
            ]
        )
        nonfinite = (~torch.isfinite(decoded).flatten(1).all(dim=1)).tolist()
        pixels = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).cpu().numpy()
        done = self._sync()

        # 4. safety checker (optional)
        flagged = [False] * len(jobs)
        if self.options.safety_checker:
            _, verdicts = pipe.run_safety_checker(decoded, self.device, prompt_embeds.dtype)
            flagged = [bool(v) for v in (verdicts or flagged)]
        checked = self._sync()
        return Batch(
            images,
            flagged,
            {
                "text": encoded - started,
                "denoise": denoised - encoded,
                "decode": done - denoised,
                "check": checked - done,
            },
            [bool(bad) for bad in nonfinite],
        )
