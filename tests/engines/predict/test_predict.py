"""`python -m engines.predict` and `Engine.predict` on a folder with one real file of each kind.

Masks are checked against the engine run here on the same preprocessed pixels (`model_input`), brought to
the picture's size as predict does (the logits resized bilinearly and thresholded where the build has a mask
rule, else the mask by nearest neighbour), for a binary model (the shared tiny IC-MoE build) and a
multi-class one (the toy label build); the corrupt file is reported (with and without --skip-bad);
`--server` against a real Triton server gives the same files as the local engine; without --backend the
fastest engine whose gates passed is used and named.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from engines import load_engine
from engines.predict import main as predict_main
from engines.predict import predict
from engines.predict.journal import JOURNAL_NAME
from icmoe.data.images import mask_from_logits, model_input, read_images, resize_label
from tests.icmoe.data.samples import write_samples

pytest.importorskip("pydicom", reason="needs pydicom (the dicom extra)")

GOOD = ["gray8", "gray16", "rgba", "palette", "jpeg", "bmp", "tiff", "dicom_mono1", "dicom_multi", "nifti"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_inputs")
    return folder, write_samples(folder)


def reference(engine, path, upsample="logits"):
    """Masks of a file's pictures: the engine on `model_input` one picture at a time, brought back to the
    picture's size: the logits resized bilinearly then the mask rule, or (no rule, or "nearest") the mask."""
    out = []
    for pic in read_images(path).pictures:
        x = model_input(pic, engine.image_size)[None]
        if engine.batch_range:
            x = np.repeat(x, engine.batch_range[0], axis=0)
        res = engine.infer(x)
        if engine.mask_rule and upsample == "logits":
            mask = mask_from_logits(res["logits"][0], pic.size, engine.mask_rule)
        else:
            mask = resize_label(res["mask"][0, 0], pic.size)
        out.append((mask, {k: int(v[0]) for k, v in res.items() if v.ndim == 1}))
    return out


def outputs_of(sample, folder, out):
    """The mask files a sample should give: [(path, frame)]."""
    rel = sample.path.relative_to(folder)
    if rel.name.endswith(".nii.gz"):
        return [(out / rel.parent / (rel.name[:-7] + "_mask.nii.gz"), None)]
    if len(sample.frames) > 1:
        return [(out / rel.parent / f"{rel.stem}_f{k:03d}.png", k) for k in sample.frames]
    return [(out / rel.parent / f"{rel.stem}.png", None)]


def run(args, capsys):
    code = predict_main([str(a) for a in args] + ["--no-progress", "--threads", "1"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def check_masks(engine, samples, out, *, binary, kinds=GOOD):
    """Every output file against the reference; returns {(path, frame): choice} of the reference."""
    folder, s = samples
    choices = {}
    for kind in kinds:
        ref = reference(engine, s[kind].path)
        files = outputs_of(s[kind], folder, out)
        if files[0][0].name.endswith(".nii.gz"):
            vol = nib.load(str(files[0][0]))
            np.testing.assert_array_equal(vol.affine, nib.load(str(s[kind].path)).affine)
            got = np.moveaxis(np.asanyarray(vol.dataobj), -1, 0)
            np.testing.assert_array_equal(got, np.stack([m for m, _ in ref]))  # binary volumes hold 0/1
        else:
            for (path, _), (mask, _), size in zip(files, ref, s[kind].sizes):
                got = np.asarray(Image.open(path))
                assert got.shape == size, (kind, got.shape, size)
                np.testing.assert_array_equal(got, mask * 255 if binary else mask, err_msg=kind)
        for k, (_, choice) in enumerate(ref):
            choices[(str(s[kind].path), s[kind].frames[k])] = choice
    return choices


def test_cli_binary_every_kind_skip_bad_json_overlays(tiny_build, samples, tmp_path, capsys):
    folder, s = samples
    out, report = tmp_path / "out", tmp_path / "report.json"
    code, _, err = run([tiny_build, folder, "--out", out, "--json", report, "--skip-bad", "--overlay",
                        "--batch-size", "4", "--backend", "onnxruntime", "--precision", "fp16"], capsys)
    assert code == 0, err
    bad = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(bad) == 1 and bad[0].startswith(f"error: {s['corrupt'].path}: ")
    assert "images/s" in err
    rep = json.loads(report.read_text())
    assert rep["skipped"] == [{"path": str(s["corrupt"].path), "error": bad[0][len("error: "):]}]
    n = sum(len(s[k].sizes) for k in GOOD)
    assert rep["totals"]["files"] == len(GOOD) and rep["totals"]["images"] == n == len(rep["images"])
    assert rep["totals"]["images_per_s"] > 0 and rep["mask_kind"] == "binary" and rep["classes"] == ["foreground"]
    with load_engine(tiny_build, "onnxruntime", threads=1) as engine:
        choices = check_masks(engine, samples, out, binary=True)
    for entry in rep["images"]:
        key = (entry["path"], entry["frame"])
        assert entry["choice"] == choices[key] and set(entry["choice"]) == {"expert"}
        mask = np.asarray(Image.open(entry["mask"])) if entry["mask"].endswith(".png") else \
            np.asanyarray(nib.load(entry["mask"]).dataobj)[..., entry["frame"]]
        assert list(mask.shape) == entry["size"]
        assert entry["fractions"]["foreground"] == pytest.approx((mask > 0).mean())
        assert entry["seconds"] > 0
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert "a_gray8.png" in overlays and "sub/j_multi_f002.png" in overlays
    assert any(o.startswith("sub/k_volume_z") for o in overlays)
    assert Image.open(out / "overlays" / "f_photo.png").size[0] >= 48
    assert not [p for p in out.rglob(".*")]  # no temporary files left


def test_cli_stops_at_the_corrupt_file_after_writing_the_ones_before(tiny_build, samples, tmp_path, capsys):
    folder, s = samples
    out = tmp_path / "out"
    code, _, err = run([tiny_build, folder, "--out", out, "--batch-size", "4"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip().splitlines()[-1]] and \
        err.startswith(f"error: {s['corrupt'].path}: damaged PNG")
    # sorted before c_broken.png, and recorded in the run's journal
    assert sorted(p.name for p in out.iterdir()) == ["a_gray8.png", "b_gray16.png", JOURNAL_NAME]


def test_cli_usage_errors(tiny_build, samples, tmp_path, capsys):
    folder, s = samples
    for args, words in (([folder / "nothing.png"], "no such file"),
                        ([str(folder / "*.xyz")], "no file matches"),
                        ([s["gray8"].path, "--batch-size", "9"], "outside this model's batch range"),
                        ([s["gray8"].path, "--concurrency", "2"], "need --server"),
                        ([s["gray8"].path, s["gray8"].path.with_suffix(".png")], None)):
        code, _, err = run([tiny_build, *args, "--out", tmp_path / "o"], capsys)
        if words is None:  # the same file twice is read once
            assert code == 0, err
            continue
        assert code == 2 and err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
    twins = tmp_path / "twins"
    twins.mkdir()
    Image.new("L", (8, 8)).save(twins / "x.png")
    Image.new("L", (8, 8)).save(twins / "x.bmp")
    code, _, err = run([tiny_build, twins, "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "would both write" in err


def test_cli_glob_mirrors_relative_paths(tiny_build, samples, tmp_path, capsys):
    folder, _ = samples
    code, _, err = run([tiny_build, str(folder / "**" / "*.dcm"), "--out", tmp_path / "o", "--json", "-", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.relative_to(tmp_path / "o").as_posix() for p in (tmp_path / "o").rglob("*.png")) == \
        ["i_mono1.png", "sub/j_multi_f000.png", "sub/j_multi_f001.png", "sub/j_multi_f002.png"]


def test_cli_multiclass_labels_and_nifti(labels_build, samples, tmp_path, capsys):
    _, s = samples
    kinds = ["gray8", "jpeg", "dicom_multi", "nifti"]
    out, report = tmp_path / "out", tmp_path / "r.json"
    code, _, err = run([labels_build, *[s[k].path for k in kinds], "--out", out, "--json", report,
                        "--overlay-dir", tmp_path / "ov", "--backend", "onnxruntime", "--precision", "fp32"], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    with load_engine(labels_build, "onnxruntime", threads=1) as engine:
        names = engine.class_names[1:]
        for k in kinds:
            ref = reference(engine, s[k].path)
            files = outputs_of(s[k], s[k].path.parent, out)  # files named directly go to the top of --out
            if files[0][0].name.endswith(".nii.gz"):
                got = np.moveaxis(np.asanyarray(nib.load(str(files[0][0])).dataobj), -1, 0)
                np.testing.assert_array_equal(got, np.stack([m for m, _ in ref]))
                continue
            for (path, _), (mask, _) in zip(files, ref):
                np.testing.assert_array_equal(np.asarray(Image.open(path)), mask)
    assert rep["mask_kind"] == "labels" and rep["classes"] == names
    for entry in rep["images"]:
        assert set(entry["fractions"]) == set(names) and entry["choice"] == {}
        assert sum(entry["fractions"].values()) <= 1
    assert len(list((tmp_path / "ov").glob("*.png"))) >= 1 + 1 + 3 + 1


def test_cli_checkpoint_folder_runs_eager(tiny_checkpoint, samples, tmp_path, capsys):
    from engines.eager import EagerEngine

    _, s = samples
    out = tmp_path / "out"
    code, _, err = run([tiny_checkpoint, s["gray16"].path, s["palette"].path, "--out", out, "--json", "-"], capsys)
    assert code == 0, err
    engine = EagerEngine.from_checkpoint(tiny_checkpoint, threads=1)
    for k in ("gray16", "palette"):
        (mask, _), = reference(engine, s[k].path)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{s[k].path.stem}.png")), mask * 255)
    code, _, err = run([tiny_checkpoint, s["gray16"].path, "--out", out, "--precision", "fp16"], capsys)
    assert code == 2 and "checkpoint folder" in err and len(err.strip().splitlines()) == 1


def test_python_api_paths_pil_and_arrays(labels_build, tiny_build, samples):
    _, s = samples
    rng = np.random.default_rng(3)
    u16 = (rng.integers(0, 4096, (21, 35))).astype(np.uint16)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    with load_engine(tiny_build, "onnxruntime", threads=1) as engine:
        got = predict(engine, [s["dicom_multi"].path, Image.open(s["jpeg"].path), u16, rgba, str(s["gray8"].path)])
        assert [(p.size, p.frame) for p in got] == [((24, 28), 0), ((24, 28), 1), ((24, 28), 2), ((64, 48), None),
                                                     ((21, 35), None), ((40, 30), None), ((40, 52), None)]
        ref = reference(engine, s["dicom_multi"].path) + reference(engine, s["jpeg"].path)
        for p, (mask, choice) in zip(got, ref):
            np.testing.assert_array_equal(p.mask, mask)
            assert p.choice == choice and set(np.unique(p.mask)) <= {0, 1}
        one = predict(engine, u16)
        assert len(one) == 1 and np.array_equal(one[0].mask, got[4].mask) and one[0].source == "<array 0>"
    with load_engine(labels_build, "onnxruntime", threads=1) as engine:
        (p,) = predict(engine, rgba, batch_size=1)
        assert p.mask.shape == (40, 30) and p.mask.max() <= 2 and set(p.fractions) == set(engine.class_names[1:])


def test_server_gives_the_local_engines_files(tiny_build, samples, tmp_path, capsys):
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the test extra)")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (the test extra)")
    from engines.triton import RepositoryOptions
    from tests.engines.test_triton_server import serving

    folder, s = samples
    inputs = [s[k].path for k in GOOD]
    local = tmp_path / "local"
    code, _, err = run([tiny_build, *inputs, "--out", local, "--precision", "fp32", "--backend", "onnxruntime",
                        "--json", tmp_path / "local.json", "--batch-size", "2"], capsys)
    assert code == 0, err
    extra = [RepositoryOptions(name="u8", precision="fp32", input_dtype="uint8")]
    lines = []
    with serving(tiny_build, tmp_path / "repo", "icmoe_python", extra=extra) as srv:
        runs = {"grpc": [srv.grpc_url.replace("grpc://", ""), "--protocol", "grpc", "--concurrency", "3"],
                "http": [f"http://{srv.http_url.replace('http://', '')}", "--concurrency", "2"],
                "u8": [srv.grpc_url.replace("grpc://", ""), "--protocol", "grpc", "--model-name", "u8_python"]}
        for name, server in runs.items():
            chosen = inputs if name != "u8" else [s[k].path for k in GOOD if not k.startswith(("dicom", "nifti"))]
            code, _, err = run([tiny_build, *chosen, "--out", tmp_path / name, "--json", tmp_path / f"{name}.json",
                                "--batch-size", "2", "--server", *server], capsys)
            assert code == 0, (name, err)
            rep = json.loads((tmp_path / f"{name}.json").read_text())
            ref = {(e["path"], e["frame"]): e for e in json.loads((tmp_path / "local.json").read_text())["images"]}
            assert len(rep["images"]) == sum(len(read_images(p).pictures) for p in chosen)
            for e in rep["images"]:
                assert e["choice"] == ref[(e["path"], e["frame"])]["choice"], name
                assert e["fractions"] == ref[(e["path"], e["frame"])]["fractions"], name
            for path in (tmp_path / name).rglob("*"):
                if path.is_file() and path.name != JOURNAL_NAME:  # the journal names the engine
                    assert path.read_bytes() == (local / path.relative_to(tmp_path / name)).read_bytes(), (name, path)
            lines.append(f"{name}: {rep['totals']['images']} images, {rep['totals']['images_per_s']:.1f} images/s, "
                         f"engine {rep['engine']}")
    print("\n" + "\n".join(lines))  # after the last capsys read: shown with -s


def test_server_urls_and_an_unreachable_server(tiny_build, samples, tmp_path, capsys):
    from engines.triton.client import parse_server

    assert parse_server("localhost:8001") == ("grpc", "localhost:8001", False)
    assert parse_server("https://triton.example/") == ("http", "triton.example", True)
    assert parse_server("grpc://h:5", "http") == ("http", "h:5", False)
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the test extra)")
    _, s = samples
    code, _, err = run([tiny_build, s["gray8"].path, "--out", tmp_path / "o", "--server", "http://127.0.0.1:9"], capsys)
    assert code == 2 and err.startswith("error: Triton server http://127.0.0.1:9 (http): ") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
