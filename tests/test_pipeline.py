"""The pipeline seam: one sampling request, the codec, and the bundled model's images pinned."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_faces.errors import UserError
from ddpm_faces.models import PixelCodec
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline

# The bundled model's fp32 images for these requests, taken before the seams were reshaped: the same seed,
# sampler, steps and precision must keep giving them. Not byte for byte: the CPU's kernels round differently
# per instruction set (AVX2, AVX-512, AMX sum in other orders), which moves a few pixels by one grey level
# (measured: at most 1 level, in 0.01% of the values, between AVX2 and AVX-512 on one AMD EPYC). Any change
# to the sampler, the schedule or the network moves far more than that.
REFERENCE = Path(__file__).parent / "data" / "faces32-fp32-reference.npz"
# Four samplers, not every one: the reference file holds these cases only (unipc is pinned instead by its exact
# ODE solution and diffusers' UniPC in test_fast_samplers.py).
PINNED = {         # with the defaults of their time: unasked attributes left to the model, guidance 1, every step
    "dpmpp-2m": dict(sampler="dpmpp-2m", steps=20, guidance=1.0, unasked="model"),
    "ddpm-guided": dict(sampler="ddpm", steps=10, attributes={"gender": "Female"}, guidance=3.0, unasked="model",
                        guidance_interval=(0.0, 999.0)),                  # every step
    "ddim-eta": dict(sampler="ddim", steps=10, eta=0.5, seed=7, guidance=1.0, unasked="model"),
    "heun-interval": dict(sampler="heun", steps=6, attributes={"age": "60-69"}, guidance=2.0,
                          guidance_interval=(100.0, 900.0), unasked="model"),
}
MAX_LEVELS, MAX_SHARE = 2, 0.005        # at most 2 grey levels apart, in at most 0.5% of the values


@pytest.fixture(scope="module")
def bundled():
    return load_pipeline("faces32")


def matches(images: np.ndarray, reference: np.ndarray) -> bool:
    diff = np.abs(images.astype(int) - reference.astype(int))
    return images.shape == reference.shape and diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_SHARE


@pytest.mark.parametrize("case", list(PINNED))
def test_bundled_model_images_are_unchanged(bundled, case):
    images = generate(bundled, SamplingRequest(num=3, precision="fp32", **PINNED[case]), progress=False)
    assert matches(images, np.load(REFERENCE)[case])


def test_the_pinned_images_tell_a_changed_sampler_apart(bundled):
    """The tolerance is far below what a real change does: one step fewer already fails it."""
    images = generate(bundled, SamplingRequest(num=3, precision="fp32", sampler="dpmpp-2m", steps=19), progress=False)
    assert not matches(images, np.load(REFERENCE)["dpmpp-2m"])


def test_batch_size_does_not_change_the_images(bundled):
    request = SamplingRequest(num=3, sampler="ddim", steps=4, eta=1.0, seed=5)
    whole = generate(bundled, request, progress=False)
    split = generate(bundled, request.replace(batch_size=2), progress=False)
    # the noise is drawn per image, so only float rounding may differ: the CPU's matmul kernels can sum in
    # another order for another batch size (measured: at most 1 level of 255 on some machines)
    diff = np.abs(whole.astype(int) - split.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize("change, field", [
    (dict(num=0), "num"), (dict(seed=-1), "seed"), (dict(seed=10**400), "seed"), (dict(seed=1.5), "seed"),
    (dict(sampler="euler"), "sampler"), (dict(steps=0), "steps"), (dict(steps=1001), "steps"),
    (dict(steps=True), "steps"), (dict(spacing="cubic"), "spacing"), (dict(eta=-1.0), "eta"),
    (dict(eta=0.5), "eta"), (dict(guidance=float("nan")), "guidance"), (dict(guidance=-1.0), "guidance"),
    (dict(guidance_interval=(900.0, 100.0)), "guidance interval"), (dict(precision="fp16"), "precision"),
    (dict(attributes={"mood": "happy"}), "mood"), (dict(attributes={"age": "200"}), "age"),
    (dict(batch_size=0), "batch size"),
])
def test_every_bad_field_is_one_line_naming_it(bundled, change, field):
    with pytest.raises(UserError) as err:
        SamplingRequest(**change).validate(bundled)
    message = str(err.value)
    assert field in message and "\n" not in message and len(message) < 300


def test_validate_drops_attributes_left_to_the_model(bundled):
    request = SamplingRequest(attributes={"age": "any", "gender": "Female", "race": None}).validate(bundled)
    assert request.attributes == {"gender": "Female"}


def test_one_default_for_every_entry_point():
    """The library, the CLI and evaluation share SamplingRequest's defaults (DPM-Solver++, 20 steps)."""
    from ddpm_faces.cli import build_parser, request_from_args

    default = SamplingRequest()
    for command in (["sample"], ["eval"], ["eval", "--attributes"]):
        request = request_from_args(build_parser().parse_args(command))
        assert request.replace(num=default.num, batch_size=default.batch_size) == default
    assert default.nfe == 8 and SamplingRequest(sampler="heun", steps=10).nfe == 19


def test_cli_flags_reproduce_the_request():
    from ddpm_faces.cli import build_parser, request_from_args

    request = SamplingRequest(num=4, seed=9, sampler="ddim", steps=30, eta=0.5, guidance=2.5, precision="bf16",
                              guidance_interval=(10.0, 500.0), attributes={"gender": "Female"})
    args = build_parser().parse_args(["sample", *request.cli_flags().replace("'", "").split()])
    assert request_from_args(args, batch_size=request.batch_size) == request


def test_pixel_codec_is_the_identity_and_knows_its_shape():
    codec = PixelCodec(3, 16)
    x = torch.randn(2, 3, 16, 16)
    assert codec.shape == (3, 16, 16) and codec.image_size == 16
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_generate_follows_the_codec_shape(unconditional_model):
    """A codec with another shape (4 channels at half size, decoded by a fixed linear map) changes what the
    sampler works on; generate takes its noise from codec.shape and returns decoded images."""
    pipe = load_pipeline(unconditional_model)

    class HalfSize(PixelCodec):
        def __init__(self):
            super().__init__(3, 16)
            self.shape = (4, 8, 8)

        def decode(self, x):
            return torch.nn.functional.interpolate(x[:, :3], scale_factor=2).clamp(-1, 1)

    seen = []
    pipe.codec = HalfSize()
    pipe.net = lambda x, t, *cond: (seen.append(tuple(x.shape)), torch.zeros_like(x))[1]
    pipe.net.parameters = lambda: iter([torch.zeros(1)])
    images = generate(pipe, SamplingRequest(num=2, steps=3, sampler="ddim"), progress=False)
    assert seen == [(2, 4, 8, 8)] * 3 and images.shape == (2, 16, 16, 3)
