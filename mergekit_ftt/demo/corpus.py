"""The demo's synthetic world: addition facts told in prose, and questions about them in chat.

The design mirrors the paper's OLMo 2 experiment (M4 → M5, math SFT) in miniature:

* Every addition fact ``a + b = c`` with operands up to ``max_operand`` is *early* (told in
  pre-training prose from stage 1 on) or *late* (told only from stage 2 on, the annealing
  stage). M_a is a checkpoint part-way through stage 2 and M_b its end, like OLMo 2's M4
  and M5, so M_b has seen the late facts more often and knows them better.
* Pre-training is prose only ("3 plus 7 equals 10.") mixed with filler sentences: no base
  model has ever seen a chat turn, so bases score zero on the chat-format test.
* The SFT set asks about early facts in the Tülu chat format, so fine-tuning mostly teaches
  the format (answer a question with the bare number), not new facts.
* The held-out test asks about late facts only: a model answers them if it knows them from
  pre-training *and* has the chat skill (from its own SFT, or from a transferred delta).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PROSE_TEMPLATES = (
    "{a} plus {b} equals {c}.",
    "the sum of {a} and {b} is {c}.",
    "{a} and {b} add up to {c}.",
    "adding {b} to {a} gives {c}.",
)
QUESTION_TEMPLATES = (
    "What is {a} plus {b}?",
    "What is the sum of {a} and {b}?",
)


@dataclass(frozen=True)
class Operation:
    """What a fact states: ``c`` from ``a`` and ``b``, in prose and as chat questions."""

    prose: tuple[str, ...]
    questions: tuple[str, ...]
    multiply: bool


# The demo and the OLMo 2 matrix state sums; the Llama matrix (configs/llama.yaml) products,
# which a tiny model must memorise fact by fact rather than partly compute.
OPERATIONS = {
    "sum": Operation(PROSE_TEMPLATES, QUESTION_TEMPLATES, multiply=False),
    "product": Operation(
        (
            "{a} times {b} equals {c}.",
            "the product of {a} and {b} is {c}.",
            "{a} multiplied by {b} makes {c}.",
            "multiplying {a} by {b} gives {c}.",
        ),
        ("What is {a} times {b}?", "What is the product of {a} and {b}?"),
        multiply=True,
    ),
}
FILLER_SUBJECTS = ("the cat", "a farmer", "my sister", "the old man", "a bird", "the teacher")
FILLER_VERBS = ("sees", "likes", "paints", "finds", "carries", "follows")
FILLER_OBJECTS = ("the river", "a red box", "the garden", "some bread", "a small boat", "the moon")
FILLER_ENDINGS = ("", " every day", " at night", " in the rain", " with care")


@dataclass(frozen=True)
class Fact:
    """One fact ``a + b = c`` (``operation`` "sum") or ``a × b = c`` ("product")."""

    a: int
    b: int
    operation: str = "sum"

    @property
    def c(self) -> int:
        return self.a * self.b if OPERATIONS[self.operation].multiply else self.a + self.b

    @property
    def questions(self) -> tuple[str, ...]:
        """Every chat question about this fact, one per question template."""
        return tuple(
            template.format(a=self.a, b=self.b) for template in OPERATIONS[self.operation].questions
        )


@dataclass(frozen=True)
class TaskConfig:
    """Sizes of the synthetic world (values: ``configs/full.yaml``, ``configs/quick.yaml``)."""

    max_operand: int
    late_fraction: float  # share of facts told only from stage 2 on
    sft_examples: int
    test_examples: int
    operation: str = "sum"  # a key of OPERATIONS


@dataclass(frozen=True)
class World:
    """The facts, split into what stage 1 tells and what only stage 2 adds."""

    early: tuple[Fact, ...]
    late: tuple[Fact, ...]

    @classmethod
    def build(cls, config: TaskConfig, seed: int) -> World:
        if config.operation not in OPERATIONS:
            raise ValueError(
                f"task operation {config.operation!r}: choose one of {', '.join(OPERATIONS)}"
            )
        operands = range(config.max_operand + 1)
        facts = [Fact(a, b, config.operation) for a in operands for b in operands]
        random.Random(seed).shuffle(facts)
        n_late = round(len(facts) * config.late_fraction)
        if n_late < config.test_examples:
            raise ValueError(
                f"only {n_late} late facts for {config.test_examples} test questions: raise "
                "max_operand or late_fraction, or lower test_examples"
            )
        return cls(early=tuple(facts[n_late:]), late=tuple(facts[:n_late]))


def prose_sentence(fact: Fact, rng: random.Random) -> str:
    return rng.choice(OPERATIONS[fact.operation].prose).format(a=fact.a, b=fact.b, c=fact.c)


def filler_sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} "
        f"{rng.choice(FILLER_OBJECTS)}{rng.choice(FILLER_ENDINGS)}."
    )


def documents(
    world: World, math_share: float, late_share: float, sentences: int, rng: random.Random
) -> Iterator[str]:
    """Endless pre-training documents of ``sentences`` sentences: ``math_share`` of them state
    a fact, which is a late one with probability ``late_share`` (0 in stage 1)."""

    def sentence() -> str:
        if rng.random() >= math_share:
            return filler_sentence(rng)
        facts = world.late if rng.random() < late_share else world.early
        return prose_sentence(rng.choice(facts), rng)

    while True:
        yield " ".join(sentence() for _ in range(sentences))


def chat_example(fact: Fact, rng: random.Random) -> dict:
    """One Tülu-format conversation: a question and the bare number as the answer."""
    question = rng.choice(fact.questions)
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": str(fact.c)},
        ]
    }


def sft_examples(world: World, count: int, seed: int) -> list[dict]:
    """Chat questions about early facts (known to M_a and M_b alike), drawn with replacement."""
    rng = random.Random(seed)
    return [chat_example(fact, rng) for fact in rng.choices(world.early, k=count)]


def held_out_examples(world: World, count: int, seed: int) -> list[dict]:
    """Held-out chat questions about late facts (told only in stage 2)."""
    rng = random.Random(seed + 1)
    return [chat_example(fact, rng) for fact in rng.sample(world.late, count)]


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
