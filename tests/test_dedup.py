"""Near-duplicate removal: planted copies are found, reports and the filtered manifest are right."""

import csv

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("imagehash")

from bigtransfer.cli import main
from bigtransfer.data.sources import load_source
from bigtransfer.dedup import (
    DedupOptions,
    candidate_pairs,
    duplicate_rule,
    planted_precision_recall,
    run_dedup,
    scored_candidates,
    write_planted_set,
)

TINY = "R[1,1,1,1]x0.5"


def test_pair_rules_on_hand_made_scores():
    opts = DedupOptions(upstream="", downstream=(), cosine=0.9, margin=0.03, identical=0.98, hash_bits=4,
                        hash_cosine=0.95)
    assert duplicate_rule(0.92, 0, 0.05, 30, opts) == "embedding"  # nearest, similar, stands out
    assert duplicate_rule(0.92, 0, 0.01, 30, opts) is None  # nearest, but one of a crowd
    assert duplicate_rule(0.92, 1, 0.05, 30, opts) is None  # not the nearest
    assert duplicate_rule(0.985, 3, 0.0, 30, opts) == "embedding"  # near-identical at any rank
    assert duplicate_rule(0.96, 2, 0.0, 3, opts) == "hash+embedding"  # hash match, embedding confirms
    assert duplicate_rule(0.80, 2, 0.0, 0, opts) is None  # equal hashes, different content


def test_candidates_come_from_both_indexes():
    up = np.array([[1, 0, 0], [0.9, 0.436, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    down = np.array([[1, 0, 0], [0, 0.6, 0.8]], dtype=np.float32)
    up_hash = np.zeros((4, 8), dtype=np.uint8)
    up_hash[3] = 255  # only upstream 3 is far in hash space
    down_hash = np.full((2, 8), 255, dtype=np.uint8)
    down_hash[0] = 0
    opts = DedupOptions(upstream="", downstream=(), neighbours=2, hash_bits=4)
    found = {(i, j): (rank, round(margin, 3), h) for i, j, _, rank, margin, h in
             scored_candidates(up, up_hash, down, down_hash, opts)}
    assert found[(0, 0)] == (0, 0.1, 0) and found[(0, 1)][0] == 1
    assert found[(0, 2)] == (2, -0.9, 0)  # outside the 2 neighbours, proposed by the hash
    assert (1, 3) in found and (1, 2) in found and (1, 0) not in found
    pairs = candidate_pairs(up, up_hash, down, down_hash, opts)
    assert [(i, j, rule) for i, j, _, _, rule in pairs] == [(0, 0, "embedding")]


def test_planted_duplicates_are_found_and_removed(tmp_path):
    truth = write_planted_set(tmp_path / "set", upstream_per_class=6, classes=6, test_per_class=3, planted=8)
    assert len(truth) == 8 and all(p.endswith(".jpg") for _, p in truth)
    out = tmp_path / "out"
    summary = run_dedup(DedupOptions(upstream=str(tmp_path / "set" / "upstream"),
                                     downstream=(str(tmp_path / "set" / "test"),), out=out, model=TINY,
                                     resolution=64, progress=False,
                                     # a randomly initialised model's embeddings are blunter than BiT's
                                     cosine=0.8, margin=0.0, hash_bits=10, hash_cosine=0.6))
    scores = planted_precision_recall(out / "pairs.csv", truth)
    assert scores["recall"] >= 0.75, scores
    with open(out / "pairs.csv", newline="") as fh:
        pairs = list(csv.DictReader(fh))
    assert {r["rule"] for r in pairs} <= {"embedding", "hash+embedding"}
    removed = {r["upstream_path"] for r in pairs}
    kept = load_source(str(out / "upstream_filtered.csv"), require_test=False, progress=False)
    assert len(kept.train) == summary["upstream_kept"] == 36 + 8 - len(removed)
    assert not removed & set(kept.train.paths)
    assert (out / "contact_sheet.png").is_file()
    assert (out / "contact_sheet.html").read_text().count("data:image/png;base64,") == 2 * len(pairs)


def test_cli_dedup_and_bad_input(tmp_path, capsys):
    truth = write_planted_set(tmp_path / "set", upstream_per_class=3, classes=4, test_per_class=2, planted=3)
    args = ["dedup", "--upstream", str(tmp_path / "set" / "upstream"), "--downstream", str(tmp_path / "set" / "test"),
            "--model", TINY, "--resolution", "32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "near-duplicate pairs" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "o2"), "--cosine", "1.5"]) == 2
    assert "--cosine" in capsys.readouterr().err
    assert main(["dedup", "--upstream", "digits", "--downstream", str(tmp_path / "set" / "test"), "--model", TINY,
                 "--out", str(tmp_path / "o3"), "--quiet"]) == 2
    assert "dedup needs image files" in capsys.readouterr().err
    assert len(truth) == 3
