"""The built-in default dataset: a synthetic federated multi-task instruction set.

Eight tasks, one per client in the default partition, each item in the FLAN ``OPTIONS:`` format
(`feddpa.core.records.format_options`): an instruction stem, a line ``OPTIONS:``, one ``- option``
line per option; the output is one of the options. The default model is a small sentence encoder
(all-MiniLM-L6-v2) that scores an option by the cosine between the embeddings of the stem and of
the option, so every label is fixed by a clear keyword in the stem (a ticket's "refund", a review's
"brilliant", an animal's name); templates and random fillers around the keyword only add variety.

The tasks are built so that personalization matters:

- **Conflict pairs** (`CONFLICT_PAIRS`): ``routing_acme`` / ``routing_globex`` (support tickets to
  teams) and ``news_daily`` / ``news_weekly`` (headlines to sections). The two tasks of a pair draw
  from one random stream, so they hold the *same* instructions with the same wording and the same
  fixed option order; only the label mapping differs (two organisations, two conventions; the
  second task of each pair uses a derangement of the natural mapping). A single global model is
  told both answers for one input; a local adapter can learn its own client's convention.
- **Shared-knowledge tasks**: ``sentiment_movies`` and ``sentiment_products`` share one sentiment
  lexicon in different formats; ``animal_class`` and ``continent`` are plain world knowledge.
  Pooling other clients' data can only help them. Their option order is shuffled per item.

Labels are balanced: concepts are drawn round-robin, then the items are shuffled. Within a task no
stem appears twice, and no test stem appears in that task's train split. Every task has its own
`random.Random` seeded from (seed, stream name); the global RNG is never touched.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from feddpa.core.records import Example, format_options

_MAX_TRIES_PER_ITEM = 1000


def _words(text: str) -> tuple[str, ...]:
    """Split a ``" | "``-separated word list; keeps the vocabularies below compact."""
    return tuple(w.strip() for w in text.split("|"))


@dataclass(frozen=True)
class _Family:
    """How one kind of input is drawn: `frame` wraps a `template` with its fields filled.

    Fields (of template or frame) named ``key*`` take distinct keywords of the item's concept
    from `vocab`; every other field except ``text`` takes a random choice from `fillers[field]`.
    """

    category: str
    frame: str
    templates: tuple[str, ...]
    vocab: Mapping[str, tuple[str, ...]]
    fillers: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Task:
    name: str
    family: _Family
    stream: str  # RNG stream name; the two tasks of a conflict pair share one
    options: tuple[str, ...]
    answers: Mapping[str, str]  # concept -> option
    shuffle_options: bool


_WHEN = _words(
    "yesterday | last week | this morning | two days ago | on Monday | last month | "
    "earlier today | over the weekend"
)
_RELATIVE = ("sister", "uncle", "neighbour", "teacher", "cousin", "grandmother", "friend", "boss")

_TICKETS = _Family(
    category="routing",
    frame="Route this support ticket to a team: {text}",
    templates=(
        "{greeting} I have a problem with the {key} for my {product} order. {closing}",
        "{greeting} there is an issue with the {key} since {when}. {closing}",
        "The {key} on my {product} purchase is not right. {closing}",
        "{greeting} I need help with a {key}, it started {when}.",
        "About my {product}: the {key} is a mess. {closing}",
        "{greeting} can someone look at the {key}? I ordered a {product} {when}.",
        "Question regarding the {key} after buying a {product}. {closing}",
        "{greeting} still waiting on a fix for the {key}. {closing}",
    ),
    vocab={
        "billing": _words(
            "invoice | double charge | refund | payment | overcharge | subscription fee | "
            "credit card charge | billing statement | receipt | unexpected charge"
        ),
        "technical": _words(
            "app crash | error message | login failure | software bug | frozen screen | "
            "server error | broken update | sync error | timeout error | installation failure"
        ),
        "delivery": _words(
            "package | courier | tracking number | late delivery | lost parcel | shipping delay | "
            "delivery address | damaged box | missing shipment | delivery driver"
        ),
        "account": _words(
            "password reset | email change | profile update | request to close my account | "
            "username change | account deletion | two-factor setup | account settings | "
            "profile picture | security question"
        ),
    },
    fillers={
        "greeting": ("Hello,", "Hi team,", "Good morning,", "Hey,", "Dear support,", "Hi,"),
        "closing": _words(
            "Please fix this soon. | Thanks in advance. | This is urgent. | "
            "Any help is appreciated. | I am very frustrated. | Let me know what to do."
        ),
        "product": _words(
            "laptop | headphones | coffee maker | phone case | smart watch | desk lamp | "
            "backpack | printer | blender | keyboard"
        ),
        "when": _WHEN,
    },
)

_HEADLINES = _Family(
    category="news",
    frame="Which section does this headline go in? {text}",
    templates=(
        "{key} {event} {when}",
        "Breaking: {key} {event} {where}",
        "{when}, the {key} {event}",
        "Report: {key} {event} {where}",
        "Why the {key} {event}",
        "{key} {event} {where} {when}",
    ),
    vocab={
        "sports": _words(
            "football club | tennis star | marathon runner | basketball team | Olympic swimmer | "
            "rugby squad | cycling champion | hockey coach | golf champion | boxing champion"
        ),
        "business": _words(
            "tech startup | stock exchange | central bank | retail giant | oil company | "
            "investment fund | car maker | airline chief executive | shipping conglomerate | "
            "insurance firm"
        ),
        "science": _words(
            "research team | space agency | physics lab | genome project | climate scientists | "
            "Mars rover | marine biologists | vaccine researchers | space telescope | "
            "quantum computing lab"
        ),
        "politics": _words(
            "prime minister | parliament | senate committee | opposition leader | "
            "election campaign | city council | foreign minister | governor | ruling party | "
            "presidential candidate"
        ),
    },
    fillers={
        "event": _words(
            "makes headlines | announces major changes | faces criticism | "
            "celebrates a record year | reveals new plans | surprises observers | "
            "breaks its silence | sets an ambitious goal"
        ),
        "where": _words(
            "in the capital | up north | on the coast | at home | abroad | downtown | in the south"
        ),
        "when": _WHEN,
    },
)

_SENTIMENT = {
    "positive": _words(
        "wonderful | excellent | brilliant | delightful | fantastic | superb | great | amazing | "
        "charming | outstanding | lovely | impressive"
    ),
    "negative": _words(
        "terrible | awful | boring | disappointing | dreadful | horrible | poor | dull | "
        "annoying | mediocre | lousy | frustrating"
    ),
}

_MOVIES = _Family(
    category="sentiment",
    frame="What is the sentiment of this movie review? {text}",
    templates=(
        "I watched {film} {when} and it was {key}.",
        "The acting in {film} was {key} and the soundtrack was {key2}.",
        "{film} is a {key} movie with a {key2} ending.",
        "What a {key} film! My {relative} agreed that {film} was {key2}.",
        "Honestly, {film} felt {key} from start to finish.",
        "Saw {film} {when}: {key} story, {key2} direction.",
    ),
    vocab=_SENTIMENT,
    fillers={
        "film": _words(
            "the new thriller | the space western | this romantic comedy | the animated sequel | "
            "the courtroom drama | the horror remake | the war epic | this indie musical | "
            "the spy caper | the family adventure"
        ),
        "when": _WHEN,
        "relative": _RELATIVE,
    },
)

_PRODUCTS = _Family(
    category="sentiment",
    frame="Did this customer like the product? Review: {text}",
    templates=(
        "The {item} I bought {when} is {key}.",
        "{key} {item}, and the price was {key2} too.",
        "Quality of this {item}: {key}. Customer service: {key2}.",
        "Got this {item} for my {relative}, it turned out {key}.",
        "After a month of use, the {item} is simply {key}.",
        "For the price, the {item} feels {key} and looks {key2}.",
    ),
    vocab=_SENTIMENT,
    fillers={
        "item": _words(
            "vacuum cleaner | phone charger | pair of running shoes | water bottle | "
            "office chair | electric kettle | bluetooth speaker | yoga mat | camping tent | "
            "hair dryer"
        ),
        "when": _WHEN,
        "relative": _RELATIVE,
    },
)

_ANIMALS = _Family(
    category="animals",
    frame="{text} Which class does the {key} belong to?",
    templates=(
        "",
        "A {key} was seen near the {place} {when}.",
        "My {relative} took a photo of a {key} at the {place}.",
        "In a book about the {place}, there is a chapter on the {key}.",
        "We saw a {key} at the {place} {when}.",
    ),
    vocab={
        "mammal": _words(
            "dog | cat | horse | whale | dolphin | bat | elephant | lion | cow | rabbit | bear | "
            "giraffe | kangaroo | monkey"
        ),
        "bird": _words(
            "eagle | sparrow | penguin | owl | parrot | ostrich | pigeon | swan | crow | "
            "flamingo | hawk | robin | duck | peacock"
        ),
        "fish": _words(
            "salmon | trout | shark | tuna | cod | goldfish | carp | catfish | herring | "
            "sardine | clownfish | swordfish | eel | mackerel"
        ),
        "insect": _words(
            "ant | bee | butterfly | mosquito | beetle | grasshopper | dragonfly | ladybug | "
            "wasp | moth | firefly | termite | flea | cockroach"
        ),
    },
    fillers={
        "place": ("river", "farm", "forest", "garden", "zoo", "beach", "lake", "park", "meadow"),
        "when": _WHEN,
        "relative": _RELATIVE,
    },
)

_PLACES = _Family(
    category="geography",
    frame="{text} On which continent is {key}?",
    templates=(
        "",
        "My {relative} is flying to {key} {when}.",
        "The {event} will be held in {key} next year.",
        "My {relative} grew up in {key}.",
        "A {event} in {key} made the news {when}.",
    ),
    vocab={
        "Europe": _words(
            "France | Germany | Italy | Spain | Norway | Greece | Poland | Portugal | Paris | "
            "Vienna | Amsterdam | Prague"
        ),
        "Asia": _words(
            "Japan | China | India | Thailand | Vietnam | Indonesia | Mongolia | Nepal | Tokyo | "
            "Seoul | Bangkok | Mumbai"
        ),
        "Africa": _words(
            "Kenya | Nigeria | Egypt | Ghana | Ethiopia | Morocco | Senegal | Tanzania | "
            "Nairobi | Cairo | Lagos | Accra"
        ),
        "South America": _words(
            "Brazil | Argentina | Peru | Chile | Colombia | Ecuador | Bolivia | Uruguay | Lima | "
            "Bogota | Santiago | Buenos Aires"
        ),
    },
    fillers={
        "event": _words(
            "music festival | trade fair | film festival | science conference | marathon"
        ),
        "when": _WHEN,
        "relative": _RELATIVE,
    },
)


def _conflict_pair(
    names: tuple[str, str], family: _Family, options: tuple[str, ...], other: tuple[str, ...]
) -> tuple[_Task, _Task]:
    """Two tasks on one stream (same instructions, same option order); concept i of `family`
    is labelled options[i] by the first task and other[i] by the second."""
    first, second = names
    return (
        _Task(first, family, first, options, dict(zip(family.vocab, options, strict=True)), False),
        _Task(second, family, first, options, dict(zip(family.vocab, other, strict=True)), False),
    )


def _shared_task(name: str, family: _Family) -> _Task:
    """A task on its own stream whose concepts are its options, shuffled per item."""
    options = tuple(family.vocab)
    return _Task(name, family, name, options, {o: o for o in options}, shuffle_options=True)


CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (
    ("routing_acme", "routing_globex"),
    ("news_daily", "news_weekly"),
)
_TEAMS = ("billing team", "tech support", "logistics", "customer care")
_SECTIONS = ("sports", "business", "science", "politics")
_TASKS = (  # second of each pair: a derangement (billing -> customer care, sports -> business)
    *_conflict_pair(CONFLICT_PAIRS[0], _TICKETS, _TEAMS, _TEAMS[::-1]),
    *_conflict_pair(CONFLICT_PAIRS[1], _HEADLINES, _SECTIONS, _SECTIONS[1:] + _SECTIONS[:1]),
    _shared_task("sentiment_movies", _MOVIES),
    _shared_task("sentiment_products", _PRODUCTS),
    _shared_task("animal_class", _ANIMALS),
    _shared_task("continent", _PLACES),
)
SYNTHETIC_TASKS: tuple[str, ...] = tuple(t.name for t in _TASKS)


def generate_synthetic(
    seed: int = 0, train_per_task: int = 300, test_per_task: int = 50
) -> tuple[dict[str, list[Example]], list[Example]]:
    """Return ({task: train examples}, test examples of all tasks, `test_per_task` per task).

    Deterministic in `seed`. Tasks come in `SYNTHETIC_TASKS` order; within a task the items are
    shuffled and no test stem occurs in the train split.
    """
    return draw_federation("synthetic", _TASKS, seed, train_per_task, test_per_task)


def draw_federation(
    name: str, tasks: tuple[_Task, ...], seed: int, train_per_task: int, test_per_task: int
) -> tuple[dict[str, list[Example]], list[Example]]:
    """Train and test items of every task of a built-in federation: each task draws from its own
    `random.Random` seeded from (name, seed, stream), train first, test stems never in train."""
    if train_per_task < 1 or test_per_task < 0:
        raise ValueError(
            f"generate_{name}: need train_per_task >= 1 and test_per_task >= 0, "
            f"got train_per_task={train_per_task}, test_per_task={test_per_task}"
        )
    train: dict[str, list[Example]] = {}
    test: list[Example] = []
    for task in tasks:
        rng = random.Random(f"feddpa-{name.replace('_', '-')}:{seed}:{task.stream}")
        seen: set[str] = set()
        train[task.name] = _draw_examples(task, rng, train_per_task, seen)
        test.extend(_draw_examples(task, rng, test_per_task, seen))
    return train, test


def _draw_examples(task: _Task, rng: random.Random, n: int, seen: set[str]) -> list[Example]:
    """`n` label-balanced examples whose stems are not in `seen` (which grows with them)."""
    concepts = tuple(task.family.vocab)
    examples = []
    for i in range(n):
        concept = concepts[i % len(concepts)]
        stem = _unseen_stem(task, concept, rng, seen)
        options = list(task.options)
        if task.shuffle_options:
            rng.shuffle(options)
        instruction = format_options(stem, options)
        answer = task.answers[concept]
        examples.append(Example(instruction, answer, task.name, task.family.category))
    rng.shuffle(examples)
    return examples


def _unseen_stem(task: _Task, concept: str, rng: random.Random, seen: set[str]) -> str:
    for _ in range(_MAX_TRIES_PER_ITEM):
        stem = _fill(task.family, concept, rng)
        if stem not in seen:
            seen.add(stem)
            return stem
    raise ValueError(
        f"synthetic task {task.name!r}: could not draw a new distinct instruction for "
        f"{concept!r} after {len(seen)} items; lower train_per_task/test_per_task"
    )


def _fill(family: _Family, concept: str, rng: random.Random) -> str:
    """One stem of `concept`: a random template with its fields filled, inside the frame."""
    template = rng.choice(family.templates)
    parsed = string.Formatter().parse(template + family.frame)
    fields = list(dict.fromkeys(f for _, f, _, _ in parsed if f and f != "text"))
    keys = [f for f in fields if f.startswith("key")]
    values = dict(zip(keys, rng.sample(family.vocab[concept], len(keys)), strict=True))
    values.update({f: rng.choice(family.fillers[f]) for f in fields if f not in values})
    text = template.format(**values)
    stem = family.frame.format(text=text[:1].upper() + text[1:], **values).strip()
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", stem)  # "a owl" -> "an owl"
