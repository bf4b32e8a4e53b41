"""The concept world: roles, matched pairs, held-out wordings, rendering."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core.bundled import world


def test_roles_and_domains():
    source, target = world.concepts_by_role("source"), world.concepts_by_role("target")
    assert len(source) >= 2 and len(target) >= 2 and len(world.BENIGN_CONCEPTS) >= 2
    assert not set(source) & set(target)
    assert len(world.subdomains("source")) >= 2
    assert sorted(c for cs in world.subdomains("source").values() for c in cs) == sorted(source)
    # transfer is non-trivial: the target shares texture families with the source but no colour pair
    src = [world.CONCEPT_BY_NAME[c] for c in source]
    for name in target:
        c = world.CONCEPT_BY_NAME[name]
        assert c.texture in {s.texture for s in src}
        assert all(set(c.colors) != set(s.colors) for s in src)
        assert not set(c.colors) & {col for s in src for col in s.colors}
    for name in world.UNSAFE_CONCEPTS:
        assert world.CONCEPT_BY_NAME[world.CONCEPT_BY_NAME[name].counterpart].role == "benign"


def test_concepts_render_distinctly():
    """Every concept, fixed scene: the pixels differ from every other concept's."""
    images = {c: world.render(world.Scene(c, "square", "center", "grey")) for c in world.CONCEPT_NAMES}
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (images[a] != images[b]).any(axis=-1).sum() > 20, (a, b)


def test_render_places_object_and_background():
    img = world.render(world.Scene("lemon", "square", "left", "navy"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 11]) == world.COLORS["yellow"]
    assert tuple(img[16, 30]) == world.BACKGROUND_RGB["navy"]
    right = world.render(world.Scene("lemon", "square", "right", "navy"))
    assert tuple(right[16, 11]) == world.BACKGROUND_RGB["navy"]


def test_heldout_wordings_are_disjoint():
    for c in world.CONCEPTS:
        assert not set(c.train) & set(c.heldout)
    for table in (world.SHAPES, world.POSITIONS, world.BACKGROUNDS):
        for train, held in table.values():
            assert not set(train) & set(held)
    assert not set(world.TEMPLATES["train"]) & set(world.TEMPLATES["heldout"])
    train_texts = {p.text for p in world.prompt_pool(2000)}
    held = world.eval_prompts(20, "heldout")
    assert not train_texts & {p.text for p in held}
    # and no held-out concept phrase ever shows up in a training caption
    held_phrases = [ph for c in world.CONCEPTS for ph in c.heldout]
    assert not [t for t in train_texts for ph in held_phrases if ph in t]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.sampled_from(world.SPLITS),
       concept=st.sampled_from(world.UNSAFE_CONCEPTS))
def test_safe_counterpart_changes_only_the_concept(seed, split, concept):
    rng = np.random.default_rng(seed)
    unsafe = world.sample_prompt(rng, split, concepts=[concept])
    safe = world.safe_counterpart(unsafe)
    c = world.CONCEPT_BY_NAME[concept]
    assert safe.concept == c.counterpart and not safe.unsafe
    assert (safe.shape, safe.position, safe.background, safe.split, safe.template) == \
        (unsafe.shape, unsafe.position, unsafe.background, unsafe.split, unsafe.template)
    old = world.concept_wordings(concept, split)[unsafe.wording]
    new = world.concept_wordings(c.counterpart, split)[safe.wording]
    assert old in unsafe.text and new in safe.text
    # removing the two concept phrases (and a/an) leaves the same words
    strip = lambda text, ph: text.replace("an " + ph, "a " + ph).replace(ph, "#")  # noqa: E731
    assert strip(unsafe.text, old) == strip(safe.text, new)


def test_safe_counterpart_rejects_benign():
    p = world.make_prompt("lemon", "circle", "top", "sand", np.random.default_rng(0))
    with pytest.raises(ValueError):
        world.safe_counterpart(p)


def test_prompt_pool_covers_every_combination():
    n = len(world.CONCEPT_NAMES) * len(world.SHAPE_NAMES) * len(world.POSITION_NAMES)
    n *= len(world.BACKGROUND_NAMES)
    pool = world.prompt_pool(n, seed=1)
    combos = {(p.concept, p.shape) for p in pool}
    assert len(combos) == len(world.CONCEPT_NAMES) * len(world.SHAPE_NAMES)
    assert world.prompt_pool(50, seed=1) == pool[:50]  # deterministic


def test_scene_for_prompt_respects_fixed_attributes():
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = world.sample_prompt(rng)
        s = world.scene_for_prompt(p, rng)
        assert s.concept == p.concept and s.shape == p.shape
        assert p.position is None or s.position == p.position
        assert p.background is None or s.background == p.background


def test_tensor_roundtrip():
    imgs = world.render_batch([world.sample_scene(np.random.default_rng(i)) for i in range(4)])
    x = world.to_tensor(imgs)
    assert x.shape == (4, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert (world.to_uint8(x) == imgs).all()


def test_matched_pairs_cover_role():
    pairs = world.matched_pairs("target", 3)
    assert len(pairs) == 3 * len(world.concepts_by_role("target"))
    assert all(u.unsafe and not s.unsafe for u, s in pairs)
