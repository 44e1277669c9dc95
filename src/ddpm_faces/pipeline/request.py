"""One sampling request: every option of a generation, its one set of defaults, and its one check; and one edit
request (EditRequest): what an edit does to a photo.

    request = SamplingRequest(num=16, seed=0, sampler="dpmpp-2m", steps=20, attributes={"gender": "Female"},
                              guidance=3.0).validate(pipe)

`ddpm-faces sample`, `eval`, `eval --attributes`, the in-training samples and FID, and the web app all
build one of these; `validate` raises UserError with a message that names the field.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..diffusion import (DEFAULT_EDIT_STEPS, DEFAULT_SAMPLER, DEFAULT_STEPS, REGISTRY, SAMPLERS, SPACINGS, SamplerSpec, sampler_spec,
                         sampling_timesteps)
from ..errors import UserError
from ..hardware import PRECISIONS, resolve_precision
from .runtime import KINDS as RUNTIMES

SAMPLING_PRECISIONS = PRECISIONS                 # auto | fp32 | bf16 | fp16: the network's; the sampler stays fp32
MAX_SEED = 2**63 - 1
# Guidance only in the middle of the noise levels (Kynkaenniemi et al. 2024, https://arxiv.org/abs/2404.07724):
# timesteps 0.2 (T-1) .. 0.96 (T-1). On cascade128 (500 faces, 8 steps, guidance 3) FID 52.2 against 52.4 for
# guiding every step, for 22 % less time (docs/results.md, benchmarks/unasked_attributes.py --guidance-interval).
GUIDANCE_BAND = (0.2, 0.96)
ANY = ("", "any", None)                          # attribute values that mean "not asked for"
UNASKED = ("data", "photo", "model")             # attributes not asked for: drawn from the data, an edited photo's own
#                                                  (evaluation.attributes.keep_photo_attributes), or left to the model


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingRequest:
    num: int = 16                                # images; image i depends only on (seed, i)
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER               # a name in diffusion.SAMPLERS
    steps: int = DEFAULT_STEPS                   # timesteps visited (network calls: see `nfe`)
    spacing: str | None = None                   # where the steps fall; None = the sampler's default
    eta: float = 0.0                             # DDIM only: 0 deterministic, 1 like DDPM
    guidance: float = 3.0                        # classifier-free guidance scale w; 1 = plain conditional. 3: with the
    #                                              unasked attributes drawn from the data, the lowest FID (docs/results.md)
    guidance_interval: tuple[float, float] | None = None    # guide only at timesteps lo <= t <= hi; None: the
    #                                              GUIDANCE_BAND of the model's timesteps (0 T-1: every step)
    precision: str = "auto"                      # auto (bf16 where the device has bf16 units, else fp32) | fp32 | bf16 | fp16 (GPU)
    runtime: str = "plain"                       # plain (PyTorch) | onnx (ONNX Runtime, fp32 on the CPU: pipeline/runtime.py)
    attributes: dict[str, str] = field(default_factory=dict)   # conditional models: name -> value
    unasked: str = "data"                        # the attributes not asked for: "data" draws them per image from the
    #                                              training data's frequencies given the asked ones (model.label_counts),
    #                                              "photo" (edits) keeps the photo's own, "model" leaves them unspecified
    batch_size: int = 16                         # images per network batch (the images do not depend on it beyond float rounding)
    sr_steps: int | None = None                  # a cascade's super-resolution stage: its steps (None: its config's)
    sr_level: int | None = None                  # ... the noise level its low-resolution image is augmented to
    sr_guidance: float | None = None             # ... its guidance with stage 1's attributes

    @property
    def spec(self) -> SamplerSpec:
        return sampler_spec(self.sampler)

    @property
    def nfe(self) -> int:
        """Network evaluations per image (twice that for guided steps, in one batched call each)."""
        return self.spec.network_evaluations(self.steps)

    @property
    def timestep_spacing(self) -> str:
        return self.spacing or self.spec.spacing

    @property
    def deterministic(self) -> bool:
        """The images depend on their start only (no noise drawn during sampling)."""
        return not self.spec.stochastic and not self.eta

    def sampler_options(self) -> dict:
        """The keyword options this sampler takes (e.g. DDIM's eta)."""
        return {name: getattr(self, name) for name in self.spec.options}

    def interval_for(self, timesteps: int) -> tuple[float, float]:
        """The timesteps lo..hi where guidance applies on a model with `timesteps` steps."""
        if self.guidance_interval is not None:
            return tuple(self.guidance_interval)
        return GUIDANCE_BAND[0] * (timesteps - 1), GUIDANCE_BAND[1] * (timesteps - 1)

    def replace(self, **changes) -> SamplingRequest:
        return dataclasses.replace(self, **changes)

    def for_stage(self, stage) -> SamplingRequest:
        """The request a super-resolution stage (a Pipeline) runs: the same seed, attributes, sampler and precision,
        with its own steps, augmentation level and guidance (the request's sr_* values, else its config's)."""
        lr = stage.cfg.lowres
        return self.replace(steps=self.sr_steps if self.sr_steps is not None else lr.sample_steps,
                            sr_level=self.sr_level if self.sr_level is not None else lr.sample_level,
                            guidance=self.sr_guidance if self.sr_guidance is not None else lr.guidance,
                            guidance_interval=None)

    def validate(self, pipe) -> SamplingRequest:
        """Check every field against the model `pipe` (a Pipeline); returns the request with the attributes
        left to the model ('any', '' or None) dropped and the precision resolved ("auto" -> "bf16" or "fp32").
        Raises UserError naming the field."""
        self._check_counts()
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise UserError(f"unknown spacing {self.spacing!r}: choose one of {', '.join(SPACINGS)}")
        T = pipe.schedule.T
        if not _is_int(self.steps) or not 1 <= self.steps <= T:
            raise UserError(f"steps must be a whole number from 1 to {T} (the model's timesteps), got {self.steps!r}")
        try:
            sampling_timesteps(pipe.schedule, self.steps, self.timestep_spacing)
        except ValueError as err:
            raise UserError(f"{self.steps} steps do not work with the {self.sampler} sampler on this model: {err}"
                            ) from None
        self._check_guidance()
        if self.unasked not in UNASKED:
            raise UserError(f"unknown unasked {self.unasked!r}: choose data (draw the attributes not asked for from "
                            "the training data), photo (an edit keeps the photo's own) or model (leave them to the "
                            "model)")
        self._check_stage2(pipe)
        precision = self._check_runtime(pipe)
        wanted = {k: v for k, v in (self.attributes or {}).items() if v not in ANY}
        pipe.labels(wanted, 1)                   # unknown names or values, or an unconditional model
        return self.replace(attributes=wanted, precision=precision)

    def _check_runtime(self, pipe) -> str:
        """The precision this request runs in: "auto" becomes what the device computes natively, or fp32 for
        ONNX Runtime, which runs the network in fp32 on the CPU."""
        if self.runtime not in RUNTIMES:
            raise UserError(f"unknown runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        if self.runtime == "plain":
            return resolve_precision(self.precision, pipe.device)
        if pipe.device.type != "cpu":
            raise UserError(f"runtime onnx runs on the CPU; the model is on {pipe.device}: use runtime plain")
        if self.precision not in ("auto", "fp32"):
            raise UserError(f"runtime onnx runs fp32, not {self.precision}: use precision auto or fp32, or runtime "
                            "plain")
        return "fp32"

    def _check_stage2(self, pipe) -> None:
        """The sr_* options: only for a super-resolution stage, in range."""
        given = [f"sr_{k}" for k in ("steps", "level", "guidance") if getattr(self, f"sr_{k}") is not None]
        if not getattr(pipe, "superres", False):
            if given:
                raise UserError(f"{', '.join(given)} apply to a cascade's super-resolution stage; this model has one "
                                "stage: leave them out")
            return
        T = pipe.schedule.T
        if self.sr_steps is not None and (not _is_int(self.sr_steps) or not 1 <= self.sr_steps <= T):
            raise UserError(f"sr_steps must be a whole number from 1 to {T}, got {self.sr_steps!r}")
        if self.sr_level is not None and (not _is_int(self.sr_level) or not 0 <= self.sr_level < T):
            raise UserError(f"sr_level must be a timestep from 0 to {T - 1}, got {self.sr_level!r}")
        if self.sr_guidance is not None and (not _is_number(self.sr_guidance) or self.sr_guidance < 0):
            raise UserError(f"sr_guidance must be a number >= 0, got {self.sr_guidance!r}")

    def _check_counts(self) -> None:
        if not _is_int(self.num) or self.num < 1:
            raise UserError(f"num must be a whole number of at least 1, got {self.num!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be a whole number from 0 to {MAX_SEED}, got {str(self.seed)[:40]}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise UserError(f"batch size must be a whole number of at least 1, got {self.batch_size!r}")

    def _check_guidance(self) -> None:
        if not _is_number(self.eta) or self.eta < 0:
            raise UserError(f"eta must be a number >= 0, got {self.eta!r}")
        if self.eta and "eta" not in self.spec.options:
            takes = ", ".join(s.name for s in REGISTRY.values() if "eta" in s.options)
            raise UserError(f"eta is an option of the {takes} sampler(s), not of {self.sampler}: leave it at 0")
        if not _is_number(self.guidance) or self.guidance < 0:
            raise UserError(f"guidance must be a number >= 0 (1 = no guidance), got {self.guidance!r}")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not (_is_number(lo) and _is_number(hi)) or lo > hi:
                raise UserError(f"guidance interval {lo!r} {hi!r}: two timesteps LO <= HI")

    def cli_flags(self, *, attributes: bool = True) -> str:
        """The `ddpm-faces sample` flags that ask for this request (defaults left out)."""
        default = SamplingRequest()
        parts = [f"--seed {self.seed} --num {self.num} --sampler {self.sampler} --steps {self.steps}"]
        for name in ("spacing", "eta", "guidance", "precision", "runtime", "unasked", "sr_steps", "sr_level",
                     "sr_guidance"):
            value = getattr(self, name)
            if value != getattr(default, name):
                flag = name.replace("_", "-")
                parts.append(f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}")
        if self.guidance_interval is not None:
            parts.append("--guidance-interval {:g} {:g}".format(*self.guidance_interval))
        if attributes:
            parts += [f"--{k} '{v}'" for k, v in self.attributes.items()]
        return " ".join(parts)


# docs/editing.md "The strength": the asked attributes show and the person is kept
DEFAULT_STRENGTH = 0.8
MAX_RESAMPLE = 20                                # RePaint used 10 (on 250 steps)
# docs/editing.md "Inpainting seams": 5 takes the seam at the mask's edge from 1.59 to 1.22 at strength 1 (the
# photos' own edges: 1.17) and from 1.29 to 1.22 at 0.8; 10 does no better. Masked edits resample by default.
MASK_RESAMPLE = 5


@dataclass(frozen=True)
class EditRequest:
    """What an edit does to a photo, beside the SamplingRequest that says how to sample: its one set of defaults
    and its one check. pipeline/edit.py's EditPlan carries it out.

        edit = EditRequest(strength=0.6, invert=True).validate()
        faces = generate(pipe, SamplingRequest(num=4, attributes={"age": "60-69"}), plan=EditPlan(pipe, photo, edit))
    """
    strength: float = DEFAULT_STRENGTH           # the noise's share of the start: 0 = the photo back, 1 = a fresh sample
    invert: bool = False                         # start from the photo's DDIM inversion instead of noising it
    mask: object = field(default=None, compare=False)   # None, or a (1, 1, S, S) tensor: 1 = redraw, 0 = keep
    resample: int | None = None                  # inpainting: each ancestral step taken this many times (RePaint);
    #                                              None: MASK_RESAMPLE with a mask whose sampler has no own options set

    def validate(self) -> EditRequest:
        """Raises UserError naming the field; the mask's shape is checked against the photo by EditPlan."""
        s = self.strength
        if not _is_number(s) or not 0 <= s <= 1:
            raise UserError(f"strength must be a number from 0 (the photo back) to 1 (a fresh sample), got {s!r}")
        if not isinstance(self.invert, bool):
            raise UserError(f"invert must be true or false, got {self.invert!r}")
        if self.resample is not None and (not _is_int(self.resample) or not 1 <= self.resample <= MAX_RESAMPLE):
            raise UserError(f"resample must be a whole number from 1 (off) to {MAX_RESAMPLE}, got {self.resample!r}")
        if (self.resample or 1) > 1 and self.mask is None:
            raise UserError("resampling (RePaint) redraws a masked region: give a mask, or leave resample at 1")
        if self.mask is not None and not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise UserError("the mask must be black and white only (white = redraw, black = keep)")
        return self

    def resample_for(self, sampler_options: dict) -> int:
        """The resampling this edit runs with a sampler given `sampler_options` (SamplingRequest.sampler_options):
        as asked, else MASK_RESAMPLE for a mask, unless an option of the sampler's own is set (DDIM's eta),
        which RePaint's ancestral steps do not have."""
        if self.resample is not None:
            return self.resample
        if self.mask is None or any(sampler_options.values()):
            return 1
        return MASK_RESAMPLE

    def one_face(self, request: SamplingRequest) -> bool:
        """Whether every image of `request` is the same face: a DDIM-inverted start (no seed in it) run by a
        deterministic sampler, without a mask (whose kept region is re-noised with each image's seed)."""
        return self.invert and self.mask is None and request.deterministic and 0 < self.strength

    def cli_flags(self, mask_file: str | None = None) -> str:
        """The `ddpm-faces edit` flags that ask for this edit (the mask by its file name)."""
        parts = [f"--strength {self.strength:g}"]
        if self.invert:
            parts.append("--invert")
        if self.mask is not None and mask_file:
            parts.append(f"--mask {mask_file}")
        if self.resample is not None and self.mask is not None:
            parts.append(f"--resample {self.resample}")
        return " ".join(parts)

    def replace(self, **changes) -> EditRequest:
        return dataclasses.replace(self, **changes)
