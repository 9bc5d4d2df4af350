"""Dyn-VQA's answer score: token recall against the best alias.

Two rules, named apart:

``official`` (the default) reproduces the evaluation script published with Dyn-VQA in
OmniSearch (Alibaba-NLP/OmniSearch; its ``--lang en|zh`` scorer that prints
"Token F1-Recall"):

- only the **prediction** is normalized, VQA-style: newlines and tabs become spaces,
  punctuation is removed or turned into spaces, periods not followed by a digit are dropped
  (at most 32 of them: the script passes ``re.UNICODE`` where ``re.sub`` takes its count),
  the text is lowercased, number words up to ten become digits, the articles a/an/the are
  dropped and apostrophe-less contractions get their apostrophe back;
- the gold aliases are used **as written**;
- both sides are then tokenized per language: ``en`` lowercases and splits with NLTK's
  ``word_tokenize``, dropping tokens that are punctuation (``,.?!:;'"``); ``zh`` splits with
  ``jieba.cut`` and drops ``，、。 ,.《》``;
- per question, the score is ``|gold tokens ∩ predicted tokens|`` (as multisets) divided by
  the number of gold tokens, maximized over aliases; an empty prediction scores 0 (and a
  gold alias with no tokens matches only a prediction with none). The benchmark score is the
  mean times 100.

``symmetric`` is tracetune's earlier, lenient variant, **not** comparable with published
numbers: prediction and aliases are both normalized VQA-style (``normalize_vqa_answer``) and
split on whitespace. It forgives a gold alias such as "two" against a predicted "2", which
the official rule scores 0.

NLTK's sentence splitter needs its ``punkt_tab`` data, which is not on PyPI; when it is not
installed, ``en`` tokenizes the text as one sentence. That only changes how a period ending
an inner sentence is split off, and the official normalization has already removed such
periods from the prediction.

The language defaults to ``auto``: ``zh`` when most gold rows contain CJK characters (the
``DynVQA_zh`` split), ``en`` otherwise. Papers call the score "F1-Recall"; it is recall: a
long answer that contains the gold tokens scores 1.

Gold rows: ``{"question_id", "answer": [alias, ...]}`` (Dyn-VQA's fields; ``id`` and a single
string answer are accepted). Predictions: ``{"question_id" | "id", "prediction"}``; RR/ORR
outputs are reduced to their answer first (``extract_answer``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any, Literal

from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    paired_rows,
    percent,
    require,
)
from tracetune.judge.vqa import extract_answer, normalize_vqa_answer

Rule = Literal["official", "symmetric"]
Lang = Literal["en", "zh", "auto"]
RULES: tuple[str, ...] = ("official", "symmetric")
LANGS: tuple[str, ...] = ("auto", "en", "zh")

# -- the official prediction normalization ----------------------------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]  # fmt: skip
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # the script's re.sub count (it passes re.UNICODE, which is 32)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The VQA evaluation's contraction table, which the Dyn-VQA script applies after lowercasing
# (so its capitalized keys, such as "Im", never fire; they are left out here).
_CONTRACTIONS = dict(
    pair.split("=", 1)
    for pair in (
        "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't "
        "couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't "
        "hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't "
        "hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's "
        "isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am "
        "mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've "
        "mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock "
        "oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
        "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
        "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd "
        "somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll "
        "somebodys=somebody's someoned=someone'd someoned've=someone'd've "
        "someone'dve=someone'd've someonell=someone'll someones=someone's "
        "somethingd=something'd somethingd've=something'd've something'dve=something'd've "
        "somethingll=something'll thats=that's thered=there'd thered've=there'd've "
        "there'dve=there'd've therere=there're theres=there's theyd=they'd "
        "theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've "
        "twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't "
        "whatll=what'll whatre=what're whats=what's whatve=what've whens=when's "
        "whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've "
        "who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're "
        "whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
        "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
        "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd "
        "youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've"
    ).split()
)
_EN_DROP = ",.?!:;'\""
_ZH_DROP = "，、。 ,.《》"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def normalize_prediction(text: str) -> str:
    """The official rule's prediction normalization (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_LIMIT)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


@cache
def _sentence_splitter() -> Any:
    """NLTK's punkt splitter when its data is installed, else None (one sentence)."""
    from nltk.tokenize import sent_tokenize

    try:
        sent_tokenize("A b. C d.")
    except LookupError:
        return None
    return sent_tokenize


def tokens_en(text: str) -> list[str]:
    """Lowercase, NLTK ``word_tokenize``, punctuation tokens dropped (the script's substring
    test: a token is dropped when it occurs inside ``,.?!:;'"``)."""
    try:
        from nltk.tokenize import word_tokenize
    except ModuleNotFoundError as exc:  # a core dependency; say how to repair a broken env
        raise ScoringInputError(
            "Dyn-VQA's official rule tokenizes English with NLTK: pip install nltk"
        ) from exc
    text = str(text).lower()
    split = _sentence_splitter()
    toks = word_tokenize(text, preserve_line=split is None)
    return [t for t in toks if t not in _EN_DROP]


def tokens_zh(text: str) -> list[str]:
    """``jieba.cut`` words (joined and re-split on whitespace), ``，、。 ,.《》`` dropped."""
    try:
        import jieba
    except ModuleNotFoundError as exc:
        raise ScoringInputError(
            "Dyn-VQA's zh split is tokenized with jieba: pip install jieba"
        ) from exc
    jieba.setLogLevel(logging.WARNING)
    return [t for t in " ".join(jieba.cut(str(text))).split() if t not in _ZH_DROP]


def _recall(gold: list[str], pred: list[str]) -> float:
    if not gold or not pred:
        return float(gold == pred)
    return sum((Counter(gold) & Counter(pred)).values()) / len(gold)


def token_recall(
    prediction: str, aliases: list[str], rule: Rule = "official", lang: str = "en"
) -> float:
    """One question's score: max over aliases of multiset token recall, under ``rule``."""
    if rule == "symmetric":
        pred = Counter(normalize_vqa_answer(prediction).split())
        best = 0.0
        for alias in aliases:
            gold = Counter(normalize_vqa_answer(str(alias)).split())
            n = sum(gold.values())
            if n:
                best = max(best, sum((gold & pred).values()) / n)
        return best
    if rule != "official":
        raise ScoringInputError(f"unknown Dyn-VQA rule {rule!r}: use one of {', '.join(RULES)}")
    if lang not in ("en", "zh"):
        raise ScoringInputError(f"unknown Dyn-VQA language {lang!r}: use en or zh")
    normalized = normalize_prediction(prediction)
    if normalized == "":
        return 0.0
    tokenize = tokens_zh if lang == "zh" else tokens_en
    pred_toks = tokenize(normalized)
    return max((_recall(tokenize(str(a)), pred_toks) for a in aliases), default=0.0)


def detect_lang(alias_lists: list[list[str]]) -> str:
    """``zh`` when most questions have an alias with CJK characters, else ``en``."""
    cjk = sum(1 for aliases in alias_lists if any(_CJK.search(str(a)) for a in aliases))
    return "zh" if alias_lists and cjk * 2 > len(alias_lists) else "en"


def score_dynvqa(
    gold: str | Path,
    predictions: str | Path,
    rule: Rule = "official",
    lang: str = "auto",
) -> ScoreReport:
    """Score predictions against Dyn-VQA gold rows (see the module docstring for the rules)."""
    if rule not in RULES:
        raise ScoringInputError(f"unknown Dyn-VQA rule {rule!r}: use one of {', '.join(RULES)}")
    if lang not in LANGS:
        raise ScoringInputError(f"unknown Dyn-VQA language {lang!r}: use auto, en or zh")
    gold_rows, pred_rows = paired_rows(
        gold,
        predictions,
        "Dyn-VQA",
        ("question_id", "id"),
        "question",
        'prediction lines are {"question_id", "prediction"}',
    )
    aliases_of: dict[str, list[str]] = {}
    for qid, (where, row) in gold_rows.items():
        aliases = require(row, "answer", where, "Dyn-VQA answers are a list of aliases")
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        if not aliases:
            raise ScoringInputError(f"{where}: 'answer' has no aliases")
        aliases_of[qid] = [str(a) for a in aliases]
    used_lang = detect_lang(list(aliases_of.values())) if lang == "auto" else lang
    items = []
    for qid, aliases in aliases_of.items():
        raw = ""
        if qid in pred_rows:
            pwhere, prow = pred_rows[qid]
            raw = str(require(prow, ("prediction", "response", "model_answer"), pwhere) or "")
        answer = extract_answer(raw)
        items.append(
            ItemScore(
                id=qid,
                scores={"token_recall": token_recall(answer, aliases, rule, used_lang)},
                prediction=answer,
                details={"aliases": aliases},
            )
        )
    total = sum(i.scores["token_recall"] or 0.0 for i in items)
    if rule == "official":
        described = (
            "official (OmniSearch's Dyn-VQA evaluation): prediction normalized VQA-style, "
            f"gold aliases as written, {used_lang} tokens "
            f"({'jieba' if used_lang == 'zh' else 'NLTK word_tokenize'}); mean over questions "
            "of max over aliases of multiset token recall, x100"
        )
    else:
        described = (
            "symmetric (tracetune's lenient variant, not comparable with published numbers): "
            "prediction and aliases both normalized VQA-style, whitespace tokens; mean over "
            "questions of max over aliases of multiset token recall, x100"
        )
    return ScoreReport(
        benchmark="dynvqa",
        metrics={"token_recall": percent(total, len(items))},
        n_items=len(items),
        details={
            "rule": rule,
            "lang": used_lang,
            "rule_description": described,
            "missing_predictions": [q for q in gold_rows if q not in pred_rows],
        },
        items=items,
    )
