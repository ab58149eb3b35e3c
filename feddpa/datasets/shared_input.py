"""A second built-in synthetic federation: every task reads the same kind of input.

Eight tasks, one per client, in the FLAN ``OPTIONS:`` format of `feddpa.datasets.synthetic` and
drawn by its filling machinery. Every input is a short travel report from one shared generator
(`REPORTS` × `ATTRIBUTES`): each report names, at once, a news topic, a place, a mood, an animal,
the weather, a means of transport and a time of day, each by a clear keyword of one concept. The
tasks differ *only* in the question put before or after the report ("How did the writer
travel?", "What was the weather like?", ...) and in which attribute labels it, so the input alone
never tells two tasks apart: a gate on input representations cannot route by task here, only the
instruction can.

- **Conflict pair** (`CONFLICT_PAIRS`): ``section_herald`` / ``section_tribune`` ask the same
  question ("Which section of the newspaper does this report belong in?") on one random stream,
  so they hold the same instructions with the same fixed option order; the second paper files
  every topic under the next section (a derangement: sports -> business -> science -> politics
  -> sports).
- **Six single-attribute tasks**: ``continent``, ``sentiment``, ``animal_class``, ``weather``,
  ``transport``, ``time_of_day``; their option order is shuffled per item.

As in `feddpa.datasets.synthetic`: labels are balanced, no stem appears twice within a task, no
test stem appears in that task's train split, and every task has its own `random.Random` seeded
from (seed, stream name); the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping

from feddpa.core.records import Example
from feddpa.datasets.synthetic import (
    _ANIMALS,
    _HEADLINES,
    _PLACES,
    _SENTIMENT,
    _conflict_pair,
    _Family,
    _shared_task,
    _Task,
    _words,
    draw_federation,
)

ATTRIBUTES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "topic": _HEADLINES.vocab,
    "place": _PLACES.vocab,
    "mood": _SENTIMENT,
    "animal": _ANIMALS.vocab,
    "weather": {
        "sunny": _words("sunny | cloudless | bright and sunny | sun-drenched | hot and sunny"),
        "rainy": _words("rainy | wet | drizzly | showery | damp and rainy"),
        "snowy": _words("snowy | icy | frosty | freezing | snow-covered"),
        "windy": _words("windy | gusty | breezy | blustery | stormy and windy"),
    },
    "travel": {
        "car": _words("car | taxi | rental car | jeep | limousine"),
        "train": _words("train | night train | tram | subway | express train"),
        "plane": _words("plane | jet | helicopter | airliner | private jet"),
        "boat": _words("boat | ferry | ship | sailboat | canoe"),
    },
    "time": {
        "morning": _words(
            "at dawn | at sunrise | over breakfast | early in the morning | at daybreak"
        ),
        "afternoon": _words("at noon | over lunch | at midday | after lunch | at lunchtime"),
        "evening": _words("at sunset | at dusk | over dinner | in the evening | at twilight"),
        "night": _words(
            "at midnight | late at night | under the stars | in the small hours | after midnight"
        ),
    },
}
"""attribute -> concept -> keywords; every report template has one field per attribute."""

REPORTS: tuple[str, ...] = (
    "Travel notes: {time} in {place}, {weather} weather. I took the {travel}, wrote about the "
    "{topic} and saw a {animal}. It felt {mood}.",
    "Dispatch from {place}: the {travel} arrived {time}, the day was {weather}, a {animal} "
    "wandered by, and my story on the {topic} was {mood}.",
    "Field report: a {weather} day in {place}. I took the {travel} {time} to cover the {topic}, "
    "spotted a {animal}, and it was {mood}.",
    "My day in {place}: a {mood} story on the {topic}, a {animal} by the road, {weather} "
    "weather, and the {travel} home {time}.",
    "Quick note: the {topic} story from {place} was {mood}. It was {weather} {time}, I rode the "
    "{travel} and met a {animal}.",
    "Log: {place}, {time}, {weather}. Took the {travel}. Story: the {topic}. Saw a {animal}. "
    "Verdict: {mood}.",
    "Postcard from {place}: {weather} {time}. The {travel} was late, a {animal} sat outside, and "
    "the news about the {topic} felt {mood}.",
    "Reporter's diary: I covered the {topic} in {place} {time}. The {travel} ride was {mood}, "
    "the sky {weather}, and a {animal} followed me.",
)
"""The shared input generator's templates: each names every attribute once."""

_CATEGORY = {
    "topic": "news",
    "place": "geography",
    "mood": "sentiment",
    "animal": "animals",
    "weather": "weather",
    "travel": "travel",
    "time": "time",
}


def report_family(attribute: str, question: str) -> _Family:
    """The shared generator, asked `question` about `attribute`: its field becomes the labelled
    ``{key}``, every other attribute is a random keyword of a random concept (uniform, since each
    attribute's concepts have equally many keywords); the question comes before or after."""
    key = "{" + attribute + "}"
    templates = tuple(
        form.format(question=question, report=report.replace(key, "{key}"))
        for report in REPORTS
        for form in ("{question} {report}", "{report} {question}")
    )
    fillers = {
        name: tuple(word for words in vocab.values() for word in words)
        for name, vocab in ATTRIBUTES.items()
        if name != attribute
    }
    return _Family(_CATEGORY[attribute], "{text}", templates, ATTRIBUTES[attribute], fillers)


QUESTIONS: Mapping[str, tuple[str, str]] = {  # task -> (attribute, question)
    "section_herald": ("topic", "Which section of the newspaper does this report belong in?"),
    "section_tribune": ("topic", "Which section of the newspaper does this report belong in?"),
    "continent": ("place", "On which continent did this happen?"),
    "sentiment": ("mood", "How did the writer feel about it?"),
    "animal_class": ("animal", "What kind of animal did the writer see?"),
    "weather": ("weather", "What was the weather like?"),
    "transport": ("travel", "How did the writer travel?"),
    "time_of_day": ("time", "At what time of day did it happen?"),
}
CONFLICT_PAIRS: tuple[tuple[str, str], ...] = (("section_herald", "section_tribune"),)
_SECTIONS = tuple(ATTRIBUTES["topic"])  # sports, business, science, politics
_TASKS: tuple[_Task, ...] = (  # the second paper: a derangement (sports -> business, ...)
    *_conflict_pair(
        CONFLICT_PAIRS[0],
        report_family(*QUESTIONS["section_herald"]),
        _SECTIONS,
        _SECTIONS[1:] + _SECTIONS[:1],
    ),
    *(
        _shared_task(name, report_family(*QUESTIONS[name]))
        for name in QUESTIONS
        if name not in CONFLICT_PAIRS[0]
    ),
)
SHARED_INPUT_TASKS: tuple[str, ...] = tuple(t.name for t in _TASKS)


def generate_shared_input(
    seed: int = 0, train_per_task: int = 300, test_per_task: int = 50
) -> tuple[dict[str, list[Example]], list[Example]]:
    """Return ({task: train examples}, test examples of all tasks, `test_per_task` per task).

    Deterministic in `seed`. Tasks come in `SHARED_INPUT_TASKS` order; within a task the items
    are shuffled and no test stem occurs in the train split.
    """
    return draw_federation("shared_input", _TASKS, seed, train_per_task, test_per_task)
