"""Every vLLM rule label the code and tests mention is defined in docs/vllm-rules.md.

The labels are short names for vLLM behaviours (section numbers like the one for max_model_len derivation, case
names such as the LongRoPE or dtype cases, RoPE patch rules). docs/vllm-rules.md is their only definition inside
the repository, so a label added to stages/, runner/ or tests/ without an entry there fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "vllm-rules.md"
SCANNED = ("stages", "runner", "tests")

SECTION = re.compile(r"§(\d+(?:\.\d+)*)(?:\s*[-/]\s*(\d+(?:\.\d+)*))?")
CASE = re.compile(r"\b([CDLMRTW])-(\d{2})(?:\s*\.\.\s*\1-(\d{2}))?\b")
TEST_NAME_CASE = re.compile(r"(?<=_)([CDLMRTW])(\d{2})(?=_)")
ROPE = re.compile(r"\bR(\d{1,2})(?:\s*[-/]\s*R(\d{1,2}))?\b")
DEF_TEST = re.compile(r"def (test_\w+)")
DOC_ENTRY = re.compile(r"^(?:#{2,4} |- \*\*)(§[\d.]+|[A-Z]-\d{2}|R\d{1,2})\b", re.MULTILINE)


def _section_span(first: str, last: str | None) -> list[str]:
    """'5.1', '5.4' -> the sections 5.1 .. 5.4 (same parent); a single section as itself."""
    if last is None:
        return [first]
    head, _, lo = first.rpartition(".")
    head2, _, hi = last.rpartition(".")
    if head != head2 or not lo.isdigit() or not hi.isdigit():
        return [first, last]
    return [f"{head}.{n}" if head else str(n) for n in range(int(lo), int(hi) + 1)]


def labels_in(text: str) -> set[str]:
    """The rule labels `text` mentions, in the doc's spelling: '§2.7', 'L-19', 'R5' (RoPE rule).

    Ranges are expanded ('D-01..D-08', 'R4-R9', '§5.1-5.4'). In test function names the case hyphen is
    dropped ('test_W17_...' is W-17); everywhere else a label without a hyphen ('R5') is a RoPE rule.
    """
    found: set[str] = set()
    for m in SECTION.finditer(text):
        found.update("§" + s for s in _section_span(m.group(1), m.group(2)))
    for m in CASE.finditer(text):
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) else lo
        found.update(f"{m.group(1)}-{n:02d}" for n in range(lo, hi + 1))
    names = DEF_TEST.findall(text)
    for name in names:
        found.update(f"{a}-{b}" for a, b in TEST_NAME_CASE.findall(name))
    without_names = DEF_TEST.sub("def _", text)
    for m in ROPE.finditer(without_names):
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        found.update(f"R{n}" for n in range(lo, hi + 1))
    return found


def defined_labels() -> set[str]:
    return set(DOC_ENTRY.findall(DOC.read_text(encoding="utf-8")))


def used_labels() -> dict[str, list[str]]:
    """label -> the files (relative) that mention it, over every .py file under stages/, runner/, tests/."""
    used: dict[str, list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue
            for label in labels_in(path.read_text(encoding="utf-8")):
                used.setdefault(label, []).append(str(path.relative_to(ROOT)))
    return used


def test_the_scanner_reads_every_spelling():
    text = (
        "x = 1  # vLLM caps it (docs/vllm-rules.md, L-19); cases D-01..D-03, rules R4-R9, R10/R11, §5.1-5.4, §2.1.6\n"
        "def test_W17_two_processes(): pass\n"
        "dtype = 'F32'  # not a label; nor is SM80 or T4\n"
    )
    assert labels_in(text) == {
        "L-19",
        "D-01",
        "D-02",
        "D-03",
        "R4",
        "R5",
        "R6",
        "R7",
        "R8",
        "R9",
        "R10",
        "R11",
        "§5.1",
        "§5.2",
        "§5.3",
        "§5.4",
        "§2.1.6",
        "W-17",
    }


def test_every_label_in_code_and_tests_is_defined_in_the_rules_doc():
    defined = defined_labels()
    missing = {label: files for label, files in used_labels().items() if label not in defined}
    assert not missing, "labels used but not defined in docs/vllm-rules.md: " + "; ".join(
        f"{label} ({', '.join(files)})" for label, files in sorted(missing.items())
    )


def test_every_file_using_labels_points_at_the_rules_doc():
    """A reader of any file with a label finds where it is defined without searching."""
    files = {f for used in used_labels().values() for f in used}
    silent = sorted(f for f in files if "docs/vllm-rules.md" not in (ROOT / f).read_text(encoding="utf-8"))
    assert not silent, f"these files use rule labels but never mention docs/vllm-rules.md: {silent}"


def test_the_rules_doc_defines_each_label_once():
    entries = DOC_ENTRY.findall(DOC.read_text(encoding="utf-8"))
    twice = sorted({e for e in entries if entries.count(e) > 1})
    assert not twice, f"docs/vllm-rules.md defines these labels more than once: {twice}"


def test_the_rules_doc_has_no_orphan_entries():
    """An entry nothing mentions any more is dead weight: drop it with the code that used it."""
    orphans = sorted(defined_labels() - set(used_labels()))
    assert not orphans, f"docs/vllm-rules.md defines labels no code or test mentions: {orphans}"
