"""VQA answers: normalization as the VQA evaluation does it, VQAv2 consensus accuracy, and
reading the answer (or the option letter) out of a model's free text.

Shared by the MMAT engine (leak checks, RR/ORR inference) and the VQA-style scorers, so an
answer is read and compared the same way when data is made and when it is scored.

``normalize_vqa_answer``: punctuation is removed (or replaced by a space, depending on
context), periods not followed by a digit are dropped, text is lowercased, number words up
to ten become digits, the articles a/an/the are dropped and apostrophe-less contractions
("dont") get their apostrophe back.
"""

from __future__ import annotations

import re
from typing import Any

# -- VQA answer normalization ----------------------------------------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for stem in ("aren", "can", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven",
                 "isn", "mightn", "mustn", "needn", "shouldn", "wasn", "weren", "won",
                 "wouldn", "ain"):  # fmt: skip
        table[f"{stem}t"] = f"{stem}'t"
    for a, b in (("couldve", "could've"), ("shouldve", "should've"), ("wouldve", "would've"),
                 ("mightve", "might've"), ("mustve", "must've"), ("youre", "you're"),
                 ("theyre", "they're"), ("youve", "you've"), ("theyve", "they've"),
                 ("weve", "we've"), ("ive", "i've"), ("im", "i'm"), ("youll", "you'll"),
                 ("theyll", "they'll"), ("itll", "it'll"), ("thats", "that's"),
                 ("whats", "what's"), ("wheres", "where's"), ("whos", "who's"),
                 ("hows", "how's"), ("theres", "there's"), ("heres", "here's"),
                 ("lets", "let's"), ("shouldnt've", "shouldn't've"), ("yall", "y'all"),
                 ("oclock", "o'clock"), ("maam", "ma'am")):  # fmt: skip
        table[a] = b
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # Punctuation touching a space, or any text with a comma inside a number, loses the
        # mark; elsewhere it separates words (e.g. "red/blue" -> "red blue").
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """VQA-style normalization (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 consensus accuracy for 10 answers; normalized exact match otherwise."""
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(str(a)) for a in answers]
    if len(refs) != 10:
        return float(pred in refs)
    total = 0.0
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        total += min(1.0, sum(1 for r in others if r == pred) / 3.0)
    return total / len(refs)


# -- answer extraction -------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<ANSWER>(.*?)(?:</ANSWER>|$)", re.IGNORECASE | re.DOTALL)
_ANSWER_IS = re.compile(r"the\s+(?:final\s+|correct\s+)?answer\s+is\s*[:：]?\s*", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"(?:^|\n|\b)(?:final\s+)?answer\s*[:：]\s*", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The answer part of a model output: inside ``<ANSWER>``, after "The answer is:" or
    "Answer:" (last occurrence), else the whole text. Surrounding whitespace is stripped."""
    tag = _ANSWER_TAG.findall(text)
    if tag:
        text = tag[-1]
    for pattern in (_ANSWER_IS, _ANSWER_LABEL):
        found = list(pattern.finditer(text))
        if found:
            text = text[found[-1].end() :]
            break
    return text.strip()


def option_letters(options: Any) -> dict[str, str]:
    if isinstance(options, dict):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    if isinstance(options, list):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}
    return {}


def extract_choice(text: str, options: Any) -> str | None:
    """The option letter a model output picks, or None when it names none (or several).

    ``options``: a list (lettered A, B, ...) or a mapping letter -> option text. Tried in
    order: the whole answer is a letter ("B", "(b)", "B."); it starts with an upper-case
    letter and a delimiter ("B. Paris", "(B) Paris", "B: Paris"); exactly one letter in
    parentheses, or after "option"/"choice", anywhere; the answer equals, or contains as
    whole words, exactly one option's text.
    """
    letters = option_letters(options)
    if not letters:
        return None
    answer = extract_answer(text)
    cls = "[" + re.escape("".join(sorted(letters))) + "]"
    whole = re.fullmatch(rf"\(?({cls})\)?[.):：]?", answer, re.IGNORECASE)
    if whole:
        return whole.group(1).upper()
    # Upper case only: a leading "A " is usually the article.
    lead = re.match(rf"(?:\(({cls})\)|({cls})[.):：])(?:\s|$)", answer)
    if lead:
        return (lead.group(1) or lead.group(2)).upper()
    for pattern in (rf"\(({cls})\)", rf"\b(?:option|choice)\s+\(?({cls})\b"):
        found = {m.group(1).upper() for m in re.finditer(pattern, answer, re.IGNORECASE)}
        if len(found) == 1:
            return found.pop()
    norm = normalize_vqa_answer(answer)
    texts = {k: normalize_vqa_answer(v) for k, v in letters.items()}
    exact = [k for k, v in texts.items() if v and v == norm]
    if len(exact) == 1:
        return exact[0]
    contained = [
        k for k, v in texts.items() if v and re.search(rf"(?:^|\s){re.escape(v)}(?:\s|$)", norm)
    ]
    return contained[0] if len(contained) == 1 else None
