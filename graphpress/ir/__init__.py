"""The IR: capture with torch.export into a Graph, recognise blocks, summarise."""

from .blocks import AttentionBlock, MLPBlock
from .capture import capture
from .graph import Graph, Linear, StoredLinear, SubgraphBuilder, matches, module_path
from .summary import GraphSummary

__all__ = [
    "AttentionBlock",
    "Graph",
    "GraphSummary",
    "Linear",
    "MLPBlock",
    "StoredLinear",
    "SubgraphBuilder",
    "capture",
    "matches",
    "module_path",
]
