"""One diffusers Stable Diffusion pipeline, loaded once per process and pinned to its device.

Real model ids and local paths load with ``from_pretrained``; ``tiny`` is built locally
(``worker.tiny``) and then loaded the same way. Images are drawn in batches with one
generator per image, seeded from the item, so an image depends on its seed and parameters
alone, never on the batch it landed in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from schemas.errors import DeviceError, ModelLoadError
from schemas.names import TINY_MODEL
from schemas.params import GenerationParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One image to draw."""

    prompt: str
    negative_prompt: str
    seed: int


class ImageModel(Protocol):
    """What the renderer needs of a pipeline; test fixtures provide stand-ins."""

    model: str

    def describe_device(self) -> str: ...

    def render(self, jobs: Sequence[Job], params: GenerationParams) -> list[Image.Image]: ...


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:n]``; a CUDA device that is not there is a :class:`DeviceError`."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {device!r}: use cpu or cuda")
    return resolved


class Pipeline:
    """A Stable Diffusion pipeline held on one device for the life of the worker process."""

    def __init__(self, pipe: Any, model: str, device: torch.device) -> None:
        self.pipe = pipe
        self.model = model
        self.device = device

    @classmethod
    def load(cls, model: str, device: str, cache_dir: Path) -> Pipeline:
        """Load ``model`` (hub id, local path or ``tiny``) onto ``device``; fp16 on CUDA."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # Loading bars and per-load notices would drown the worker's own log lines.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        target = resolve_device(device)
        dtype = torch.float16 if target.type == "cuda" else torch.float32
        source: str | Path = model
        if model == TINY_MODEL:
            from worker import tiny

            source = tiny.ensure(cache_dir)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                source, dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc
        pipe = pipe.to(target)
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded %s on %s (%s)", model, target, dtype)
        return cls(pipe, model, target)

    def describe_device(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    @torch.inference_mode()
    def render(self, jobs: Sequence[Job], params: GenerationParams) -> list[Image.Image]:
        """Draw one image per job, in one batch."""
        # CPU generators: the starting noise is the same on every machine and GPU model.
        generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in jobs]
        output = self.pipe(
            prompt=[job.prompt for job in jobs],
            negative_prompt=[job.negative_prompt for job in jobs],
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=generators,
            output_type="pil",
        )
        return list(output.images)
