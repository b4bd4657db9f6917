"""The one forward path (`inference.Predictor`): what it reads from a weights file and what it answers."""

from __future__ import annotations

import torch

from bigtransfer.inference.predictor import load_predictor
from bigtransfer.models import create_model, save_checkpoint

TINY = "R[1,1,1,1]x0.5"


def _saved(tmp_path, provenance=None, classes=("cat", "dog", "fox")):
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=len(classes), zero_head=False)
    return save_checkpoint(model, tmp_path / "model.safetensors", class_names=list(classes), resolution=32,
                           provenance=provenance), model


def test_probabilities_are_softmax_unless_the_file_says_the_head_was_trained_with_a_sigmoid(tmp_path):
    path, _ = _saved(tmp_path)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    softmax = load_predictor(path, device="cpu")
    assert not softmax.multi_label
    torch.testing.assert_close(softmax.probabilities(images).sum(dim=1), torch.ones(4))
    sig_path, _ = _saved(tmp_path / "sig", provenance={"loss": "sigmoid"})
    sigmoid = load_predictor(sig_path, device="cpu")
    assert sigmoid.multi_label
    torch.testing.assert_close(sigmoid.probabilities(images), torch.sigmoid(sigmoid.logits(images)))


def test_the_predictor_answers_what_the_model_computes_with_class_names_in_rank_order(tmp_path):
    path, model = _saved(tmp_path)
    predictor = load_predictor(path, device="cpu")
    assert (predictor.resolution, predictor.class_names, predictor.name) == (32, ["cat", "dog", "fox"],
                                                                              "model.safetensors")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(predictor.logits(images), model(images))
        torch.testing.assert_close(predictor.features(images), model.forward_features(images))
    probs = predictor.probabilities(images)
    for row, ranked in zip(probs, predictor.top_k(probs, k=5)):
        assert len(ranked) == 3  # k is capped at the class count
        assert [r["label"] for r in ranked] == [predictor.class_names[i] for i in row.argsort(descending=True)]
