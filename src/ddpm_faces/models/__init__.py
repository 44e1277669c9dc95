"""Networks: the denoising UNet, the attribute embedding, and codecs (pixels today)."""
from .codec import Codec, PixelCodec
from .unet import UNet, UNetConfig, count_parameters, timestep_embedding

__all__ = ["Codec", "PixelCodec", "UNet", "UNetConfig", "count_parameters", "timestep_embedding"]
