"""Checks of a DICOM SEG against its source series and the PNG masks of the same slices, shared by the
SEG and the DICOMweb tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from engines.predict.seg import RESEARCH_ONLY


def png_of(png_dir, folder, path, frame):
    rel = path.relative_to(folder)
    stem = rel.name[:-len(rel.suffix)] if rel.suffix else rel.name
    name = f"{stem}_f{frame:03d}.png" if frame is not None else f"{stem}.png"
    return np.asarray(Image.open(png_dir / rel.parent / name))


def source_slices(spec):
    """(SOPInstanceUID, frame or None) -> (file, position, orientation, pixel spacing) of every source slice."""
    out = {}
    for ds, path in zip(spec.datasets, spec.files):
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0]
            for k, f in enumerate(ds.PerFrameFunctionalGroupsSequence):
                out[(ds.SOPInstanceUID, k)] = (path, f.PlanePositionSequence[0].ImagePositionPatient,
                                               shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                                               shared.PixelMeasuresSequence[0].PixelSpacing)
        else:
            out[(ds.SOPInstanceUID, None)] = (path, ds.ImagePositionPatient, ds.ImageOrientationPatient,
                                              ds.PixelSpacing)
    return out


def check_seg(seg, spec, folder, png_dir, labels, binary):
    """Every frame of a SEG (highdicom) at its source slice, equal to the PNG `--format png` wrote for that
    slice; no foreground missing (a frame left out is empty in the PNG). Returns the SEG."""
    first = spec.datasets[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and RESEARCH_ONLY in seg.SeriesDescription
    assert seg.SegmentationType == "BINARY"
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert refs == {ds.SOPInstanceUID for ds in spec.datasets}
    sources = source_slices(spec)
    shared = seg.SharedFunctionalGroupsSequence[0]
    (_, _, orientation, spacing), = {(None, None, tuple(v[2]), tuple(v[3])) for v in sources.values()}
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, orientation, atol=1e-6)
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose(measures.PixelSpacing, spacing, atol=1e-6)
    o = np.asarray(orientation, float)
    d = np.sort([np.asarray(v[1], float) @ np.cross(o[:3], o[3:]) for v in sources.values()])
    np.testing.assert_allclose(float(measures.SpacingBetweenSlices), np.median(np.diff(d)), rtol=1e-3)
    pixels = seg.pixel_array.reshape(-1, *seg.pixel_array.shape[-2:])
    seen = set()
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) - 1 if "ReferencedFrameNumber" in ref else None
        path, position, _, _ = sources[(ref.ReferencedSOPInstanceUID, frame)]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, position, atol=1e-4)
        ident = item if "SegmentIdentificationSequence" in item else shared  # one segment: in the shared groups
        segment = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        png = png_of(png_dir, folder, path, frame)
        want = (png == 255) if binary else (png == segment)
        np.testing.assert_array_equal(pixels[i], want.astype(np.uint8), err_msg=f"{path} frame {frame} #{segment}")
        seen.add((ref.ReferencedSOPInstanceUID, frame, segment))
    for (sop, frame), (path, *_) in sources.items():  # frames left out are empty in the PNG
        png = png_of(png_dir, folder, path, frame)
        for value, _ in labels:
            if (sop, frame, value) not in seen:
                assert not ((png == 255) if binary else (png == value)).any(), (path, frame, value)
    return seg
