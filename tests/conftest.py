"""Test ordering for `pytest -n auto --dist loadfile`: the longest modules start first.

xdist hands whole modules to workers in collection order, so a long module collected last (the end-to-end
pipeline and the real-data study sort late by name) would run alone at the end while the other worker idles.
"""

from __future__ import annotations

import pytest

# Each runs one or more whole pipelines: the slowest first.
LONGEST_FIRST = (
    "test_pipeline_e2e.py",
    "test_real_data.py",
    "test_interrupted.py",
    "test_multiclass_e2e.py",
    "test_many_classes.py",
    "test_distribute.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a module
