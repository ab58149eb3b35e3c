"""Instruction records and the `OPTIONS:` block convention of FLAN / FedDPA dataset 1.

A record's instruction may end with a block::

    OPTIONS:
    - first option
    - second option

Multiple-choice models score each option; the answer (`output`) must be one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIONS_MARKER = "OPTIONS:"


@dataclass(frozen=True)
class Example:
    """One instruction-following item; `task` names the task it was drawn from."""

    instruction: str
    output: str
    task: str
    category: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        return parse_options(self.instruction)

    @property
    def stem(self) -> str:
        """The instruction without its OPTIONS block."""
        return split_options(self.instruction)[0]

    def to_dict(self) -> dict[str, str]:
        return {
            "instruction": self.instruction,
            "output": self.output,
            "task": self.task,
            "category": self.category,
        }


def split_options(instruction: str) -> tuple[str, tuple[str, ...]]:
    """Return (stem, options); options is empty when there is no OPTIONS block."""
    head, marker, tail = instruction.rpartition(OPTIONS_MARKER)
    if not marker:
        return instruction.strip(), ()
    options = tuple(
        line.strip()[2:].strip() for line in tail.splitlines() if line.strip().startswith("- ")
    )
    return head.strip(), options


def parse_options(instruction: str) -> tuple[str, ...]:
    return split_options(instruction)[1]


def format_options(stem: str, options: list[str] | tuple[str, ...]) -> str:
    """Inverse of `split_options`: the instruction text with an OPTIONS block."""
    lines = "\n".join(f"- {o}" for o in options)
    return f"{stem}\n{OPTIONS_MARKER}\n{lines}"
