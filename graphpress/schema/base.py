"""The strict base model every spec object derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors (``extra="forbid"``): a typo never passes silently.

    Types are strict too: ``"8"`` is not 8 and ``"no"`` is not false (an int is still a
    float), and no float field takes NaN or infinity.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, serialize_by_alias=True, strict=True, allow_inf_nan=False
    )
