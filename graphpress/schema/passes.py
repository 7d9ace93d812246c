"""Pass configurations: one pydantic model per pass, selected by its ``"pass"`` key.

The pass implementations in ``graphpress.passes`` refer to these classes as their
``Config``; the schema owns them so that a spec can be validated (and its JSON
Schema printed) without importing any pass.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from .base import StrictModel

Targets = Annotated[
    str | list[str],
    Field(
        description="Glob pattern(s) over module paths as they appear in nn_module_stack, "
        "e.g. 'layers.*.mlp.*'. A pattern also matches a path that ends with it at a dot, "
        "so 'layers.*.mlp.up_proj' selects 'model.layers.0.mlp.up_proj' too.",
    ),
]


class ParamRatio(StrictModel):
    """Keep this fraction of the layer's parameters: rank = floor(ratio * in * out / (in + out))."""

    param_ratio: float = Field(gt=0.0, le=1.0)


class PassConfig(StrictModel):
    """Fields every pass accepts."""

    targets: Targets = "*"
    exclude: list[str] = Field(default_factory=list, description="Glob patterns removed from the selection.")


class LowRankConfig(PassConfig):
    """Factor a linear y = W x (W: out x in) into y = B (A x), A: rank x in, B: out x rank.

    A layer is left alone (and reported as skipped) when rank * (in + out) >= in * out,
    i.e. when factoring would not save parameters, unless ``only_if_smaller`` is false.
    """

    pass_: Literal["low_rank"] = Field(alias="pass")
    method: Literal["svd"] = Field("svd", description="How W is factored: truncated SVD, W ~= U_r S_r V_r^T.")
    rank: int | ParamRatio = Field(
        description="A fixed rank for every targeted layer (int), or {'param_ratio': r} per layer."
    )
    min_rank: int = Field(1, ge=1, description="Never factor below this rank.")
    only_if_smaller: bool = Field(True, description="Skip layers where factoring would not save parameters.")


PASS_CONFIGS: dict[str, type[PassConfig]] = {"low_rank": LowRankConfig}

AnyPassConfig = Annotated[Union[tuple(PASS_CONFIGS.values())], Field(discriminator="pass_")]  # noqa: UP007
