"""Chat prompts that ask for step-by-step reasoning followed by a fixed final-answer line.

The fixed line ("The final answer is N") lets the answer-first analysis split a run into
its think stage and answer stage even for models without a ``</think>`` token. Small
models (SmolLM2-135M) follow the format far more often when the instruction comes after
the question in the user turn than when it sits in the system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FINAL_ANSWER_PREFIX = "The final answer is"

SYSTEM_PROMPT = "You are a careful math tutor."
INSTRUCTION = f"Solve it step by step. Then write the last line as: {FINAL_ANSWER_PREFIX} N"


def build_messages(
    question: str, system_prompt: str = SYSTEM_PROMPT, instruction: str = INSTRUCTION
) -> list[dict[str, str]]:
    """System + user messages for one problem; the instruction follows the question."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"{question.strip()}\n\n{instruction}"},
    ]


def render_prompt(tokenizer: Any, question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The chat-templated prompt text, ending where the assistant starts writing.

    Tokenise the result with ``add_special_tokens=False``: the template already holds the
    special tokens.
    """
    return tokenizer.apply_chat_template(
        build_messages(question, system_prompt), tokenize=False, add_generation_prompt=True
    )


def few_shot_system_prompt(examples: Sequence[Any], header: str = SYSTEM_PROMPT) -> str:
    """A system prompt of worked examples (``Problem``s with a ``solution``): ``header``,
    then each question, its steps and the final-answer line, in the given order."""
    parts = [f"{header} Worked examples follow."]
    for i, example in enumerate(examples, 1):
        parts.append(
            f"Example {i}.\nQuestion: {example.question.strip()}\nSolution: "
            f"{example.solution.strip()}\n{FINAL_ANSWER_PREFIX} {example.answer}"
        )
    return "\n\n".join(parts)
