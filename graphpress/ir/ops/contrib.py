"""onnxruntime's own ops as onnxscript ops, for the exporter's translations: its contrib ops
(``com.microsoft``) and the few it registers in the default domain (``SimplifiedLayerNormalization``).

onnx ships no schemas for them; onnxruntime documents each in ``get_all_operator_schema()``,
so the onnxscript op is built from that (the same inputs, optional ones, type constraints
and attributes the runtime checks), not restated by hand.
"""

from __future__ import annotations

import functools

DOMAIN = "com.microsoft"


def contrib_op(name: str, outputs: int | None = None):
    """``com.microsoft::<name>`` as an onnxscript ``Op``."""
    return ort_op(name, DOMAIN, outputs)


@functools.cache
def ort_op(name: str, domain: str, outputs: int | None = None):
    """onnxruntime's op ``<domain>::<name>`` (its newest version) as an onnxscript ``Op``, from its own schema.

    ``outputs``: how many of its outputs a node produces (the exporter makes one per schema
    output, and onnxruntime rejects some optional ones unless attributes ask for them)."""
    import onnx
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    from onnxscript import values

    found = [s for s in get_all_operator_schema() if s.name == name and s.domain == domain]
    if not found:
        raise ValueError(f"onnxruntime documents no op {domain}::{name}")
    ort = max(found, key=lambda s: s.since_version)
    Param = onnx.defs.OpSchema.FormalParameter
    options = {
        "Single": onnx.defs.OpSchema.FormalParameterOption.Single,
        "Optional": onnx.defs.OpSchema.FormalParameterOption.Optional,
        "Variadic": onnx.defs.OpSchema.FormalParameterOption.Variadic,
    }

    def params(formal):
        return [Param(p.name, p.typeStr, param_option=options[p.option.name]) for p in formal]

    schema = onnx.defs.OpSchema(
        name,
        domain,
        ort.since_version,
        inputs=params(ort.inputs),
        outputs=params(ort.outputs[:outputs]),
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in ort.type_constraints],
        attributes=[
            onnx.defs.OpSchema.Attribute(key, onnx.defs.OpSchema.AttrType(int(a.type)), "")
            for key, a in ort.attributes.items()
        ],
    )
    return values.Op(values.Opset(domain, ort.since_version), name, schema)
