"""Per-volume Dice / HD95 (`icmoe.evaluation.volume_metrics`) and the per-volume evaluation (`icmoe.evaluate`) on
hand-made volumes whose figures are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from icmoe.core.errors import DataError, IcmoeError
from icmoe.data.volumes import SliceDataset, Volume
from icmoe.evaluation.overlays import PALETTE, class_overlay
from icmoe.evaluation.volume_metrics import (
    EMPTY_BOTH,
    EMPTY_PRED,
    EMPTY_REF,
    NOT_COMPUTED,
    VolumeMetricError,
    format_summary,
    score_volume,
    summarize,
)
from icmoe.evaluation.volumes import volume_evaluation

NAMES = ("a", "b", "c", "d")
SPACING = (5.0, 1.5, 1.0)  # mm along (Z, H, W): three different sizes, so a swapped axis shows


# One torch thread (tests/conftest.py): the models are tiny.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def offset_cubes() -> tuple:
    """Reference and prediction (Z, H, W): class a shifted 1 slice along Z, b 2 rows along H, c 2 columns
    along W (6x6x6 boxes), d only in the reference."""
    ref = np.zeros((12, 30, 30), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:8, 2:8, 2:8] = 1
    pred[3:9, 2:8, 2:8] = 1
    ref[2:8, 12:18, 2:8] = 2
    pred[2:8, 14:20, 2:8] = 2
    ref[2:8, 2:8, 12:18] = 3
    pred[2:8, 2:8, 14:20] = 3
    ref[10:12, 25:27, 25:27] = 4
    return pred, ref


def test_offset_cubes_dice_and_hd95_in_millimetres():
    pred, ref = offset_cubes()
    r = score_volume(pred, ref, NAMES, name="cubes", spacing=SPACING)
    c = r["classes"]
    # Dice of a 6-box shifted by s along one axis: (6 - s) / 6.
    assert c["a"]["dice"] == pytest.approx(5 / 6) and c["b"]["dice"] == pytest.approx(4 / 6)
    assert c["c"]["dice"] == pytest.approx(4 / 6)
    # Every surface distance is at most the shift, and a whole face (over 5% of the surface) is at
    # exactly the shift, so HD95 = shift x that axis's spacing.
    assert c["a"]["hd95"] == pytest.approx(1 * 5.0)
    assert c["b"]["hd95"] == pytest.approx(2 * 1.5)
    assert c["c"]["hd95"] == pytest.approx(2 * 1.0)
    assert c["d"] == {"dice": 0.0, "hd95": None, "hd95_note": EMPTY_PRED, "pred_voxels": 0, "ref_voxels": 8}
    assert r["unit"] == "mm" and r["spacing"] == list(SPACING)
    assert r["mean_dice"] == pytest.approx((5 / 6 + 4 / 6 + 4 / 6 + 0) / 4)


def test_without_spacing_hd95_is_in_voxels():
    pred, ref = offset_cubes()
    r = score_volume(pred, ref, NAMES, name="cubes", spacing=None)
    assert r["unit"] == "voxels" and r["spacing"] is None
    assert [r["classes"][k]["hd95"] for k in "abc"] == pytest.approx([1.0, 2.0, 2.0])


def test_empty_classes_are_reported_not_dropped():
    ref = np.zeros((4, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 2:5, 2:5] = 2  # b: reference only
    pred[1:3, 6:9, 6:9] = 3  # c: prediction only; a and d: empty in both
    c = score_volume(pred, ref, NAMES, name="v", spacing=SPACING)["classes"]
    assert (c["a"]["dice"], c["a"]["hd95"], c["a"]["hd95_note"]) == (1.0, None, EMPTY_BOTH)
    assert (c["b"]["dice"], c["b"]["hd95"], c["b"]["hd95_note"]) == (0.0, None, EMPTY_PRED)
    assert (c["c"]["dice"], c["c"]["hd95"], c["c"]["hd95_note"]) == (0.0, None, EMPTY_REF)
    assert c["d"]["hd95_note"] == EMPTY_BOTH
    quick = score_volume(*offset_cubes(), NAMES, spacing=SPACING, distances=False)["classes"]
    assert quick["a"]["hd95"] is None and quick["a"]["hd95_note"] == NOT_COMPUTED
    assert quick["a"]["dice"] == pytest.approx(5 / 6)


def test_summary_means_over_volumes_and_classes():
    pred, ref = offset_cubes()
    v1 = score_volume(pred, ref, NAMES, name="v1", spacing=SPACING)
    v2 = score_volume(ref, ref, NAMES, name="v2", spacing=SPACING)  # perfect: Dice 1, HD95 0
    s = summarize([v1, v2], NAMES)
    assert s["n_volumes"] == 2 and s["unit"] == "mm"
    assert s["per_class"]["a"]["dice"] == pytest.approx((5 / 6 + 1) / 2)
    assert s["per_class"]["a"]["hd95"] == pytest.approx(5.0 / 2) and s["per_class"]["a"]["hd95_volumes"] == 2
    # d: empty in v1's prediction (Dice 0, no HD95), perfect in v2: both count in Dice, one in HD95.
    assert s["per_class"]["d"]["dice"] == pytest.approx(0.5)
    assert s["per_class"]["d"]["hd95"] == 0.0 and s["per_class"]["d"]["hd95_volumes"] == 1
    assert s["per_class"]["d"]["empty"] == {EMPTY_PRED: 1}
    assert s["mean_dice"] == pytest.approx(np.mean([p["dice"] for p in s["per_class"].values()]))
    assert s["mean_hd95"] == pytest.approx(np.mean([5.0 / 2, 3.0 / 2, 2.0 / 2, 0.0]))
    table = format_summary(s).splitlines()
    assert table[0].split()[:4] == ["class", "Dice", "HD95", "mm"] and len(table) == 1 + 4 + 1
    # Volumes with and without spacing: HD95 in mm and voxels are never averaged together.
    mixed = summarize([v1, score_volume(pred, ref, NAMES, name="v3")], NAMES)
    assert mixed["unit"] == "mixed" and mixed["mean_hd95"] is None and "not averaged" in mixed["hd95_note"]
    assert mixed["per_class"]["a"]["dice"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("pred, ref, spacing, words", [
    (np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.uint8), None, "not one (Z, H, W) shape"),
    (np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8), None, "dtype float32"),
    (np.full((2, 4, 4), 7, np.uint8), np.zeros((2, 4, 4), np.uint8), None, "labels outside 0..4"),
    (np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8), (1.0, 0.0, 1.0), "spacing"),
])
def test_bad_input_is_one_line_naming_the_volume(pred, ref, spacing, words):
    with pytest.raises(VolumeMetricError) as err:
        score_volume(pred, ref, NAMES, name="case7", spacing=spacing)
    assert isinstance(err.value, IcmoeError)
    msg = str(err.value)
    assert msg.startswith("case7: ") and words in msg and "\n" not in msg


class Oracle(nn.Module):
    """Logits whose argmax is the class written into the image (intensity = 60 x class)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = torch.arange(4, dtype=images.dtype).view(1, 4, 1, 1)
        return -(images[:, :1] / 60 - k).abs()  # (B, 4, S, S)


def _volumes(h: int, w: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i, spacing in enumerate(((5.0, 1.5, 1.5), None)):
        label = np.zeros((5, h, w), np.uint8)
        label[1:4, 4:h // 2, 4:w // 2] = 1
        label[0:3, h // 2:h - 4, 6:w // 2] = 2
        label[2:5, 6:h - 6, w // 2 + 2:w - 4] = 3
        image = label.astype(np.float32) * 60 + rng.uniform(-5, 5, label.shape).astype(np.float32)
        out.append(Volume(f"vol{i}", image, label, spacing, None, f"/data/vol{i}.nii.gz"))
    return out


def test_volume_evaluation_of_a_perfect_model_at_native_size():
    ds = SliceDataset(_volumes(32, 32), image_size=32, classes=NAMES[:3], progress=False)
    ev = volume_evaluation(Oracle(), ds, NAMES[:3], batch_size=3, progress=False)
    r = ev.report
    assert r["n_volumes"] == 2 and r["n_slices"] == 10 and ev.score == r["mean_dice"] == 1.0
    assert [v["name"] for v in r["volumes"]] == ["vol0", "vol1"]
    assert [v["unit"] for v in r["volumes"]] == ["mm", "voxels"] and r["unit"] == "mixed"
    for v in r["volumes"]:
        assert {c: s["dice"] for c, s in v["classes"].items()} == {"a": 1.0, "b": 1.0, "c": 1.0}
        assert all(s["hd95"] == 0.0 for s in v["classes"].values())
    assert "mean Dice 1.0000 over 2 volumes" in ev.headline and "a" in ev.table


def test_volume_evaluation_resizes_predictions_back_to_each_volume():
    # Native 40x48 slices, model input 32: the label maps come back at 40x48 by nearest neighbour.
    ds = SliceDataset(_volumes(40, 48), image_size=32, classes=NAMES[:3], progress=False)
    ev = volume_evaluation(Oracle(), ds, NAMES[:3], batch_size=4, progress=False, distances=False)
    for v in ev.report["volumes"]:
        for s in v["classes"].values():
            assert s["ref_voxels"] > 0 and 0.85 < s["dice"] <= 1.0  # boundary pixels move, classes stay
            assert s["hd95_note"] == NOT_COMPUTED
    assert ev.report["mean_hd95"] is None and ev.report["hd95_note"] == NOT_COMPUTED


def test_volume_evaluation_refuses_a_dataset_missing_slices():
    ds = SliceDataset(_volumes(32, 32), image_size=32, classes=NAMES[:3], progress=False)
    ds.slices = ds.slices[:-1]  # the last slice of vol1 is gone
    with pytest.raises(DataError, match=r"^/data/vol1.nii.gz: the dataset does not hold every slice of vol1"):
        volume_evaluation(Oracle(), ds, NAMES[:3], progress=False)


def test_class_overlay_has_both_panels_and_a_legend(tmp_path):
    gray = np.full((32, 32), 100, np.float32)
    truth = np.zeros((32, 32), np.uint8)
    truth[4:12, 4:12] = 1
    pred = np.zeros_like(truth)
    pred[20:28, 20:28] = 2
    pic = class_overlay(gray, truth, pred, ["alpha", "beta"], caption="Dice 0.000", min_side=64)
    pic.save(tmp_path / "o.png")
    arr = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    assert arr.shape[1] == 2 * 64 + 6 and arr.shape[0] > 64
    fill = lambda k: np.round(0.55 * 100 + 0.45 * np.asarray(PALETTE[k - 1])).astype(int)  # noqa: E731
    assert np.abs(arr[16, 16] - fill(1)).max() <= 1  # class 1 in the reference panel (x2)
    assert np.abs(arr[48, 70 + 48] - fill(2)).max() <= 1  # class 2 in the prediction panel
    assert (arr[40, 40] == 100).all()  # background untouched
    legend = arr[64:]
    for k in (1, 2):  # each class's swatch in the legend
        assert (np.abs(legend - np.asarray(PALETTE[k - 1])).max(axis=-1) == 0).any()
