"""Supp. A's regularisers in the training loop: pre-logit dropout and decay towards the initial weights."""

from pathlib import Path

import pytest
import torch

from bigtransfer import BigTransferError, create_model
from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.sources import load_source
from bigtransfer.data.transforms import train_transform
from bigtransfer.train.distributed import DistContext
from bigtransfer.train.execution import ExecutionOptions
from bigtransfer.train.loop import train
from bigtransfer.train.recipe import TrainingRecipe
from bigtransfer.train.schedule import LRSchedule

TINY = "R[1,1,1,1]x0.5"


@pytest.fixture(scope="module")
def digits():
    splits = load_source("digits", progress=False)
    return TransformedImages(splits.train.subset(range(200)), train_transform(20, 16, flip=False))


def run(digits, out: Path, steps=6, on_eval=None, **regularisers):
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=10, zero_head=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainingRecipe(schedule=LRSchedule(0.2, 0, (), steps), batch=20, **regularisers)
    execution = ExecutionOptions(log_every=1, checkpoint_every=1, progress=False, eval_every=1 if on_eval else 0,
                                 precision="fp32")
    train(model, digits, digits if on_eval else None, cfg, execution, out, DistContext(0, 1, 0, torch.device("cpu")),
          fingerprint="t", on_eval=on_eval)
    return model, initial


def distance(model, initial) -> float:
    return sum(float((v.float() - initial[k].float()).pow(2).sum()) for k, v in model.state_dict().items()) ** 0.5


def test_decay_towards_initial_weights_keeps_the_model_near_its_start(digits, tmp_path):
    free, start = run(digits, tmp_path / "a")
    anchored, start_b = run(digits, tmp_path / "b", l2_to_init=2.0)
    assert all(torch.equal(start[k], start_b[k]) for k in start)
    assert distance(anchored, start_b) < 0.8 * distance(free, start)


def test_prelogit_dropout_is_used_in_training_only(digits, tmp_path):
    plain, _ = run(digits, tmp_path / "a")
    dropped, _ = run(digits, tmp_path / "b", prelogit_dropout=0.5)
    assert dropped.pre_logits_dropout.p == 0.5
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))
    dropped.eval()
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(dropped(x), dropped(x))  # no dropout at test time


def test_a_resumed_run_decays_towards_the_original_start_not_the_checkpoint(digits, tmp_path):
    whole, _ = run(digits, tmp_path / "whole", l2_to_init=1.0)

    def stop_at_three(step, metrics, logbook):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(digits, tmp_path / "cut", l2_to_init=1.0, on_eval=stop_at_three)
    resumed, _ = run(digits, tmp_path / "cut", l2_to_init=1.0)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_bad_regulariser_values(digits, tmp_path):
    with pytest.raises(BigTransferError, match="dropout in \\[0, 1\\)"):
        run(digits, tmp_path / "a", prelogit_dropout=1.0)
    with pytest.raises(BigTransferError, match="l2_to_init must be >= 0"):
        run(digits, tmp_path / "b", l2_to_init=-1.0)
