"""lm-evaluation-harness tasks on graphpress's models (spec ``evaluate.lm_eval``, the optional ``lm-eval`` package).

Every model evaluation scores (the original, the compressed graph, each artifact) is one logits function, token
ids (1, L) -> logits (1, L, V); this module makes it an lm-eval ``LM``, tokenizing with the model's own tokenizer.
Loglikelihood requests only: a continuation's log-probability is the sum of its tokens' log-softmax after the
context (the context and continuation tokenized together and split where the context's own tokens end, as
lm-eval's HF model does), and greedy means each continuation token is the argmax. Generation tasks need a
detokenizer, which a model directory's ``tokenize()`` does not give, so they are refused up front. Nothing is
downloaded: tasks come from the user's YAML files, their datasets from local files (datasets runs offline).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch

from .errors import SpecError
from .metrics import logits_of
from .schema.spec import LmEvalConfig

FIELD = "evaluate.lm_eval"
SCORED = {"multiple_choice", "loglikelihood", "loglikelihood_rolling"}


def check(cfg: LmEvalConfig, tokenize) -> None:
    """The package, the tokenizer and every task (with its local data) are there, and each task is scored by
    loglikelihood: checked before any compression work."""
    if tokenize is None:
        raise SpecError([(FIELD, "the model has no tokenizer (a checkpoint's own, or a model directory's tokenize())")])
    for name, task in _tasks(cfg).items():
        kind = getattr(task, "OUTPUT_TYPE", None)
        if kind not in SCORED:
            raise SpecError(
                [(f"{FIELD}.tasks", f"task {name!r} is a {kind} task; graphpress scores {', '.join(sorted(SCORED))}")]
            )


def run(cfg: LmEvalConfig, lm: Callable[[torch.Tensor], torch.Tensor], tokenize) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's results for one model (stderr under 'metric_stderr')."""
    from lm_eval import simple_evaluate

    with _offline_and_quiet():
        results = simple_evaluate(
            model=_adapter(lm, tokenize, cfg.max_length),
            tasks=cfg.tasks,
            task_manager=_manager(cfg),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    scores = {}
    for task, values in sorted(results["results"].items()):
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in sorted(values.items())
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
    return scores


def _manager(cfg: LmEvalConfig):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SpecError([(FIELD, "needs the lm-eval package: pip install 'graphpress[eval]'")]) from None
    return TaskManager(include_path=cfg.include_path, include_defaults=False)


def _tasks(cfg: LmEvalConfig) -> dict:
    manager = _manager(cfg)
    try:
        with _offline_and_quiet():
            loaded = manager.load(cfg.tasks)
    except Exception as exc:
        why = " ".join(str(exc).split())[:300]
        raise SpecError([(f"{FIELD}.tasks", f"lm-eval cannot load {cfg.tasks}: {why}")]) from None
    tasks = loaded["tasks"] if isinstance(loaded, dict) and "tasks" in loaded else loaded
    if not tasks:
        raise SpecError([(f"{FIELD}.tasks", f"no task found for {cfg.tasks} (include_path {cfg.include_path!r})")])
    return tasks


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """datasets and the hub offline (a task naming a hub dataset fails instead of downloading), lm-eval's logs and
    progress bars off; each restored afterwards."""
    import datasets
    import huggingface_hub.constants as hub

    saved = (datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE, datasets.utils.logging.is_progress_bar_enabled())
    level = logging.getLogger("lm_eval").level
    datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    datasets.utils.logging.disable_progress_bar()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved[:2]
        if saved[2]:
            datasets.utils.logging.enable_progress_bar()
        logging.getLogger("lm_eval").setLevel(level)


def _adapter(lm: Callable[[torch.Tensor], torch.Tensor], tokenize, max_length: int):
    from lm_eval.api.model import LM

    class GraphpressLM(LM):
        """lm-eval's model interface over one graphpress logits function (one request per call)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return [self._continuation(*request.args) for request in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [self._rolling(request.args[0]) for request in requests]

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise SpecError([(f"{FIELD}.tasks", "generation tasks need a detokenizer; graphpress scores likelihoods")])

        def _continuation(self, context: str, continuation: str) -> tuple[float, bool]:
            whole = tokenize(context + continuation)
            start = max(1, len(tokenize(context)) if context else 0)  # the first token has no prediction
            count = len(whole) - start
            if count <= 0:
                return 0.0, True
            ids = whole[-(max_length + 1) :]
            count = min(count, len(ids) - 1)
            logprobs = _logprobs(ids)[-count:]
            targets = torch.tensor(ids[-count:])
            picked = logprobs.gather(-1, targets[:, None]).sum().item()
            return picked, bool((logprobs.argmax(-1) == targets).all())

        def _rolling(self, text: str) -> float:
            ids, total = tokenize(text), 0.0
            for start in range(0, max(len(ids) - 1, 0), max_length):  # each token after the first predicted once
                window = ids[start : start + max_length + 1]
                total += _logprobs(window).gather(-1, torch.tensor(window[1:])[:, None]).sum().item()
            return total

    def _logprobs(ids: list[int]) -> torch.Tensor:
        """Log-softmax (len(ids) - 1, V) of each next token given the ones before it."""
        with torch.no_grad():
            logits = logits_of(lm(torch.tensor([ids[:-1]], dtype=torch.long)))[0].float()
        return logits.log_softmax(-1)

    return GraphpressLM()
