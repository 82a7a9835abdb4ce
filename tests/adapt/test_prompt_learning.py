"""Prompt learning (coop, cocoop, dapl) on a bag-of-words text encoder with token-level access:
the prompt assembly and the logits against a naive NumPy reference, the start at the zero-shot
classifier, learning what the text gets wrong, and domain prompts."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from scipy.special import softmax

from clinadapt.adapt import METHODS, create_method
from clinadapt.adapt.vl.prompts import build_prompts
from clinadapt.backbones.text_side import JointSpace, TextEncoder, Tokens
from clinadapt.data.class_text import parse_class_text
from clinadapt.data.info import CLASSIFICATION_TASKS, DatasetInfo, TaskType
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval import evaluate

DIM = 16
SCALE = 10.0
PROMPTED = ["coop", "cocoop", "dapl"]


class BagText(TextEncoder):
    """Tokens are words; a text's embedding is the mean of its tokens' input embeddings (start
    and end tokens included). The word 'c<k>' points along axis k; a text with 'without' gets
    the opposite embedding (the absent side of a multi-label head)."""

    START, END = "<s>", "</s>"

    def __init__(self) -> None:
        super().__init__("bag", DIM, "none")
        self.vocab: dict[str, int] = {"<pad>": 0, self.START: 1, self.END: 2}

    @property
    def token_width(self) -> int:
        return DIM

    def words(self, text: str) -> list[str]:
        return [self.START, *re.findall(r"\w+|[^\w\s]", text.lower()), self.END]

    def vector(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, word)) * 7 + len(word))
        row = 0.3 * torch.randn(DIM, generator=g)
        if re.fullmatch(r"c\d+", word):
            row[int(word[1:])] += 3.0
        return row

    def tokenize(self, texts):
        rows = [[self.vocab.setdefault(w, len(self.vocab)) for w in self.words(t)] for t in texts]
        length = max(map(len, rows))
        ids = torch.zeros(len(rows), length, dtype=torch.int64)
        mask = torch.zeros(len(rows), length, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return Tokens(ids, {"attention_mask": mask})

    def input_embeddings(self, tokens):
        words = {i: w for w, i in self.vocab.items()}
        return torch.stack(
            [torch.stack([self.vector(words[int(i)]) for i in row]) for row in tokens.ids]
        )

    def encode_embeddings(self, tokens, embeddings):
        mask = tokens.extra["attention_mask"][..., None].float()
        mean = (embeddings * mask).sum(dim=-2) / mask.sum(dim=-2)
        negated = (tokens.ids == self.vocab.setdefault("without", len(self.vocab))).any(dim=-1)
        return torch.where(negated[..., None], -mean, mean)

    def _embed(self, texts):
        tokens = self.tokenize(texts)
        return self.encode_embeddings(tokens, self.input_embeddings(tokens))


def class_text(task: TaskType, n: int, names=None, templates=None):
    record = {
        "templates": templates or ["an image of {}.", "a photo showing {} here."],
        "classes": {
            str(k): {"name": (names or {}).get(k, f"c{k}"), "description": f"c{k} seen"}
            for k in range(n)
        },
    }
    if task is TaskType.MULTILABEL:
        record["negative_templates"] = ["an image without {}."]
    info = DatasetInfo("toy", task, tuple(str(k) for k in range(n)), 1, 2)
    return parse_class_text(record, info, "test")


def make(name, task, n, options=None, **text):
    method = create_method(name, options)
    space = JointSpace(BagText(), logit_scale=SCALE, image_dim=DIM)
    return method.use_text(space, class_text(task, n, **text)), space


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def naive_class_embedding(encoder, contexts, prompts):
    """By hand: each prompt's mean of [start, context..., its phrase and suffix words, end],
    normalised, averaged over the class's prompts, normalised."""
    rows = []
    for rest in prompts:
        tokens = [encoder.vector(encoder.START).numpy(), *contexts]
        tokens += [encoder.vector(w).numpy() for w in encoder.words(rest)[1:]]
        rows.append(unit(np.mean(tokens, axis=0)))
    return unit(np.mean(rows, axis=0))


def test_coop_logits_match_the_naive_prompt_assembly(separable_data):
    task, n = TaskType.MULTICLASS, 4
    x, y = separable_data(task, 40, seed=1)
    method, space = make("coop", task, n, {"epochs": 3, "text": "both", "lr": 0.5})
    method.fit(x, y, task, n, seed=0)
    contexts = [c.detach().numpy() for c in method._contexts]
    assert len(contexts) == 1 and contexts[0].shape == (3, DIM)  # "an image of"
    weights = np.stack(
        [
            naive_class_embedding(space.text, contexts[0], [f"c{k}.", f"c{k} seen."])
            for k in range(n)
        ]
    )
    z = unit(x)
    expected = softmax(SCALE * z @ weights.T, axis=1)
    np.testing.assert_allclose(method.predict_proba(x), expected, rtol=1e-4, atol=1e-6)
    assert method.fitted_parameters() == 3 * DIM
    assert method.selected()["first_prompts"][0] == "an image of c0."


def test_template_init_starts_at_the_zero_shot_classifier_of_the_first_template(separable_data):
    task, n = TaskType.MULTICLASS, 4
    x, y = separable_data(task, 40, seed=1)
    coop, _ = make("coop", task, n, {"epochs": 1, "lr": 1e-12})
    first = class_text(task, n)
    first = dataclasses.replace(first, templates=first.templates[:1])
    space = JointSpace(BagText(), logit_scale=SCALE, image_dim=DIM)
    zeroshot = create_method("zeroshot").use_text(space, first).fit(x[:0], y[:0], task, n)
    expected = zeroshot.predict_proba(x)
    np.testing.assert_allclose(coop.fit(x, y, task, n).predict_proba(x), expected, atol=1e-6)
    cocoop, _ = make("cocoop", task, n, {"epochs": 1, "lr": 1e-12})
    np.testing.assert_allclose(cocoop.fit(x, y, task, n).predict_proba(x), expected, atol=1e-6)


def test_contexts_random_phrase_and_class_specific():
    encoder = BagText()
    text = class_text(TaskType.MULTICLASS, 3)
    options = METHODS.get("coop").config_cls
    random = build_prompts(encoder, text, TaskType.MULTICLASS, options(init="random", n_ctx=5))
    assert random.slots == [5] and random.texts[0] == "X X X X X c0."
    assert 0.005 < float(random.init[0].std()) < 0.04
    phrase = build_prompts(encoder, text, TaskType.MULTICLASS, options(init="a photo of a"))
    assert phrase.slots == [4]
    torch.testing.assert_close(
        phrase.init[0], torch.stack([encoder.vector(w) for w in ("a", "photo", "of", "a")])
    )
    specific = build_prompts(
        encoder, text, TaskType.MULTICLASS, options(class_specific=True, text="both")
    )
    assert specific.slots == [3, 3, 3] and specific.group.tolist() == [0, 0, 1, 1, 2, 2]
    multi = build_prompts(
        encoder, class_text(TaskType.MULTILABEL, 3), TaskType.MULTILABEL, options()
    )
    assert multi.slots == [3, 3] and multi.heads == 3 and multi.options == 2
    assert multi.group.tolist()[:3] == [0, 1, 0]  # absent, present, absent: one context each
    assert multi.texts[:2] == ["an image without c0.", "an image of c0."]


def test_class_specific_contexts_learn_what_the_text_gets_wrong(separable_data):
    task, n = TaskType.MULTICLASS, 4
    x, y = separable_data(task, 80, seed=1)
    xq, yq = separable_data(task, 80, seed=2)
    swapped = {0: "c1", 1: "c0"}  # the text of classes 0 and 1 is each other's
    zeroshot, _ = make("zeroshot", task, n, names=swapped)
    before = evaluate(yq, zeroshot.fit(x[:0], y[:0], task, n).predict_proba(xq), task)["acc"]
    options = {"class_specific": True, "epochs": 60, "lr": 2.0, "batch_size": 80}
    coop, _ = make("coop", task, n, options, names=swapped)
    after = evaluate(yq, coop.fit(x, y, task, n, seed=0).predict_proba(xq), task)["acc"]
    assert before < 0.6 and after > 0.9
    again, _ = make("coop", task, n, options, names=swapped)
    np.testing.assert_array_equal(
        again.fit(x, y, task, n, seed=0).predict_proba(xq), coop.predict_proba(xq)
    )


@pytest.mark.parametrize(("name", "task"), [(m, t) for m in PROMPTED for t in CLASSIFICATION_TASKS])
def test_contract_on_every_task(name, task, separable_data, num_classes):
    n = num_classes[task]
    x, y = separable_data(task, 24, seed=1)
    xq, yq = separable_data(task, 30, seed=3)
    method, _ = make(name, task, n, {"epochs": 2})
    if name == "dapl":
        method.use_domains(np.array(["a", "b"] * 12))
    p = method.fit(x, y, task, n, seed=0).predict_proba(xq)
    assert p.shape == (30, n) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    if task.single_label:
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert evaluate(yq, p, task)["auc"] > 0.85
    with pytest.raises(DataError, match="do not fit"):
        method.predict_proba(xq[:, :5])


def test_cocoop_trains_its_meta_net_and_conditions_on_each_image(separable_data):
    task, n = TaskType.BINARY, 2
    x, y = separable_data(task, 16, seed=1)
    method, _ = make("cocoop", task, n, {"epochs": 3, "lr": 0.5})
    method.fit(x, y, task, n, seed=0)
    meta = sum(p.numel() for p in method._meta.parameters())
    assert meta == (DIM * 1 + 1) + (1 * DIM + DIM)  # d -> d/16 -> token width
    assert method.fitted_parameters() == 3 * DIM + meta
    assert method._meta[2].weight.abs().sum() > 0  # left its zero start
    z = torch.nn.functional.normalize(torch.from_numpy(x[:2]).float(), dim=-1)
    shift = method._meta(z).detach()
    assert not torch.allclose(shift[0], shift[1])  # each image its own context


def test_domain_prompts_use_each_query_domain():
    task, n = TaskType.BINARY, 2
    rng = np.random.default_rng(0)
    y = np.arange(40).reshape(-1, 1) % 2
    x = rng.normal(size=(40, DIM))
    x[:, 0] += 3 * (y[:, 0] == 0)
    x[:, 1] += 3 * (y[:, 0] == 1)
    domains = np.array(["scanner a"] * 20 + ["scanner b"] * 20)
    method, _ = make("dapl", task, n, {"epochs": 3, "domain_ctx": 2})
    with pytest.raises(ConfigError, match="domain column"):
        method.fit(x, y, task, n)
    method.use_domains(domains)
    method.fit(x, y, task, n, seed=0)
    assert method.selected()["domains"] == {"scanner a": 20, "scanner b": 20}
    assert method.fitted_parameters() == 3 * DIM + 2 * 2 * DIM
    a = method.query_domains(["scanner a"] * 40).predict_proba(x)
    b = method.query_domains(["scanner b"] * 40).predict_proba(x)
    assert not np.allclose(a, b)
    mixed = method.query_domains(domains).predict_proba(x)
    np.testing.assert_allclose(mixed, np.concatenate([a[:20], b[20:]]))
    np.testing.assert_allclose(method.predict_proba(x), (a + b) / 2)  # domains not given
    unseen = method.query_domains(["scanner c"] * 40).predict_proba(x)
    np.testing.assert_allclose(unseen, (a + b) / 2)
    with pytest.raises(DataError, match="3 query domains for 40"):
        method.query_domains(["scanner a"] * 3).predict_proba(x)
    with pytest.raises(DataError, match="support domains"):
        method.use_domains(domains[:5]).fit(x, y, task, n)


def test_bad_prompt_options_and_encoders(separable_data):
    task, n = TaskType.MULTICLASS, 3
    x, y = separable_data(TaskType.MULTICLASS, 12, seed=1)
    x, y = x, y % 3
    method, _ = make("coop", task, n, templates=["{} on an image."])
    with pytest.raises(ConfigError, match="no words before"):
        method.fit(x, y, task, n)
    method, _ = make(
        "coop", task, n, {"init": "random", "n_ctx": 2, "epochs": 1}, templates=["{} on an image."]
    )
    assert method.fit(x, y, task, n).selected()["context_tokens"] == [2]
    with pytest.raises(ConfigError, match="n_ctx"):
        create_method("coop", {"n_ctx": 0})
    with pytest.raises(ConfigError, match="domain_ctx"):
        create_method("dapl", {"domain_ctx": 0})

    class Plain(TextEncoder):
        def _embed(self, texts):
            return torch.ones(len(texts), DIM)

    plain = create_method("coop").use_text(
        JointSpace(Plain("plain", DIM, "none"), 10.0, DIM), class_text(task, n)
    )
    with pytest.raises(ConfigError, match="no token-level access"):
        plain.fit(x, y, task, n)
