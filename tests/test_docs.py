"""The README and docs/ cannot drift from the code: every flag they mention is one a CLI's --help lists, every docs
page is linked from the README, and the README stays a front door (about a screen and a half)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

import analyze
import ofrecordMake
import run
from bench.cli import main as bench_main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# flags of other tools the docs show in commands: pip, pytest, pytest-benchmark, torchrun, Slurm, ruff
OTHER_TOOLS = {
    "--index-url",
    "--upgrade",
    "--quiet",
    "--benchmark-enable",
    "--benchmark-autosave",
    "--columns",
    "--sort",
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--master_addr",
    "--master_port",
    "--array",
    "--help",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--durations",
    "--check",
}
COMMANDS = [
    (run.main, []),
    (ofrecordMake.main, []),
    (bench_main, []),
    (bench_main, ["merge"]),
    (bench_main, ["report"]),
    *((analyze.main, [command]) for command in ("sensitivity", "dependency", "conflict", "stats", "export")),
]


def help_text(main, prefix: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*prefix, "--help"])
    assert exited.value.code == 0
    return out.getvalue()


def test_every_flag_the_docs_mention_exists():
    offered = {flag for main, prefix in COMMANDS for flag in re.findall(r"--[a-zA-Z][\w-]*", help_text(main, prefix))}
    for page in PAGES:
        mentioned = set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", page.read_text()))
        unknown = sorted(mentioned - offered - OTHER_TOOLS)
        assert not unknown, f"{page.relative_to(ROOT)} mentions flags no CLI offers: {unknown}"


def test_every_docs_page_is_linked_from_the_readme_and_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
