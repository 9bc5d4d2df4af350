"""The leak check: the reference answer must not appear in a rationale before evidence.

The teacher is shown the reference answer. A rationale leaks it when a thought (or a search
query) states the answer before any operator or retrieval output shown earlier in the
conversation contains it, or when the text admits an answer was given. Matching is on
VQA-normalized words (number words become digits, articles and punctuation go), so
"there is one face" matches the answer "1". For multiple choice, naming the option letter
("option B", "(B)", "the answer is B") or concluding with the option's text counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tracetune.engine.trace import Rationale, RationaleStep
from tracetune.judge.vqa import normalize_vqa_answer

_REVEALS = re.compile(
    r"\b(?:(?:reference|given|provided|expected|gold|ground[- ]truth|supplied) answer"
    r"|answer (?:was|is) (?:given|provided|supplied)|(?:i was|we were|i am|we are) told"
    # "the label says" alone is how one reads a product label; only a label that was
    # handed over gives the reference away.
    r"|(?:reference|given|provided|gold|ground[- ]truth) label)\b",
    re.IGNORECASE,
)


_NUMBERING = re.compile(
    r"\b(?:step|stage|part|phase|turn|round|line|option|item)\s+\d+\b|(?:^|\n)\s*\d+[.)]\s",
    re.IGNORECASE,
)
# Words around a small number that make it talk about the work, not the image: "one
# operator", "top-3 passages", "none of the results", "this one", "one at a time".
# Compared on normalized words (articles are gone, number words are digits).
_META_BEFORE = frozenset({"top", "this", "that", "which", "each", "every", "any", "per"})
_META_AFTER = frozenset(
    "of more operator operators tool tools step steps thing things way ways passage passages "
    "result results query queries call calls search searches time times by another at "
    "question questions look looks".split()
)
# A bare yes/no states the answer only as a reply ("No, ...", "so the answer is yes"),
# not as a determiner ("there is no text", "no information yet").
_YES_NO = (
    r"(?:^\s*|[.!?;:]\s+|\b(?:answer is|so|therefore|thus|hence|clearly)\s*:?\s*)"
    r"{word}\b(?!\s+\w)"
)


@dataclass
class Leak:
    """Where a rationale leaked the answer, and how."""

    kind: str  # "answer_before_evidence" | "reveals_reference"
    step: int
    excerpt: str

    @property
    def reason(self) -> str:
        return "answer_leak" if self.kind == "answer_before_evidence" else "reveals_reference"

    def describe(self) -> str:
        if self.kind == "reveals_reference":
            return f"step {self.step + 1} says an answer was given: {self.excerpt!r}"
        return (
            f"step {self.step + 1} states the answer before any tool output supports it: "
            f"{self.excerpt!r}"
        )


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def _excerpt(text: str, needle: str, width: int = 60) -> str:
    i = text.lower().find(needle.lower())
    if i < 0:
        return text[: 2 * width]
    return text[max(0, i - width) : i + len(needle) + width]


class LeakChecker:
    """Checks rationales against one task's reference answer."""

    def __init__(
        self,
        answer: str,
        question: str = "",
        choices: list[str] | None = None,
        letter: str | None = None,
    ) -> None:
        self.answer = answer.strip()
        self.norm = normalize_vqa_answer(self.answer)
        self.choices = choices or []
        self.letter = letter.upper() if letter else None
        self.option = None
        if self.letter and self.choices:
            index = ord(self.letter) - ord("A")
            if 0 <= index < len(self.choices):
                self.option = normalize_vqa_answer(self.choices[index])
        # An answer the question itself contains (an option's text, a yes/no echo) only
        # leaks when the text concludes with it, not whenever it is mentioned.
        self.in_question = _contains(normalize_vqa_answer(question), self.norm)

    def mentions(self, text: str) -> str | None:
        """The phrase by which ``text`` states the answer, or None."""
        norm = normalize_vqa_answer(text)
        if self.letter:
            letter = re.escape(self.letter)
            # The letter is matched in upper case only: a lone "a" is usually the article.
            for pattern in (
                rf"\b(?i:option|choice)\s*\(?{letter}\b",
                rf"\({letter}\)",
                rf"\b(?i:answer\s+is)\s*:?\s*\(?{letter}\b",
                rf"\b{letter}\s+(?i:is\s+correct)\b",
            ):
                found = re.search(pattern, text)
                if found:
                    return found.group(0)
            if self.option and _contains(norm, f"answer is {self.option}"):
                return self.option
            return None
        if self.in_question:
            for lead in ("answer is", "so it is", "therefore"):
                if _contains(norm, f"{lead} {self.norm}"):
                    return f"{lead} {self.answer}"
            return None
        if self.norm in ("yes", "no"):
            pattern = _YES_NO.format(word=self.norm)
            found = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
            return self.answer if found else None
        if self.norm.isdigit():
            # Small numbers are everywhere in a plan ("step 1", "1. read the text", "one
            # operator", "the top-3 passages"): numbering and counts of the solver's own
            # work are not claims about the answer.
            words = re.split(r"[^\w']+", normalize_vqa_answer(_NUMBERING.sub(" ", text)))
            for i, word in enumerate(words):
                if word != self.norm:
                    continue
                before = words[i - 1] if i else ""
                after = words[i + 1] if i + 1 < len(words) else ""
                if before not in _META_BEFORE and after not in _META_AFTER:
                    return self.answer
            return None
        return self.answer if _contains(norm, self.norm) else None

    def supported_by(self, outputs: list[str]) -> bool:
        target = self.option if self.letter and self.option else self.norm
        if self.letter and not self.option:
            return False
        return any(_contains(normalize_vqa_answer(o), target) for o in outputs)

    def check(self, rationale: Rationale) -> Leak | None:
        """The first leak in ``rationale``, or None."""
        shown: list[str] = []  # outputs fed back so far
        for i, step in enumerate(rationale.steps):
            leak = self.check_text(i, [step.thought, step.rag.query if step.rag else ""], shown)
            if leak is not None:
                return leak
            shown.extend(_outputs(step))
        return reflection_reveals(rationale)

    def check_text(self, step: int, texts: list[str], shown: list[str]) -> Leak | None:
        for text in texts:
            if not text:
                continue
            if (found := _REVEALS.search(text)) is not None:
                return Leak("reveals_reference", step, _excerpt(text, found.group(0)))
            said = self.mentions(text)
            if said is not None and not self.supported_by(shown):
                return Leak("answer_before_evidence", step, _excerpt(text, said))
        return None


def reflection_reveals(rationale: Rationale) -> Leak | None:
    """Whether the repair (critique or derivation) says an answer was given. Its derivation
    follows every tool output and states the answer by design, so only this kind counts."""
    if rationale.reflection is None:
        return None
    for text in (rationale.reflection.critique, rationale.reflection.derivation):
        if (found := _REVEALS.search(text)) is not None:
            return Leak("reveals_reference", len(rationale.steps), _excerpt(text, found.group(0)))
    return None


def _outputs(step: RationaleStep) -> list[str]:
    out = [op.result for op in step.operators if op.error is None]
    if step.rag is not None and step.rag.error is None:
        out.append(step.rag.result)
    return out
