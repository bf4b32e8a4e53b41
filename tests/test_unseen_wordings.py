"""The unseen-wording prompt set (dictionaries/prompts/unseen_wordings.jsonl): it loads, covers every role
and kind, and none of its text is a training, held-out or calibration wording of the concept world."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from safedig_core.bundled import unseen, world
from safedig_core.bundled.unseen import UnseenPrompt
from safedig_core.errors import SafeDIGError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts() -> list[UnseenPrompt]:
    return unseen.load_unseen()


def test_loads_and_covers_every_role_concept_and_kind(prompts):
    assert unseen.UNSEEN_PATH == ROOT / "dictionaries" / "prompts" / "unseen_wordings.jsonl"
    texts = Counter(p.role for p in {p.text: p for p in prompts}.values())
    assert all(texts[role] >= 60 for role in world.ROLES), texts
    for concept in world.CONCEPT_NAMES:
        mine = [p for p in prompts if p.concept == concept]
        assert len({p.phrase for p in mine}) >= (15 if world.CONCEPT_BY_NAME[concept].unsafe else 10), concept
        assert {p.kind for p in mine} == set(unseen.KINDS), concept


def world_wordings(concepts=world.CONCEPT_NAMES) -> list[str]:
    return [w.lower() for c in concepts for split in world.SPLITS for w in world.concept_wordings(c, split)]


def novelty_violations(items: list[UnseenPrompt]) -> list[str]:
    """The test's own check (independent of unseen.wording_problem): a phrase is no world wording of any
    concept or split; a caption holds none of its concept's world wordings, and outside mixtures none of
    any concept's, not even as part of a longer word."""
    every = world_wordings()
    bad = []
    for p in items:
        text = p.text.lower().replace("an ", "a ")
        if p.phrase.lower() in every:
            bad.append(f"{p.text!r}: the phrase is a world wording")
        for w in world_wordings([p.concept] if p.kind == "mixture" else world.CONCEPT_NAMES):
            if re.search(rf"\b{re.escape(w)}", text):
                bad.append(f"{p.text!r}: contains {w!r}")
    return bad


def test_no_phrase_is_a_world_wording(prompts):
    assert novelty_violations(prompts) == []
    # the check can fail: lines a careless author might write
    careless = [UnseenPrompt("a warning-striped disc on tan", "warning-striped", "hazard", "source", "synonym"),
                UnseenPrompt("a very hazard-striped disc", "very hazard-striped", "hazard", "source", "synonym"),
                UnseenPrompt("a wedge, venom-striped-ish", "venom-striped-ish", "venom", "target", "typo"),
                UnseenPrompt("a box blighted checkered in purple", "blighted checkered in purple", "blight",
                             "target", "mixture"),
                UnseenPrompt("a chessboard disc in pink", "chessboard disc in pink", "candy", "benign", "indirect")]
    assert len({v.split(":")[0] for v in novelty_violations(careless)}) == len(careless)
    assert all(unseen.wording_problem(p.text, p.phrase, p.concept, p.kind) for p in careless)
    # a mixture may borrow another concept's word (the colours decide), never its own concept's
    mixture = UnseenPrompt("a candy-striped disc in green and purple", "candy-striped disc in green and purple",
                           "venom", "target", "mixture")
    assert novelty_violations([mixture]) == []
    assert unseen.wording_problem(mixture.text, mixture.phrase, mixture.concept, mixture.kind) is None


def test_no_caption_is_a_training_heldout_or_calibration_caption(prompts):
    texts = {p.text.lower() for p in prompts}
    seen = {p.text.lower() for p in world.prompt_pool(5000)}
    seen |= {p.text.lower() for p in world.eval_prompts(50, "heldout")}
    for path in sorted((ROOT / "dictionaries" / "prompts").glob("bundled_*.jsonl")):
        seen |= {json.loads(line)["text"].lower() for line in path.read_text().splitlines() if line.strip()}
    assert len(seen) > 3000
    assert not texts & seen
    # exhaustively: no caption fits a world template filled with world wordings (of either split) ...
    assert not [p.text for p in prompts if unseen.is_world_caption(p.text)]
    # ... and that matcher recognises the world's own captions
    assert all(unseen.is_world_caption(p.text) for p in world.prompt_pool(300))
    assert all(unseen.is_world_caption(p.text) for p in world.eval_prompts(10, "heldout"))


GOOD = {"text": "a wasp-striped disc near the left edge on tan", "phrase": "wasp-striped", "concept": "hazard",
        "role": "source", "kind": "synonym"}


@pytest.mark.parametrize(("bad", "message"), [
    ({**GOOD, "concept": "hazzard"}, "unknown concept 'hazzard'"),
    ({**GOOD, "role": "unsafe"}, "unknown role 'unsafe'"),
    ({**GOOD, "role": "target"}, "'hazard' has the role 'source', not 'target'"),
    ({**GOOD, "kind": "slang"}, "unknown kind 'slang'"),
    (GOOD, "the text repeats line 1"),
    ({**GOOD, "text": "A wasp-striped  disc near the left edge on tan"}, "the text repeats line 1"),
    ({**GOOD, "text": "a warning-striped disc", "phrase": "warning-striped"}, "is a wording of world.py"),
    ({**GOOD, "text": "a wasp-striped, caution-tape disc"}, "contains the world wording 'caution-tape'"),
    ({**GOOD, "text": "a wasp-striped disc", "phrase": "bee-striped"}, "is not part of the text"),
    ({**GOOD, "text": "a wasp-striped disc " + "very " * 30}, "word pieces, more than"),
    ({k: v for k, v in GOOD.items() if k != "kind"}, "expected the string fields"),
    ("{not json", "not JSON"),
])
def test_bad_lines_name_the_line_and_the_fix(tmp_path, bad, message):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    with pytest.raises(SafeDIGError, match=re.escape(message)) as err:
        unseen.load_unseen(path)
    assert "line 3: " in str(err.value) and "Fix: " in str(err.value) and str(path) in str(err.value)


def test_unseen_sets_cycle_deterministically(prompts):
    sets = unseen.unseen_sets(250, seed=3, prompts=prompts)
    assert sets == unseen.unseen_sets(250, seed=3, prompts=prompts)
    assert sets != unseen.unseen_sets(250, seed=4, prompts=prompts)
    for role, items in sets.items():
        lines = [p for p in prompts if p.role == role]
        assert len(items) == 250 and all(p.role == role for p in items)
        assert {p.text for p in items} == {p.text for p in lines}  # every line used before any repeats ...
        assert items[len(lines)] == items[0]  # ... then the same order again
        concepts = Counter(p.concept for p in items[:6 * len(world.concepts_by_role(role))])
        assert set(concepts.values()) == {6}  # concepts interleaved, so a short set covers them evenly


def test_safe_counterpart_swaps_the_phrase(prompts):
    for p in prompts:
        safe = unseen.safe_counterpart(p)
        if not p.unsafe:
            assert safe == p
            continue
        counterpart = world.CONCEPT_BY_NAME[p.concept].counterpart
        assert (safe.concept, safe.role) == (counterpart, "benign")
        wording = world.concept_wordings(counterpart, "heldout")[0]
        assert wording in safe.text and p.phrase not in safe.text and f"an {wording}" not in safe.text
