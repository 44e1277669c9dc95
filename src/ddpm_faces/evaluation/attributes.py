"""A small attribute classifier (age, gender, race) to measure whether conditional samples show what was
asked for, next to how well the same classifier reads real faces.

    clf = load_classifier()                                   # the bundled one (weights/attributes32)
    acc = classifier_accuracy(clf, images_uint8, labels)      # per attribute, on real faces
    rows = model_eval.attribute_agreement(pipe, clf, SamplingRequest(num=300), reference=..., guidance_scales=[1, 3])
    kept = read_attributes(clf, photo_uint8, pipe.cfg.model.vocab)   # what an edit keeps of the photo

The network is a plain CNN (three stages of two 3x3 convolutions with GroupNorm and SiLU, global average
pooling, one linear head per attribute), trained with cross-entropy on the labelled train split; images
whose label is unknown do not count for that attribute. Weights are a safetensors file beside a
config.yaml holding the vocabularies and the resolution.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import BatchLoader
from ..errors import UserError
from ..hardware import DTYPES, resolve_precision
from ..io import atomic_folder
from ..runs import DEFAULT_CLASSIFIER, bundled

log = logging.getLogger("ddpm_faces.evaluation")



class AttributeClassifier(nn.Module):
    def __init__(self, vocab: dict[str, list[str]], resolution: int = 32, width: int = 32):
        super().__init__()
        self.vocab, self.resolution, self.width = {k: list(v) for k, v in vocab.items()}, resolution, width
        layers, c_in = [], 3
        for i, c in enumerate((width, 2 * width, 4 * width)):
            for j in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, stride=2 if (j == 0 and i > 0) else 1),
                           nn.GroupNorm(8, c), nn.SiLU()]
                c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({name: nn.Linear(c_in, len(values)) for name, values in self.vocab.items()})

    @property
    def attributes(self) -> list[str]:
        return list(self.vocab)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1] -> logits per attribute."""
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    def prepare(self, images_uint8: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 at any size -> (N, 3, r, r) in [-1, 1] at the classifier's resolution."""
        x = torch.from_numpy(np.array(images_uint8, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    @torch.no_grad()
    def predict(self, images_uint8: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Class indices per attribute for (N, H, W, 3) uint8 images."""
        self.eval()
        out = {name: [] for name in self.vocab}
        for i in range(0, len(images_uint8), batch_size):
            logits = self(self.prepare(images_uint8[i:i + batch_size]))
            for name, value in logits.items():
                out[name].append(value.argmax(1).numpy())
        return {name: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for name, v in out.items()}


def read_attributes(clf: AttributeClassifier, image_uint8: np.ndarray, vocab: dict[str, list[str]]) -> dict[str, str]:
    """The values the classifier reads on one (H, W, 3) uint8 photo, for the attributes of `vocab` (a model's)
    that it knows, by value name."""
    pred = clf.predict(np.asarray(image_uint8)[None])
    read = {name: clf.vocab[name][int(pred[name][0])] for name in vocab if name in clf.vocab}
    return {name: value for name, value in read.items() if value in vocab[name]}


def keep_photo_attributes(request, vocab: dict[str, list[str]], image_uint8: np.ndarray,
                          clf: AttributeClassifier | None = None):
    """(request, kept): an edit's request with every attribute it does not ask for set to the photo's own, as
    the classifier reads it (request.unasked "photo"), so that asking for an age does not also change the
    person's gender or race; and those kept values. Unchanged where unasked is not "photo" or the model is
    unconditional."""
    if request.unasked != "photo" or not vocab:
        return request, {}
    read = read_attributes(clf or load_classifier(), image_uint8, vocab)
    kept = {name: value for name, value in read.items() if name not in request.attributes}
    return request.replace(attributes={**request.attributes, **kept}), kept


def classifier_accuracy(clf: AttributeClassifier, images_uint8: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy per attribute over the images whose label is known (labels: (N, n_attributes), -1 unknown)."""
    pred = clf.predict(images_uint8)
    acc = {}
    for i, name in enumerate(clf.attributes):
        known = labels[:, i] >= 0
        acc[name] = float((pred[name][known] == labels[known, i]).mean()) if known.any() else float("nan")
    return acc


@dataclass
class ClassifierTraining:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    width: int = 32
    precision: str = "auto"                   # auto: bf16 autocast where the CPU has bf16 units, else fp32


def train_classifier(data, attributes: list[str] | None = None, settings: ClassifierTraining = ClassifierTraining(),
                     progress: bool = True) -> tuple[AttributeClassifier, dict]:
    """Train on the prepared dataset's train split; returns the model and its accuracy on the val split."""
    attributes = attributes or list(data.attributes)
    missing = [a for a in attributes if a not in data.attributes]
    if missing:
        raise UserError(f"the data has no {', '.join(missing)} labels (it has: {', '.join(data.attributes) or 'none'})")
    cols = [data.attributes.index(a) for a in attributes]
    torch.manual_seed(settings.seed)
    clf = AttributeClassifier({a: data.vocab[a] for a in attributes}, data.resolution, settings.width)
    opt = torch.optim.AdamW(clf.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps, pct_start=0.1)
    loader = iter(BatchLoader(data, "train", settings.batch_size, seed=settings.seed, hflip=True))
    dtype = DTYPES[resolve_precision(settings.precision)]         # auto: bf16 only where the CPU has bf16 units
    clf.train()
    bar = tqdm(range(settings.steps), desc="attribute classifier", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        batch = next(loader)
        labels = batch["labels"][:, cols]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = clf(batch["images"])
        loss = sum(F.cross_entropy(logits[a].float(), labels[:, i], ignore_index=-1) for i, a in enumerate(attributes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    val = data.indices("val")
    images = np.asarray(data.images[val])
    acc = classifier_accuracy(clf, images, data.labels[val][:, cols].astype(np.int64))
    log.info("attribute classifier trained in %.0f s; val accuracy %s", time.perf_counter() - t0, acc)
    return clf.eval(), acc


def save_classifier(clf: AttributeClassifier, out_dir: str | Path, accuracy: dict | None = None,
                    note: str | None = None) -> Path:
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, tmp / "model.safetensors",
                  metadata={"format": "ddpm-faces-attributes"})
        meta = {"resolution": clf.resolution, "width": clf.width, "vocab": clf.vocab}
        if accuracy is not None:
            meta["val_accuracy"] = {k: round(v, 4) for k, v in accuracy.items()}
        if note:
            meta["note"] = note
        (tmp / "config.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return out_dir


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """The classifier at `path` (a folder with model.safetensors + config.yaml), or the bundled one."""
    folder = Path(path) if path else bundled(DEFAULT_CLASSIFIER)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.yaml").is_file():
        raise UserError(f"no attribute classifier in {folder}: expected model.safetensors and config.yaml "
                        "(train one with `ddpm-faces classifier`)")
    meta = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    try:
        clf = AttributeClassifier(meta["vocab"], int(meta["resolution"]), int(meta["width"]))
        clf.load_state_dict(load_file(folder / "model.safetensors"))
    except Exception as err:                     # a file of another model or format: one line, no traceback
        raise UserError(f"{folder} does not hold a readable attribute classifier ({type(err).__name__}): "
                        "train it again with `ddpm-faces classifier`") from None
    clf.accuracy = meta.get("val_accuracy", {})
    return clf.eval()


def target_labels(data, attributes: list[str], num: int, seed: int) -> np.ndarray:
    """`num` attribute combinations drawn from the val split's labelled faces (realistic combinations)."""
    cols = [data.attributes.index(a) for a in attributes]
    labels = data.labels[data.indices("val")][:, cols].astype(np.int64)
    complete = labels[(labels >= 0).all(1)]
    if len(complete) == 0:
        raise UserError("no val image has every attribute labelled: cannot pick attributes to ask for")
    rng = np.random.default_rng(seed)
    return complete[rng.integers(0, len(complete), num)]


def agreement(clf: AttributeClassifier, images_uint8: np.ndarray, asked: np.ndarray,
              attributes: list[str], model_vocab: dict[str, list[str]]) -> dict:
    """Share of images in which the classifier reads the attribute value that was asked for."""
    pred = clf.predict(images_uint8)
    out = {}
    for i, name in enumerate(attributes):
        if name not in clf.vocab:
            continue
        # the model's and the classifier's vocabularies may be ordered differently: compare values by name
        want = np.array([model_vocab[name][j] for j in asked[:, i]])
        got = np.array([clf.vocab[name][j] for j in pred[name]])
        out[name] = float((want == got).mean())
    return out

