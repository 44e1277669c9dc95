"""The data cache under real faults: a full disk, a preparation killed half-way, damaged cache files,
odd file names, 16-bit images and a read-only cache folder.

Everything here happens for real: small tmpfs mounts (root only; skipped otherwise, saying why), a
process killed with SIGKILL, files truncated and overwritten on disk, names made of raw bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_faces import cli
from ddpm_faces.data import PreparedData, prepare_dataset
from ddpm_faces.errors import UserError
from ddpm_faces.evaluation import reference
from ddpm_faces.evaluation.metrics import FeatureStats

PYTHON = sys.executable


# --------------------------------------------------------------------------- helpers


def make_folder(root: Path, count: int, size: int = 8) -> Path:
    """``count`` distinct small PNGs in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size, size), (30 * i % 256, 255 - 20 * i % 256, 90)).save(root / f"{i:02d}.png")
    return root


def hidden(folder: Path) -> list[str]:
    """The hidden (work) entries directly in ``folder``."""
    return sorted(name for name in os.listdir(folder) if name.startswith(".")) if folder.exists() else []


def data_warnings(caplog: pytest.LogCaptureFixture, logger: str = "ddpm_faces.data") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end, capturing its output as text."""
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


def mount_tmpfs(target: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` on ``target``, or skip the test saying why that is not possible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk / read-only folder) needs root")
    target.mkdir(parents=True, exist_ok=True)
    result = run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)])
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")


def unmount(target: Path) -> None:
    """Detach a mount made by :func:`mount_tmpfs` (lazily: a test may still map a file on it)."""
    run(["umount", "-l", str(target)])


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs)."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "2m")
    yield disk
    unmount(disk)


class LockableFolder:
    """A folder for a cache that :meth:`lock` then makes unwritable for real.

    As root, permission bits do not stop writes, so the folder is a tmpfs that is remounted
    read-only; as another user it is chmod 0o555 (restored afterwards so it can be removed).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.as_root = os.geteuid() == 0
        if self.as_root:
            mount_tmpfs(path, "8m")
        else:
            path.mkdir()

    def lock(self) -> None:
        """Make the folder read-only, or skip the test when it stays writable."""
        if self.as_root:
            result = run(["mount", "-o", "remount,ro", str(self.path)])
            if result.returncode != 0:
                pytest.skip(f"cannot remount {self.path} read-only: {result.stderr.strip()}")
        else:
            self.path.chmod(0o555)
        try:
            (self.path / "probe").touch()
        except OSError:
            return
        pytest.skip(f"{self.path} stays writable here, so a read-only cache cannot be tested")

    def release(self) -> None:
        if self.as_root:
            unmount(self.path)
        else:
            self.path.chmod(0o755)


@pytest.fixture
def lockable(tmp_path: Path) -> Iterator[LockableFolder]:
    folder = LockableFolder(tmp_path / "ro-cache")
    yield folder
    folder.release()


# --------------------------------------------------------------------------- 1. a full disk


def test_full_disk_is_one_line_error_naming_the_cache_and_leaves_nothing(small_disk: Path, tmp_path: Path) -> None:
    """12 images at 256 px need about 3.3 MiB on a 2 MiB disk (run as a command: before the check
    this was a bus error that would take the test run down with it)."""
    source = make_folder(tmp_path / "faces", 12)
    cache = small_disk / "cache"
    free_before = shutil.disk_usage(small_disk).free

    result = run([PYTHON, "-m", "ddpm_faces", "data", str(source), "--resolution", "256", "--cache-dir", str(cache)])

    assert result.returncode == 2, (result.returncode, result.stderr)  # -7 would be SIGBUS
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.search(r"needs about 3\.\d MiB, 2\.0 MiB is free", line), line
    assert str(cache) in line and "DDPM_FACES_CACHE" in line and "--cache-dir" in line
    assert hidden(cache) == [] and list(cache.iterdir()) == []
    assert shutil.disk_usage(small_disk).free == free_before

    small = prepare_dataset(str(source), 16, cache_dir=cache, progress=False)  # what fits still works
    assert small.images.shape == (12, 16, 16, 3)


DISK_FILLS_MEANWHILE = """
import shutil, sys
from ddpm_faces import cli
from ddpm_faces.data import prepare

real = shutil.disk_usage

def before_another_writer_filled_it(path):
    usage = real(path)
    return usage._replace(free=usage.free + 10 * 2**20)

prepare.shutil.disk_usage = before_another_writer_filled_it
sys.exit(cli.main(sys.argv[1:]))
"""


def test_disk_that_fills_after_the_check_is_one_line_error_not_a_bus_error(small_disk: Path, tmp_path: Path) -> None:
    """The space check passes (it is told of 10 MiB more, as if another program filled the disk just
    after it), so the real 2 MiB disk runs out while the images file is made: that must be the
    one-line error, not a bus error from writing a memory map past the disk's end."""
    source = make_folder(tmp_path / "faces", 12)
    cache = small_disk / "cache"

    result = run([PYTHON, "-c", DISK_FILLS_MEANWHILE, "data", str(source), "--resolution", "256",
                  "--cache-dir", str(cache)])

    assert result.returncode == 2, (result.returncode, result.stderr)  # -7 would be SIGBUS
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk of the data cache in") and "is full" in last
    assert "DDPM_FACES_CACHE" in last and "Traceback" not in result.stderr
    assert hidden(cache) == [] and list(cache.iterdir()) == []
    assert shutil.disk_usage(small_disk).used < 64 * 1024


def start_stuck_preparation(source: Path, cache: Path, resolution: int) -> subprocess.Popen:
    """A preparation that blocks on a FIFO among the images, once its half-built folder exists."""
    os.mkfifo(source / "zz.png")
    code = (
        "import sys; from ddpm_faces.data import prepare_dataset; "
        "prepare_dataset(sys.argv[1], int(sys.argv[2]), cache_dir=sys.argv[3], progress=False)"
    )
    process = subprocess.Popen([PYTHON, "-c", code, str(source), str(resolution), str(cache)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not any((cache / name / "images.npy").exists() for name in hidden(cache)):
        assert process.poll() is None, "the preparation ended instead of blocking on the FIFO"
        assert time.monotonic() < deadline, "no half-built folder appeared"
        time.sleep(0.1)
    time.sleep(0.3)
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_folder_of_a_killed_preparation_no_longer_keeps_the_disk_full(small_disk: Path, tmp_path: Path, caplog) -> None:
    """kill -9 during a preparation leaves its half-built folder, whose reserved images fill most
    of the small disk; the next preparation removes it (its process is dead) and fits."""
    caplog.set_level(logging.INFO, logger="ddpm_faces.data")
    source = make_folder(tmp_path / "faces", 4)
    cache = small_disk / "cache"
    process = start_stuck_preparation(source, cache, 256)
    kill(process)
    (stale,) = hidden(cache)
    assert f".building-{process.pid}-" in stale
    assert shutil.disk_usage(small_disk).free < 4 * 256 * 256 * 3 + 2**20  # 4 images would not fit

    (source / "zz.png").unlink()
    data = prepare_dataset(str(source), 256, cache_dir=cache, progress=False)

    assert data.images.shape == (4, 256, 256, 3)
    assert hidden(cache) == []
    assert any("interrupted preparation" in r.getMessage() and str(process.pid) in r.getMessage()
               for r in caplog.records)


def test_only_folders_of_dead_processes_on_this_machine_are_removed(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "faces", 3)
    cache = tmp_path / "cache"
    process = start_stuck_preparation(source, cache, 8)
    kill(process)
    (dead,) = hidden(cache)
    live_process = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(120)"])
    host = dead.rsplit("-", 2)[-2]  # this machine, as the work folder names spell it
    try:
        live = cache / f".faces-0123456789-r8-center.building-{live_process.pid}-{host}-0123abcd"
        elsewhere = cache / f".faces-0123456789-r8-center.building-{process.pid}-otherhost-0123abcd"
        for folder in (live, elsewhere):
            folder.mkdir()
            (folder / "images.npy").write_bytes(b"half")
        (source / "zz.png").unlink()
        prepare_dataset(str(source), 8, cache_dir=cache, progress=False)
        assert hidden(cache) == sorted([live.name, elsewhere.name])
        assert dead not in hidden(cache)
    finally:
        live_process.kill()
        live_process.wait()


# --------------------------------------------------------------------------- 2. a damaged cache


def pickle_bomb(marker: Path) -> np.ndarray:
    """An object array whose unpickling would create ``marker``: proof that nothing unpickled it."""

    class Bomb:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    array = np.empty(1, dtype=object)
    array[0] = Bomb()
    return array


def truncate_images(root: Path) -> str:
    path = root / "images.npy"
    os.truncate(path, path.stat().st_size - 100)
    return "images.npy is"


def overwrite_images_header(root: Path) -> str:
    with open(root / "images.npy", "r+b") as handle:
        handle.write(b"\0" * 32)
    return "images.npy has no valid .npy header"


def images_of_another_shape(root: Path) -> str:
    np.save(root / "images.npy", np.zeros((4, 4, 4, 3), np.uint8))
    return "images.npy holds uint8 (4, 4, 4, 3)"


def images_as_object_array(root: Path) -> str:
    np.save(root / "images.npy", pickle_bomb(root.parent / "unpickled"), allow_pickle=True)
    return "images.npy holds object"


def labels_as_object_array(root: Path) -> str:
    np.save(root / "labels.npy", pickle_bomb(root.parent / "unpickled"), allow_pickle=True)
    return "labels.npy cannot be read"


def meta_count_differs(root: Path) -> str:
    meta = json.loads((root / "meta.json").read_text())
    meta["counts"]["n_images"] += 1
    (root / "meta.json").write_text(json.dumps(meta))
    return "images.npy holds uint8 (6, 8, 8, 3), not uint8 (7, 8, 8, 3)"


def meta_resolution_differs(root: Path) -> str:
    meta = json.loads((root / "meta.json").read_text())
    meta["resolution"] = 16
    (root / "meta.json").write_text(json.dumps(meta))
    return "meta.json says resolution 16, not 8"


def meta_is_not_json(root: Path) -> str:
    (root / "meta.json").write_bytes(b"\x89\xff{ not json")
    return "meta.json cannot be read"


def split_is_missing(root: Path) -> str:
    (root / "split.npy").unlink()
    return "split.npy is missing"


def labels_outside_the_vocabulary(root: Path) -> str:
    labels = np.load(root / "labels.npy")
    labels[0, 0] = 99
    np.save(root / "labels.npy", labels)
    return "labels.npy holds class indices outside the vocabulary"


DAMAGES = [truncate_images, overwrite_images_header, images_of_another_shape, images_as_object_array,
           labels_as_object_array, meta_count_differs, meta_resolution_differs, meta_is_not_json,
           split_is_missing, labels_outside_the_vocabulary]


@pytest.fixture
def labelled_faces(tmp_path: Path) -> Path:
    """Six PNGs with a gender label for each."""
    root = make_folder(tmp_path / "faces", 6)
    rows = "".join(f"{i:02d}.png,{['Male', 'Female'][i % 2]}\n" for i in range(6))
    (root / "labels.csv").write_text("file,gender\n" + rows)
    return root


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_damaged_cache_is_reported_once_and_rebuilt(labelled_faces: Path, tmp_path: Path, caplog, damage) -> None:
    cache = tmp_path / "cache"
    first = prepare_dataset(str(labelled_faces), 8, cache_dir=cache, progress=False)
    pixels, labels, root = np.array(first.images), first.labels.copy(), first.root
    del first
    expected = damage(root)

    with pytest.raises(UserError, match="not a usable prepared dataset"):
        PreparedData.load(root)
    caplog.set_level(logging.INFO, logger="ddpm_faces.data")
    again = prepare_dataset(str(labelled_faces), 8, cache_dir=cache, progress=False)

    (warning,) = data_warnings(caplog)
    assert str(root) in warning and expected in warning and "preparing it again" in warning
    assert again.root == root and np.array_equal(again.images, pixels) and np.array_equal(again.labels, labels)
    assert PreparedData.load(root).meta["counts"]["n_images"] == 6
    assert not (tmp_path / "unpickled").exists()
    assert sorted(os.listdir(cache)) == [root.name]


class PixelFeatures:
    """A cheap stand-in for Inception: a few pixels as features, counting its calls."""

    identity = "test-pixels-v1"
    calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        PixelFeatures.calls += 1
        return np.asarray(images).reshape(len(images), -1)[:, ::17].astype(np.float64)


def truncated_npz(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def random_bytes_npz(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def npz_with_object_arrays(path: Path) -> None:
    np.savez(path, mu=pickle_bomb(path.parent / "unpickled"), sigma=np.eye(2), info=np.array("{}"))


def npz_with_mismatched_shapes(path: Path) -> None:
    np.savez(path, mu=np.zeros(3), sigma=np.eye(5), feats=np.zeros((4, 3)), info=np.array("{}"))


def npz_with_nan(path: Path) -> None:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["mu"][0] = np.nan
    np.savez(path, **arrays)


def npz_of_other_statistics(path: Path) -> None:
    FeatureStats.from_features(np.random.default_rng(0).normal(size=(5, 3)), info={"split": "x"}).save(path)


@pytest.mark.parametrize("damage", [truncated_npz, random_bytes_npz, npz_with_object_arrays,
                                    npz_with_mismatched_shapes, npz_with_nan, npz_of_other_statistics],
                         ids=lambda damage: damage.__name__)
def test_damaged_reference_statistics_are_computed_again(labelled_faces: Path, tmp_path: Path, caplog, damage) -> None:
    cache = tmp_path / "cache"

    def stats() -> FeatureStats:
        return reference.reference_stats(str(labelled_faces), "all", 8, cache_dir=cache,
                                         extractor=PixelFeatures, progress=False)

    PixelFeatures.calls = 0
    first = stats()
    (path,) = (cache / "reference").glob("*.npz")
    damage(path)
    if damage is not npz_of_other_statistics:  # that one is whole, only made for another key
        with pytest.raises(UserError, match=path.name):
            FeatureStats.load(path)
    caplog.set_level(logging.INFO, logger="ddpm_faces.evaluation")

    again = stats()

    (warning,) = data_warnings(caplog, "ddpm_faces.evaluation")
    assert str(path) in warning and "computing them again" in warning
    assert PixelFeatures.calls == 2 and np.allclose(again.mu, first.mu) and np.allclose(again.sigma, first.sigma)
    assert np.allclose(FeatureStats.load(path).mu, first.mu)  # the file was written again, whole
    assert not (tmp_path / "cache" / "reference" / "unpickled").exists()


# --------------------------------------------------------------------------- 3. odd files


def write_bytes_named(folder: Path, name: bytes, content: bytes) -> None:
    """Create a file whose name is raw bytes (not necessarily UTF-8)."""
    handle = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(handle, content)
    finally:
        os.close(handle)


def test_file_names_that_are_not_utf8_are_skipped_counted_and_reported_once(tmp_path: Path, caplog, capsys) -> None:
    if sys.platform == "darwin":
        pytest.skip("macOS file systems only store UTF-8 names")
    caplog.set_level(logging.WARNING, logger="ddpm_faces.data")
    # the source folder's own name is not UTF-8 either
    source = Path(os.fsdecode(os.fsencode(tmp_path) + b"/faces-\xe9t\xe9"))
    make_folder(source, 3)
    png = (source / "00.png").read_bytes()
    write_bytes_named(source, b"caf\xe9.png", png)  # Latin-1, as old cameras and zip tools write
    os.mkdir(os.fsencode(source) + b"/\xff\xfe")
    write_bytes_named(source / "\udcff\udcfe", b"inside.jpg", png)

    data = prepare_dataset(str(source), 8, cache_dir=tmp_path / "cache", progress=False)

    assert len(data) == 3
    assert data.meta["counts"]["skipped_non_utf8_names"] == 2
    (warning,) = [m for m in data_warnings(caplog) if "UTF-8" in m]
    assert "skipped 2 image file(s)" in warning and "caf\\xe9.png" in warning
    caplog.clear()
    assert cli.main(["data", str(source), "--resolution", "8", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "skipped_non_utf8_names: 2" in capsys.readouterr().out
    assert [m for m in data_warnings(caplog) if "UTF-8" in m] == []  # reused: reported once, when prepared


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path: Path) -> None:
    values = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 65535 // 63).astype(np.uint16)
    values[0, :3] = (0, 257 * 128, 65535)
    source = tmp_path / "sixteen"
    source.mkdir()
    Image.fromarray(values).save(source / "grey16.png")
    assert Image.open(source / "grey16.png").mode in ("I;16", "I")

    data = prepare_dataset(str(source), 8, crop="none", cache_dir=tmp_path / "cache", progress=False)

    expected = np.rint(values / 257).astype(np.uint8)
    assert data.images[0, 0, :3, 0].tolist() == [0, 128, 255]
    for channel in range(3):
        assert np.array_equal(data.images[0, ..., channel], expected)


def test_read_only_cache_folder_is_one_line_naming_the_setting(tmp_path: Path, lockable, capsys) -> None:
    source = make_folder(tmp_path / "faces", 3)
    cache = lockable.path
    prepared = prepare_dataset(str(source), 8, cache_dir=cache, progress=False)
    lockable.lock()

    assert prepare_dataset(str(source), 8, cache_dir=cache, progress=False).root == prepared.root  # reading is fine
    for target in (cache, cache / "not-yet"):
        with pytest.raises(UserError) as error:
            prepare_dataset(str(source), 16, cache_dir=target, progress=False)
        message = str(error.value)
        assert "\n" not in message and "DDPM_FACES_CACHE" in message and str(cache) in message

    assert cli.main(["data", str(source), "--resolution", "16", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write the data cache") and "DDPM_FACES_CACHE" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_an_image_written_onto_a_full_disk_keeps_the_earlier_one_whole(small_disk: Path) -> None:
    """A full disk while writing a picture (a grid, a strip, an edit) is one line, and the file that was there
    stays whole: pictures are written to a temporary file, then renamed over the old one."""
    from PIL import Image

    from ddpm_faces.images import save_image

    out = small_disk / "faces.png"
    save_image(np.full((32, 32, 3), 128, np.uint8), out)
    before = out.read_bytes()
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)                    # fill the disk to its last block
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)   # does not compress
    with pytest.raises(UserError, match=r"cannot write the image .*faces\.png: No space left on device"):
        save_image(noise, out)
    assert out.read_bytes() == before and Image.open(out).size == (32, 32)
    with pytest.raises(UserError, match="No space left on device"):
        save_image(noise, small_disk / "new.png")
    assert not (small_disk / "new.png").exists()                        # no 0-byte file where none was
    assert sorted(p.name for p in small_disk.iterdir()) == ["faces.png", "filler"]   # no temporary file left
