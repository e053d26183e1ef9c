"""A toy third model family, defined in the test tree alone, in one folder: one SAM segmenter, prompt-free.

It proves that a family plugs into the pipeline (build, verify, engines, Triton repository,
benchmark) with one folder and one registry line, and nothing in `export/` or `engines/`:
`register_family("toy", "tests.icmoe.families.toy:FAMILY")`, or the ICMOE_FAMILIES variable in
subprocesses. It subclasses nothing of another family's; its parts are SAM's (`icmoe.sam`).

    image (B, 3, S, S) float32 RGB 0..255  ->  logits (B, 1, S, S) float32, mask (B, 1, S, S) uint8

Its multi-class sibling `toy_labels` (`LABELS_FAMILY`) decodes SAM's three multimask outputs as
three classes and takes their argmax, as a multi-class family (label names from `class_names`) does:

    image (B, 3, S, S)  ->  logits (B, 3, S, S) float32, mask (B, 1, S, S) uint8 labels 0..2
"""

from tests.icmoe.families.toy.family import FAMILY, LABELS, LABELS_FAMILY

__all__ = ["FAMILY", "LABELS", "LABELS_FAMILY"]
