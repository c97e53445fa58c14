"""The tiny model loads through the real diffusers path and draws from the seed alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas.errors import DeviceError, ModelLoadError
from schemas.params import GenerationParams
from worker.pipeline import Job, Pipeline

PARAMS = GenerationParams(width=64, height=32, steps=4)


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


def test_images_have_the_requested_size_and_depend_on_the_seed(pipeline: Pipeline) -> None:
    """Same seed, same pixels; another seed, other pixels."""
    a, b, c = (pipeline.render([Job("red shoe", "", seed)], PARAMS)[0] for seed in (1, 1, 2))
    assert a.size == (64, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_a_missing_model_or_device_is_reported_by_name(tmp_path: Path) -> None:
    """Loading errors name the model or device; they are fatal for the process."""
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        Pipeline.load(str(tmp_path / "does-not-exist"), "cpu", tmp_path)
    with pytest.raises(DeviceError):
        Pipeline.load("tiny", "cuda", tmp_path)
