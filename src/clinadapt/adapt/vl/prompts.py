"""Prompt assembly for prompt learning (CoOp, CoCoOp, domain prompts): class prompts whose first
tokens are learned context vectors.

A prompt is ``[start] [context 1..M] [class phrase] [rest of the template] [end]``: the class
phrase goes where the template's ``{}`` is and the context replaces the words before it, so with
``init=template`` the context starts as the input embeddings of those words and the first
prediction is the zero-shot one of the dataset's first template. ``init=random`` starts ``n_ctx``
vectors from N(0, 0.02^2) (CoOp's random initialisation) and any other text starts the context as
that text's token embeddings (CoOp's "a photo of a"). The class phrase is always at the end of the
context (CoOp's "end" position).

Prompts come in heads of options as ``ClassText.prompts`` gives them (one head over the classes;
per label an (absent, present) head for multi-label tasks, the absent option from the
``negative_templates``). ``text=both`` gives an option two prompts, whose normalised embeddings are
averaged, as zero-shot prompt ensembles are. Contexts are shared by every option of a role
(unified: one for single-label tasks, one for "absent" and one for "present" for multi-label
tasks) or one per option (``class_specific``, CoOp's CSC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from clinadapt.adapt.vl.base import TextOptions
from clinadapt.data.class_text import ClassText
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError

if TYPE_CHECKING:
    from clinadapt.backbones.text_side import TextEncoder, Tokens

PLACEHOLDER = "X"
"""The word that holds a context slot before its embedding is replaced (as in CoOp's code)."""
RANDOM_STD = 0.02


@dataclass
class PromptOptions(TextOptions):
    """What every prompt-learning method shares: the context and its training."""

    init: str = field(
        default="template",
        metadata={
            "help": "start of the context: template (the words before {} in the first "
            "template), random (n_ctx vectors), or a phrase such as 'a photo of a'"
        },
    )
    n_ctx: int = field(default=16, metadata={"help": "context vectors when init=random"})
    class_specific: bool = field(
        default=False, metadata={"help": "one context per class (CoOp's CSC) instead of one"}
    )
    epochs: int = field(default=50, metadata={"help": "passes over the support set"})
    lr: float = field(
        default=0.002, metadata={"help": "SGD learning rate (momentum 0.9, cosine decay)"}
    )
    batch_size: int = field(default=32, metadata={"help": "support examples per step"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init.strip():
            raise ConfigError("init must be template, random or a non-empty phrase")
        if self.n_ctx < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"n_ctx, epochs and batch_size must be positive, got {self.n_ctx}, "
                f"{self.epochs}, {self.batch_size}"
            )
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )


@dataclass
class PromptSet:
    """Every prompt of a classifier as tokens, with what is learned where.

    ``base`` (P, L, w) holds the input embeddings of the prompts as tokenized; prompt p's
    positions 1 .. slots[group[p]] are context slots, replaced by ``embed``. ``option`` is the
    flat option index (head * K + option) a prompt belongs to; ``init`` holds each group's
    starting context (slots[g], w); ``texts`` the prompts as first written, for records.
    """

    tokens: Tokens
    base: torch.Tensor
    option: torch.Tensor
    group: torch.Tensor
    slots: list[int]
    init: list[torch.Tensor]
    heads: int
    options: int
    texts: list[str] = field(default_factory=list)

    def embed(self, contexts: list[torch.Tensor]) -> torch.Tensor:
        """(P, L, w) input embeddings with each group's context, (slots[g], w), or a batch of
        them, (B, slots[g], w), which gives (B, P, L, w)."""
        batched = contexts[0].ndim == 3
        lead = (contexts[0].shape[0],) if batched else ()
        out = self.base.expand(*lead, *self.base.shape).clone()
        for g, ctx in enumerate(contexts):
            rows = (self.group == g).nonzero().flatten()
            if len(rows):
                m = self.slots[g]
                value = ctx.unsqueeze(-3).expand(*lead, len(rows), m, ctx.shape[-1])
                out[..., rows, 1 : 1 + m, :] = value.to(out.dtype)
        return out

    def weights(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., P, d) raw prompt embeddings -> (..., H, K, d) unit class embeddings: the
        normalised embeddings of each option's prompts averaged and normalised again."""
        member = F.one_hot(self.option, self.heads * self.options).to(raw.dtype)  # (P, H*K)
        mean = torch.einsum("...pd,pc->...cd", F.normalize(raw, dim=-1), member)
        mean = mean / member.sum(dim=0)[:, None]
        return F.normalize(mean, dim=-1).unflatten(-2, (self.heads, self.options))

    def describe(self) -> dict[str, Any]:
        return {
            "context_groups": len(self.slots),
            "context_tokens": self.slots,
            "prompts": len(self.texts),
            "first_prompts": self.texts[: min(4, len(self.texts))],
        }


def build_prompts(
    encoder: TextEncoder,
    class_text: ClassText,
    task: TaskType,
    options: PromptOptions,
    *,
    extra_slots: int = 0,
    seed: int = 0,
) -> PromptSet:
    """The prompts of ``task``'s heads with context slots before each class phrase;
    ``extra_slots`` more slots follow the initialised ones (domain prompts put their
    domain-specific context there), starting from N(0, 0.02^2) like random contexts."""
    roles = _roles(class_text, task, options.text)  # (role, head, option, phrase)
    heads = 1 if task.single_label else len(class_text.classes)
    n_options = len(class_text.classes) if task.single_label else 2
    generator = torch.Generator().manual_seed(seed)
    texts, prefix_of, group_of = [], [], []
    for role, head, option, phrase in roles:
        template = _template(class_text, role)
        prefix, suffix = template.split("{}")
        lead = _lead(options, prefix)
        extra = " ".join([PLACEHOLDER] * extra_slots)
        texts.append(" ".join(t for t in (lead, extra, phrase + suffix) if t))
        prefix_of.append(" ".join(t for t in (lead, extra) if t))
        group_of.append(head * n_options + option if options.class_specific else role)
    remapped = {g: i for i, g in enumerate(dict.fromkeys(group_of))}
    group = torch.tensor([remapped[g] for g in group_of])
    # the prompts and, after them, the same prompts without their lead words: where the two
    # agree tells how many tokens the lead takes, whatever the tokenizer
    rests = [t[len(p) :].lstrip() for t, p in zip(texts, prefix_of, strict=True)]
    tokens = encoder.tokenize(texts + rests)
    ids = tokens.ids
    base = encoder.input_embeddings(tokens)
    n = len(texts)
    slots: list[int] = [0] * len(remapped)
    init: list[torch.Tensor | None] = [None] * len(remapped)
    for p in range(n):
        m = _lead_tokens(ids[p], ids[n + p], texts[p])
        g = int(group[p])
        if m <= extra_slots:
            raise ConfigError(
                f"{class_text.source}: template {_template(class_text, roles[p][0])!r} has no "
                "words before {} to start the context from; use method.init=random or a phrase"
            )
        if init[g] is None:
            start = base[p, 1 : 1 + m].clone()
            if options.init == "random" or extra_slots:
                fresh = RANDOM_STD * torch.randn(start.shape, generator=generator)
                keep = 0 if options.init == "random" else m - extra_slots
                start[keep:] = fresh[keep:]
            slots[g], init[g] = m, start
        elif slots[g] != m:
            raise ConfigError(
                f"the context of {texts[p]!r} takes {m} tokens, other prompts sharing it take "
                f"{slots[g]}; use method.class_specific=true or one template per role"
            )
    sliced = _take(tokens, n)
    return PromptSet(
        tokens=sliced,
        base=base[:n],
        option=torch.tensor([h * n_options + k for _, h, k, _ in roles]),
        group=group,
        slots=slots,
        init=[t for t in init if t is not None],
        heads=heads,
        options=n_options,
        texts=texts,
    )


PRESENT, ABSENT = 0, 1  # role 0 fills the templates, role 1 the negative templates


def _roles(class_text: ClassText, task: TaskType, use: str) -> list[tuple[int, int, int, str]]:
    """(role, head, option, phrase) of every prompt, in the order of ``ClassText.prompts``."""
    if task.single_label:
        return [
            (0, 0, k, phrase)
            for k, entry in enumerate(class_text.classes)
            for phrase in class_text.phrases(entry, use)
        ]
    class_text.prompts(task, use)  # the error for a multi-label record without negatives
    out = []
    for h, entry in enumerate(class_text.classes):
        out.append((ABSENT, h, 0, entry.name))
        out += [(PRESENT, h, 1, phrase) for phrase in class_text.phrases(entry, use)]
    return out


def _template(class_text: ClassText, role: int) -> str:
    return (class_text.negative_templates if role == ABSENT else class_text.templates)[0]


def _lead(options: PromptOptions, prefix: str) -> str:
    """The words whose slots become the context."""
    if options.init == "template":
        return prefix.strip()
    if options.init == "random":
        return " ".join([PLACEHOLDER] * options.n_ctx)
    return options.init.strip()


def _lead_tokens(full: torch.Tensor, rest: torch.Tensor, text: str) -> int:
    """How many tokens after the start token belong to the lead words: the smallest m with
    ``full[1 + m:]`` equal to ``rest[1:]`` (the last position left out, where a truncated
    prompt keeps its end token)."""
    length = len(full)
    for m in range(length - 2):
        if torch.equal(full[1 + m : length - 1], rest[1 : length - 1 - m]):
            return m
    raise ConfigError(
        f"cannot tell the context tokens of prompt {text!r} apart from its class phrase: the "
        "tokenizer does not split it at the words"
    )


def _take(tokens: Tokens, n: int) -> Tokens:
    from clinadapt.backbones.text_side import Tokens

    return Tokens(tokens.ids[:n], {k: v[:n] for k, v in tokens.extra.items()})
