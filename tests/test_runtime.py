"""pipeline/runtime.py: the ONNX Runtime path computes what the network computes, is reused while the weights
stay the same, and falls back to the plain network (with one warning) whenever it cannot run."""
from __future__ import annotations

import gc
import logging
import sys
import weakref

import numpy as np
import pytest
import torch

from ddpm_faces.errors import UserError
from ddpm_faces.models import UNet, UNetConfig
from ddpm_faces.models.autoencoder import Autoencoder, AutoencoderConfig
from ddpm_faces.pipeline import runtime
from ddpm_faces.pipeline.runtime import fast_net

SHAPE = (2, 3, 16, 16)


def tiny_unet(attributes: bool = True) -> UNet:
    cfg = UNetConfig(resolution=16, base_channels=16, channel_mults=[1, 2], blocks_per_level=1, attn_resolutions=[8],
                     head_channels=16, dropout=0.0, attributes=["age", "gender"] if attributes else [],
                     vocab={"age": ["young", "old"], "gender": ["Female", "Male"]} if attributes else {})
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    with torch.no_grad():                 # zero-initialised output layers would make every output 0
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))


@pytest.fixture
def onnx_available():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")


def test_onnx_unet_matches_the_network(onnx_available):
    net = tiny_unet()
    fast = fast_net(net, SHAPE, "onnx")
    assert fast is not net
    x = torch.randn(5, 3, 16, 16)                                       # another batch size than the example
    labels = torch.tensor([[0, 1], [1, -1], [-1, -1], [1, 0], [0, 0]])
    with torch.inference_mode():
        for t in (torch.tensor([0, 10, 500, 999, 3]), torch.full((5,), 412.37)):     # long and fractional t
            assert close(fast(x, t), net(x, t))
            assert close(fast(x, t, labels), net(x, t, labels))


def test_onnx_unconditional_unet_and_decoder(onnx_available):
    net = tiny_unet(attributes=False)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 50, 999])
    with torch.inference_mode():
        assert close(fast_net(net, SHAPE)(x, t), net(x, t))
    decoder = Autoencoder(AutoencoderConfig(resolution=16, channels=[8, 16], groups=4)).decoder.eval()
    z = torch.randn(3, 4, 8, 8)
    fast = fast_net(decoder, (2, 4, 8, 8))
    with torch.inference_mode():
        assert close(fast(z), decoder(z))


def test_the_session_is_kept_until_the_weights_change(onnx_available):
    net = tiny_unet()
    fast = fast_net(net, SHAPE)
    assert fast_net(net, SHAPE) is fast
    with torch.no_grad():
        net.conv_in.weight.add_(0.1)
    again = fast_net(net, SHAPE)
    assert again is not fast
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.inference_mode():
        assert close(again(x, t), net(x, t))


def test_plain_and_unknown_kinds():
    net = tiny_unet()
    assert fast_net(net, SHAPE, "plain") is net
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'"):
        fast_net(net, SHAPE, "tensorrt")


def test_without_onnxruntime_the_plain_network_is_used(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)               # import onnxruntime raises ImportError
    net = tiny_unet()
    with caplog.at_level(logging.WARNING, logger="ddpm_faces.pipeline.runtime"):
        assert fast_net(net, SHAPE) is net
    assert len(caplog.records) == 1 and "using the plain PyTorch network" in caplog.records[0].getMessage()


def test_a_failing_export_or_a_mismatch_falls_back_until_the_weights_change(onnx_available, monkeypatch, caplog):
    net = tiny_unet()

    def broken(*args):
        raise RuntimeError("Unsupported ONNX opset")
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="ddpm_faces.pipeline.runtime"):
        m.setattr(runtime, "export", broken)
        assert fast_net(net, SHAPE) is net
        assert fast_net(net, SHAPE) is net                              # remembered: no second export, no warning
    assert "Unsupported ONNX opset" in caplog.text and len(caplog.records) == 1
    caplog.clear()
    with torch.no_grad():
        net.conv_in.bias.add_(0.01)                                     # new weights: tried again
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="ddpm_faces.pipeline.runtime"):
        m.setattr(runtime, "TOLERANCE", -1.0)                          # every output counts as a mismatch
        assert fast_net(net, SHAPE) is net
    assert "differ from the network's" in caplog.text
    with torch.no_grad():
        net.conv_in.bias.add_(0.01)
    fast = fast_net(net, SHAPE)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.inference_mode():
        assert fast is not net and close(fast(x, t), net(x, t))


def test_labels_for_an_unconditional_network_are_refused(onnx_available):
    fast = fast_net(tiny_unet(attributes=False), SHAPE)
    with pytest.raises(ValueError, match="without conditioning"):
        fast(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.zeros(2, 1, dtype=torch.long))


def test_the_cache_does_not_keep_networks_alive(onnx_available):
    net = tiny_unet()
    fast = fast_net(net, SHAPE)
    gone = weakref.ref(net)
    del net
    gc.collect()
    assert gone() is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    assert fast(x, t).shape == (2, 3, 16, 16)                # the session outlives the network it came from


# ---------------------------------------------------------------------------------------------- wired in
def test_a_request_with_runtime_onnx_draws_the_plain_fp32_faces():
    pytest.importorskip("onnxruntime")
    from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline

    pipe = load_pipeline("faces32")
    request = SamplingRequest(num=2, seed=4, steps=6, attributes={"gender": "Female"}, guidance=2.0)
    plain = generate(pipe, request.replace(precision="fp32"), progress=False).astype(int)
    onnx = generate(pipe, request.replace(runtime="onnx"), progress=False).astype(int)
    assert request.replace(runtime="onnx").validate(pipe).precision == "fp32"      # auto means fp32 there
    assert np.abs(plain - onnx).max() <= 1


@pytest.mark.parametrize("change, words", [(dict(runtime="tensorrt"), "unknown runtime 'tensorrt'"),
                                           (dict(runtime="onnx", precision="bf16"), "runtime onnx runs fp32")])
def test_bad_runtime_requests_are_one_line(change, words):
    from ddpm_faces.pipeline import SamplingRequest, load_pipeline

    with pytest.raises(UserError) as err:
        SamplingRequest(**change).validate(load_pipeline("faces32"))
    assert words in str(err.value) and "\n" not in str(err.value)
