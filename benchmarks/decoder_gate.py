"""The decoder gate: the shipped autoencoder's decoder against a fine-tuned one (the encoder the same), on the
same val faces: PSNR, SSIM and reconstruction FID, and a picture (a face | old decoder | new decoder, with the
eyes enlarged below each) of faces drawn by latent128, since the data set's photos may not be copied here.

    python benchmarks/decoder_gate.py --new runs/decoder128 --num 1000 --out benchmarks/results/decoder-gate.json \\
        --picture docs/decoder-gate.png

`--old` defaults to the autoencoder that the bundled latent128 carries. Gate: reconstruction FID <= 8 with PSNR
>= 30 dB (1,000 val faces at 128 px).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.model_eval import evaluate_codec
from ddpm_faces.hardware import machine_info
from ddpm_faces.images import make_grid, save_image, to_uint8
from ddpm_faces.images import to_model_range
from ddpm_faces.pipeline import SamplingRequest, build_codec, generate, load_codec, load_pipeline, read_config
from ddpm_faces.runs import CODEC_FILE, bundled, find_model


def codec_from(name: str):
    """An autoencoder run/export, or a latent model's carried autoencoder (e.g. latent128)."""
    cfg = read_config(name)
    if cfg.task == "autoencoder":
        return load_codec(name)
    return build_codec(cfg, find_model(name).folder / CODEC_FILE).eval()


def drawn_faces(num: int) -> torch.Tensor:
    """Faces drawn by the bundled latent128 (guidance 3, 20 steps), in [-1, 1]: the data set's photos may not be
    copied into the project, so its pictures show drawn faces; the measurements are on real val photos."""
    pipe = load_pipeline("latent128")
    images = generate(pipe, SamplingRequest(num=num, seed=3, steps=20, guidance=3.0,
                                            attributes={"gender": "Female"}), progress=False)
    images = np.concatenate([images, generate(pipe, SamplingRequest(num=num, seed=4, steps=20, guidance=3.0,
                                              attributes={"gender": "Male"}), progress=False)])[::2][:num]
    return to_model_range(torch.from_numpy(images))


def picture(codecs: dict, photos: torch.Tensor, path: str) -> None:
    """One row per source (the face, then each decoder's reconstruction of it), one column per face; below each
    its eyes (rows 24-56, columns 24-104 of 128) enlarged 1.6x (nearest)."""
    with torch.no_grad():
        sources = [to_uint8(photos)] + [to_uint8(c.decode(c.encode(photos))) for c in codecs.values()]
    tiles = []
    for images in sources:
        eyes = np.stack([np.asarray(Image.fromarray(img[24:56, 24:104]).resize((128, 51), Image.NEAREST))
                         for img in images])                                         # (N, 51, 128, 3)
        tiles.append(np.concatenate([images, eyes], axis=1))                           # (N, 179, 128, 3)
    save_image(make_grid(np.concatenate(tiles), nrow=len(photos)), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default="latent128")
    p.add_argument("--new", required=True)
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--picture")
    p.add_argument("--picture-only", action="store_true", help="draw the picture, measure nothing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    codecs = {"old": codec_from(args.old), "new": codec_from(args.new)}
    if args.picture_only:
        picture(codecs, drawn_faces(6), args.picture)
        return
    extractor = InceptionFeatures("cpu", progress=False)
    result = {"reference": args.reference, "num": args.num, "old_source": args.old, "new_source": args.new,
              "machine": machine_info(threads=args.threads, precision="fp32", device="cpu")}
    for name, codec in codecs.items():
        start = time.perf_counter()
        result[name] = evaluate_codec(codec, reference=args.reference, num=args.num, extractor=extractor,
                                      progress=False)
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, {k: result[name][k] for k in ("psnr", "ssim", "rfid")}, flush=True)
    new = result["new"]
    result["gate"] = {"rfid_at_most": 8.0, "psnr_at_least": 30.0,
                      "passed": bool(new["rfid"] <= 8.0 and new["psnr"] >= 30.0)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.picture:
        picture(codecs, drawn_faces(6), args.picture)


if __name__ == "__main__":
    main()
