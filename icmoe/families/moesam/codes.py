"""SNOMED CT codes of the organs MoE-SAM's datasets label (ACDC, BTCV, MM-WHS, Synapse), for DICOM SEG.

Keyed by the class names of `icmoe.data.volumes.spec.VOLUME_DATASETS`; a class whose name is not here
(the synthetic set's shapes, `tiny`'s class1..classC) gets the generic code. Category: SNOMED CT
"Anatomical Structure"; left and right organs are the organ with a laterality modifier, as DICOM's
CID 7150 / 7151 / 244 code them. docs/clinical.md lists them.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from icmoe.core.codes import GENERIC_CODE, SegmentCode, concept

ANATOMICAL_STRUCTURE = concept("91723000", "SCT", "Anatomical Structure")
RIGHT, LEFT = concept("24028007", "SCT", "Right"), concept("7771000", "SCT", "Left")

# class name -> (SNOMED CT code, meaning, laterality modifier or None)
_ORGANS: Dict[str, Tuple[str, str, Optional[dict]]] = {
    "spleen": ("78961009", "Spleen", None),
    "right kidney": ("64033007", "Kidney", RIGHT),
    "left kidney": ("64033007", "Kidney", LEFT),
    "gallbladder": ("28231008", "Gallbladder", None),
    "esophagus": ("32849002", "Esophagus", None),
    "liver": ("10200004", "Liver", None),
    "stomach": ("69695003", "Stomach", None),
    "aorta": ("15825003", "Aorta", None),
    "inferior vena cava": ("64131007", "Inferior vena cava", None),
    # BTCV labels the portal and the splenic vein as one class; SNOMED CT has no concept for the pair,
    # so the segment is coded as the portal vein (its label keeps the class name).
    "portal and splenic veins": ("32764006", "Portal vein", None),
    "pancreas": ("15776009", "Pancreas", None),
    "right adrenal gland": ("23451007", "Adrenal gland", RIGHT),
    "left adrenal gland": ("23451007", "Adrenal gland", LEFT),
    # ACDC and MM-WHS: MYO is the myocardium of the left ventricle; LV, RV, LA, RA the cavities
    "MYO": ("49848007", "Left Ventricle Myocardium", None),
    "LV": ("87878005", "Left ventricle", None),
    "RV": ("53085002", "Right ventricle", None),
    "LA": ("82471001", "Left atrium", None),
    "RA": ("73829009", "Right atrium", None),
    "AA": ("54247002", "Ascending aorta", None),
    "PA": ("81040000", "Pulmonary artery", None),
}


def organ_code(name: str) -> SegmentCode:
    """The code of one class name (the generic code for a name not in the table)."""
    if name not in _ORGANS:
        return {k: dict(v) for k, v in GENERIC_CODE.items()}
    value, meaning, modifier = _ORGANS[name]
    code: SegmentCode = {"category": dict(ANATOMICAL_STRUCTURE), "type": concept(value, "SCT", meaning)}
    if modifier is not None:
        code["modifier"] = dict(modifier)
    return code


def organ_codes(labels: Sequence[str]) -> List[SegmentCode]:
    """One code per foreground label of `labels` (background first, left out)."""
    return [organ_code(name) for name in labels[1:]]
