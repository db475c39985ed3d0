"""Prompts (boxes / points) for promptable models, received as a JSON form or query field ``prompts``.

The JSON is the library's :meth:`medseg.inference.prompts.Prompts.from_json` schema, e.g.
``{"space": "voxel", "boxes": [[40, 52, 90, 110, 10, 14]], "points": [[64, 80, 12, 1]]}``. A prompted model
called without prompts, prompts sent to a model that takes none, or malformed JSON answer 422 with the expected
shape: the model's own :meth:`~medseg.inference.contract.SegmentationPredictor.check_prompts` decides.
"""

from __future__ import annotations

import json

from medseg.inference.prompts import PROMPTS_JSON_EXAMPLE, Prompts
from server.errors import ApiError

PROMPTS_DESCRIPTION = (
    "prompted models only (db_sam, sam_unet_*): JSON with `boxes` [[x0,y0,x1,y1(,z0,z1)]], `points` [[x,y(,z),label]] "
    f"and `space` voxel|ras, e.g. {PROMPTS_JSON_EXAMPLE}"
)


def parse_prompts(text: str | None) -> Prompts | None:
    """``Prompts`` from the ``prompts`` field, ``None`` when absent; 422 for text that is not JSON."""
    if text is None or not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            422,
            "ModelInputError",
            f"the field `prompts` is not valid JSON ({exc.msg} at character {exc.pos})",
            hint=f"send e.g. {PROMPTS_JSON_EXAMPLE}",
        ) from None
    return Prompts.from_json(data)  # ModelInputError (422) names the bad field
