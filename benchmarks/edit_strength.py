"""Edit strength against what an edit does: attribute agreement and distance from the photo, SDEdit and --invert.

    python benchmarks/edit_strength.py --threads 1 --markdown --out benchmarks/results/edit-strength.json \\
        --plot docs/edit-strength.png --pictures docs              # --plot needs matplotlib

For --num val faces of --data at the model's size (spread evenly over the val faces whose age and gender are
labelled), each face is edited once per strength, with and without DDIM inversion, asking for an age bin and a
gender that are not the photo's own (guidance 3, DPM-Solver++ 20 steps, bf16, as flags):

- the asked gender is the other one of the two;
- the asked age bin is taken from the bins at least 3 bins away from the photo's own label, in the vocabulary's
  order (0-2 ... more than 70): the face's position i in the selection picks the (i mod count)-th of them, so the
  asked bins cover the whole range, young to old and old to young, the same for every strength and setting.

Face i starts from the noise of image i of --seed (the same for every strength, so the strengths are paired).
Per (strength, invert) it reports the share of edits in which the bundled attribute classifier reads the asked
age bin, the asked gender and both; PSNR between photo and edit after both are area-resized to 16 px (what the
edit kept of the photo's layout and colours, not its texture; per face, capped at 60 dB, then averaged); and the
mean L2 distance between the photo's and the edit's 2048-d Inception pool features (the FID feature space).
The share of edits the face detector still finds as faces, and how far apart the edits of two different photos
are (for the first --pairs faces, photo i + 1 is also edited exactly as photo i: the same noise and the same
asked values; the mean grey-level distance between the two edits at 16 px, near 0 where every photo becomes the
same face). Two reference rows: the classifier on the unedited photos (how often it already reads the asked values: the floor;
and its accuracy on their own labels), and each photo against the next selected one (PSNR and feature distance
between two different people).

Pictures (--pictures DIR, 4x nearest upscale): edit-strengths.png (one face; rows SDEdit, --invert; the photo,
then the strengths), edit-ages.png (the same face asked for every age bin at --picture-strength, its own gender
kept; rows SDEdit, --invert) and edit-inpaint.png (photo, mask (white = redraw), 4 inpainted faces at
--inpaint-strength with the face's own age and gender). The picture face is --face (a val file name), by default
the first val face of the FairFace part (CC BY 4.0, names fairface_*) labelled 20 to 49 years; the UTKFace part
is for non-commercial research only.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm_faces.hardware import machine_info, resolve_precision
from ddpm_faces.data import prepare_dataset, resolve_source
from ddpm_faces.images import to_model_range
from ddpm_faces.errors import UserError
from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.attributes import load_classifier
from ddpm_faces.photos.faces import face_rate
from ddpm_faces.images import EDITED, make_grid, provenance, save_image
from ddpm_faces.diffusion import DEFAULT_EDIT_STEPS
from ddpm_faces.pipeline import DEFAULT_STRENGTH
from ddpm_faces.pipeline import (DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLING_PRECISIONS, EditPlan, EditRequest, SamplingRequest,
                                 generate, load_pipeline)

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
MIN_AGE_GAP = 3                  # bins between the photo's age label and the one asked for
PSNR_SIZE = 16
PSNR_CAP = 60.0                  # dB: a face equal to the photo at 16 px counts as this much, not inf
ADULT_BINS = ("20-29", "30-39", "40-49")


# --------------------------------------------------------------------------- pure helpers (tested)


def edit_targets(age: int, gender: int, position: int, n_ages: int, n_genders: int = 2,
                 min_gap: int = MIN_AGE_GAP) -> tuple[int, int]:
    """(age bin, gender) to ask for, as vocabulary indices: the other gender, and among the bins at least
    `min_gap` away from `age` the (position mod count)-th, so that consecutive faces ask for different bins."""
    if not 0 <= age < n_ages or not 0 <= gender < n_genders:
        raise ValueError(f"labels out of range: age {age} of {n_ages}, gender {gender} of {n_genders}")
    far = [b for b in range(n_ages) if abs(b - age) >= min_gap]
    if not far:
        raise ValueError(f"no age bin is {min_gap} bins away from bin {age} of {n_ages}")
    return far[position % len(far)], (gender + 1) % n_genders


def spread(count: int, num: int) -> np.ndarray:
    """`num` positions out of range(count), evenly spread, first and last included (all when num >= count)."""
    if num >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, num).round().astype(np.int64))


def downsample(images: np.ndarray, size: int = PSNR_SIZE) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float in [0, 255], area-averaged (a box filter: antialiased)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def psnr_small(a: np.ndarray, b: np.ndarray, size: int = PSNR_SIZE) -> np.ndarray:
    """Per-image PSNR in dB between two (N, H, W, 3) uint8 batches, both area-resized to `size` px first
    (not rounded back to uint8); inf where they are equal."""
    mse = ((downsample(a, size).double() - downsample(b, size).double()) ** 2).mean((1, 2, 3)).numpy()
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def read_as(predicted: np.ndarray, vocab: list[str], asked: list[str]) -> np.ndarray:
    """Boolean per image: the classifier's class index (in its own vocabulary) names the asked value."""
    return np.array([vocab[p] == a for p, a in zip(predicted, asked)], dtype=bool)


def share(ok: np.ndarray) -> dict:
    """Share of True and its binomial standard error."""
    n = len(ok)
    p = float(ok.mean()) if n else float("nan")
    return {"share": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan")}


def suggest_strength(rows: list[dict], invert: bool, fraction: float = 0.9) -> float | None:
    """The smallest strength (for this invert setting) whose share of edits read as both asked values is at
    least `fraction` of the best share over the strengths: the edit does nearly all it can while keeping the
    most of the photo. A suggestion to read next to the table, not a verdict."""
    mine = sorted((r for r in rows if r["invert"] == invert), key=lambda r: r["strength"])
    if not mine:
        return None
    best = max(r["both"]["share"] for r in mine)
    if not best > 0:
        return None
    return next(r["strength"] for r in mine if r["both"]["share"] >= fraction * best)


def inpaint_mask(size: int) -> np.ndarray:
    """(size, size) 0/1: the mouth and chin (white = redraw) of a face framed like the training faces."""
    mask = np.zeros((size, size), dtype=np.float32)
    mask[round(0.58 * size):round(0.92 * size), round(0.25 * size):round(0.75 * size)] = 1
    return mask


# --------------------------------------------------------------------------- the measurement


def val_faces(data, source: str, num: int) -> tuple[np.ndarray, list[str | None]]:
    """Rows of `num` val faces with age and gender labelled, evenly spread; and every row's file name where the
    source lists them in the prepared order (None otherwise)."""
    cols = [data.attributes.index(a) for a in ("age", "gender")]
    val = data.indices("val")
    labelled = val[(data.labels[val][:, cols] >= 0).all(1)]
    names: list[str | None] = [None] * len(data)
    try:
        records = list(resolve_source(source).make_records())
        if len(records) == len(data):
            names = [r.name for r in records]
    except (UserError, OSError):                 # names are only for the record; the numbers do not need them
        pass
    return labelled[spread(len(labelled), num)], names


def edit_one(pipe, image: np.ndarray, request: SamplingRequest, *, strength: float, invert: bool, index: int,
             mask: np.ndarray | None = None) -> np.ndarray:
    """`request.num` edits of one (H, W, 3) uint8 photo, noise from images index.. of request.seed."""
    photo = to_model_range(torch.from_numpy(np.array(image, dtype=np.uint8))[None])
    m = None if mask is None else torch.from_numpy(mask)[None, None]
    plan = EditPlan(pipe, photo, EditRequest(strength=strength, mask=m, invert=invert), seed=request.seed)
    return generate(pipe, request, plan=plan, first_index=index, progress=False)


def names_of(data, rows: np.ndarray, attribute: str) -> list[str | None]:
    col = data.attributes.index(attribute)
    return [data.vocab[attribute][j] if j >= 0 else None for j in data.labels[rows, col]]


def run(args) -> dict:
    pipe = load_pipeline(args.checkpoint)
    if not {"age", "gender"} <= set(pipe.cfg.model.attributes):
        raise SystemExit(f"{pipe.source} is not conditioned on age and gender: nothing to ask an edit for")
    size = pipe.codec.image_size
    data = prepare_dataset(args.data, size, progress=False)
    clf = load_classifier(args.classifier)
    extractor = InceptionFeatures(batch_size=args.feature_batch)
    rows, names = val_faces(data, args.data, args.num)
    photos = np.asarray(data.images[rows])
    vocab = data.vocab
    own_age, own_gender = (data.labels[rows, data.attributes.index(a)].astype(int) for a in ("age", "gender"))
    targets = [edit_targets(a, g, i, len(vocab["age"]), len(vocab["gender"]))
               for i, (a, g) in enumerate(zip(own_age, own_gender))]
    asked_age = [vocab["age"][a] for a, _ in targets]
    asked_gender = [vocab["gender"][g] for _, g in targets]
    own_race = names_of(data, rows, "race") if args.keep_race and "race" in data.attributes else [None] * len(rows)
    base = SamplingRequest(num=1, seed=args.seed, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                           precision=args.precision)

    def asked(i: int) -> dict:
        return {"age": asked_age[i], "gender": asked_gender[i], **({"race": own_race[i]} if own_race[i] else {})}

    def readings(images: np.ndarray) -> dict:
        pred = clf.predict(images)
        age_ok = read_as(pred["age"], clf.vocab["age"], asked_age)
        gender_ok = read_as(pred["gender"], clf.vocab["gender"], asked_gender)
        return {"age": share(age_ok), "gender": share(gender_ok), "both": share(age_ok & gender_ok)}

    photo_features = extractor(photos)
    pred = clf.predict(photos)
    own = {"age": read_as(pred["age"], clf.vocab["age"], [vocab["age"][j] for j in own_age]),
           "gender": read_as(pred["gender"], clf.vocab["gender"], [vocab["gender"][j] for j in own_gender])}
    nxt = np.roll(np.arange(len(photos)), -1)
    result = {
        "model": str(pipe.source), "step": pipe.step, "image_size": size, "data": args.data, "num": len(rows),
        "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "precision": args.precision,
        "seed": args.seed, "keep_race": args.keep_race, "threads": torch.get_num_threads(),
        "machine": machine_info(precision=resolve_precision(args.precision)),
        "min_age_gap": MIN_AGE_GAP, "psnr_size": PSNR_SIZE, "psnr_cap": PSNR_CAP,
        "faces": [names[r] or int(r) for r in rows],
        "asked_age_counts": {b: asked_age.count(b) for b in vocab["age"]},
        "photos": {**readings(photos), "accuracy_own_labels": {k: float(v.mean()) for k, v in own.items()}},
        "other_photo": {"psnr16": float(np.mean(np.minimum(psnr_small(photos, photos[nxt]), PSNR_CAP))),
                        "grey_levels": float((downsample(photos) - downsample(photos[nxt])).abs().mean()),
                        "feature_distance": float(np.linalg.norm(photo_features - photo_features[nxt], axis=1).mean())},
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for strength in args.strengths:
        for invert in (False, True):
            edits = np.empty_like(photos)
            start = time.perf_counter()
            for i in tqdm(range(len(photos)), desc=f"strength {strength:g}{' invert' if invert else ''}",
                          unit="face", leave=False):
                edits[i] = edit_one(pipe, photos[i], base.replace(attributes=asked(i)), strength=strength,
                                    invert=invert, index=i)[0]
            seconds = (time.perf_counter() - start) / len(photos)
            psnr = np.minimum(psnr_small(photos, edits), PSNR_CAP)
            distance = np.linalg.norm(extractor(edits) - photo_features, axis=1)
            pairs = min(args.pairs, len(photos))         # photo i + 1 edited exactly as photo i: same noise, same asks
            others = np.stack([edit_one(pipe, photos[nxt[i]], base.replace(attributes=asked(i)), strength=strength,
                                        invert=invert, index=i)[0] for i in range(pairs)])
            apart = (downsample(edits[:pairs]) - downsample(others)).abs().mean((1, 2, 3)).numpy()
            row = {"strength": strength, "invert": invert, **readings(edits),
                   "face_rate": float(face_rate(edits)),
                   "other_edit_grey_levels": float(apart.mean()),
                   "psnr16": float(psnr.mean()), "psnr16_median": float(np.median(psnr)),
                   "feature_distance": float(distance.mean()), "seconds_per_edit": round(seconds, 3)}
            result["rows"].append(row)
            out.write_text(json.dumps(result, indent=2))
            print(format_row(row), flush=True)
    for invert in (False, True):
        result[f"suggested_strength{'_invert' if invert else ''}"] = suggest_strength(result["rows"], invert)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.pictures:
        pictures(pipe, data, names, base, args)
    return result


# --------------------------------------------------------------------------- output


def format_row(r: dict) -> str:
    return (f"strength {r['strength']:.1f} {'invert' if r['invert'] else 'sdedit'}: age {r['age']['share']:.1%}  "
            f"gender {r['gender']['share']:.1%}  both {r['both']['share']:.1%}  PSNR16 {r['psnr16']:.2f} dB  "
            f"Inception distance {r['feature_distance']:.2f}  faces {r['face_rate']:.1%}  "
            f"apart {r['other_edit_grey_levels']:.1f}  {r['seconds_per_edit']:.2f} s/edit")


def markdown_table(result: dict) -> str:
    """Strengths down, SDEdit and --invert rows; the unedited photos and another photo as reference rows."""
    def pct(s: dict) -> str:
        return f"{100 * s['share']:.0f}%"

    lines = ["| strength | start | age read as asked | gender read as asked | both | faces | PSNR at 16 px (dB) | "
             "Inception distance | two photos' edits apart (grey levels) | s / edit |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    p, o = result["photos"], result["other_photo"]
    lines.append(f"| 0 | the photo, unedited | {pct(p['age'])} | {pct(p['gender'])} | {pct(p['both'])} "
                 "| – | – | 0 | – | – |")
    for r in sorted(result["rows"], key=lambda r: (r["invert"], r["strength"])):
        lines.append(f"| {r['strength']:.1f} | {'DDIM inversion' if r['invert'] else 'noised (SDEdit)'} | "
                     f"{pct(r['age'])} | {pct(r['gender'])} | {pct(r['both'])} | {100 * r['face_rate']:.0f}% | "
                     f"{r['psnr16']:.1f} | {r['feature_distance']:.1f} | {r['other_edit_grey_levels']:.1f} | "
                     f"{r['seconds_per_edit']:.2f} |")
    lines.append(f"| – | another val photo | – | – | – | – | {o['psnr16']:.1f} | {o['feature_distance']:.1f} "
                 f"| {o.get('grey_levels', float('nan')):.1f} | – |")
    acc = p["accuracy_own_labels"]
    lines.append("")
    lines.append(f"{result['num']} val faces, {result['sampler']} {result['steps']} steps, guidance "
                 f"{result['guidance']:g}, {result['precision']}, {result['threads']} thread(s). The classifier reads "
                 f"the photos' own labels at {acc['age']:.0%} (age) and {acc['gender']:.0%} (gender).")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
    styles = {False: ("-", "noised (SDEdit)"), True: ("--", "DDIM inversion")}
    colours = {"age": "C0", "gender": "C1", "both": "C2"}
    for invert, (ls, label) in styles.items():
        mine = sorted((r for r in result["rows"] if r["invert"] == invert), key=lambda r: r["strength"])
        if not mine:
            continue
        s = [r["strength"] for r in mine]
        for key, colour in colours.items():
            axes[0].plot(s, [r[key]["share"] for r in mine], ls, marker="o", color=colour, label=f"{key}, {label}")
        axes[1].plot(s, [r["psnr16"] for r in mine], ls, marker="o", color="k", label=label)
        axes[2].plot(s, [r["feature_distance"] for r in mine], ls, marker="o", color="k", label=label)
    for key, colour in colours.items():
        axes[0].axhline(result["photos"][key]["share"], color=colour, ls=":", lw=1)
    axes[1].axhline(result["other_photo"]["psnr16"], color="grey", ls=":", label="another photo")
    axes[2].axhline(result["other_photo"]["feature_distance"], color="grey", ls=":", label="another photo")
    titles = ("read as asked (dotted: the unedited photo)", f"PSNR at {PSNR_SIZE} px, dB (higher: closer)",
              "Inception feature distance (lower: closer)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("strength")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def picture_face(data, names: list[str | None], wanted: str | None) -> int:
    """The row of --face (a file name), else the first FairFace val face labelled 20-49, else the first val face."""
    val = data.indices("val")
    if wanted:
        hits = [r for r in range(len(names)) if names[r] == wanted]
        if not hits:
            raise SystemExit(f"--face {wanted}: no such file in {data.meta['source']}")
        return hits[0]
    ages = names_of(data, val, "age")
    for r, age in zip(val, ages):
        if (names[r] or "").startswith("fairface") and age in ADULT_BINS:
            return int(r)
    return int(val[0])


SYNTHETIC_FACE = {"age": "20-29", "gender": "Male"}


def synthetic_face(pipe, seed: int) -> np.ndarray:
    """A face the model draws itself (guidance 3), standing in for a photo in the committed pictures: the
    shared photos may not be copied into the repository."""
    request = SamplingRequest(num=1, seed=seed, attributes=SYNTHETIC_FACE, guidance=3.0)
    return generate(pipe, request, progress=False)[0]


def pictures(pipe, data, names, base: SamplingRequest, args) -> None:
    folder = Path(args.pictures)
    vocab = data.vocab
    if args.face:
        row = picture_face(data, names, args.face)
        image = np.asarray(data.images[row])
        age, gender = (int(data.labels[row, data.attributes.index(a)]) for a in ("age", "gender"))
        label = names[row] or f"row {row}"
        source = f"val face {label} of {args.data}"
    else:
        image = synthetic_face(pipe, args.synthetic_seed)
        age, gender = (vocab[a].index(SYNTHETIC_FACE[a]) for a in ("age", "gender"))
        label = f"a drawn face (seed {args.synthetic_seed})"
        source = f"{label}, asked {SYNTHETIC_FACE}"
    # position -1: the last of the far bins (the oldest for a young face), the other gender
    t_age, t_gender = edit_targets(max(age, 0), max(gender, 0), -1, len(vocab["age"]), len(vocab["gender"]))
    asked = {"age": vocab["age"][t_age], "gender": vocab["gender"][t_gender]}
    own = {k: vocab[k][j] for k, j in (("age", age), ("gender", gender)) if j >= 0}
    note = f"{EDITED}; photo: {source}"

    def text(what: str) -> dict:
        return provenance(f"python benchmarks/edit_strength.py ({what})", str(pipe.source), pipe.step, note=note)

    strips = []
    for invert in (False, True):
        edits = [edit_one(pipe, image, base.replace(attributes=asked), strength=s, invert=invert, index=0)
                 for s in args.strengths]
        strips.append(np.concatenate([image[None], *edits]))
    path = save_image(make_grid(np.concatenate(strips), nrow=len(args.strengths) + 1), folder / "edit-strengths.png",
                      upscale=4, text=text(f"{label} asked {asked}, strengths {args.strengths}"))
    print(f"wrote {path}: {label} ({own}) asked for {asked}; rows SDEdit, --invert; the photo, then strengths "
          f"{', '.join(f'{s:g}' for s in args.strengths)}")

    strips = []
    for invert in (False, True):
        edits = [edit_one(pipe, image, base.replace(attributes={**({"gender": own["gender"]} if "gender" in own
                                                                  else {}), "age": b}),
                          strength=args.picture_strength, invert=invert, index=0) for b in vocab["age"]]
        strips.append(np.concatenate([image[None], *edits]))
    path = save_image(make_grid(np.concatenate(strips), nrow=len(vocab["age"]) + 1), folder / "edit-ages.png",
                      upscale=4, text=text(f"{label} across the age bins at strength {args.picture_strength:g}"))
    print(f"wrote {path}: {label} at strength {args.picture_strength:g}, its own gender kept; rows SDEdit, --invert; "
          f"the photo, then {', '.join(vocab['age'])}")

    mask = inpaint_mask(image.shape[0])
    faces = edit_one(pipe, image, base.replace(num=4, attributes=own), strength=args.inpaint_strength, invert=False,
                     index=0, mask=mask)
    mask_rgb = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    path = save_image(make_grid(np.concatenate([image[None], mask_rgb[None], faces]), nrow=6),
                      folder / "edit-inpaint.png", upscale=4,
                      text=text(f"{label} inpainted at strength {args.inpaint_strength:g}, asked {own}"))
    print(f"wrote {path}: {label}, the mask (white = redraw), 4 faces at strength {args.inpaint_strength:g} "
          f"asked for its own {own}")


OLD_AGE, YOUNG_AGE = "60-69", "20-29"


def faces_picture(args) -> None:
    """--faces-picture PATH: --picture-faces faces that --picture-checkpoint (default cascade128, edit's default)
    draws itself, one per row: the face, then --strengths without and with --invert, each edit made as
    `ddpm-faces edit --age A` makes it (A = 60-69 for a face read as younger than 40, else 20-29; the other
    attributes the photo's own as the classifier reads them; edit's default 20 steps and guidance 3)."""
    from ddpm_faces.evaluation.attributes import keep_photo_attributes, read_attributes
    from ddpm_faces.photos.framing import frame_photo
    from PIL import Image

    pipe = load_pipeline(args.picture_checkpoint)
    first = pipe.stages[0]                          # a cascade edits at its stage 1 and upscales the edit
    clf = load_classifier(args.classifier)
    vocab = first.cfg.model.vocab
    drawn = generate(pipe, SamplingRequest(num=args.picture_faces, seed=args.synthetic_seed, guidance=3.0),
                     progress=False)
    base = SamplingRequest(num=1, seed=args.seed, steps=args.edit_steps, guidance=3.0, precision=args.precision,
                           unasked="photo")
    tiles, lines = [], []
    for i, face in enumerate(drawn):
        small = frame_photo(Image.fromarray(face), first.codec.image_size, detect=False).image
        read = read_attributes(clf, small, vocab)
        age = OLD_AGE if vocab["age"].index(read.get("age", YOUNG_AGE)) < vocab["age"].index("40-49") else YOUNG_AGE
        request, kept = keep_photo_attributes(base.replace(attributes={"age": age}), vocab, small, clf)
        photo = to_model_range(torch.from_numpy(small.copy())[None])
        row = [face]
        for invert in (False, True):
            for s in args.strengths:
                plan = EditPlan(first, photo, EditRequest(strength=s, invert=invert), seed=request.seed)
                row.append(generate(pipe, request, plan=plan, first_index=i, progress=False)[0])
        tiles.extend(row)
        lines.append(f"face {i}: read {read}, asked age {age}")
    text = provenance(f"python benchmarks/edit_strength.py --faces-picture {Path(args.faces_picture).name} "
                      f"--picture-faces {args.picture_faces} --synthetic-seed {args.synthetic_seed} --strengths "
                      + " ".join(f"{s:g}" for s in args.strengths), str(pipe.source), pipe.step,
                      note=f"{EDITED}; photos: faces the model drew (seed {args.synthetic_seed})")
    path = save_image(make_grid(np.stack(tiles), nrow=1 + 2 * len(args.strengths)), args.faces_picture, text=text)
    print(f"wrote {path}: per row the drawn face, then strengths {', '.join(f'{s:g}' for s in args.strengths)} "
          "noised, then the same inverted\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="faces32", help="the model: a run, export or checkpoint (default: the bundled 32 px model, which a cascade edits with)")
    p.add_argument("--data", default="../shared/data/faces")
    p.add_argument("--classifier", help="attribute classifier folder (default: the bundled one)")
    p.add_argument("--num", type=int, default=200, help="val faces (default 200)")
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps at strength 1 (default {DEFAULT_STEPS}; edit uses 20)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--precision", default="auto", choices=SAMPLING_PRECISIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=50, help="photo pairs edited alike, for how far apart edits stay")
    p.add_argument("--keep-race", action="store_true", help="also ask for the photo's own race label")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--feature-batch", type=int, default=32, help="images per Inception batch")
    p.add_argument("--out", default="benchmarks/results/edit-strength.json")
    p.add_argument("--plot", help="agreement, PSNR and feature distance against strength into this PNG")
    p.add_argument("--pictures", help="folder for edit-strengths.png, edit-ages.png and edit-inpaint.png")
    p.add_argument("--face", help="a val file name for the pictures (for looking at locally: the shared photos "
                                  "may not be committed); default: a face the model draws, --synthetic-seed")
    p.add_argument("--synthetic-seed", type=int, default=5, help="seed of the drawn face of the pictures")
    p.add_argument("--picture-strength", type=float, default=DEFAULT_STRENGTH,
                   help=f"strength of edit-ages.png (default {DEFAULT_STRENGTH}, edit's)")
    p.add_argument("--inpaint-strength", type=float, default=1.0, help="strength of edit-inpaint.png (default 1)")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown (for the README)")
    p.add_argument("--faces-picture", help="only draw this picture (see faces_picture) and stop")
    p.add_argument("--picture-checkpoint", default="cascade128", help="the model of --faces-picture")
    p.add_argument("--picture-faces", type=int, default=6)
    p.add_argument("--edit-steps", type=int, default=DEFAULT_EDIT_STEPS, help="steps of --faces-picture's edits")
    args = p.parse_args()
    if args.faces_picture:
        torch.set_num_threads(args.threads)
        faces_picture(args)
        return
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib (or leave out --plot)") from None
    torch.set_num_threads(args.threads)
    result = run(args)
    for invert in (False, True):
        s = result[f"suggested_strength{'_invert' if invert else ''}"]
        print(f"suggested strength {'with' if invert else 'without'} --invert: {s} (the smallest whose 'both' share "
              "is at least 90% of the best over the strengths)")
    if args.markdown:
        print(markdown_table(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
