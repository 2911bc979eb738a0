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


FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)  # (language, body) of each fenced code block
SCRIPT = re.compile(r"(?:^|/)(" + "|".join(re.escape(s) for s in PARSERS) + r")$")


def commands(text: str) -> list[tuple[str | None, list[str], str]]:
    """(script, its arguments, the line) of every line in the page's shell code blocks (untagged or bash / sh /
    shell / console; continuations joined, comments dropped) that names one of the scripts. The script is run by
    `python`, `python3`, `python -m`, `torchrun ...` or as `./script.py`, after any environment variables; a line
    naming a script in another form comes back with script None, so that no command escapes the check."""
    out = []
    for block in (body for lang, body in re.findall(FENCED, text) if lang in ("", "bash", "sh", "shell", "console")):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^\w+=", words[0]):  # VAR=value before the command
                words = words[1:]
            if words[:2] in (["python", "-m"], ["python3", "-m"]) and len(words) > 2:
                words = [words[0], words[2] + ".py", *words[3:]]
            named = [i for i, w in enumerate(words) if SCRIPT.search(w)]
            if named:
                i = named[0]
                runner = words[:i]
                ok = runner in (["python"], ["python3"]) or runner[:1] == ["torchrun"] or (i == 0 and
                                                                                         words[0].startswith("./"))
                out.append((SCRIPT.search(words[i])[1] if ok else None, words[i + 1:], line))
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
    for script, argv, line in found:
        if script is None:
            pytest.fail(f"{page.name}: `{line.strip()}` names a script in a form this check does not parse")
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
            text = FENCED.sub("", file.read_text())  # a `# comment` in a code block is no heading
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)]
            assert anchor in headings, f"{page.name}: no heading #{anchor} in {file.name}"


def test_a_bad_command_is_caught():
    """The checker itself: an unknown flag and a missing value fail, a good command passes."""
    with pytest.raises(SystemExit):
        train_imagenet.build_parser().parse_args(["--no-such-flag"])
    with pytest.raises(SystemExit):
        train_t2i.parse_args(["--preset"])
    line = "python sample.py runs/x --n 3  # a grid"
    assert commands(f"```bash\n{line}\n```\n") == [("sample.py", ["runs/x", "--n", "3"], line)]
    for form in ("OMP_NUM_THREADS=1 python3 ./train_t2i.py --iters 2", "python -m train_t2i --iters 2",
                 "torchrun --nproc_per_node 2 train_t2i.py --iters 2", "./train_t2i.py --iters 2"):
        assert commands(f"```\n{form}\n```") == [("train_t2i.py", ["--iters", "2"], form)], form
    assert commands("```sh\nsrun train_t2i.py --iters 2\n```")[0][0] is None, "another launcher is not skipped"
    assert commands("```python\nimport sample  # sample.py\n```") == []
    page = "# Title\n```bash\n# not a heading\n```\n[x](#not-a-heading)"
    assert [slug(h) for h in re.findall(r"^#+ (.+)$", FENCED.sub("", page), re.M)] == ["title"]
