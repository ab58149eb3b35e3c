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
    # the options as given (serving: the list a client sent, or the block parsed once and
    # checked against the limits); never parsed again from the text, where an option holding
    # "\n- x" lines would become several. None: parsed from the instruction's OPTIONS block
    choices: tuple[str, ...] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        return self.choices if self.choices is not None else parse_options(self.instruction)

    @property
    def stem(self) -> str:
        """The instruction without its OPTIONS block."""
        if self.choices is not None:
            block = format_options("", self.choices)  # "\nOPTIONS:\n- a\n- b"
            if self.instruction.endswith(block):
                return self.instruction.removesuffix(block).strip()
        return split_options(self.instruction)[0]

    @classmethod
    def multiple_choice(cls, stem: str, options: list[str] | tuple[str, ...], task: str) -> Example:
        """An item whose options are exactly `options` (the first is its `output`)."""
        return cls(format_options(stem, options), options[0], task, choices=tuple(options))

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
