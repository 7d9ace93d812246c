"""hf backend: the compressed model as a Hugging Face transformers checkpoint, where transformers can express it.

A pass that changes weights but not the architecture (``qkvo_lock``; any pass at a
setting that leaves every layer as it was) gives a model transformers runs as it is: the
same class and config, new weights. The backend writes that checkpoint with
``save_pretrained`` (safetensors, the config, the checkpoint's tokenizer files), loads it
back with ``from_pretrained`` from the folder alone, and holds its logits to the graph's.

The rule is the graph's tensors, not the pass names: the compressed graph's parameters
and buffers must be exactly the model's own state (same names and shapes). New tensors (low-rank factors,
packed codes, a latent projection) have no place in the class, and are refused by name;
with ``dense``, weights in a compressed format (LUT, N:M, shift, integer codes) are rebuilt
into the dense weights they stand for, which the class does hold.
A change the architecture cannot express without new tensors (a quantized KV cache) is
caught by the logits check. One rewrite has a class of its own: ``gqa_to_mla``'s MLA is written
in DeepSeek's layout (``hf_deepseek``), loaded back and checked the same way.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from ..errors import BackendError
from ..fileio import publish_all, staging_dir
from ..ir import Graph
from ..ir.ops.fused import FUSED
from ..metrics import compare_outputs, logits_of
from ..progress import step
from ..schema import HfBackendConfig
from .base import Backend, BackendRecord, Comparison, tensor_leaves
from .hf_deepseek import MLA_LINEARS, deepseek_v3, layout_details, mla_paths
from .onnx_genai import copy_tokenizer

SHOWN = 5  # tensors named in a refusal


class HfBackend(Backend):
    target = "hf"
    Config = HfBackendConfig

    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        cfg: HfBackendConfig = self.config
        start = time.perf_counter()
        model = self._transformers_model()
        cls, config, state = self._checkpoint(graph, model)
        with staging_dir(out_dir) as tmp:
            folder = tmp / cfg.folder
            with step(f"{self.spec_path} hf: writing {cfg.folder}/"), _no_transformers_bars():
                _save(cls, config, state, folder)
                copied = copy_tokenizer(self.source, folder)
                loaded = cls.from_pretrained(folder, dtype=next(iter(state.values())).dtype).eval()
            comparison = self.validate(loaded, graph, inputs)
            if comparison.errors["rel_l2"] > cfg.max_error:
                raise BackendError(
                    f"{self.spec_path}: {cls.__name__} with the compressed weights differs from the compressed "
                    f"graph: rel_l2 = {comparison.errors['rel_l2']:.3g} > max_error = {cfg.max_error:g} (the graph "
                    "changes what the architecture computes, not only its weights)"
                )
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
            publish_all(tmp, out_dir, last=[out_dir / cfg.folder])
        return BackendRecord(
            target=self.target,
            artifact=str(out_dir / cfg.folder),
            files=files,
            errors=comparison.errors,
            tolerance=cfg.max_error,
            seconds=time.perf_counter() - start,
            details={"class": cls.__name__, "tensors": len(state), **layout_details(config)},
            latency=comparison.latency,
            warnings=[] if copied else [f"{self.spec_path}: no tokenizer files (the model is not a checkpoint's)"],
        )

    def _transformers_model(self):
        model = getattr(self.source, "model", None)
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency of the hf target's users
            PreTrainedModel = ()  # noqa: N806
        if not isinstance(model, PreTrainedModel):
            raise BackendError(
                f"{self.spec_path}: the hf target writes transformers checkpoints; the model compressed is "
                f"{type(model).__name__}, not a transformers PreTrainedModel"
            )
        return model

    def _checkpoint(self, graph: Graph, model):
        """(class, config, state dict) of the checkpoint: the model's own class, or DeepSeek's MLA layout for a
        ``gqa_to_mla`` conversion (``layout``)."""
        tensors = self._tensors(graph, model)
        layout = self.config.layout
        if layout == "deepseek_v3" or (layout == "auto" and mla_paths(tensors)):
            from transformers import DeepseekV3ForCausalLM

            config, tensors = deepseek_v3(graph, tensors, model.config, self.spec_path)
            cls = DeepseekV3ForCausalLM
        else:
            cls, config = type(model), model.config
        hints = []
        if mla_paths(tensors):
            hints.append('and gqa_to_mla\'s MLA in DeepSeek\'s layout ("layout": "deepseek_v3")')
        if not self.config.dense and any(n.target in FUSED for n in graph.nodes):
            hints.append('"dense": true writes compressed-format weights rebuilt dense')
        return cls, config, self._state(tensors, cls, config, hints)

    def _tensors(self, graph: Graph, model) -> dict[str, torch.Tensor]:
        """The graph's state by name: formats rebuilt dense (``dense``), each tied weight under both names."""
        tensors = dict(graph.program.state_dict)  # lifted constants (a decode graph's scalars) are not state
        ours = set(model.state_dict())
        if self.config.dense:
            attention = {k[: -len(".q_proj.weight")] for k in ours if k.endswith(".q_proj.weight")}
            wanted = ours | {f"{p}.{part}.weight" for p in attention for part in MLA_LINEARS}
            for name, (weight, stored) in _dense_weights(graph, wanted - set(tensors)).items():
                tensors[name] = weight
                for key in stored:
                    tensors.pop(key, None)
        for key, alias in _aliases(model).items():  # a tied weight is captured under one of its names
            if key not in tensors and alias in tensors:
                tensors[key] = tensors[alias]
        return tensors

    def _state(self, tensors: dict[str, torch.Tensor], cls, config, hints: list[str]) -> dict[str, torch.Tensor]:
        """``cls(config)``'s state, every tensor taken from ``tensors``; refused, naming tensors (and ``hints``),
        when they differ."""
        from transformers.initialization import no_init_weights

        from ..ir.store import materialize

        with torch.device("meta"), no_init_weights():
            skeleton = cls(config)
        ours = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        buffers = {name for name, _ in skeleton.named_buffers()}
        new = sorted(set(tensors) - set(ours) - buffers)
        gone = sorted(k for k in ours if k not in tensors)
        reshaped = sorted(k for k in ours if k in tensors and tuple(tensors[k].shape) != ours[k])
        if new or gone or reshaped:
            why = [
                f"{label} {', '.join(names[:SHOWN])}{f' (+{len(names) - SHOWN} more)' if len(names) > SHOWN else ''}"
                for label, names in (("new tensors", new), ("tensors gone", gone), ("reshaped", reshaped))
                if names
            ]
            raise BackendError(
                f"{self.spec_path}: transformers' {cls.__name__} cannot hold this compressed model: "
                f"{'; '.join(why)}. The hf target writes models whose passes change weights only (e.g. qkvo_lock)"
                + "".join(f"; {hint}" for hint in hints)
            )
        return {k: materialize(tensors[k]).detach() for k in ours}

    def validate(self, loaded, graph: Graph, inputs: list[tuple]) -> Comparison:
        """The loaded checkpoint's logits against the graph's on the calibration inputs (a decode graph: its
        teacher-forced logits over the first sample's first tokens)."""
        from ..runtime import TorchDecoder, teacher_forced_logits
        from .base import DECODE_VALIDATION_TOKENS

        outputs, references = [], []
        with torch.no_grad(), step(f"{self.spec_path} hf: validating the loaded checkpoint"):
            if graph.cache is not None:
                ids = inputs[0][0][:, :DECODE_VALIDATION_TOKENS]
                references.append(teacher_forced_logits(TorchDecoder(graph), ids))
                outputs.append(logits_of(loaded(ids)))
            else:
                eager = graph.module()
                for args in inputs:
                    references.append(logits_of(eager(*args)))
                    outputs.append(logits_of(loaded(*tensor_leaves(args))))
        self.validated_shapes = sorted({"x".join(map(str, o.shape[:-1])) for o in outputs})
        return Comparison(compare_outputs(outputs, references))


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers' own bars (writing shards, loading weights) would print inside graphpress's step."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _dense_weights(graph: Graph, missing: set[str]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Per linear whose weight is a compressed format rebuilt from stored tensors (``linear(x, lut_weight(...))``,
    an N:M weight of palettized values included), ``<layer>.weight`` -> (the dense weight, the stored tensors it
    replaces). The layer is the longest prefix of a stored tensor's name that names a missing weight."""
    from ..ir.store import materialize
    from .fuse_linear import fusable

    def value(arg, stored: list[str]):
        if not isinstance(arg, torch.fx.Node):
            return arg
        name = graph.tensor_name(arg)
        if name is not None:
            stored.append(name)
            return materialize(graph.stored(name))
        return arg.target(*(value(a, stored) for a in arg.args))

    dense = {}
    for node in graph.nodes:
        if not fusable(node):
            continue
        stored: list[str] = []
        weight = value(node.args[1], stored)
        parts = stored[0].split(".")
        layer = next(
            (".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) + ".weight" in missing),
            None,
        )
        if layer is not None:
            dense[f"{layer}.weight"] = (weight.detach(), stored)
    return dense


def _aliases(model) -> dict[str, str]:
    """Each tied weight's other name, both ways (``lm_head.weight`` <-> ``model.embed_tokens.weight`` of a model
    that ties its embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    pairs = tied.items() if isinstance(tied, dict) else ()
    return {**dict(pairs), **{source: target for target, source in pairs}}


def _save(cls, config, state: dict[str, torch.Tensor], folder: Path) -> None:
    """``cls(config)`` with ``state``'s weights, saved by transformers itself (shared tensors, the config's dtype,
    the generation config as it does for any model)."""
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(config)
    config.dtype = next(iter(state.values())).dtype
    with no_init_weights():
        fresh = cls(config)
    fresh.load_state_dict(state, strict=False)
    fresh.tie_weights()
    fresh.save_pretrained(folder, safe_serialization=True)
