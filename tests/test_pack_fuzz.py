"""CI-sized run of the pack-loading fuzzer (the documented long run is benchmarks/fuzz_packs.py)."""

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings

from pack_fuzz import MUTATIONS, base_pack_bytes, check_outcome, mutated_pack

OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_pack_bytes(tmp_path_factory.mktemp("fuzz"))


def test_mutated_packs_load_or_raise_pack_error(base, tmp_path):
    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(case=mutated_pack(base))
    def run(case):
        kind, data = case
        path = tmp_path / "fuzzed.safetensors"
        path.write_bytes(data)
        OUTCOMES[(kind, check_outcome(path))] += 1

    run()
    rejected = {kind for kind, outcome in OUTCOMES if outcome == "rejected"}
    # Every mutation family was exercised and produced clean rejections.
    assert rejected == set(MUTATIONS), OUTCOMES
