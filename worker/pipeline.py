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
tensors; as options, ``torch.compile`` in any of its modes (CUDA graphs with
``reduce-overhead``), fused QKV projections and TF32 for fp32 work. Every option that can
change pixels is off by default, and :class:`PipelineOptions` says by how much each can.
This module imports torch, diffusers and Pillow only (no Celery, no pydantic), so the GPU
benchmark can drive it as it is.
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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes; reduce-overhead and max-autotune also capture CUDA graphs."""
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})

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
    """How a worker holds its pipeline. The defaults are the fast path that keeps pixels as
    they are: every option that can change pixels is off by default, and its docstring
    says by how much it can (``bench/gpu.py`` measures it on the device)."""

    dtype: str = "auto"
    """auto (fp16 on CUDA, fp32 on CPU), fp16, bf16 or fp32."""
    compile: bool = False
    """Same as ``compile_mode="default"``, for callers that predate compile_mode (the two
    are kept in step: ``compile`` is true exactly when ``compile_mode`` is set; to switch
    compiling off with ``dataclasses.replace``, clear both)."""
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
    compile_mode: str | None = None
    """``torch.compile`` the UNet in this mode; None (the default) compiles nothing.

    ``default``; ``reduce-overhead`` (CUDA graphs: one replay per UNet call instead of
    hundreds of kernel launches; outputs are copied out of the graph's memory pool, so any
    scheduler may keep them across steps); ``max-autotune`` (Triton benchmarks GEMM and
    convolution kernels per shape, plus CUDA graphs: compiling takes minutes);
    ``max-autotune-no-cudagraphs``. The first batch of each new shape compiles (a minute or
    more for SD 1.5 on a GPU). Pixels: Inductor fuses and reorders arithmetic, so an image
    can differ from the uncompiled one by rounding, which the steps can grow (``tiny`` on
    the CPU: at most 1 step of 255; ``bench/gpu.py`` records it on the GPU); CUDA graphs
    alone change nothing. The CPU has no CUDA graphs: reduce-overhead acts as default.
    """
    fuse_qkv: bool = False
    """One projection for the query, key and value of each self-attention, and one for the
    key and value of each cross-attention, in the UNet and the VAE (diffusers'
    ``fuse_qkv_projections``): the same weights in fewer, wider matrix multiplies. Pixels:
    a wider GEMM can take a kernel that rounds differently, so on CUDA an image can differ
    from the unfused one by rounding (``bench/gpu.py`` records by how much). On the CPU,
    batch-invariant mode covers the fused layers too (an image is the same in any batch);
    against the unfused pipeline, ``tiny`` is bit-identical and SD 1.5's architecture at
    64×64 moved 0.01% of its 8-bit values by 1 (measured; the tests bound it).
    """
    tf32: bool = False
    """Let CUDA run fp32 matrix multiplies and convolutions on TF32 tensor cores (inputs
    rounded to a 10-bit mantissa; PyTorch's default keeps fp32 matmuls exact and already
    allows TF32 in cuDNN convolutions), through the process-wide flags
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``, set
    when the pipeline is pinned to a CUDA device. Pixels: only fp32 work changes, so with
    ``dtype`` fp32 images differ by rounding grown over the steps; with fp16 or bf16 (the
    CUDA default) next to nothing runs in fp32. A no-op on the CPU: no flag is touched and
    pixels are identical.
    """

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)} (or None for no "
                f"compile); got {self.compile_mode!r}"
            )
        mode = self.compile_mode or ("default" if self.compile else None)
        object.__setattr__(self, "compile_mode", mode)
        object.__setattr__(self, "compile", mode is not None)

    def describe(self) -> str:
        """The options that differ from the defaults, for log lines and benchmark rows."""
        default = PipelineOptions()
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name != "compile" and getattr(self, f.name) != getattr(default, f.name)
        ]
        return ", ".join(changed) or "defaults"


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


def _copy_out_of_graph_pool(_module: Any, _args: Any, output: Any) -> Any:
    """A forward hook for a UNet compiled with CUDA graphs: the graph's next replay
    overwrites its outputs, and a scheduler such as PNDM keeps past outputs across steps;
    a copy (a latent, a few hundred KiB) makes them the caller's own."""
    if isinstance(output, tuple):  # diffusers' pipelines call it with return_dict=False
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in output)
    return output.clone() if isinstance(output, torch.Tensor) else output


def compile_unet(unet: Any, mode: str, device: torch.device) -> Any:
    """``torch.compile`` a UNet in ``mode`` (one of :data:`COMPILE_MODES`), whole-graph."""
    compiled: Any = torch.compile(unet, mode=mode, fullgraph=True)
    if mode in CUDA_GRAPH_MODES and device.type == "cuda":
        compiled.register_forward_hook(_copy_out_of_graph_pool)
    return compiled


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 CUDA work (see :attr:`PipelineOptions.tf32`); process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    if enabled:
        torch.backends.cudnn.allow_tf32 = True


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


def quiet_libraries() -> None:
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
        quiet_libraries()
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
        if options.fuse_qkv:
            # before the batch-invariant switch, so the new fused layers are switched too
            pipe.fuse_qkv_projections()
        if options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        invariant = (
            device.type == "cpu" if options.batch_invariant is None else options.batch_invariant
        )
        if invariant:
            make_batch_invariant(pipe)
            options = dataclasses.replace(options, vae_batch=1, batch_invariant=True)
        if device.type == "cuda":
            set_tf32(options.tf32)  # set either way: the last pipeline pinned decides
        if options.compile_mode is not None:
            pipe.unet = compile_unet(pipe.unet, options.compile_mode, device)
        log.info(
            "loaded %s on %s (%s%s%s%s%s%s)",
            model,
            device,
            str(pipe.unet.dtype).split(".")[-1],
            f", compiled ({options.compile_mode})" if options.compile_mode else "",
            ", fused QKV" if options.fuse_qkv else "",
            ", TF32" if options.tf32 and device.type == "cuda" else "",
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
        # (N, H, W, 3) laid out as such on the device, so the host gets one contiguous copy
        images = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
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
