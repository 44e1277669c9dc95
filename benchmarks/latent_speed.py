"""Latent diffusion at 128 px against pixel diffusion, side by side in one process, on one CPU thread.

- 4 faces at 128 px (DPM-Solver++, 20 steps, bf16 and fp32), decoding included: the latent128 layout (the
  bundled UNet on 32x32x4 latents + the ae128 decoder) against diffusers' UNet2DModel with the same layout
  run in pixel space at 128 px (the cost a pixel model of that shape would have), the same step count.
- Encoding the training faces into the latent cache: images per second, and the minutes for 21,940 faces
  (both flips).
- Training images per second: the latent model on cached latents against the bundled 32 px pixel model.

Weights do not change the speed, so fresh networks are timed (an autoencoder run can be named with --codec).

    python benchmarks/latent_speed.py --out benchmarks/results/latent-speed-cpu-1thread.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ddpm_faces.hardware import bf16_native, machine_info
from ddpm_faces.config import load_config
from ddpm_faces.diffusion import Denoiser, sample_dpmpp_2m, sampling_timesteps
from ddpm_faces.models import UNet, count_parameters
from ddpm_faces.models.autoencoder import Autoencoder
from ddpm_faces.models.codec import LatentCodec
from ddpm_faces.pipeline import build_schedule

TRAIN_FACES = 21_940


def median_seconds(fn, repeats: int) -> float:
    fn()                                                          # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def diffusers_pixel_unet(cfg, res: int):
    """diffusers' UNet2DModel with the latent model's layout, at `res` pixels, RGB."""
    from diffusers import UNet2DModel

    m = cfg.model
    widths = [m.base_channels * k for k in m.channel_mults]
    down, r = [], res
    attn_at = {res // (m.resolution // a) for a in m.attn_resolutions}      # the same relative depth
    for _ in widths:
        down.append("AttnDownBlock2D" if r in attn_at else "DownBlock2D")
        r //= 2
    net = UNet2DModel(sample_size=res, block_out_channels=tuple(widths), layers_per_block=m.blocks_per_level,
                      down_block_types=tuple(down), up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
                      attention_head_dim=m.head_channels, norm_num_groups=16, resnet_time_scale_shift="scale_shift")
    return lambda x, t, *cond: net(x, t).sample


def sample_seconds(net, shape, cfg, precision: str, steps: int, decode, repeats: int) -> float:
    schedule = build_schedule(cfg)
    denoiser = Denoiser(net if precision == "fp32" else _bf16(net), schedule, cfg.diffusion.prediction)
    ts = sampling_timesteps(schedule, steps, "karras")

    def run():
        with torch.inference_mode():
            x = sample_dpmpp_2m(denoiser, torch.randn(4, *shape), ts)
            return decode(x)
    return median_seconds(run, repeats)


def _bf16(net):
    def run(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(*args)
    return run


def encode_rate(codec: LatentCodec, precision: str, repeats: int) -> float:
    """Images per second through the path the latent cache uses (bf16: LatentCodec.fast_encoder) or plain fp32."""
    images = torch.rand(64, 3, 128, 128) * 2 - 1
    encode = codec.fast_encoder("bf16") if precision == "bf16" else codec.encode

    def run():
        with torch.inference_mode():
            encode(images)
    return 64 / median_seconds(run, repeats)


def train_rate(net, shape, batch: int, repeats: int) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    x, t = torch.randn(batch, *shape), torch.randint(0, 1000, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (net(x, t).float() - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch / median_seconds(step, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codec", help="an autoencoder run or export to time instead of a fresh ae128")
    p.add_argument("--out", help="write the numbers as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent, pixel32 = load_config("latent128"), load_config("bundled32")
    latent.model.attributes = pixel32.model.attributes = []
    codec = LatentCodec(Autoencoder(latent.autoencoder)).eval()
    if args.codec:
        from ddpm_faces.pipeline import load_codec
        codec = load_codec(args.codec)
    unet = UNet(latent.model).eval()
    pixels = diffusers_pixel_unet(latent, 128)
    rows = {"threads": args.threads, "steps": args.steps, "latent_unet_parameters": count_parameters(unet),
            "autoencoder_parameters": count_parameters(codec)}
    rows["machine"] = machine_info(threads=args.threads)
    precisions = ("fp32", "bf16") if bf16_native("cpu") else ("fp32",)   # bf16 without bf16 units: ~20x slower
    for precision in precisions:                       # bf16 last: fast_encoder leaves the codec channels-last
        rows[f"latent128_4_faces_s_{precision}"] = sample_seconds(unet, codec.shape, latent, precision, args.steps,
                                                                  codec.decode, args.repeats)
        rows[f"diffusers_pixel128_4_faces_s_{precision}"] = sample_seconds(pixels, (3, 128, 128), latent, precision,
                                                                           args.steps, lambda x: x, 1)
        rows[f"encode_images_per_s_{precision}"] = encode_rate(codec, precision, args.repeats)
        rows[f"encode_train_set_min_{precision}"] = 2 * TRAIN_FACES / rows[f"encode_images_per_s_{precision}"] / 60
    rows["train_images_per_s_latent128"] = train_rate(UNet(latent.model), codec.shape, 32, args.repeats)
    rows["train_images_per_s_pixel32"] = train_rate(UNet(pixel32.model), (3, 32, 32), 32, args.repeats)
    for key, value in rows.items():
        print(f"{key:40s} {value:.3f}" if isinstance(value, float) else f"{key:40s} {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
