"""The classifier feature extractor: trained on a labelled synthetic split, registered with torch-fidelity,
its features tell real images from noise, it knows the classes of the images it learned, and an
evaluation with it logs the class accuracy and says which extractor made its numbers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from mvar import tracking
from mvar.cli import main as mvar_main
from mvar.data.synth import write_synth
from mvar.errors import UserError
from mvar.evaluation.run import evaluate
from mvar.metrics.classifier import EXTRACTOR_NAME, load_classifier, meta_path, read_labelled, register
from mvar.metrics.fidelity import compute_reference, save_reference, score_images
from mvar.metrics.inception import resolve_weights


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """(weights .pt, training shards, held-out shards): 100 + 50 synthetic 64 px images, 10 classes,
    80 steps (about 8 s on 2 shared cores); training accuracy 1.0."""
    root = tmp_path_factory.mktemp("classifier")
    train, held = str(root / "train"), str(root / "held")
    write_synth(train, num_images=100, image_size=64, num_classes=10, seed=3, shard_size=50)
    write_synth(held, num_images=50, image_size=64, num_classes=10, seed=4, shard_size=50)
    out = root / "classifier.pt"
    assert mvar_main(["eval", "train-classifier", "--shards", train, "--eval-shards", held, "--out", str(out),
                      "--steps", "80", "--batch-size", "50"]) == 0
    return str(out), train, held


class Images(torch.utils.data.Dataset):
    def __init__(self, x_uint8):
        self.x = x_uint8

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_round_trip_through_torch_fidelity_real_beats_noise_and_training_images_are_known(classifier):
    import torch_fidelity
    weights_path, train, held = classifier
    register()
    x_train, _, _, _ = read_labelled(train)
    x_held, _, _, _ = read_labelled(held)
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (50, 3, 64, 64), dtype=np.uint8))
    kwargs = dict(feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=weights_path, fid=True, isc=True,
                  prc=True, cuda=False, batch_size=50, verbose=False, isc_splits=2, cache=False,
                  save_cpu_ram=True)
    real = torch_fidelity.calculate_metrics(input1=Images(x_train), input2=Images(x_held), **kwargs)
    fake = torch_fidelity.calculate_metrics(input1=Images(noise), input2=Images(x_held), **kwargs)
    assert real["frechet_inception_distance"] * 3 < fake["frechet_inception_distance"], (real, fake)
    # IS over the classifier's 10 classes: confident and balanced on real images, not on noise
    assert real["inception_score_mean"] > 5 > fake["inception_score_mean"], (real, fake)
    assert real["recall"] > fake["recall"]
    # the project's own path: same extractor through torch-fidelity's registry, plus the class accuracy
    weights = resolve_weights(weights_path, extractor="classifier")
    assert weights.extractor == EXTRACTOR_NAME and not weights.official
    ref = compute_reference(held, weights, torch.device("cpu"), batch_size=50)
    assert ref.features.shape == (50, 64) and ref.feature_extractor == EXTRACTOR_NAME
    m = score_images(train, ref, weights, torch.device("cpu"), isc_splits=2, batch_size=50)
    assert m["class_acc"] == 1.0 and m["class_acc_min"] == 1.0
    assert m["fid"] == pytest.approx(real["frechet_inception_distance"], rel=1e-3)


def test_a_replaced_or_half_written_classifier_and_a_mismatched_reference_are_refused(classifier, eval_inputs,
                                                                                      tmp_path):
    weights_path, _, _ = classifier
    copy = tmp_path / "c.pt"
    shutil.copy(weights_path, copy)
    with pytest.raises(UserError, match="no 'c.yaml' beside it"):
        resolve_weights(str(copy), extractor="classifier")
    shutil.copy(meta_path(weights_path), meta_path(copy))
    model, meta = load_classifier(copy)
    assert meta.num_classes == 10 and meta.image_size == 64 and meta.training["train_acc"] == 1.0
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(UserError, match="replaced or is incomplete"):
        resolve_weights(str(copy), extractor="classifier")
    with pytest.raises(UserError, match="needs the classifier file"):
        resolve_weights("", extractor="classifier")
    # an Inception reference with classifier features: refused before any sampling
    cfg = eval_inputs.config(tmp_path / "ev", feature_extractor="classifier", feature_extractor_weights=weights_path)
    with pytest.raises(UserError, match="holds inception-v3-compat features"):
        evaluate(cfg)


def test_evaluation_with_the_classifier_logs_class_accuracy_and_names_the_extractor(classifier, eval_inputs,
                                                                                    tmp_path):
    weights_path, _, held = classifier
    ref = str(tmp_path / "ref.npz")
    save_reference(ref, compute_reference(held, resolve_weights(weights_path, extractor="classifier"),
                                          torch.device("cpu"), 50))
    cfg = eval_inputs.config(tmp_path / "ev", track=True, reference=ref, feature_extractor="classifier",
                             feature_extractor_weights=weights_path)
    [result] = evaluate(cfg)
    m = result.metrics
    # random weights: the samples are noise-like, so the classifier's accuracy on them is low
    assert 0 <= m["eval/class_acc"] <= 0.5 and m["eval/class_acc_min"] <= m["eval/class_acc"]
    assert 1 <= m["eval/is"] <= 10 and m["eval/fid"] > 0
    assert 0 <= m["eval/class_acc_boot_low"] <= m["eval/class_acc_boot_high"] <= 1
    run = tracking.client(eval_inputs.tracking_uri).get_run(result.run_id)
    assert run.data.tags["mvar.feature_extractor"] == EXTRACTOR_NAME
    assert run.data.tags["mvar.metrics_comparable"] == "false"
    assert run.data.params["eval.feature_extractor"] == EXTRACTOR_NAME
    assert run.data.metrics["eval/class_acc"] == pytest.approx(m["eval/class_acc"])
    # a model of another class count cannot be judged by this classifier
    meta = yaml.safe_load(meta_path(weights_path).read_text())
    other = tmp_path / "other.pt"
    shutil.copy(weights_path, other)
    meta_path(other).write_text(yaml.safe_dump({**meta, "class_names": meta["class_names"][:5]}))
    with pytest.raises(UserError, match="knows 5 classes, the model has 10"):
        evaluate(eval_inputs.config(tmp_path / "ev2", reference=ref, feature_extractor="classifier",
                                    feature_extractor_weights=str(other)))
