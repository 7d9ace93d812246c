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
from .fileio import verify_published

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
    verify_published(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InspectError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph

    def dtype_name(elem_type: int) -> str:
        try:
            return TensorProto.DataType.Name(elem_type).lower()
        except ValueError:
            return f"unknown({elem_type})"

    def itemsize(init) -> int:
        try:
            return helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise InspectError(
                f"{path}: initializer {init.name!r} has data type {dtype_name(init.data_type)}, "
                "which has no fixed size (a broken or non-standard ONNX file)"
            ) from None

    def value(v) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
        return {"name": v.name, "dtype": dtype_name(t.elem_type), "shape": dims}

    tensors, external_files = [], set()
    for init in graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        if init.data_location == TensorProto.EXTERNAL or external:
            external_files.add(_external_file(path, init.name, external))
        if "length" in external:
            nbytes = _count(path, init.name, "length", external["length"])
        elif init.raw_data:
            nbytes = len(init.raw_data)
        elif init.data_type == TensorProto.STRING:
            nbytes = sum(len(v) for v in init.string_data)
        else:
            count = 1
            for d in init.dims:
                count *= _count(path, init.name, "dims", d)
            nbytes = count * itemsize(init)
        tensors.append(
            {"name": init.name, "dtype": dtype_name(init.data_type), "shape": list(init.dims), "bytes": nbytes}
        )
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t["dtype"]] += t["bytes"]
    nodes = list(graph.node) + [n for f in model.functions for n in f.node]
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node)
    inputs, outputs = [value(v) for v in graph.input], [value(v) for v in graph.output]
    external_files = sorted(external_files)
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
            "inputs": [v for v in inputs if v["name"].startswith("past_key_values.")],
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


def _count(path: Path, tensor: str, field: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise InspectError(f"{path}: initializer {tensor!r} has {field} {value!r}, not a size")
    return n


def _external_file(path: Path, tensor: str, external: dict[str, str]) -> str:
    """The external-data file of a tensor, checked to lie inside the model's folder without reading it.

    A location that is absolute, climbs out with '..' or resolves (through a symlink) outside
    the folder is refused, as onnx's own loader refuses it: inspecting a file must not touch
    or reveal anything else on the machine.
    """
    location = external.get("location")
    if not location:
        raise InspectError(f"{path}: initializer {tensor!r} is stored externally but names no location")
    folder = path.parent.resolve()
    target = (folder / location).resolve()
    if Path(location).is_absolute() or ".." in Path(location).parts or not target.is_relative_to(folder):
        raise InspectError(
            f"{path}: initializer {tensor!r} points its external data at {location!r}, outside the model's folder; "
            "not read (onnx refuses such locations too)"
        )
    if not target.is_file():
        raise InspectError(f"{path}: initializer {tensor!r}: its external data file {location!r} is missing")
    return location


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
