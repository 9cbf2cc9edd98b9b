"""Shared pytest fixtures. Nothing here downloads anything.

Keep one section per concern; session-scoped fixtures are shared by every test, so a test that
needs to change one (e.g. add tokens to the tokenizer) must work on a `copy.deepcopy` of it.
"""

from __future__ import annotations

import pytest


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 tokenizer, built offline (cached on disk across sessions). Do not mutate."""
    from longvu.tokenizer import build_qwen2_tokenizer

    return build_qwen2_tokenizer()


# --- parity oracle -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def oracle_dir(tmp_path_factory):
    """tests/fixtures/oracle.tar.xz unpacked once per session (original LongVU outputs on a tiny model)."""
    import tarfile
    from pathlib import Path

    out = tmp_path_factory.mktemp("oracle")
    with tarfile.open(Path(__file__).parent / "fixtures" / "oracle.tar.xz") as archive:
        archive.extractall(out, filter="data")
    return out


# --- order -------------------------------------------------------------------------------------


def pytest_collection_modifyitems(items):
    """Files holding slow tests first (each file's order kept): under xdist's `--dist loadfile` the long
    DeepSpeed files then start early and the quick ones fill the end, instead of one worker finishing
    a long file alone while the other idles."""
    def path(item):
        return item.nodeid.split("::")[0]

    slow_files = {path(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: path(item) not in slow_files)
