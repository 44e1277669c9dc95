"""From a trained model to pictures: load a Pipeline (codec, denoiser, schedule), build a SamplingRequest,
generate.

    pipe = load_pipeline(None)                                  # the bundled model
    images = generate(pipe, SamplingRequest(num=16, seed=0))    # (16, H, W, 3) uint8
    edits = generate(pipe, SamplingRequest(num=4, attributes={"age": "60-69"}),
                     plan=EditPlan(pipe.stages[0], photo, EditRequest(strength=0.8)))    # a photo edited
"""
from .edit import EditPlan
from .generate import autocast_net, generate, interpolate, slerp, stage_steps, starting_noise
from .model import (Pipeline, build_codec, build_model, build_schedule, check_device, default_threads,
                    load_codec, load_pipeline, read_config, start_from)
from .request import (DEFAULT_EDIT_STEPS, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_STRENGTH, MASK_RESAMPLE, MAX_SEED, RUNTIMES,
                      SAMPLING_PRECISIONS, EditRequest, SamplingRequest)
from .runtime import fast_net

__all__ = [
    "EditPlan",
    "autocast_net", "generate", "interpolate", "slerp", "stage_steps", "starting_noise",
    "Pipeline", "build_codec", "build_model", "build_schedule", "check_device", "default_threads", "load_codec", "load_pipeline", "read_config", "start_from",
    "DEFAULT_EDIT_STEPS", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_STRENGTH", "MASK_RESAMPLE", "MAX_SEED", "RUNTIMES", "SAMPLING_PRECISIONS",
    "EditRequest", "SamplingRequest",
    "fast_net",
]
