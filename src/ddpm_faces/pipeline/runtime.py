"""A faster way to run the networks on the CPU in fp32: the same weights through ONNX Runtime.

    net = fast_net(pipe.net, (4, *pipe.codec.shape))                    # (x, t, cond=None) -> out, like pipe.net
    decode = fast_net(codec.autoencoder.decoder, (4, *codec.shape))     # (z) -> images, like the decoder

On one CPU thread in fp32 this samples the bundled models 1.26-1.39x faster end to end, the images within
one grey level of the plain path's (benchmarks/fast_path.py; CPU time, 4 faces, 20 and 10 steps, decoding
included): faces32 1.31x / 1.39x, latent128 with an ONNX decoder too 1.29x / 1.26x on a Zen 4 EPYC; with
torch limited to AVX2 1.47x / 1.46x and 1.44x / 1.45x, but ONNX Runtime picks its kernels from CPUID and
still used AVX-512 there, so that figure overstates an AVX2-only CPU. Channels-last and torch.compile gained
at most 1.15x, compile after one to two and a half minutes of compiling. Where bf16 is native (AVX512-BF16,
AMX) precision bf16 is faster still (1.4-1.5x); this is for fp32.

The network is exported once (torch.onnx.export, a few seconds, batch size left free) and the session is
kept with it: another call with the same network and unchanged weights returns the same object, and a
call after the weights changed (training, a new EMA) exports again. Whatever keeps ONNX Runtime from running
the network (not installed, a network on a GPU, an export that fails, outputs that do not match the
network's own) is logged as one warning (once per network and weights) and the network itself is returned:
the plain path always works.
"""
from __future__ import annotations

import io
import logging
import warnings
import weakref

import torch
from torch import nn

from ..errors import UserError
from ..models import UNet

log = logging.getLogger(__name__)

KINDS = ("plain", "onnx")
TOLERANCE = 1e-3                      # largest difference from the network's own output, relative to its scale
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()     # net -> (weights_version, OnnxNet or None)


def fast_net(net: nn.Module, example_shape: tuple[int, ...], kind: str = "onnx", *, threads: int | None = None):
    """`net` (the denoising UNet, or a decoder taking one tensor) as a callable with the same signature that
    runs the `kind` way: "onnx" (ONNX Runtime on the CPU) or "plain" (the network itself). `example_shape`
    is one input's (batch, channels, height, width); `threads` defaults to torch's."""
    if kind not in KINDS:
        raise UserError(f"unknown runtime {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "plain":
        return net
    version = weights_version(net)
    known = _cache.get(net)
    if known is not None and known[0] == version:
        return known[1] or net
    try:
        fast = OnnxNet(net, tuple(example_shape), threads or torch.get_num_threads())
    except Exception as err:                  # ImportError, export or session errors, a mismatch: all fall back
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("ONNX Runtime cannot run this network (%s): using the plain PyTorch network", reason)
        fast = None                           # remembered too: no new attempt until the weights change
    _cache[net] = (version, fast)
    return fast or net


def weights_version(net: nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter or buffer is modified in place (optimizer steps, EMA, load_state_dict)."""
    return tuple(t._version for t in (*net.parameters(), *net.buffers()))


class OnnxNet:
    """The network exported to ONNX and run by an onnxruntime CPU session; called like the network."""

    def __init__(self, net: nn.Module, example_shape: tuple[int, ...], threads: int):
        import onnxruntime as ort                       # optional: pip install onnxruntime onnx

        device = next(net.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"the network is on {device}, and this runtime runs on the CPU")
        # no reference to net itself is kept, or the weak cache (net -> this) would keep every network alive
        self.unet = isinstance(net, UNet)
        self.unspecified = net.cond_embedding.unspecified if self.unet and net.conditional else None
        example = self.inputs(torch.randn(example_shape), torch.full(example_shape[:1], 500.5))
        self.names = ["x", "t", "cond"][:len(example)] if self.unet else ["z"]
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(export(net, example, self.names), options,
                                            providers=["CPUExecutionProvider"])
        self.check(net, example)

    def inputs(self, x: torch.Tensor, t: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> tuple:
        """The tensors the exported graph takes: a UNet's t as float32 and its labels always given (cond=None
        is all-unspecified, as the UNet does itself), so one graph serves every call."""
        if not self.unet:
            return (x,)
        if cond is not None and self.unspecified is None:
            raise ValueError("this model was built without conditioning; it cannot take labels")
        if cond is None and self.unspecified is not None:
            cond = self.unspecified(len(x))
        t = t.to(torch.float32)
        return (x, t) if cond is None else (x, t, cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | None = None, cond: torch.Tensor | None = None):
        feed = {name: a.detach().cpu().contiguous().numpy() for name, a in zip(self.names, self.inputs(x, t, cond))}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)

    def check(self, net: nn.Module, example: tuple) -> None:
        with torch.inference_mode():
            want = net(*example).float()
        got = self(*example)
        error = float((got - want).abs().max()) / max(float(want.abs().max()), 1.0)
        if not error <= TOLERANCE:
            raise ValueError(f"its outputs differ from the network's by {error:.2g} (relative)")


def export(net: nn.Module, example: tuple, names: list[str]) -> bytes:
    """The network as ONNX bytes (TorchScript exporter, opset 17), the batch dimension left free."""
    buffer = io.BytesIO()
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")             # tracer and deprecation warnings, not for the user
            torch.onnx.export(Positional(net), example, buffer, dynamo=False, input_names=names,
                              output_names=["out"], dynamic_axes={n: {0: "batch"} for n in [*names, "out"]},
                              opset_version=17)
    finally:
        net.train(was_training)
    return buffer.getvalue()


class Positional(nn.Module):
    """net(*inputs): the exporter traces forward with positional inputs only."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        return self.net(*inputs)
