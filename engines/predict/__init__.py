"""Segment images of any size with any engine: the Python API, and the predict command over files,
folders, DICOM series and NIfTI (`python -m engines.predict`; docs/predict.md, docs/clinical.md).

    from engines import load_engine
    from engines.predict import predict
    with load_engine("build/icmoe-tiny") as engine:
        results = predict(engine, ["scan.dcm", "photo.jpg", uint16_array])
    results[0].mask        # uint8 (H, W) at the input's size: 0/1, or label values

    pipeline.py   pictures -> model-size batches -> masks at the pictures' sizes (any runner)
    inputs.py     files, folders and globs -> (file, output path)
    series.py     DICOM series among the inputs (volumes), --format, predict_series
    seg.py        DICOM SEG of a predicted series (highdicom)
    writers.py    masks, label volumes, SEGs and overlays, written atomically
    files.py      one run over files: engine or server, read, predict, write, report
    dicomweb.py   a PACS round trip: WADO-RS in, STOW-RS out
    bundle.py     the components of a MONAI Bundle's inference config
    cli.py        the command's flags
"""

from icmoe.core.lazy import lazy_exports

_EXPORTS = {
    "Prediction": "engines.predict.pipeline",
    "predict": "engines.predict.pipeline",
    "predict_series": "engines.predict.series",
    "PredictOptions": "engines.predict.files",
    "open_engine": "engines.predict.files",
    "predict_files": "engines.predict.files",
    "main": "engines.predict.cli",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
