"""The hostile YAML corpus (tests/data/hostile/ plus files too large to commit, generated on demand),
with where and how each one must be refused. Shared by tests/test_hostile_yaml.py and
bench/bench_hostile.py."""

from __future__ import annotations

from pathlib import Path

from factory.yamlconf import MAX_BYTES, MAX_DEPTH, MAX_VALUES

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests/data/hostile"

# file → (line of the error, words the message must contain). Lines counted by hand in each file.
EXPECTED = {
    "alias-bomb.yaml": (8, f"past {MAX_VALUES} values"),  # *d: the first alias whose expansion passes it
    "merge-bomb.yaml": (6, f"past {MAX_VALUES} values"),
    "deep-brackets.yaml": (2, f"nested more than {MAX_DEPTH} levels"),
    "deep-braces.yaml": (2, f"nested more than {MAX_DEPTH} levels"),
    "deep-dashes.yaml": (2, f"nested more than {MAX_DEPTH} levels"),
    "python-tag.yaml": (3, "the tag !!python/object/apply:os.system is not allowed"),
    "python-name-tag.yaml": (1, "the tag !!python/name:os.system is not allowed"),
    "custom-tag.yaml": (2, "the tag !include is not allowed"),
    "recursive-alias.yaml": (5, "the alias *p is used inside its own anchor &p"),
    "recursive-merge.yaml": (2, "the alias *base is used inside its own anchor &base"),
    "non-utf8.yaml": (1, "not valid UTF-8 (byte 0xe9); save the file as UTF-8"),
    "tabs.yaml": (3, "a tab character where YAML needs spaces"),
    "nul-byte.yaml": (1, "invalid character U+0000"),
}
# what to fix, per kind of refusal (every message must carry one)
FIXES = ("write the values out", "check for unclosed", "remove the tag", "refer to a value defined before it",
         "save the file as UTF-8", "use spaces, not tabs", "remove it", "put data")


def _huge_scalar(path: Path) -> None:  # 50 MB in one scalar; refused after reading 1 MiB
    with path.open("w") as f:
        f.write("name: x\ndescription: ")
        f.write("a" * (50 << 20))
        f.write("\n")


def _wide(path: Path) -> None:  # under the size cap, but 200,000 values
    path.write_text("- x\n" * 200_000)


def _deep_indent(path: Path) -> None:  # block mappings indented one space per level, 1,000 levels
    path.write_text("".join(" " * i + f"k{i}:\n" for i in range(1000)) + " " * 1000 + "leaf: 1\n")


# generated file → (writer, line, words)
GENERATED = {
    "huge-scalar.yaml": (_huge_scalar, 2, f"larger than {MAX_BYTES // 1024} KiB"),
    "wide.yaml": (_wide, MAX_VALUES, f"more than {MAX_VALUES} values"),  # the list itself is value 1
    # line L holds the mapping at level L and its key at level L + 1
    "deep-indent.yaml": (_deep_indent, MAX_DEPTH, f"nested more than {MAX_DEPTH} levels"),
}


def generate(name: str, tmp: Path) -> tuple[Path, int, str]:
    """Write one generated hostile file into ``tmp``: (path, line, words)."""
    writer, line, words = GENERATED[name]
    path = tmp / name
    writer(path)
    return path, line, words


def all_files(tmp: Path) -> dict[str, tuple[Path, int, str]]:
    """Every hostile file, committed and generated: name → (path, line, words)."""
    return {**{n: (CORPUS / n, *EXPECTED[n]) for n in sorted(EXPECTED)},
            **{n: generate(n, tmp) for n in GENERATED}}
