"""The GPU-path pipeline options (fused QKV, TF32, torch.compile modes) on the CPU, and the
benchmark's variant table: what can be checked without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.params import GenerationParams
from skufleet.worker.pipeline import (
    COMPILE_MODES,
    BatchInvariantLinear,
    Job,
    Pipeline,
    PipelineOptions,
    compile_unet,
)

ROOT = Path(__file__).resolve().parent.parent
PARAMS = GenerationParams(width=64, height=64, steps=2)
JOBS = [Job(f"product {i}, studio photo", "blurry", 500 + i) for i in range(3)]
FUSED_BOUND = 2
"""Largest 8-bit step fused QKV may move a pixel on the CPU. Measured: 0 on tiny here
(bit-identical), 1 on SD 1.5's architecture at 64×64 (bench/gpu.py --model sd15-random)."""


@pytest.fixture(scope="module")
def plain(model_cache: Path) -> Pipeline:
    return Pipeline.load("tiny", "cpu", model_cache)


@pytest.fixture(scope="module")
def reference(plain: Pipeline) -> np.ndarray:
    return plain.render(JOBS, PARAMS).images


def test_pixel_changing_options_are_off_by_default() -> None:
    """No compile, no fused projections, no TF32 unless asked for."""
    options = PipelineOptions()
    assert (options.compile, options.compile_mode, options.fuse_qkv, options.tf32) == (
        False,
        None,
        False,
        False,
    )
    assert options.describe() == "defaults"


def test_compile_flag_and_mode_agree_and_a_bad_mode_is_one_line() -> None:
    """``compile=True`` is the default mode; a mode implies compile; an unknown mode is a
    ConfigError naming it and the modes there are, on one line."""
    assert PipelineOptions(compile=True).compile_mode == "default"
    for mode in COMPILE_MODES:
        options = PipelineOptions(compile_mode=mode)
        assert options.compile and options.compile_mode == mode
    assert PipelineOptions(compile=True, compile_mode="max-autotune").compile_mode == (
        "max-autotune"
    )
    with pytest.raises(ConfigError) as caught:
        PipelineOptions(compile_mode="fast")
    message = str(caught.value)
    assert "'fast'" in message and "reduce-overhead" in message and "\n" not in message


def test_fused_qkv_stays_batch_invariant_and_within_the_bound(
    model_cache: Path, reference: np.ndarray
) -> None:
    """Fusing happens before the batch-invariant switch, so the fused projections are
    batch-invariant too: an image alone equals it in a batch, and the pixels differ from
    the unfused pipeline's by at most FUSED_BOUND (0 measured on tiny)."""
    fused = Pipeline.load("tiny", "cpu", model_cache, PipelineOptions(fuse_qkv=True))
    attention = [m for m in fused.pipe.unet.modules() if hasattr(m, "to_qkv")]
    attention += [m for m in fused.pipe.vae.modules() if hasattr(m, "to_qkv")]
    assert attention, "nothing was fused"
    for component in (fused.pipe.unet, fused.pipe.vae, fused.pipe.text_encoder):
        for module in component.modules():
            if isinstance(module, torch.nn.Linear):
                assert type(module) is BatchInvariantLinear
    batch = fused.render(JOBS, PARAMS).images
    for position, job in enumerate(JOBS):
        assert np.array_equal(fused.render([job], PARAMS).images[0], batch[position])
    difference = np.abs(batch.astype(np.int16) - reference.astype(np.int16)).max()
    assert difference <= FUSED_BOUND


def test_tf32_is_a_no_op_on_the_cpu(model_cache: Path, reference: np.ndarray) -> None:
    """TF32 is CUDA's: on the CPU no flag is touched and the pixels are identical."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    pipeline = Pipeline.load("tiny", "cpu", model_cache, PipelineOptions(tf32=True))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert np.array_equal(pipeline.render(JOBS, PARAMS).images, reference)


def test_cuda_graph_modes_copy_the_unet_output_out_of_the_graph_pool() -> None:
    """With CUDA graphs the next replay overwrites the UNet's outputs, which PNDM keeps
    across steps: a hook on the compiled module copies them (nothing compiles until a call,
    so this runs without a GPU); other modes and the CPU get no hook."""
    module = torch.nn.Linear(4, 4)
    hooked = compile_unet(module, "reduce-overhead", torch.device("cuda"))
    (hook,) = hooked._forward_hooks.values()
    sample = torch.ones(2, 4)
    (copied,) = hook(hooked, (), (sample,))
    assert torch.equal(copied, sample) and copied.data_ptr() != sample.data_ptr()
    assert hook(hooked, (), sample).data_ptr() != sample.data_ptr()
    for mode, device in (("default", "cuda"), ("max-autotune-no-cudagraphs", "cuda")):
        assert not compile_unet(module, mode, torch.device(device))._forward_hooks
    assert not compile_unet(module, "reduce-overhead", torch.device("cpu"))._forward_hooks


def run_benchmark(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_the_benchmark_measures_each_variant_against_the_workers_pixels(tmp_path: Path) -> None:
    """One run: the seed-style baseline, the worker, fuse_qkv and tf32 at the worker's
    fastest batch size with their pixel differences (tf32: none on the CPU; fuse_qkv: 0
    measured, FUSED_BOUND allowed), and a compile variant skipped because the budget left
    is below what a compile needs (set above any budget, so a slow host changes nothing)."""
    result = run_benchmark(
        tmp_path,
        "--variants",
        "baseline,worker,fuse_qkv,tf32,compile",
        "--batch-sizes",
        "2",
        "--images",
        "2",
        "--baseline-images",
        "1",
        "--budget",
        "600",
        "--compile-minimum",
        "100000",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("gpu-cpu-tiny-*.json")
    figures = json.loads(written.read_text())
    assert figures["complete"] and json.loads(result.stdout) == figures
    assert figures["baseline"]["setup"].startswith("seed-style: diffusers' ")
    assert figures["baseline"]["pixels_vs_worker"]["images"] == 1
    rows = {row["variant"]: row for row in figures["variants"]}
    assert list(rows) == ["worker", "fuse_qkv", "tf32", "compile"]
    for name in ("fuse_qkv", "tf32"):
        row = rows[name]
        assert row["batch_size"] == 2 and row["images_per_second"] > 0
        difference = row["pixels_vs_worker"]
        assert difference["images"] == 4  # two batches of 2, all compared
        assert difference["max_abs"] <= (FUSED_BOUND if name == "fuse_qkv" else 0)
        assert row["speedup_vs_baseline"] > 0 and row["speedup_vs_worker"] > 0
        assert row["options"] == f"{name}=True" and row["pixel_effect"]
    assert rows["compile"]["skipped"].startswith("over budget")
    assert figures["fastest"]["variant"] in rows and figures["recommended_batch_size"] == 2
    assert figures["physical_limit"] is None and figures["targets"] is None  # tiny, on a CPU
    assert "| fuse_qkv | 2 |" in result.stderr


def test_an_unknown_variant_stops_the_benchmark_before_it_draws(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "--variants", "worker,fuse_qkv+turbo")
    assert result.returncode != 0
    assert "unknown variant part 'turbo' in 'fuse_qkv+turbo'" in result.stderr
    assert not list(tmp_path.glob("*.json"))
