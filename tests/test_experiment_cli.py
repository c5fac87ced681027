"""Every script in python/experiments and python/examples answers ``--help`` (issue 18): a
description, a ``--quick`` mode, a help string for every flag (no empty one, no doubled
default), and no internal flag. The scripts parse their flags before importing
torch, so each ``--help`` is a fraction of a second."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "python" / "experiments").glob("*.py")) + sorted((ROOT / "python" / "examples").glob("*.py"))
# Scripts without --quick, and the words their help uses to say why.
NO_QUICK = {"own_model_and_data.py": "has no --quick"}
INTERNAL = ("--worker", "--cost")   # distributed_throughput.py's flags for one rank
OPTIONS_HEADERS = ("options:", "optional arguments:")


def _help(path):
    return subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def helps():
    return {p.name: _help(p) for p in SCRIPTS}


def parse_help(text):
    """(description, {option: help}) from argparse's --help output; the help of an option is the
    text after its invocation plus its continuation lines, with whitespace collapsed."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip() in OPTIONS_HEADERS)
    first_blank = next(i for i, line in enumerate(lines) if not line.strip())   # end of the usage
    description = " ".join(line.strip() for line in lines[first_blank:header]).strip()
    options, current = {}, None
    for line in lines[header + 1:]:
        if not line.strip() or not line.startswith(" "):
            break   # the end of the options (an epilog may follow)
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m:   # "  -x, --xx X  help...": the invocation, then the help after two or more spaces
            current = tuple(o.split()[0] for o in m.group(1).split(", "))
            options[current] = (m.group(2) or "").strip()
        elif current is not None:
            options[current] = (options[current] + " " + line.strip()).strip()
    return description, options


def test_found_the_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"distributed_throughput.py", "fig2_fo_cge_rge.py", "custom_zo_loop.py", "own_model_and_data.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_help(path, helps):
    out = helps[path.name]
    assert out.returncode == 0, out.stderr
    description, options = parse_help(out.stdout)
    assert len(description) > 20, f"{path.name}: no description in --help"
    names = {n for opts in options for n in opts}
    for opts, text in options.items():
        if "-h" in opts:
            continue
        bare = re.sub(r"\(default: [^)]*\)", "", text).strip()
        assert bare, f"{path.name}: {opts[-1]} has no help string"
        assert len(re.findall(r"\(default\b", text, re.I)) <= 1, f"{path.name}: {opts[-1]} doubles its default: {text}"
    assert not names & set(INTERNAL) and "--worker" not in out.stdout, f"{path.name} shows internal flags"
    if path.name in NO_QUICK:
        assert "--quick" not in names and NO_QUICK[path.name] in " ".join(out.stdout.split())
        return
    assert "--quick" in names, f"{path.name}: no --quick"


def test_hidden_worker_flags_still_parse():
    """distributed_throughput.py hides --worker and --cost from --help, and its launcher still
    passes them to every rank (the module imports torch only inside a rank)."""
    mod = load_script("python/experiments/distributed_throughput.py")
    a = mod.build_parser().parse_args(["--worker", "--cost=flops", "--size=8"])
    assert a.worker and a.cost == "flops" and a.size == 8
    assert not mod.build_parser().parse_args([]).worker


def test_parse_help_reads_argparse():
    """The parser of the help text itself, on a parser with every case the checks look for."""
    import argparse
    ap = argparse.ArgumentParser(description="What it does.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="An epilog.")
    ap.add_argument("--a", default=1)
    ap.add_argument("--bee-with-a-very-long-name", metavar="LONG_METAVAR", help="x " * 40)
    ap.add_argument("--c", default=None, help="text (default all)")
    ap.add_argument("--hidden", help=argparse.SUPPRESS)
    description, options = parse_help(ap.format_help())
    assert description == "What it does."
    assert options[("--a",)] == ""   # no help string: argparse shows not even the default
    assert options[("--bee-with-a-very-long-name",)].startswith("x x") and "(default: None)" in \
        options[("--bee-with-a-very-long-name",)]
    assert options[("--c",)] == "text (default all) (default: None)"
    assert ("-h", "--help") in options and not any("--hidden" in o for o in options)
