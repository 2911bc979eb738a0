"""The documentation stays true: every `python <script>.py ...` command in README.md and docs/*.md parses with that
script's own argument parser (no unknown flag, no missing value, no bad choice), and every relative link resolves,
to a file and, with an anchor, to one of its headings."""

import re
import shlex
from pathlib import Path

import pytest

import sample
import train_imagenet
import train_t2i

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train_imagenet.py": lambda argv: train_imagenet.build_parser().parse_args(argv),
           "train_t2i.py": train_t2i.parse_args, "sample.py": sample.parse_args}


def commands(text: str) -> list[str]:
    """Shell lines of the page's code blocks (continuations joined, comments dropped) that run one of the scripts."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if any(w in PARSERS for w in words) and words[0] in ("python", "torchrun", "OMP_NUM_THREADS=1"):
                out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_pages_exist_and_stay_short():
    assert (ROOT / "README.md").is_file() and len(PAGES) >= 7
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    for page in PAGES[1:]:
        assert len(page.read_text().splitlines()) <= 320, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_parses(page):
    found = commands(page.read_text())
    for line in found:
        words = shlex.split(line, comments=True)
        script = next(w for w in words if w in PARSERS)
        argv = words[words.index(script) + 1:]
        try:
            PARSERS[script](argv)
        except SystemExit as e:
            pytest.fail(f"{page.name}: `{line.strip()}` does not parse (exit {e.code})")
    if page.name in ("README.md", "small-scale.md", "text-to-image.md", "imagenet-64.md"):
        assert found, f"{page.name} shows no command"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} -> {file} does not exist"
        if anchor and file.suffix == ".md":
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)]
            assert anchor in headings, f"{page.name}: no heading #{anchor} in {file.name}"


def test_a_bad_command_is_caught():
    """The checker itself: an unknown flag and a missing value fail, a good command passes."""
    with pytest.raises(SystemExit):
        train_imagenet.build_parser().parse_args(["--no-such-flag"])
    with pytest.raises(SystemExit):
        train_t2i.parse_args(["--preset"])
    line = "python sample.py runs/x --n 3  # a grid"
    assert commands(f"```bash\n{line}\n```\n") == [line]
