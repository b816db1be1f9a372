"""The README's Guarantees section quotes the numbers this suite proves: they must stay in step."""

from __future__ import annotations

from prestage.stages import hub
from tests.conftest import REPO_ROOT
from tests.reliability import test_bad_inputs, test_concurrency, test_kill_points, test_names


def test_the_readme_quotes_the_suite():
    text = " ".join((REPO_ROOT / "README.md").read_text().split())
    section = text[text.index("## Guarantees") : text.index("## Layout")]
    assert f"{test_kill_points.KILLS} SIGKILLs" in section
    assert f"{test_concurrency.RUNS} runs at once" in section
    assert f"{test_bad_inputs.case_count()} bad command lines" in section
    hostile_names = len(test_names.HOSTILE_ETAGS) + len(test_names.HOSTILE_REVISIONS) + len(test_names.HOSTILE_PATHS)
    assert f"{hostile_names} hostile ETags" in section
    assert f"{len(test_bad_inputs.HOSTILE) + 1} hostile or broken hub behaviours" in section  # + the cross-host token
    assert f"{hub.STALL_BOUND_S:g} s" in section
