"""Every registered family gets these tests: a family added to the registry (with a tiny builder)
is tested without copying a test file. Tiny checkpoints are built once per session per variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_bridge.registry import FAMILIES

CASES = [(f.name, variant) for f in FAMILIES for variant in f.tiny_variants]


def case_id(case: tuple[str, str]) -> str:
    return case[0] if case[1] == "default" else f"{case[0]}-{case[1]}"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``(family, variant) -> folder``, built on first use."""
    from vlm_bridge.registry import family_by_name

    built: dict[tuple[str, str], Path] = {}

    def get(name: str, variant: str = "default") -> Path:
        if (name, variant) not in built:
            family = family_by_name(name)
            folder = tmp_path_factory.mktemp(f"{name}_{variant}") / "hf"
            built[(name, variant)] = family.build_tiny(folder, **family.tiny_variants[variant])
        return built[(name, variant)]

    return get


@pytest.fixture(params=CASES, ids=case_id)
def case(request, tiny_models):
    """``(family, folder)`` for every registered family and tiny variant."""
    from vlm_bridge.registry import family_by_name

    name, variant = request.param
    return family_by_name(name), tiny_models(name, variant)


@pytest.fixture(scope="session")
def shapes_jsonl(tmp_path_factory) -> Path:
    """The synthetic shapes task (one image per question), training split."""
    from vlm_bridge.testing.shapes_task import make_task

    return make_task(tmp_path_factory.mktemp("shapes"), n_train=16, n_eval=4, size=56)["train"]
