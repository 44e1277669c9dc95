"""The attribute classifier behind `eval --attributes`: it learns a learnable attribute, survives save and
load, refuses bad files in one line, and agreement compares values by name across vocabularies."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_faces.data import prepare_dataset
from ddpm_faces.errors import UserError
from ddpm_faces.evaluation.attributes import (AttributeClassifier, ClassifierTraining, agreement,
                                              classifier_accuracy, load_classifier, save_classifier,
                                              target_labels, train_classifier)


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    """Faces whose 'gender' is the colour of the background (learnable) and whose 'age' is noise."""
    root = tmp_path_factory.mktemp("coloured")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(160):
        gender = ["Female", "Male"][i % 2]
        img = np.zeros((16, 16, 3), np.uint8) + rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
        img[..., 0 if gender == "Male" else 2] += 180
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append({"file": f"{i}.png", "split": "val" if i % 5 == 0 else "train", "gender": gender,
                     "age": ["20-29", "30-39"][rng.integers(0, 2)]})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "split", "gender", "age"])
        w.writeheader()
        w.writerows(rows)
    return prepare_dataset(root, 16, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_classifier_learns_a_learnable_attribute_and_round_trips(coloured, tmp_path):
    torch.set_num_threads(1)
    clf, acc = train_classifier(coloured, ["gender", "age"], ClassifierTraining(steps=40, batch_size=16, width=8),
                                progress=False)
    assert acc["gender"] == 1.0                         # the colour decides it
    assert 0.2 < acc["age"] < 0.9                       # a coin toss stays near chance
    save_classifier(clf, tmp_path / "clf", acc)
    again = load_classifier(tmp_path / "clf")
    images = np.asarray(coloured.images[:20])
    for name in ("gender", "age"):
        assert np.array_equal(clf.predict(images)[name], again.predict(images)[name])
    assert again.accuracy["gender"] == 1.0
    val = coloured.indices("val")
    labels = coloured.labels[val][:, [coloured.attributes.index("gender")]].astype(np.int64)
    gender_only = AttributeClassifier({"gender": clf.vocab["gender"]}, 16, 8)
    gender_only.load_state_dict({k: v for k, v in clf.state_dict().items() if not k.startswith("heads.age")})
    assert classifier_accuracy(gender_only, np.asarray(coloured.images[val]), labels) == {"gender": 1.0}


def test_bad_classifier_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no attribute classifier"):
        load_classifier(tmp_path)
    save_classifier(AttributeClassifier({"gender": ["Female", "Male"]}, 16, 8), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="readable attribute classifier"):
        load_classifier(tmp_path / "c")


class FixedClassifier:
    """Reads every image as the given values."""
    vocab = {"gender": ["Male", "Female"]}            # another order than the model's

    def __init__(self, answers):
        self.answers = answers

    def predict(self, images):
        return {"gender": np.array(self.answers)}


def test_agreement_compares_values_by_name_across_vocabulary_orders():
    model_vocab = {"gender": ["Female", "Male"], "age": ["0-2", "3-9"]}
    asked = np.array([[0, 0], [1, 1], [0, 1], [1, 0]])      # model indices: F, M, F, M
    clf = FixedClassifier([1, 0, 0, 0])                     # classifier indices: F, M, M, M
    result = agreement(clf, np.zeros((4, 8, 8, 3), np.uint8), asked, ["gender", "age"], model_vocab)
    assert result == {"gender": 0.75}                       # age: the classifier does not read it


def test_target_labels_are_labelled_val_combinations(coloured):
    labels = target_labels(coloured, ["gender", "age"], 50, seed=0)
    val = coloured.labels[coloured.indices("val")]
    cols = [coloured.attributes.index(a) for a in ("gender", "age")]
    seen = {tuple(r) for r in val[:, cols].tolist()}
    assert labels.shape == (50, 2) and all(tuple(r) in seen for r in labels.tolist())
    assert np.array_equal(labels, target_labels(coloured, ["gender", "age"], 50, seed=0))


def test_eval_attributes_on_an_unconditional_model_is_a_one_line_error(tmp_path, unconditional_model):
    save_classifier(AttributeClassifier({"gender": ["Female", "Male"]}, 16, 8), tmp_path / "c")
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "eval", "--attributes", "--classifier",
                          str(tmp_path / "c"), "--num", "2", "--checkpoint", str(unconditional_model)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "conditional model" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
