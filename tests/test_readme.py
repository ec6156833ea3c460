"""The README stands on its own: every repository file it names exists in the repository, and
it never sends users to documents that are not shipped with it."""

from __future__ import annotations

import re

import pytest

from tinyclip_ds.config import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
TOP_LEVEL = ("recipes", "tests", "bench", "launch", "ds_configs", "docs", "tinyclip_ds")


def named_paths() -> list[str]:
    """Repository paths the README names: Markdown link targets and `code` spans that start
    with a top-level folder of the repository."""
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)  # code blocks hold calls, not links
    links = re.findall(r"\]\(([^)#\s]+)\)", prose)
    spans = re.findall(r"`((?:%s)/[^`\s*…<]*)`" % "|".join(TOP_LEVEL), README)
    return sorted({path for path in links + spans if not path.startswith(("http://", "https://"))})


@pytest.mark.parametrize("path", named_paths())
def test_every_repository_path_the_readme_names_exists(path):
    assert (PROJECT_ROOT / path).exists(), f"README.md names {path}, which is not in the repository"


def test_readme_names_no_document_outside_the_repository():
    assert "DESIGN.md" not in README and "../shared" not in README and "seed notes" not in README
