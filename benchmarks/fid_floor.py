"""The floors under the 128 px table: what real photos score against the val split when they go through each
model's last step, with the same protocol (500 faces, FID/KID/precision/recall at 128 px).

    python benchmarks/fid_floor.py --new-decoder runs/decoder128 --cascade runs/cascade128 \\
        --out benchmarks/results/fid-floor.json --picture docs/upscale-val.png

Rows: train photos as they are (the sampling floor of 500 faces); taken to 32 px and enlarged bicubically (the
floor of the enlarged 32 px model); through the old and the new decoder (the floor of a latent model); taken
to 32 px and upscaled by the cascade's super-resolution stage (the floor of the cascade, with a perfect stage 1).
With --picture: faces drawn by latent128 (stand-ins for photos, which may not be copied here) taken to 32 px,
as bicubic | upscaled | the 128 px face.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ddpm_faces.data import prepare_dataset
from ddpm_faces.images import to_model_range
from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.reference import evaluate_images, reference_stats, spread
from ddpm_faces.hardware import machine_info, resolve_precision
from ddpm_faces.images import make_grid, resize_images, save_image, to_uint8
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline
from decoder_gate import codec_from, drawn_faces


def batches(fn, photos: torch.Tensor, size: int = 50) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([to_uint8(fn(photos[i:i + size])) for i in range(0, len(photos), size)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-decoder", default="latent128")
    p.add_argument("--new-decoder")
    p.add_argument("--cascade")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--picture")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    extractor = InceptionFeatures("cpu", progress=False)
    real = reference_stats(args.reference, "val", 128, extractor=extractor, progress=False)
    data = prepare_dataset(args.reference, 128, progress=False)
    photos = to_model_range(torch.from_numpy(np.array(data.images[spread(data.indices("train"), args.num)])))
    small = resize_images(photos, 32)
    rows = {"photos": to_uint8(photos),
            "bicubic_from_32": batches(lambda x: torch.nn.functional.interpolate(
                resize_images(x, 32), size=(128, 128), mode="bicubic", align_corners=False), photos)}
    for name, source in (("old_decoder", args.old_decoder), ("new_decoder", args.new_decoder)):
        if source:
            codec = codec_from(source)
            rows[name] = batches(lambda x: codec.decode(codec.encode(x)), photos)
    if args.cascade:
        stage2 = load_pipeline(args.cascade, stage1=False)
        rows["cascade_stage2_from_32"] = generate(stage2, SamplingRequest(num=args.num, seed=0), lowres=small,
                                                  progress=True)
    result = {"num": args.num, "reference": f"{args.reference} val at 128 px", "sources": vars(args) | {"out": str(args.out)},
              "machine": machine_info(threads=args.threads, precision=resolve_precision("auto")), "rows": {}}
    for name, images in rows.items():
        metrics = evaluate_images(images, real, extractor=extractor, progress=False)
        result["rows"][name] = {k: float(metrics[k]) for k in ("fid", "kid_mean", "precision", "recall")}
        print(name, result["rows"][name], flush=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.picture and args.cascade:
        faces = drawn_faces(8)
        small = resize_images(faces, 32)
        up = generate(stage2, SamplingRequest(num=len(faces), seed=0), lowres=small, progress=False)
        bicubic = to_uint8(torch.nn.functional.interpolate(small, size=(128, 128), mode="bicubic", align_corners=False))
        triples = np.stack([bicubic, up, to_uint8(faces)], axis=1).reshape(-1, 128, 128, 3)
        save_image(make_grid(triples, nrow=6), args.picture)


if __name__ == "__main__":
    main()
