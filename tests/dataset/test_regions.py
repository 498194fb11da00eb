"""Region-based labels (BraTS style) at the dataset layer: dataset.json rules and `LabelScheme`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from autoseg.cli import cli
from autoseg.common.errors import AutosegError, DatasetError
from autoseg.common.paths import Paths
from autoseg.dataset.io import read_image
from autoseg.dataset.phantom import PhantomRecipe, make_region_phantom_dataset
from autoseg.dataset.spec import LabelScheme, load_dataset
from autoseg.dataset.verify import verify_dataset
from tests.dataset.conftest import TINY_NAME, edit_dataset_json, make_tiny_dataset

BRATS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
ORDER = (1, 2, 3)


def test_the_scheme_knows_regions_outputs_and_values() -> None:
    s = LabelScheme.from_labels(BRATS, ORDER)
    assert s.has_regions and s.num_outputs == 3 and s.label_values == (0, 1, 2, 3)
    assert s.regions == ((1, 2, 3), (2, 3), (3,))
    assert s.eval_targets == {"whole": (1, 2, 3), "core": (2, 3), "enhancing": (3,)}
    classes = LabelScheme.from_labels({"background": 0, "b": 2, "a": 1, "ignore": 3})
    assert not classes.has_regions and classes.num_outputs == 3 and classes.ignore_label == 3
    assert classes.eval_targets == {1: (1,), 2: (2,)} and classes.regions == ()


def test_label_map_to_regions_and_back_is_the_identity_for_nested_regions() -> None:
    """Nested regions + regions_class_order innermost-last: regions of a label map give it back."""
    s = LabelScheme.from_labels(BRATS, ORDER)
    seg = np.random.default_rng(0).integers(0, 4, size=(1, 1, 5, 6, 7))
    regions = s.region_targets(seg)
    assert regions.shape == (1, 3, 5, 6, 7) and regions.dtype == np.float32
    np.testing.assert_array_equal(regions[0, 0], seg[0, 0] > 0)
    np.testing.assert_array_equal(regions[0, 1], np.isin(seg[0, 0], [2, 3]))
    np.testing.assert_array_equal(regions[0, 2], seg[0, 0] == 3)
    np.testing.assert_array_equal(s.label_map(regions[0]), seg[0, 0])
    as_torch = s.region_targets(torch.from_numpy(seg))  # the loss converts on the device, in torch
    np.testing.assert_array_equal(as_torch.numpy(), regions)


def test_label_map_follows_regions_class_order_and_the_threshold() -> None:
    s = LabelScheme.from_labels(BRATS, ORDER)
    probs = np.array([[0.9, 0.9, 0.2, 0.51], [0.6, 0.4, 0.9, 0.5], [0.7, 0.1, 0.1, 0.9]], np.float32)
    # later regions overwrite earlier ones where > 0.5, even without the earlier one (column 2)
    np.testing.assert_array_equal(s.label_map(probs), [3, 1, 2, 3])
    reversed_order = LabelScheme.from_labels(BRATS, (3, 2, 1))
    np.testing.assert_array_equal(reversed_order.label_map(probs), [1, 3, 2, 1])
    with pytest.raises(AutosegError, match="regions_class_order"):
        LabelScheme.from_labels(BRATS, (1, 2)).label_map(probs)


def test_a_region_phantom_loads_and_verifies(paths: Paths) -> None:
    root = make_region_phantom_dataset(paths.raw, PhantomRecipe(num_training=2, num_test=1, shape=(6, 20, 20)))
    spec = verify_dataset(root, show_progress=False)
    assert spec.num_channels == 2 and spec.regions_class_order == ORDER
    assert spec.labels == {"background": 0, "whole": (1, 2, 3), "core": (2, 3), "enhancing": 3}
    assert spec.num_classes == 3 and spec.foreground_labels == (1, 2, 3)
    values = np.unique(np.concatenate([np.unique(read_image(c.label)[0]) for c in spec.cases]))
    assert values.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("labels, order, words", [
    (BRATS, None, "'labels' declares regions (lists of labels), so 'regions_class_order' is required"),
    (BRATS, [1, 2], "'regions_class_order' has 2 entries but 'labels' declares 3 foreground region(s)"),
    (BRATS, [1, 2, 5], "'regions_class_order' [1, 2, 5] must hold foreground label values from [1, 2, 3]"),
    (BRATS, "1,2,3", "'regions_class_order' must be a list of integer labels, got '1,2,3'"),
    ({**BRATS, "core": []}, [1, 2, 3], "region 'core' must be a non-empty list of integer labels, got []"),
    ({"background": 0, "whole": [1, 3]}, [1], "label values must be consecutive integers from 0, got [0, 1, 3]"),
])
def test_region_declaration_errors_are_one_line_naming_dataset_json(paths: Paths, labels: dict, order: object,
                                                                    words: str) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, labels=labels, **({} if order is None else {"regions_class_order": order}))
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    assert words in e.value.message and str(e.value.where) == str(root / "dataset.json")
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", TINY_NAME])
    assert result.exit_code == 2
    assert any(line.startswith("error:") and "dataset.json" in line and words in line
               for line in result.stderr.splitlines()), result.stderr


def test_a_tiny_dataset_with_regions_over_its_two_classes_loads(paths: Paths) -> None:
    root = make_tiny_dataset(paths.raw)
    edit_dataset_json(root, labels={"background": 0, "whole": [1, 2], "posterior": 2}, regions_class_order=[1, 2])
    spec = load_dataset(root)
    assert spec.label_scheme.regions == ((1, 2), (2,)) and spec.num_classes == 2


def test_verify_prints_the_regions(paths: Paths) -> None:
    make_region_phantom_dataset(paths.raw, PhantomRecipe(num_training=2, num_test=0, shape=(6, 20, 20)))
    result = CliRunner().invoke(cli, ["--raw", str(paths.raw), "verify", "Dataset997_RegionPhantom"])
    assert result.exit_code == 0, result.output
    assert ("3 regions (whole=[1, 2, 3], core=[2, 3], enhancing=[3]; regions_class_order [1, 2, 3])"
            in result.output)


def test_conversions_equal_nnunets_label_manager_and_region_transform() -> None:
    """nnU-Net as the reference: LabelManager's regions and label maps, ConvertSegmentationToRegionsTransform."""
    lm_mod = pytest.importorskip("nnunetv2.utilities.label_handling.label_handling",
                                 reason="nnunetv2 (the parity reference) is not installed")
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    ours = LabelScheme.from_labels(BRATS, ORDER)
    theirs = lm_mod.LabelManager(BRATS, regions_class_order=list(ORDER))
    assert theirs.has_regions and theirs.num_segmentation_heads == ours.num_outputs
    assert [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in theirs.foreground_regions] == list(ours.regions)
    rng = np.random.default_rng(1)
    probs = rng.random((3, 6, 7, 8)).astype(np.float32)
    np.testing.assert_array_equal(ours.label_map(probs), theirs.convert_probabilities_to_segmentation(probs))
    seg = torch.from_numpy(rng.integers(0, 4, size=(1, 6, 7, 8)))
    expected = ConvertSegmentationToRegionsTransform(theirs.foreground_regions)._apply_to_segmentation(seg)
    np.testing.assert_array_equal(ours.region_targets(seg[None])[0].numpy(), expected.numpy().astype(np.float32))
