"""Sample: one evaluation prompt, its references and how its answer is scored."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Sample:
    """One prompt of an evaluation task, the same for every method.

    Args:
        task: task name (``"hotpotqa"``, ``"needle_single"``, ...); results are grouped by it.
        sample_id: unique within the task and stable across runs (resume keys on ``(task, sample_id)``).
        prompt: the full text given to the model (document(s) and question), already truncated to fit.
        answers: reference answers; a prediction is scored against each and the best score counts.
        metric: a name from ``hf_dashkv.apps.evaluation.metrics.METRICS`` (``None``: fidelity only, no task score).
        max_new_tokens: greedy tokens generated for the answer.
        all_classes: the label set, for classification metrics.
        continuation: text whose negative log-likelihood after the prompt is measured (teacher-forced, one decode
            step per token); defaults to the first answer.
        context_tokens: the context length this sample was built for (results are grouped by it too).
        stop_at_newline: end the answer at its first newline (short answers); otherwise at end-of-sequence.
        meta: anything else worth keeping in the predictions file (depth, source document, ...).
    """

    task: str
    sample_id: str
    prompt: str
    answers: list[str]
    metric: str | None
    max_new_tokens: int
    all_classes: list[str] | None = None
    continuation: str | None = None
    context_tokens: int = 0
    stop_at_newline: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.context_tokens}/{self.sample_id}"

    def to_dict(self) -> dict:
        return asdict(self)
