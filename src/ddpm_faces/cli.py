"""The `ddpm-faces` command: train, sample, edit, eval, classifier, export, serve, data.

Thin over the library: parse the flags, build a config or a SamplingRequest, call the library, print. Every
UserError becomes one line `error: ...` and exit status 2, here in `main` and nowhere else, with its fix worded
in flags (FIXES).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import errors
from .errors import UserError

# The library names a remedy (errors.py); the command line words it in flags, with the error's facts
FIXES = {
    errors.RESUME: ": ddpm-faces train --config {run_dir} --resume",
    errors.NEW_RUN: ": pass --resume to continue it, or pick another run name with --set name=<new>",
    errors.OTHER_NAME: " with --set name=<new>",
    errors.RESUME_AS_SAVED: "; resume with the run's own config (--config {saved})",
    errors.NOT_RESUMING: " (leave out --resume)",
    errors.RUN_LONGER: "; to train further raise it: ddpm-faces train --config {run_dir} --resume "
                       "--set train.max_steps={steps}",
    errors.MORE_PATIENCE: "; to train further raise the patience (0 = never stop): ddpm-faces train --config "
                          "{run_dir} --resume --set train.patience={patience}",
    errors.OTHER_OUT_DIR: " (--set train.out_dir=DIR)",
    errors.CACHE_ELSEWHERE: " (or --cache-dir DIR)",
    errors.CPU_DEVICE: ": use --device cpu",
    errors.CENTRE_SQUARE: ", or --no-detect to take its centre square as it is",
    errors.WITHOUT_DETECTOR: ", or go on without it (eval: --no-face-rate; edit and upscale: --no-detect)",
    errors.OTHER_MODEL: ", or pass --checkpoint with a run, export or checkpoint folder",
}


def _train(args) -> None:
    from .config import load_config
    from .runs import RunFolder
    from .training import train

    config = args.config
    if config is None and args.resume:
        raise UserError("--resume needs --config: the run folder or its config file, e.g. --config runs/<name>")
    if args.resume:
        check_resumed_run_exists(config)
    cfg = load_config(config or "quickstart", args.set)
    if args.data:
        cfg.data.source = args.data                  # taken as it is: a path is not YAML
    if args.compile:
        cfg.train.compile = True
    if args.until_step is not None and args.until_step < 1:
        raise UserError(f"--until-step must be a positive step number, got {args.until_step}")
    result = train(cfg, resume=args.resume, progress=not args.no_progress, until_step=args.until_step)
    if not result.is_main:
        return
    metric = cfg.train.best_metric.replace("_", " ").replace("fid", "FID")
    best = f", best {metric} {result.best:.5f}" if result.best is not None else ""
    skipped = f" ({result.skipped_steps} skipped for a non-finite loss)" if result.skipped_steps else ""
    if result.interrupted or result.step < cfg.train.max_steps and not result.stopped_early:
        why = "interrupted" if result.interrupted else "paused"
        print(f"{why} after {result.step} steps{skipped}; checkpoint saved. Continue with: ddpm-faces train "
              f"--config {result.run_dir} --resume")
        return
    print(f"trained {result.step} steps{skipped}{best}; model exported to {RunFolder(result.run_dir).export}")


def check_resumed_run_exists(config: str) -> None:
    """--resume --config runs/<name> (or its config.yaml) for a run that is not there: name the runs that are."""
    from .runs import CONFIG_FILE, missing_run_error

    path = Path(config)
    if path.exists() or (str(path) == path.name and not path.suffix):      # a bundled config's name
        return
    folder = path.parent.parent if path.name == CONFIG_FILE else path.parent
    raise missing_run_error(config, folder)


def _set_threads(threads: int | None) -> None:
    """--threads, or all cores but one: sampling with every core collapses when another process holds one."""
    import torch

    from .pipeline import default_threads

    torch.set_num_threads(threads or default_threads())


def check_name_lengths(path: str, flag: str) -> None:
    """Fail before any work when a file or folder name in `path` is longer than a file system allows."""
    from .io import NAME_MAX, name_bytes

    long = [part for part in Path(path).parts if name_bytes(part) > NAME_MAX]
    if long:
        raise UserError(f"a file or folder name in {flag} is {name_bytes(long[0])} bytes long, more than the "
                        f"{NAME_MAX} a file system allows: use a shorter name")


# Every argument that names a path, by its argparse dest: checked once, in main, before any command runs
PATH_ARGS = {"out": "--out", "strip": "--strip", "checkpoint": "--checkpoint", "save_individual": "--save-individual",
             "json": "--json", "cache_dir": "--cache-dir", "image": "--image", "mask": "--mask", "data": "--data",
             "config": "--config", "reference": "--reference", "classifier": "--classifier", "source": "the source",
             "photo": "the photo"}


def check_path_names(args: argparse.Namespace) -> None:
    """One check for every path the user names: a file or folder name longer than a file system allows is one
    line before any work (hub names such as hf:org/name are names too, and as short)."""
    for dest, flag in PATH_ARGS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and value:
            check_name_lengths(value, flag)


def check_image_path(path: str, flag: str = "--out") -> None:
    """Fail before any work when an output image could not be written (tries to create it)."""
    from PIL import Image

    out = Path(path)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the image format of {path!r} from its extension: use .png, .jpg or .webp")
    Image.init()
    if fmt not in Image.SAVE:
        raise UserError(f"{out.suffix} images can be read but not written: use .png, .jpg or .webp for {out.name}")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
        if not existed:
            out.unlink()
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; choose another {flag}") from None


MAX_UPSCALE = 16                 # --upscale: a 16-face grid of 128 px faces becomes 8,224 px square at most
MAX_NUM = 100_000                # --num: more is a job of days; run it in parts with --seed


def upscale_factor(text: str) -> int:
    value = positive_int(text)
    if value > MAX_UPSCALE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_UPSCALE}, got {value}")
    return value


def image_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_NUM:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NUM:,}, got {value:,}: ask for fewer images, or "
                                         "run several commands with other --seed values")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


ATTRIBUTE_FLAGS = ("age", "gender", "race")


def bundled_vocab() -> dict[str, list[str]]:
    """The attribute values the bundled default model knows, for --help ({} where it cannot be read)."""
    from .pipeline import read_config
    from .runs import DEFAULT_MODEL, bundled

    try:
        return dict(read_config(bundled(DEFAULT_MODEL)).model.vocab)
    except (UserError, OSError, AttributeError):
        return {}


def add_sampling_flags(p: argparse.ArgumentParser, *, num: int, batch_size: int, guidance_scales: bool = False,
                       steps: int | None = None, edit: bool = False):
    """The flags of a SamplingRequest, declared once for every command that samples."""
    from .diffusion import REGISTRY, SAMPLERS, SPACINGS
    from .pipeline import RUNTIMES, SAMPLING_PRECISIONS, SamplingRequest
    from .pipeline.request import UNASKED

    default = SamplingRequest()
    p.add_argument("--num", type=image_count, default=num, help=f"number of faces (default {num})")
    p.add_argument("--seed", type=int, default=default.seed, help="image i of a seed is the same whatever --num")
    p.add_argument("--sampler", default=default.sampler, choices=SAMPLERS,
                   help="; ".join(f"{s.name}: {s.calls_per_step} network call(s) per step" for s in REGISTRY.values())
                        + f" (default {default.sampler})")
    steps = steps or default.steps
    p.add_argument("--steps", type=positive_int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--spacing", choices=SPACINGS, help="where the steps fall; default: " + ", ".join(
        f"{s.spacing} for {s.name}" for s in REGISTRY.values()))
    p.add_argument("--eta", type=float, default=default.eta, help="DDIM noise: 0 deterministic, 1 like DDPM")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"images per network batch (default {batch_size}; the images do not depend on it, up to "
                        "float rounding)")
    p.add_argument("--precision", default=default.precision, choices=SAMPLING_PRECISIONS,
                   help="auto (default): bf16 where the CPU or GPU has bf16 units (AMX, AVX512-BF16), else fp32; "
                        "bf16 on a CPU without them is many times slower; fp16 needs a GPU")
    p.add_argument("--runtime", default=default.runtime, choices=RUNTIMES,
                   help="onnx: the network through ONNX Runtime in fp32 on the CPU, 1.3-1.4x faster than plain "
                        "fp32 after a few seconds of export (pip install 'ddpm-faces[fast]'); plain by default")
    known = bundled_vocab()
    for name in ATTRIBUTE_FLAGS:
        values = f"; the bundled models know {', '.join(known[name])}" if known.get(name) else ""
        p.add_argument(f"--{name}", help=f"conditional models: the {name} to ask for (default: any){values}")
    if edit:
        p.add_argument("--unasked", default="photo", choices=("photo", "model"),
                       help="the attributes not asked for: photo (default) keeps the photo's own, as the bundled "
                            "attribute classifier reads them; model leaves them to the model (they may drift)")
    else:
        p.add_argument("--unasked", default=default.unasked, choices=[u for u in UNASKED if u != "photo"],
                       help="the attributes not asked for: data (default) draws them for each face from the "
                            "training data's frequencies, given the ones asked, and guides them; model leaves them "
                            "to the model")
    if guidance_scales:
        p.add_argument("--guidance", type=float, nargs="+",
                       help="classifier-free guidance scale w (1 = none); with --attributes, several scales "
                            "(default 1 2 3 5)")
    else:
        p.add_argument("--guidance", type=float, default=default.guidance,
                       help="classifier-free guidance scale w (1 = plain conditional, larger = stronger attributes)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at timesteps LO <= t <= HI (default: 0.2 to 0.96 of the model's timesteps, "
                        "200 to 959 of 1000, the same FID as every step for less time; 0 999: every step)")
    p.add_argument("--sr-steps", type=positive_int, help="a cascade's super-resolution stage: its steps "
                                                          "(default: the stage's lowres.sample_steps)")
    p.add_argument("--sr-level", type=int, help="... the noise level (timestep) its low-resolution image is "
                                                "augmented to (default: lowres.sample_level)")
    p.add_argument("--sr-guidance", type=float, help="... its guidance scale (default: lowres.guidance)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads for torch (default: all cores but one, so that a busy machine does not "
                        "slow sampling down several times)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def request_from_args(args, **changes):
    """The SamplingRequest that the shared sampling flags describe (checked later, against the model)."""
    from .pipeline import SamplingRequest

    guidance = args.guidance if args.guidance is not None else SamplingRequest().guidance
    if isinstance(guidance, list):
        guidance = guidance[0]
    interval = tuple(args.guidance_interval) if args.guidance_interval is not None else None
    request = SamplingRequest(num=args.num, seed=args.seed, sampler=args.sampler, steps=args.steps,
                              spacing=args.spacing, eta=args.eta, guidance=guidance, guidance_interval=interval,
                              precision=args.precision, runtime=args.runtime, batch_size=args.batch_size,
                              unasked=args.unasked,
                              sr_steps=args.sr_steps, sr_level=args.sr_level, sr_guidance=args.sr_guidance,
                              attributes={name: getattr(args, name) for name in ATTRIBUTE_FLAGS
                                          if getattr(args, name) is not None})
    return request.replace(**changes)


def _sample(args) -> None:
    import numpy as np

    from PIL import Image

    from .images import DenoisingStrip, label_rows, make_grid, provenance, save_image
    from .pipeline import generate, load_pipeline, stage_steps
    from .runs import model_name

    _set_threads(args.threads)
    check_image_path(args.out)
    if args.strip:
        check_image_path(args.strip, "--strip")
    if args.save_individual:
        try:
            Path(args.save_individual).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            why = "it is a file, not a folder" if isinstance(err, FileExistsError) else err.strerror or err
            raise UserError(f"cannot write into {args.save_individual}: {why}; choose another --save-individual"
                            ) from None
    pipe = load_pipeline(args.checkpoint, device=args.device)
    request = request_from_args(args).validate(pipe)           # every bad option: one line, before any work
    progress = not args.no_progress
    checkpoint = f"--checkpoint {args.checkpoint} " if args.checkpoint else ""
    grid_by = f" --grid-by {args.grid_by}" if args.grid_by else ""
    layout = "".join(f" --{k} {v}" for k, v in (("nrow", args.nrow), ("upscale", args.upscale)) if v not in (None, 1))
    command = f"ddpm-faces sample {checkpoint}{request.cli_flags()}{grid_by}{layout}"
    text = provenance(f"{command} --out {Path(args.out).name}" + (f" --strip {Path(args.strip).name}" if args.strip
                      else ""), model_name(pipe.source), pipe.step)
    if args.grid_by:
        rows = grid_rows(pipe, args.grid_by, request.attributes)
        # the same seeds and the same drawn attributes in every row: the attribute is the only thing that changes
        images = [generate(pipe, request.replace(attributes={**request.attributes, args.grid_by: value}),
                           labels=labels, progress=progress)
                  for value, labels in zip(rows, row_labels(pipe, request, args.grid_by, rows))]
        grid = make_grid(np.concatenate(images), nrow=args.num)
        grid = np.asarray(Image.fromarray(grid).resize((grid.shape[1] * args.upscale, grid.shape[0] * args.upscale),
                                                       Image.NEAREST))            # the labels are drawn at full size
        out = save_image(label_rows(grid, rows, pad=2 * args.upscale, size=max(12, 6 * args.upscale)), args.out, text=text)
        print(f"wrote {len(rows)} rows of {args.num} faces ({args.grid_by}: {', '.join(rows)}) to {out}")
        return
    strip = DenoisingStrip(stage_steps(pipe, request), request.num) if args.strip else None
    images = generate(pipe, request, callback=strip, progress=progress)
    out = save_image(make_grid(images, nrow=args.nrow), args.out, upscale=args.upscale, text=text)
    print(f"wrote {len(images)} faces to {out}")
    if strip is not None:
        print(f"wrote the denoising steps to "
              f"{save_image(strip.picture(), args.strip, upscale=args.upscale, text=text)}")
    if args.save_individual:
        folder = Path(args.save_individual)
        for i, img in enumerate(images):
            save_image(img, folder / f"seed{args.seed}-{i:04d}.png", upscale=args.upscale, text=text)
        print(f"wrote {len(images)} images to {folder}/")


def _edit(args) -> None:
    """ddpm-faces edit: SDEdit / DDIM inversion / inpainting of a real photo (pipeline/edit.py)."""
    import numpy as np
    import torch

    from .images import to_model_range
    from .evaluation.attributes import keep_photo_attributes
    from .photos.framing import frame_photo, open_photo
    from .images import EDITED, enlarge, make_grid, provenance, save_image
    from .pipeline import EditPlan, EditRequest, generate, load_pipeline
    from .runs import model_name

    _set_threads(args.threads)
    check_image_path(args.out)
    pipe = load_pipeline(args.checkpoint, device=args.device)
    request = request_from_args(args).validate(pipe)
    first = pipe.stages[0]                  # a cascade edits at its stage 1; the later stages upscale the edit
    size = first.codec.image_size
    framed = frame_photo(open_photo(args.image), size, detect=not args.no_detect)
    if framed.faces > 1:
        print(f"{framed.faces} faces found: editing the largest", file=sys.stderr)
    photo = to_model_range(torch.from_numpy(framed.image.copy())[None])
    mask = read_mask(args.mask, framed, size) if args.mask else None
    edit = EditRequest(strength=args.strength, invert=args.invert, mask=mask, resample=args.resample)
    plan = EditPlan(first, photo, edit, seed=request.seed)
    request, kept = keep_photo_attributes(request, first.cfg.model.vocab, framed.image)
    if kept:
        print("kept from the photo (as the attribute classifier reads it): " + ", ".join(
              f"{k} {v}" for k, v in kept.items()) + "; ask for one to change it, or --unasked model to leave them "
              "to the model", file=sys.stderr)
    if edit.one_face(request) and request.num > 1:
        print(f"--invert with the deterministic {request.sampler} sampler gives one face whatever the seed: drawing "
              "1 (for variations: --sampler ddpm, or --sampler ddim --eta 1)", file=sys.stderr)
        request = request.replace(num=1)
    images = generate(pipe, request, plan=plan, progress=not args.no_progress)
    if args.compare:
        images = np.concatenate([enlarge(framed.image[None], images.shape[1]), images])
    flags = " ".join(f for f in (f"--checkpoint {args.checkpoint}" if args.checkpoint else "", f"--image {Path(args.image).name}",
                                 edit.cli_flags(Path(args.mask).name if args.mask else None),
                                 "--no-detect" if args.no_detect else "", "--compare" if args.compare else "",
                                 request.cli_flags(), f"--upscale {args.upscale}" if args.upscale > 1 else "",
                                 f"--out {Path(args.out).name}") if f)
    text = provenance(f"ddpm-faces edit {flags}", model_name(pipe.source), pipe.step, note=EDITED)
    nrow = args.nrow or (len(images) if args.compare else None)          # before/after: one strip
    picture = images[0] if len(images) == 1 else make_grid(images, nrow=nrow)     # one face: no grid border
    out = save_image(picture, args.out, upscale=args.upscale, text=text)
    print(f"wrote {len(images) - bool(args.compare)} edited face(s){' after the photo' if args.compare else ''} to {out}")


def _upscale(args) -> None:
    """ddpm-faces upscale: a small real face to 128 px through a cascade's super-resolution stage (generative:
    the detail is drawn by the model, not recovered from the photo)."""
    import numpy as np
    import torch

    from .images import to_model_range
    from .photos.framing import frame_photo, open_photo
    from .images import UPSCALED, enlarge, make_grid, provenance, save_image
    from .pipeline import SamplingRequest, generate, load_pipeline
    from .runs import DEFAULT_UPSCALER, model_name

    _set_threads(args.threads)
    check_image_path(args.out)
    pipe = load_pipeline(args.checkpoint or DEFAULT_UPSCALER, device=args.device, stage1=False)
    if not pipe.superres:
        raise UserError(f"{pipe.source} is not a super-resolution stage: give a cascade (e.g. {DEFAULT_UPSCALER})")
    request = SamplingRequest(num=args.num, seed=args.seed, sampler=args.sampler, precision=args.precision,
                              sr_steps=args.steps, sr_level=args.level).validate(pipe)
    side = pipe.cfg.lowres.resolution
    framed = frame_photo(open_photo(args.photo), side, detect=not args.no_detect)
    if framed.faces > 1:
        print(f"{framed.faces} faces found: upscaling the largest", file=sys.stderr)
    lowres = to_model_range(torch.from_numpy(framed.image.copy())[None]).repeat(args.num, 1, 1, 1)
    images = generate(pipe, request, lowres=lowres, progress=not args.no_progress)
    if args.compare:
        images = np.concatenate([enlarge(framed.image[None], images.shape[1]), images])
    flags = " ".join(f for f in (Path(args.photo).name, f"--checkpoint {args.checkpoint}" if args.checkpoint else "",
                                 f"--seed {args.seed}", f"--num {args.num}" if args.num > 1 else "",
                                 f"--steps {args.steps}" if args.steps else "", f"--level {args.level}"
                                 if args.level is not None else "", "--no-detect" if args.no_detect else "") if f)
    text = provenance(f"ddpm-faces upscale {flags}", model_name(pipe.source), pipe.step, note=UPSCALED)
    picture = images[0] if len(images) == 1 else make_grid(images, nrow=len(images))
    out = save_image(picture, args.out, text=text)
    what = f"{args.num} upscaled face(s)" + (" after the bicubic enlargement" if args.compare else "")
    print(f"wrote {what} ({side} -> {images.shape[1]} px) to {out}")


def read_mask(path: str, framing, size: int):
    """A black-and-white mask of the photo's size (white = redraw), framed like the photo, as (1, 1, S, S)."""
    import numpy as np
    import torch

    from .photos.framing import frame_mask, open_photo

    img = open_photo(path).convert("L")
    if img.size != framing.photo_size:
        raise UserError(f"the mask {path} is {img.width}x{img.height} but the photo is {framing.photo_size[0]}x"
                        f"{framing.photo_size[1]}: draw the mask on the photo itself")
    values = np.asarray(img)
    if not np.isin(values, (0, 255)).all():
        raise UserError(f"the mask {path} must be black (keep) and white (redraw) only, without grey or "
                        "anti-aliased edges")
    return torch.from_numpy(frame_mask(values > 127, framing, size))[None, None]


def grid_rows(pipe, attribute: str, attributes: dict) -> list[str]:
    """The values of `attribute` for a --grid-by picture, checked against the model."""
    m = pipe.cfg.model
    if not m.attributes:
        raise UserError(f"--grid-by {attribute}: this model ({pipe.source}) is unconditional")
    if attribute not in m.attributes:
        raise UserError(f"--grid-by {attribute}: the model is conditioned on {', '.join(m.attributes)} only")
    if attribute in attributes:
        raise UserError(f"--grid-by {attribute} varies the {attribute}: do not also pass --{attribute}")
    return list(m.vocab[attribute])


def row_labels(pipe, request, attribute: str, values: list[str]) -> list:
    """For each value of a --grid-by row: the labels of its faces, where the attributes not asked for are drawn
    from the data (request.unasked "data"): the same draw in every row, with `attribute` set to the row's value;
    None (the request's attributes) otherwise."""
    import torch

    from .pipeline.generate import drawn_labels

    base = drawn_labels(pipe.stages[0], request)
    if base is None:
        return [None] * len(values)
    m, column = pipe.cfg.model, pipe.cfg.model.attributes.index(attribute)
    return [base.clone().index_fill_(1, torch.tensor([column]), m.vocab[attribute].index(v)) for v in values]


def check_json_path(path: str | None) -> None:
    """Fail before an evaluation of minutes when its --json file could not be written."""
    if not path:
        return
    out = Path(path)
    probe = out.with_name(f".probe-{os.getpid()}")          # the file itself is written only at the end; a short
    #                                                         name, so that any name the file system allows passes
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; choose another --json") from None


def _write_json(path: str | None, result: dict) -> None:
    """The results, written whole at the end (atomically); a failure there (a full disk) is one line."""
    from .io import atomic_file

    if path:
        try:
            with atomic_file(Path(path)) as tmp:
                tmp.write_text(json.dumps(result, indent=2))
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}; the results above are complete, "
                            "run again with another --json") from None
        print(f"wrote {path}")


def _eval(args) -> None:
    from .evaluation.model_eval import evaluate_model, format_table
    from .pipeline import load_pipeline, read_config

    _set_threads(args.threads)
    check_json_path(args.json)
    if args.checkpoint and read_config(args.checkpoint).kind.codec:
        return _eval_codec(args)
    pipe = load_pipeline(args.checkpoint, device=args.device)
    if args.attributes:
        return _eval_attributes(args, pipe)
    if args.guidance is not None and len(args.guidance) > 1:
        raise UserError(f"--guidance takes several scales only with --attributes, got {args.guidance}")
    result = evaluate_model(pipe, request_from_args(args), reference=args.reference, split=args.split,
                            reference_num=args.reference_num, cache_dir=args.cache_dir,
                            with_face_rate=not args.no_face_rate, progress=not args.no_progress)
    print(format_table([result]))
    _write_json(args.json, result)


def _eval_codec(args) -> None:
    """An autoencoder: PSNR, SSIM and reconstruction FID on --reference-num images of the split (all by default)."""
    from .evaluation.model_eval import evaluate_codec
    from .pipeline import load_codec, read_config

    codec, d = load_codec(args.checkpoint, device=args.device), read_config(args.checkpoint).data
    result = evaluate_codec(codec, reference=args.reference, split=args.split, num=args.reference_num, crop=d.crop,
                            hf_config=d.hf_config, cache_dir=args.cache_dir, batch_size=args.batch_size,
                            progress=not args.no_progress)
    print(f"{result['num']} {args.split} images at {result['resolution']} px: PSNR {result['psnr']:.2f} dB, "
          f"SSIM {result['ssim']:.4f}, reconstruction FID {result['rfid']:.2f}")
    _write_json(args.json, result)


def _eval_attributes(args, pipe) -> None:
    from .evaluation.attributes import load_classifier
    from .evaluation.model_eval import attribute_agreement, format_agreement

    classifier = load_classifier(args.classifier)
    scales = args.guidance or [1.0, 2.0, 3.0, 5.0]
    result = attribute_agreement(pipe, classifier, request_from_args(args), reference=args.reference,
                                 guidance_scales=scales, split=args.split, cache_dir=args.cache_dir,
                                 with_fid=not args.no_fid, progress=not args.no_progress)
    print(format_agreement(result))
    _write_json(args.json, result)


def _classifier(args) -> None:
    from .data import prepare_dataset
    from .evaluation.attributes import ClassifierTraining, save_classifier, train_classifier

    _set_threads(args.threads)
    data = prepare_dataset(args.data, args.resolution, cache_dir=args.cache_dir)
    clf, acc = train_classifier(data, args.attribute, ClassifierTraining(steps=args.steps, seed=args.seed),
                                progress=not args.no_progress)
    note = (f"ddpm-faces classifier --data {args.data} --resolution {args.resolution} --steps {args.steps} "
            f"--seed {args.seed}")
    out = save_classifier(clf, args.out, acc, note)
    print("val accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f"; wrote {out}")


def _export(args) -> None:
    import torch

    from .pipeline import load_codec, load_pipeline, read_config
    from .runs import export_model

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    cfg = read_config(args.checkpoint)
    if cfg.kind.codec:                 # a codec, with its latent statistics
        net, step, codec, source = load_codec(args.checkpoint), None, None, args.checkpoint
    else:
        pipe = load_pipeline(args.checkpoint)
        net, cfg, step, codec, source = pipe.net, pipe.cfg, pipe.step, pipe.codec, pipe.source
    out = export_model(net, cfg, Path(args.out), dtype=dtype, step=step, codec=codec)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"exported {source} to {out} ({args.dtype}, {size:.1f} MiB)")


def _serve(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web app needs gradio: pip install 'ddpm-faces[app]'") from None
    from .app import serve

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {args.port}")
    serve(args.checkpoint, host=args.host, port=args.port, share=args.share, threads=args.threads,
          runtime=args.runtime)


def _data(args) -> None:
    from .data import prepare_dataset

    data = prepare_dataset(args.source, args.resolution, crop=args.crop, cache_dir=args.cache_dir,
                           hf_config=args.hf_config)
    m = data.meta
    print(f"{data.root}: {len(data.images)} images at {data.resolution} px "
          f"({len(data.indices('train'))} train, {len(data.indices('val'))} val)")
    for attr in data.attributes:
        print(f"  {attr}: {', '.join(data.vocab[attr])}")
    skipped = {k: v for k, v in m.get("counts", {}).items() if k.startswith(("skipped", "missing")) and v}
    if skipped:
        print("  " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors instead of a usage block."""

    def error(self, message: str):
        message = message.replace("\r", "\\r").replace("\n", "\\n")     # user text echoed back stays one line
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (TensorBoard logs, checkpoints, export in runs/<name>)")
    p.add_argument("--config", help="YAML config: a path or a name in configs/ (default: quickstart)")
    p.add_argument("--data", help="face images: a folder (optional labels.csv), FairFace's release folder, "
                                  "a parquet file or folder, or hf:HuggingFaceM4/FairFace")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=2e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (same as --set train.compile=true)")
    p.add_argument("--until-step", type=int, metavar="N",
                   help="pause after step N with a checkpoint (the learning-rate schedule still runs to "
                        "train.max_steps): short runs that compare like with like, resumable later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate a grid of faces (default: the bundled model)")
    p.add_argument("--checkpoint", help="runs/<name>, its export/ or a checkpoints/step-N folder; "
                                        "default: the bundled model")
    add_sampling_flags(p, num=16, batch_size=16)
    p.add_argument("--out", default="faces.png", help="grid image to write (default faces.png)")
    p.add_argument("--nrow", type=positive_int, help="images per grid row (default: a square)")
    p.add_argument("--upscale", type=upscale_factor, default=1, help="enlarge the saved images by this factor (nearest)")
    p.add_argument("--save-individual", metavar="DIR", help="also save every face as its own PNG in DIR")
    p.add_argument("--strip", metavar="PNG", help="also save the predicted clean image along the way, one row "
                                                 "per face (a denoising strip)")
    p.add_argument("--grid-by", choices=ATTRIBUTE_FLAGS,
                   help="one row per value of this attribute, with the same seeds in every row")
    p.set_defaults(func=_sample)


def _edit_parser(sub) -> None:
    from .diffusion import DEFAULT_EDIT_STEPS
    from .pipeline import DEFAULT_STRENGTH, MASK_RESAMPLE

    p = sub.add_parser("edit", help="edit a real photo: change its age or gender, or redraw a masked region")
    p.add_argument("--image", required=True, help="the photo (JPEG, PNG ...); its largest face is framed like "
                                                  "the training faces")
    p.add_argument("--checkpoint", help="a run, export or checkpoint folder; default: the bundled model")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="the share of noise the photo is taken to before the model redraws it: 0 gives it back, "
                        "0.5 changes little, 0.8 shows the asked age or gender, 1 is a fresh sample (default "
                        f"{DEFAULT_STRENGTH})")
    p.add_argument("--invert", action="store_true",
                   help="start from the photo's DDIM inversion instead of fresh noise (keeps more of the person)")
    p.add_argument("--mask", help="black and white image of the photo's size: white = redraw, black = keep")
    p.add_argument("--resample", type=positive_int, metavar="N",
                   help="with --mask: RePaint's resampling, N ancestral (DDPM) steps per timestep of the sampler's "
                        "schedule, so the redrawn region fits the kept one without a seam (N times the network "
                        f"calls; default {MASK_RESAMPLE} with --mask, 1 = off)")
    p.add_argument("--no-detect", action="store_true", help="take the photo's centre square instead of finding "
                                                            "the face")
    p.add_argument("--compare", action="store_true", help="put the framed photo first in the output")
    add_sampling_flags(p, num=4, batch_size=16, steps=DEFAULT_EDIT_STEPS, edit=True)
    p.add_argument("--out", default="edited.png", help="image to write (default edited.png)")
    p.add_argument("--nrow", type=positive_int, help="images per row (default: a square)")
    p.add_argument("--upscale", type=upscale_factor, default=1, help="enlarge the saved image (nearest)")
    p.set_defaults(func=_edit)


def _upscale_parser(sub) -> None:
    from .diffusion import DEFAULT_SAMPLER, SAMPLERS
    from .pipeline import SAMPLING_PRECISIONS
    from .runs import DEFAULT_UPSCALER

    p = sub.add_parser("upscale", help="a small face photo to a 128 px face (generative: the model draws the "
                                       "detail, it does not recover it)")
    p.add_argument("photo", help="the photo (JPEG, PNG ...); its largest face is framed like the training faces "
                                 "and taken to the stage's low resolution (32 px)")
    p.add_argument("--out", default="upscaled.png", help="image to write (default upscaled.png)")
    p.add_argument("--checkpoint", help=f"a cascade (run, export or bundled name; default {DEFAULT_UPSCALER}); its "
                                        "super-resolution stage is used")
    p.add_argument("--seed", type=int, default=0, help="the upscaling's noise (default 0)")
    p.add_argument("--num", type=image_count, default=1, help="variants side by side (default 1)")
    p.add_argument("--no-detect", action="store_true", help="take the photo's centre square instead of finding "
                                                            "the face")
    p.add_argument("--compare", action="store_true", help="put the bicubic enlargement first")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the stage's lowres.sample_steps)")
    p.add_argument("--level", type=int, help="noise level (timestep) the small face is augmented to: higher "
                                             "invents more (default: the stage's lowres.sample_level)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    p.add_argument("--precision", default="auto", choices=SAMPLING_PRECISIONS)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_upscale)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="FID, KID, precision/recall and face rate of generated samples vs real faces")
    p.add_argument("--checkpoint", help="a run, export or checkpoint folder; default: the bundled model")
    add_sampling_flags(p, num=2000, batch_size=64, guidance_scales=True)
    p.add_argument("--reference", default="../shared/data/faces", help="real faces, any --data form "
                                                                       "(default ../shared/data/faces)")
    p.add_argument("--split", default="val", choices=["train", "val", "all"])
    p.add_argument("--reference-num", type=positive_int,
                   help="use N images spread evenly over the split (default: all of it)")
    p.add_argument("--cache-dir", help="where prepared data and reference statistics are cached")
    p.add_argument("--no-face-rate", action="store_true", help="skip the face detector")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--attributes", action="store_true",
                   help="conditional models: how often an attribute classifier reads what was asked for, per "
                        "guidance scale, with FID (uses --num samples per scale)")
    p.add_argument("--classifier", help="attribute classifier folder (default: the bundled one)")
    p.add_argument("--no-fid", action="store_true", help="--attributes without FID (faster)")
    p.set_defaults(func=_eval)


def _classifier_parser(sub) -> None:
    p = sub.add_parser("classifier", help="train the attribute classifier that `eval --attributes` uses")
    p.add_argument("--data", default="../shared/data/faces", help="labelled faces, any train --data form")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and config.yaml into")
    p.add_argument("--attribute", action="append", help="an attribute to learn (repeat; default: all labelled)")
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_classifier)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's EMA weights (safetensors) and config to a folder")
    p.add_argument("--checkpoint", required=True, help="runs/<name>, its export/ or a checkpoints/step-N folder")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and config.yaml into")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.set_defaults(func=_export)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="a web page that generates faces (Gradio; http://127.0.0.1:7860)")
    p.add_argument("--checkpoint", action="append", metavar="PATH",
                   help="a model to offer: runs/<name>, an export or checkpoint folder (repeat for several; "
                        "default: the bundled model(s) and every exported run under runs/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public share link (off unless given)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: all cores but one)")
    p.add_argument("--runtime", default="plain", choices=("plain", "onnx"),
                   help="onnx: requests that run in fp32 go through ONNX Runtime, 1.3-1.4x faster after a few "
                        "seconds of export per model (pip install 'ddpm-faces[fast]')")
    p.set_defaults(func=_serve)


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare (decode, crop, resize, cache) a face dataset and describe it")
    p.add_argument("source", help="same forms as train --data")
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--crop", default="center", choices=["center", "none"])
    p.add_argument("--hf-config", default="0.25", choices=["0.25", "1.25"])
    p.add_argument("--cache-dir")
    p.set_defaults(func=_data)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="ddpm-faces", description="Denoising diffusion models for human faces.")
    parser.add_argument("--version", action="version", version=f"ddpm-faces {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_train_parser, _sample_parser, _edit_parser, _upscale_parser, _eval_parser, _classifier_parser, _export_parser,
                _serve_parser, _data_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io import PipeSafe

    streams = sys.stdout, sys.stderr             # a reader that goes away (| head, a killed tee) must not end
    sys.stdout, sys.stderr = PipeSafe(sys.stdout), PipeSafe(sys.stderr)      # the work: writes stop there instead
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        check_path_names(args)
        args.func(args)
    except UserError as err:
        print(f"error: {err.worded(FIXES)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        sys.stdout, sys.stderr = streams
    return 0


if __name__ == "__main__":
    sys.exit(main())
