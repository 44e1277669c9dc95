"""The edit benchmarks' own helpers (benchmarks/edit_strength.py, benchmarks/edit_speed.py): which attributes an
edit asks for, the 16 px PSNR, the face selection, the strength suggestion, and one tiny edit through each script's
edit function, so that a change of the library's edit API breaks a test rather than the 30-minute measurement."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_faces.evaluation.reconstruction import psnr
from ddpm_faces.pipeline import SamplingRequest, load_pipeline

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


strength = load_script("edit_strength")
speed = load_script("edit_speed")


def test_targets_are_the_other_gender_and_an_age_bin_far_away():
    for age in range(9):
        asked = {strength.edit_targets(age, gender, i, 9)[0] for i in range(12) for gender in (0, 1)}
        far = {b for b in range(9) if abs(b - age) >= 3}
        assert asked == far                                   # consecutive faces go through all the far bins
        for gender in (0, 1):
            assert strength.edit_targets(age, gender, 5, 9)[1] == 1 - gender
    assert strength.edit_targets(3, 0, 0, 9) == strength.edit_targets(3, 0, 0, 9)      # deterministic
    with pytest.raises(ValueError):
        strength.edit_targets(-1, 0, 0, 9)                    # unknown labels are left out before this
    with pytest.raises(ValueError):
        strength.edit_targets(1, 0, 0, 3)                     # no bin 3 away


def test_psnr_at_16_px_blurs_before_comparing():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert np.isinf(strength.psnr_small(a, a)).all()
    # a +-1 checkerboard on a flat grey is gone after 2x2 averaging, and costs ~48 dB at full size
    flat = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    checker = flat.astype(int) + np.where((np.indices((32, 32)).sum(0) % 2)[None, ..., None] == 0, 1, -1)
    checker = checker.astype(np.uint8)
    assert np.isinf(strength.psnr_small(flat, checker))[0]
    assert psnr(flat, checker)[0] == pytest.approx(48.13, abs=0.01)
    # a uniform shift survives the blur: 10 levels everywhere -> 20 log10(255 / 10)
    shifted = flat + 10
    assert strength.psnr_small(flat, shifted)[0] == pytest.approx(20 * np.log10(25.5), abs=1e-6)
    # any size goes to 16 px: 128 px images compare like their 32 px versions when both are block-constant
    big = np.repeat(np.repeat(a, 4, axis=1), 4, axis=2)
    big_shifted = np.repeat(np.repeat(np.clip(a.astype(int) + 7, 0, 255).astype(np.uint8), 4, axis=1), 4, axis=2)
    small_shifted = np.clip(a.astype(int) + 7, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(strength.psnr_small(big, big_shifted), strength.psnr_small(a, small_shifted))


def test_spread_suggestion_and_mask():
    assert strength.spread(10, 3).tolist() == [0, 4, 9]                # rounds 4.5 to the even 4
    assert strength.spread(5, 50).tolist() == [0, 1, 2, 3, 4]
    rows = [{"strength": s, "invert": inv, "both": {"share": b}}
            for inv, shares in ((False, (0.1, 0.5, 0.7, 0.72)), (True, (0.0, 0.0, 0.0, 0.0)))
            for s, b in zip((0.2, 0.4, 0.6, 0.8), shares)]
    assert strength.suggest_strength(rows, False) == 0.6                 # 0.7 >= 0.9 x 0.72
    assert strength.suggest_strength(rows, True) is None                 # nothing worked: no suggestion
    mask = strength.inpaint_mask(32)
    assert set(np.unique(mask)) == {0.0, 1.0} and mask[:16].sum() == 0 and mask[24, 16] == 1


@pytest.fixture
def one_thread():
    """One torch thread, as the benchmarks run (two threads collapse when the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_tiny_edit_through_each_script(tmp_path, one_thread):
    pipe = load_pipeline("faces32")
    request = SamplingRequest(num=1, steps=2, guidance=3.0, precision="bf16", attributes={"age": "60-69"})
    face = speed.frame_photo(speed.drawn_face(), 32, detect=False).image
    for invert in (False, True):
        out = strength.edit_one(pipe, face, request, strength=0.5, invert=invert, index=3)
        assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    mask = strength.inpaint_mask(32)
    out = strength.edit_one(pipe, face, request.replace(num=2), strength=1.0, invert=False, index=0, mask=mask)
    np.testing.assert_array_equal(out[:, mask == 0], np.broadcast_to(face[mask == 0], out[:, mask == 0].shape))
    assert speed.first_photo(tmp_path / "none") is None
    timing = speed.one_edit(pipe, None, request, 0.6, False)             # no photo: the drawn face, no detection
    assert timing["faces"] == 0 and timing["total_s"] >= timing["edit_s"] > 0


faces_bench = load_script("edit_faces")


def test_foreign_colours_count_the_pixels_whose_colour_the_photo_never_had():
    rng = np.random.default_rng(0)
    photo = rng.integers(90, 160, (32, 32, 3), dtype=np.uint8)           # greys and browns
    assert faces_bench.foreign_colours(photo, photo) == 0.0
    assert faces_bench.foreign_colours(photo, photo[::-1, ::-1].copy()) == 0.0   # the same colours elsewhere
    blotched = photo.copy()
    blotched[4:12, 4:12] = (250, 40, 120)                                # a pink blotch: 64 of 1024 pixels
    assert faces_bench.foreign_colours(photo, blotched) == pytest.approx(64 / 1024)


def test_a_seam_is_a_step_at_the_masks_edge_against_the_steps_beside_it():
    y, x = np.mgrid[:32, :32]
    ramp = 4 * (x + y)                                                   # every neighbour step is 4 levels
    image = np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8)      # smooth: no edge anywhere
    mask = faces_bench.strength_bench.inpaint_mask(32)
    assert faces_bench.seam_ratio(image, mask) == pytest.approx(1.0, abs=0.1)
    pasted = image.astype(int)
    pasted[mask > 0] += 40                                               # the redrawn region 40 levels brighter
    assert faces_bench.seam_ratio(np.clip(pasted, 0, 255).astype(np.uint8), mask) > 3
    with pytest.raises(ValueError, match="no edge"):
        faces_bench.seam_ratio(image, np.zeros((32, 32)))
