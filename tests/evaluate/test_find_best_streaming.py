"""find-best streams cases: however many there are, only a few arrays are alive at once."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest

import autoseg.evaluate.best as best_module
import autoseg.infer.predict as predict_module
from autoseg.dataset.io import read_image, write_image
from autoseg.evaluate.best import find_best
from autoseg.evaluate.postprocess import determine_postprocessing, nanmean
from tests.evaluate.conftest import GEOM, make_ref, write_validation

NUM_CASES = 30


def _probabilities(ref: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Softmax-like maps (3, z, y, x) that mostly agree with ``ref``, with noise."""
    logits = np.stack([(ref == k).astype(np.float32) * 2 for k in range(3)]) + rng.normal(0, 0.8, (3, *ref.shape))
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


@pytest.fixture
def cv_30(paths, tmp_path: Path):
    """Two configurations x 3 folds x 10 validation cases, with probabilities (pairs are scored)."""
    rng = np.random.default_rng(3)
    refs = {}
    for i in range(NUM_CASES):
        refs[f"c{i:02d}"] = tmp_path / "ref" / f"c{i:02d}.nii.gz"
        ref = make_ref(i)
        if i % 4 == 0:
            ref[ref == 2] = 1  # some cases without the lesion
        write_image(refs[f"c{i:02d}"], ref, GEOM)
    for config in ("A", "B"):
        for fold in range(3):
            ids = sorted(refs)[fold::3]
            probs = {cid: _probabilities(read_image(refs[cid])[0], rng) for cid in ids}
            preds = {cid: np.argmax(p, axis=0).astype(np.uint8) for cid, p in probs.items()}
            write_validation(paths, "Dataset123_Toy", config, fold, refs, preds, probs)
    return paths, refs


def test_find_best_holds_a_few_arrays_not_every_case(cv_30, monkeypatch) -> None:
    paths, refs = cv_30
    alive, peak, loaded = [0], [0], [0]

    def tracked(array: np.ndarray) -> np.ndarray:
        alive[0] += 1
        loaded[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(array, lambda: alive.__setitem__(0, alive[0] - 1))
        return array

    real_read, real_load = best_module.read_image, predict_module.load_probabilities
    monkeypatch.setattr(best_module, "read_image", lambda p: (tracked(real_read(p)[0]), real_read(p)[1]))
    monkeypatch.setattr(predict_module, "load_probabilities",
                        lambda d, c: (lambda pr: (tracked(pr[0]), pr[1]))(real_load(d, c)))
    best = find_best(paths, "Dataset123_Toy")
    assert {c.configs for c in best.candidates} == {("A",), ("B",), ("A", "B")}
    # every case was read (3 candidates + reference, twice for the winner) but never all at once
    assert loaded[0] >= 4 * NUM_CASES
    assert peak[0] <= 4, f"{peak[0]} arrays alive at once"


def test_streamed_scores_equal_an_in_memory_recount(cv_30) -> None:
    paths, refs = cv_30
    best = find_best(paths, "Dataset123_Toy")
    root = paths.results / "Dataset123_Toy"
    segs = {c: {} for c in ("A", "B", "A+B")}
    for cid in refs:
        fold = sorted(refs).index(cid) % 3
        probs = []
        for c in ("A", "B"):
            vdir = root / c / "default" / f"fold_{fold}" / "validation"
            segs[c][cid] = read_image(vdir / f"{cid}.nii.gz")[0]
            with np.load(vdir / f"{cid}.npz") as z:
                probs.append(z[z.files[0]].astype(np.float32))
        segs["A+B"][cid] = np.argmax(probs[0] + probs[1], axis=0)
    ref_maps = {cid: read_image(p)[0] for cid, p in refs.items()}

    def dice(s: np.ndarray, r: np.ndarray, v: int) -> float:
        total = (s == v).sum() + (r == v).sum()
        return float("nan") if total == 0 else 2 * ((s == v) & (r == v)).sum() / total

    by_name = {" + ".join(c.configs).replace(" + ", "+"): c for c in best.candidates}
    for name, maps in segs.items():
        expected = {v: nanmean(dice(maps[cid], ref_maps[cid], v) for cid in refs) for v in (1, 2)}
        assert by_name[name].class_dice == pytest.approx(expected)
    winner = segs["+".join(best.configs)]
    decision = determine_postprocessing([winner[cid] for cid in refs], [ref_maps[cid] for cid in refs], [1, 2])
    assert best.postprocessing == decision.rules
    assert best.class_dice_postprocessed == pytest.approx(decision.dice_after)
