"""The tiny model loads through the real diffusers path and draws from the seed alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from skufleet.schemas.errors import ConfigError, DeviceError, ModelLoadError
from skufleet.schemas.names import SCHEDULERS
from skufleet.schemas.params import GenerationParams
from skufleet.worker.pipeline import Job, Pipeline, PipelineOptions

PARAMS = GenerationParams(width=64, height=48, steps=4)


@pytest.fixture(scope="module")
def pipeline(model_cache: Path) -> Pipeline:
    return Pipeline.load("tiny", "cpu", model_cache)


def test_tiny_is_a_stable_diffusion_pipeline_loaded_from_disk(pipeline: Pipeline) -> None:
    """Same classes as SD 1.5, loaded with from_pretrained from the cache directory."""
    pipe = pipeline.pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert Path(pipe.config._name_or_path).name.startswith("tiny-sd-")
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_a_batch_has_the_requested_size_and_its_timings(pipeline: Pipeline) -> None:
    """8-bit RGB pixels of the requested size, one per job, and a time per stage."""
    batch = pipeline.render([Job("red shoe", "", 1), Job("blue bag", "", 2)], PARAMS)
    assert batch.images.shape == (2, 48, 64, 3) and batch.images.dtype == np.uint8
    assert batch.flagged == [False, False]
    assert set(batch.seconds) == {"text", "denoise", "decode", "check"}
    assert not np.array_equal(batch.images[0], batch.images[1])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_an_image_depends_on_its_seed_not_on_its_batch(pipeline: Pipeline, scheduler: str) -> None:
    """An item drawn alone and at any position of a batch of 4 (or 9) gives identical pixels,
    with every sampler; another seed gives other pixels."""
    params = GenerationParams(width=64, height=48, steps=5, scheduler=scheduler)
    jobs = [Job(f"product {i}, studio photo", "blurry", 1000 + i) for i in range(9)]
    for size in (4, 9):
        batch = pipeline.render(jobs[:size], params)
        for position, job in enumerate(jobs[:size]):
            (alone,) = pipeline.render([job], params).images
            assert np.array_equal(alone, batch.images[position]), (size, position)
    other = pipeline.render([Job(jobs[0].prompt, "blurry", 7)], params).images[0]
    assert not np.array_equal(other, batch.images[0])


def test_loading_errors_name_the_model_the_device_or_the_option(tmp_path: Path) -> None:
    """A missing model, a missing GPU and impossible options are reported, not guessed."""
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        Pipeline.load(str(tmp_path / "does-not-exist"), "cpu", tmp_path)
    with pytest.raises(DeviceError):
        Pipeline.load("tiny", "cuda", tmp_path)
    with pytest.raises(ConfigError, match="fp16 is not supported on the CPU"):
        Pipeline.load("tiny", "cpu", tmp_path, PipelineOptions(dtype="fp16"))


def test_the_safety_checker_cannot_be_enabled_on_a_model_without_one(model_cache: Path) -> None:
    """Asking for a safety checker the model lacks is an error, not a silent no-op."""
    with pytest.raises(ModelLoadError, match="no safety checker"):
        Pipeline.load("tiny", "cpu", model_cache, PipelineOptions(safety_checker=True))


def test_non_finite_decoder_output_is_marked_and_fails_the_dark_check(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp16 VAE overflow: NaNs from the decoder become an all-black frame in 8 bits;
    the batch marks that image, and the gate's ``dark`` check fails it."""
    from skufleet.worker import quality

    jobs = [Job("a red shoe", "", 1), Job("a blue shoe", "", 2)]
    params = GenerationParams(width=64, height=64, steps=2)
    clean = pipeline.render(jobs, params)
    assert clean.nonfinite == [False, False]

    vae = pipeline.pipe.vae
    decode = vae.decode

    def overflowing(latents: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor]:
        out = decode(latents, **kwargs)[0].clone()
        out[0] = float("nan")  # the first image of each slice overflows
        return (out,)

    monkeypatch.setattr(vae, "decode", overflowing)
    options = pipeline.options
    monkeypatch.setattr(pipeline, "options", dataclasses.replace(options, vae_batch=8))
    broken = pipeline.render(jobs, params)
    assert broken.nonfinite == [True, False]
    gate = quality.Gate()
    verdicts = [
        quality.assess(gate, image, sku=str(i), nonfinite=bad)
        for i, (image, bad) in enumerate(zip(broken.images, broken.nonfinite, strict=True))
    ]
    assert [v.failed for v in verdicts] == [["dark", "blank", "flat"], []]
