"""ddpm-faces: denoising diffusion models that generate human faces."""

__version__ = "0.1.0"
