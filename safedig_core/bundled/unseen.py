"""Unseen wordings: hand-written captions of the concept world that no training or calibration run saw.

dictionaries/prompts/unseen_wordings.jsonl holds one caption a line,
    {"text": ..., "phrase": ..., "concept": ..., "role": ..., "kind": ...}
where `phrase` is the part of `text` that names the concept and `kind` says how it avoids the world's
wordings: a synonym ("wasp-striped"), an indirect description ("striped like a bee"), a typo
("hazzard-striped"), a reorder ("striped black and yellow") or a mixture of one concept's words with
another's colours ("candy-striped in green and purple" is venom: the colours decide).

Every line is checked on load: a phrase must not be a world wording of any concept or split, a caption
must not contain its own concept's world wordings (nor, except in a mixture, any concept's), must not be a
caption world.py could write, and must fit the text encoder's 32 word pieces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import SafeDIGError
from . import world

UNSEEN_PATH = Path(__file__).resolve().parents[2] / "dictionaries" / "prompts" / "unseen_wordings.jsonl"
KINDS = ("synonym", "indirect", "typo", "mixture", "reorder")
FIELDS = ("text", "phrase", "concept", "role", "kind")


@dataclass(frozen=True)
class UnseenPrompt:
    text: str
    phrase: str   # the words of `text` that name the concept
    concept: str  # the concept the colours and texture describe (what the renderer would draw)
    role: str     # the concept's world role: "source", "target" or "benign"
    kind: str     # one of KINDS

    @property
    def unsafe(self) -> bool:
        return world.CONCEPT_BY_NAME[self.concept].unsafe


def _norm(text: str) -> str:
    """Lower case, single spaces, 'an' read as 'a' (world.py picks the article by the next word)."""
    return re.sub(r"\ban\b", "a", " ".join(text.lower().split()))


def _contains(text: str, wording: str) -> bool:
    """`wording` occurs in `text` from a word start on (so "hazard-striped-ish" contains "hazard-striped")."""
    return re.search(rf"\b{re.escape(_norm(wording))}", _norm(text)) is not None


def _all_wordings(concepts=world.CONCEPTS) -> list[str]:
    return [w for c in concepts for w in (*c.train, *c.heldout)]


@lru_cache(maxsize=1)
def _world_caption_patterns() -> list[re.Pattern]:
    """Every template of both splits with every wording of both splits, as one regex per template."""
    def alternatives(words) -> str:
        return "(?:" + "|".join(re.escape(_norm(w)) for w in sorted(set(words), key=len, reverse=True)) + ")"

    slots = {"c": alternatives(_all_wordings()),
             "s": alternatives(w for t, h in world.SHAPES.values() for w in (*t, *h)),
             "p": alternatives(w for t, h in world.POSITIONS.values() for w in (*t, *h)),
             "b": alternatives(w for t, h in world.BACKGROUNDS.values() for w in (*t, *h))}
    patterns = []
    for template in (*world.TEMPLATES["train"], *world.TEMPLATES["heldout"]):
        parts = re.split(r"\{(\w)\}", _norm(template))  # literal, slot, literal, slot, ...
        body = "".join(slots[part] if i % 2 else re.escape(part) for i, part in enumerate(parts))
        patterns.append(re.compile(body))
    return patterns


def is_world_caption(text: str) -> bool:
    """Whether world.py could write this caption (any template, wording and split)."""
    return any(p.fullmatch(_norm(text)) for p in _world_caption_patterns())


def wording_problem(text: str, phrase: str, concept: str, kind: str) -> str | None:
    """Why this caption is not an unseen wording of `concept`, or None when it is one."""
    if phrase not in text:
        return f"the phrase {phrase!r} is not part of the text {text!r}"
    if _norm(phrase) in {_norm(w) for w in _all_wordings()}:
        return f"the phrase {phrase!r} is a wording of world.py"
    own = world.CONCEPT_BY_NAME[concept]
    for w in _all_wordings([own] if kind == "mixture" else world.CONCEPTS):
        if _contains(text, w):
            return f"the text contains the world wording {w!r}"
    if is_world_caption(text):
        return f"{text!r} is a caption world.py can write"
    return None


def load_unseen(path: str | Path = UNSEEN_PATH) -> list[UnseenPrompt]:
    """Every line of the set, validated (SafeDIGError naming the line and the fix otherwise)."""
    from .text_encoder import CONTEXT_LEN, token_lengths

    path = Path(path)

    def fail(lineno: int, problem: str, fix: str):
        return SafeDIGError(f"line {lineno}: {problem}", fix, path=path)

    prompts: list[UnseenPrompt] = []
    linenos: list[int] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise fail(lineno, f"not JSON ({e.msg})", "write one JSON object per line") from None
        if not isinstance(record, dict) or set(record) != set(FIELDS) or \
                not all(isinstance(record[k], str) for k in FIELDS):
            raise fail(lineno, f"expected the string fields {', '.join(FIELDS)}",
                       "give exactly these keys, each a string")
        p = UnseenPrompt(**{k: record[k] for k in FIELDS})
        if p.concept not in world.CONCEPT_BY_NAME:
            raise fail(lineno, f"unknown concept {p.concept!r}", f"use one of {', '.join(world.CONCEPT_NAMES)}")
        if p.role not in world.ROLES:
            raise fail(lineno, f"unknown role {p.role!r}", f"use one of {', '.join(world.ROLES)}")
        if p.role != world.CONCEPT_BY_NAME[p.concept].role:
            raise fail(lineno, f"{p.concept!r} has the role {world.CONCEPT_BY_NAME[p.concept].role!r}, "
                       f"not {p.role!r}", "give the concept's role from world.CONCEPTS")
        if p.kind not in KINDS:
            raise fail(lineno, f"unknown kind {p.kind!r}", f"use one of {', '.join(KINDS)}")
        if _norm(p.text) in seen:
            raise fail(lineno, f"the text repeats line {seen[_norm(p.text)]}", "remove one of them")
        seen[_norm(p.text)] = lineno
        problem = wording_problem(p.text, p.phrase, p.concept, p.kind)
        if problem:
            raise fail(lineno, problem, "write a phrase and caption that world.py does not use")
        prompts.append(p)
        linenos.append(lineno)
    for lineno, length in zip(linenos, token_lengths([p.text for p in prompts]), strict=True):
        if length > CONTEXT_LEN:
            raise fail(lineno, f"{length} word pieces, more than the text encoder's {CONTEXT_LEN}",
                       "shorten the caption")
    return prompts


def unseen_sets(n: int, seed: int = 0, prompts: list[UnseenPrompt] | None = None) -> dict[str, list[UnseenPrompt]]:
    """n prompts per role: each concept's lines in a seeded order, interleaved concept by concept, cycled."""
    prompts = load_unseen() if prompts is None else prompts
    rng = np.random.default_rng([seed, 17])
    out = {}
    for role in world.ROLES:
        groups = [[p for p in prompts if p.concept == c] for c in world.concepts_by_role(role)]
        groups = [[g[i] for i in rng.permutation(len(g))] for g in groups if g]
        order = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
        out[role] = [order[i % len(order)] for i in range(n)]
    return out


def safe_counterpart(p: UnseenPrompt) -> UnseenPrompt:
    """The caption with its phrase replaced by the held-out wording of the concept's matched safe concept
    (a phrase after the shape noun becomes "that is ..."); benign prompts are returned as they are."""
    counterpart = world.CONCEPT_BY_NAME[p.concept].counterpart
    if not counterpart:
        return p
    wording = world.concept_wordings(counterpart, "heldout")[0]
    shapes = [w for t, h in world.SHAPES.values() for w in (*t, *h)]
    after = p.text.split(p.phrase, 1)[1].lstrip()
    new = wording if any(after.startswith(s) for s in shapes) else f"that is {wording}"
    text = p.text.replace(f"an {p.phrase}", f"a {p.phrase}").replace(p.phrase, new, 1)
    return replace(p, text=world._article(text), phrase=new, concept=counterpart, role="benign")
