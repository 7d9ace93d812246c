"""What an ONNX artifact holds, for a check before deploying it (``graphpress inspect model.onnx``).

Reads the graph without loading external weight data: opsets, the custom domains its
nodes use, inputs and outputs with dtypes and (symbolic) shapes, the KV-cache tensors of
a decode graph and their layout, bytes per initializer and per dtype, and nodes per op.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .errors import GraphpressError

TOP_TENSORS = 10


class InspectError(GraphpressError):
    """The file cannot be read as an ONNX model."""


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of the ONNX model at ``path``."""
    import onnx
    from onnx import TensorProto, helper

    from .runtime import LAYOUT_KEY

    path = Path(path)
    if not path.is_file():
        raise InspectError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InspectError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph

    def dtype_name(elem_type: int) -> str:
        return TensorProto.DataType.Name(elem_type).lower()

    def value(v) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
        return {"name": v.name, "dtype": dtype_name(t.elem_type), "shape": dims}

    tensors = []
    for init in graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        if "length" in external:
            nbytes = int(external["length"])
        elif init.raw_data:
            nbytes = len(init.raw_data)
        else:
            count = 1
            for d in init.dims:
                count *= d
            nbytes = count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        tensors.append(
            {"name": init.name, "dtype": dtype_name(init.data_type), "shape": list(init.dims), "bytes": nbytes}
        )
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t["dtype"]] += t["bytes"]
    nodes = list(graph.node) + [n for f in model.functions for n in f.node]
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node)
    inputs, outputs = [value(v) for v in graph.input], [value(v) for v in graph.output]
    external_files = sorted({e.value for i in graph.initializer for e in i.external_data if e.key == "location"})
    metadata = {p.key: p.value for p in model.metadata_props}
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size + sum((path.parent / f).stat().st_size for f in external_files),
        "external_data": external_files,
        "ir_version": model.ir_version,
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "custom_domains": sorted({n.domain for n in nodes if n.domain not in ("", "ai.onnx")}),
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": {
            "inputs": [v for v in inputs if v["name"].startswith("past.")],
            "outputs": [v for v in outputs if v["name"].startswith("present.")],
            "layout": metadata.get(LAYOUT_KEY),
        },
        "initializer_bytes": sum(t["bytes"] for t in tensors),
        "bytes_by_dtype": dict(by_dtype.most_common()),
        "largest_tensors": sorted(tensors, key=lambda t: -t["bytes"])[:TOP_TENSORS],
        "initializers": len(tensors),
        "nodes": len(graph.node),
        "ops": dict(ops.most_common()),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """The summary as text for a terminal."""

    def shape(dims) -> str:
        return "?" if dims is None else "(" + ", ".join(str(d) for d in dims) + ")"

    def mb(n: int) -> str:
        return f"{n / 1e6:.3f} MB"

    lines = [
        f"{info['file']}: {mb(info['file_bytes'])} on disk"
        + (f" (external data: {', '.join(info['external_data'])})" if info["external_data"] else ""),
        f"  opsets: {', '.join(f'{d} {v}' for d, v in sorted(info['opsets'].items()))}; IR version {info['ir_version']}",
        f"  custom domains: {', '.join(info['custom_domains']) or 'none'}",
        "  inputs:",
        *(f"    {v['name']}: {v['dtype']} {shape(v['shape'])}" for v in info["inputs"]),
        "  outputs:",
        *(f"    {v['name']}: {v['dtype']} {shape(v['shape'])}" for v in info["outputs"]),
    ]
    cache = info["kv_cache"]
    if cache["inputs"] or cache["outputs"]:
        dtypes = Counter(v["dtype"] for v in cache["inputs"])
        lines.append(
            f"  KV cache: {len(cache['inputs'])} inputs, {len(cache['outputs'])} outputs; input dtypes "
            + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
            + ("; layout recorded in metadata" if cache["layout"] else "; no layout metadata")
        )
    lines.append(
        f"  weights: {mb(info['initializer_bytes'])} in {info['initializers']} initializers ("
        + ", ".join(f"{d} {mb(b)}" for d, b in info["bytes_by_dtype"].items())
        + ")"
    )
    lines.append("  largest tensors:")
    lines += [f"    {t['name']}: {t['dtype']} {shape(t['shape'])} {mb(t['bytes'])}" for t in info["largest_tensors"]]
    lines.append(f"  nodes: {info['nodes']}")
    lines += [f"    {op}: {n}" for op, n in info["ops"].items()]
    return "\n".join(lines)
