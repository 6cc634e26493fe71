"""``factory constitution import``: a constitution YAML from the CAI paper's prompt files.

The paper's repository (anthropics/ConstitutionalHarmlessnessPaper, ``prompts/``) keeps its
constitution in three JSON shapes; this reads a user's own copy of them (none of its text ships here):

- critique/revision pairs (SL-CAI)::

      {"harmful0": {"prompt": ["\\n\\nCritiqueRequest: Identify ...\\n\\nCritique:"],
                    "edit_request": "\\n\\nRevisionRequest: Please rewrite ...\\n\\nRevision:"}, ...}

  each becomes an SL principle (critique + revision), its id the slug of its name (a ``prompt`` list
  of several requests gives ``name``, ``name-2``, …, sharing the revision request);
- comparison principles (RL-CAI): a JSON list of strings such as ``"\\nPlease choose the response
  that ... Options:"``, each an RL principle ``compare-01``, ``compare-02``, …;
- few-shot transcripts: a JSON list of strings ``"Human: …\\n\\nAssistant: …\\n\\nCritiqueRequest: …
  \\n\\nCritique: …\\n\\nRevisionRequest: …\\n\\nRevision: …\\n\\nHuman:"``, each a ``kind: critique``
  example; it names the principle whose requests it shows when one matches, else keeps its own
  ``critique_request``/``revision_request``;
- labelled comparison demonstrations (``--comparison-few-shot``): a JSON list of ``{"prompt":
  "\n\nHuman: …\n\nAssistant:", "corrects": […], "incorrects": […]}``, each (correct, incorrect) pair
  a ``kind: comparison`` example with the correct response as ``a`` (the judge shows every
  demonstration in both orders, so no position is taught).

The markers (``CritiqueRequest:``, ``Critique:``, ``Options:`` …) are stripped: the templates add
their own framing. Malformed input is a :class:`~factory.yamlconf.ConfigError` naming the file and
the entry (key or index); the YAML written is loaded back and validated before it replaces OUT.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import typer

from .yamlconf import ConfigError

SL_MARKERS = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_MARKER = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):[ \t]?")


def slug(name: str) -> str:
    """``"Harmful 0"`` → ``"harmful-0"``: lowercase letters, digits and '-' (a principle id)."""
    s = re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-_")
    return s or "principle"


def strip_request(text: str, marker: str, answer: str) -> str:
    """``"\\n\\nCritiqueRequest: Identify ...\\n\\nCritique:"`` → ``"Identify ..."`` (markers optional)."""
    t = text.strip()
    if t.startswith(f"{marker}:"):
        t = t[len(marker) + 1:]
    if t.endswith(f"{answer}:"):
        t = t[: -len(answer) - 1]
    return t.strip()


def _read_json(path: str | Path, what: str) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), f"{what} file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read the {what} file: {e}; it must be UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), f"not valid JSON ({e.msg}); the {what} file must be JSON", e.lineno, e.colno) from None


def _unique(base: str, used: set[str]) -> str:
    pid, n = base, 2
    while pid in used:
        pid, n = f"{base}-{n}", n + 1
    used.add(pid)
    return pid


def read_critiques(path: str | Path, used: set[str]) -> list[dict]:
    """SL principles from ``{"name": {"prompt": [...], "edit_request": "..."}}``."""
    data = _read_json(path, "critiques")
    if not isinstance(data, dict) or not data:
        raise ConfigError(str(path), 'must be a JSON object of {"name": {"prompt": ["CritiqueRequest: ..."], '
                                     '"edit_request": "RevisionRequest: ..."}}; got ' + type(data).__name__)
    out = []
    for name, entry in data.items():
        at = f"entry '{name}'"
        if not isinstance(entry, dict):
            raise ConfigError(str(path), f"{at} must be an object with `prompt` and `edit_request`; got "
                                         f"{type(entry).__name__}")
        extra = sorted(set(entry) - {"prompt", "edit_request"})
        if extra:
            raise ConfigError(str(path), f"{at}: unknown key(s) {extra}; allowed keys: prompt, edit_request")
        prompts, edit = entry.get("prompt"), entry.get("edit_request")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
            raise ConfigError(str(path), f"{at}: `prompt` must be a list of critique request strings "
                                         "(\"CritiqueRequest: ... Critique:\")")
        if not isinstance(edit, str):
            raise ConfigError(str(path), f"{at}: `edit_request` must be a revision request string "
                                         "(\"RevisionRequest: ... Revision:\")")
        revision = strip_request(edit, "RevisionRequest", "Revision")
        if not revision:
            raise ConfigError(str(path), f"{at}: `edit_request` has no text besides its markers")
        for j, prompt in enumerate(prompts):
            critique = strip_request(prompt, "CritiqueRequest", "Critique")
            if not critique:
                raise ConfigError(str(path), f"{at}: `prompt`[{j}] has no text besides its markers")
            pid = _unique(slug(name) if j == 0 else f"{slug(name)}-{j + 1}", used)
            out.append({"id": pid, "critique": critique, "revision": revision})
    return out


def read_comparisons(path: str | Path, used: set[str]) -> list[dict]:
    """RL principles from a JSON list of comparison strings ("... Options:")."""
    data = _read_json(path, "comparisons")
    if not isinstance(data, list) or not data:
        raise ConfigError(str(path), 'must be a JSON list of comparison strings ("Please choose the response '
                                     'that ... Options:"); got ' + type(data).__name__)
    width = max(2, len(str(len(data))))
    out = []
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise ConfigError(str(path), f"entry [{i}] must be a comparison string; got {type(text).__name__}")
        question = text.strip()
        if question.endswith("Options:"):
            question = question[: -len("Options:")].strip()
        if not question:
            raise ConfigError(str(path), f"entry [{i}] has no text besides its markers")
        out.append({"id": _unique(f"compare-{i + 1:0{width}d}", used), "comparison": question})
    return out


def parse_fewshot(text: str) -> dict:
    """One transcript → a ``kind: critique`` example (ValueError says what is wrong)."""
    parts = _MARKER.split(text.strip())
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' ({parts[0].strip()[:40]!r})")
    items = [(who, body.strip()) for who, body in zip(parts[1::2], parts[2::2])]
    if items and items[-1] == ("Human", ""):  # the transcript ends by opening the next turn
        items.pop()
    names = [who for who, _ in items]
    if names[-4:] != list(SL_MARKERS) or any(n in SL_MARKERS for n in names[:-4]):
        raise ValueError("must be Human/Assistant turns followed by one CritiqueRequest:, Critique:, "
                         f"RevisionRequest: and Revision: in that order; found {' → '.join(names) or 'no markers'}")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body} for who, body in items[:-4]]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with the Assistant's reply that is critiqued")
    for i, (who, body) in enumerate(items):
        if not body:
            raise ValueError(f"the {who}: part #{i + 1} is empty")
    (_, creq), (_, crit), (_, rreq), (_, rev) = items[-4:]
    return {"kind": "critique", "conversation": turns, "critique": crit, "revision": rev,
            "critique_request": creq, "revision_request": rreq}


def read_fewshot(path: str | Path, principles: list[dict]) -> list[dict]:
    data = _read_json(path, "few-shot")
    if not isinstance(data, list):
        raise ConfigError(str(path), "must be a JSON list of transcripts (\"Human: ... Assistant: ... "
                                     "CritiqueRequest: ... Critique: ... RevisionRequest: ... Revision: ...\")")
    by_text = {(p["critique"], p["revision"]): p["id"] for p in principles if "critique" in p}
    out = []
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise ConfigError(str(path), f"entry [{i}] must be a transcript string; got {type(text).__name__}")
        try:
            ex = parse_fewshot(text)
        except ValueError as e:
            raise ConfigError(str(path), f"entry [{i}]: {e}") from None
        pid = by_text.get((ex["critique_request"], ex["revision_request"]))
        if pid is not None:  # it shows one of the imported principles: name it, drop the copies
            ex = {k: v for k, v in ex.items() if k not in ("critique_request", "revision_request")} | {"principle": pid}
        out.append(ex)
    return out


def read_comparison_fewshot(path: str | Path) -> list[dict]:
    """``[{"prompt": "Human: …Assistant:", "corrects": [...], "incorrects": [...]}]`` → comparison examples."""
    from .constitution import parse_transcript

    data = _read_json(path, "comparison few-shot")
    if not isinstance(data, list):
        raise ConfigError(str(path), 'must be a JSON list of {"prompt": "Human: ... Assistant:", "corrects": [...], '
                                     '"incorrects": [...]}')
    out = []
    for i, entry in enumerate(data):
        at = f"entry [{i}]"
        if not isinstance(entry, dict) or set(entry) != {"prompt", "corrects", "incorrects"}:
            raise ConfigError(str(path), f"{at} must be an object with exactly `prompt`, `corrects` and `incorrects`")
        prompt, good, bad = entry["prompt"], entry["corrects"], entry["incorrects"]
        if not isinstance(prompt, str):
            raise ConfigError(str(path), f"{at}: `prompt` must be a transcript string")
        for key, xs in (("corrects", good), ("incorrects", bad)):
            if not isinstance(xs, list) or not xs or not all(isinstance(x, str) and x.strip() for x in xs):
                raise ConfigError(str(path), f"{at}: `{key}` must be a list of non-empty response strings")
        text = prompt.rstrip()
        if text.endswith("Assistant:"):  # the transcript opens the reply the responses complete
            text = text[: -len("Assistant:")]
        try:
            turns = parse_transcript(text)
        except ValueError as e:
            raise ConfigError(str(path), f"{at}: `prompt` {e}") from None
        if turns[-1]["role"] != "user":
            raise ConfigError(str(path), f"{at}: `prompt` must end with the Human's turn the responses answer")
        out += [{"kind": "comparison", "conversation": turns, "response_a": g.strip(), "response_b": b.strip(),
                 "preferred": "a"} for g in good for b in bad]
    return out


def build(name: str, version: str = "1", description: str = "", critiques: str | Path | None = None,
          comparisons: str | Path | None = None, few_shot: str | Path | None = None,
          comparison_few_shot: str | Path | None = None) -> dict:
    """The constitution (plain data) from the paper-shaped files."""
    if critiques is None and comparisons is None:
        raise ConfigError("constitution import", "give --critiques (critique/revision JSON), --comparisons "
                                                 "(comparison list JSON) or both")
    used: set[str] = set()
    principles = (read_critiques(critiques, used) if critiques else []) + (
        read_comparisons(comparisons, used) if comparisons else [])
    data: dict[str, Any] = {"name": name, "version": version}
    if description:
        data["description"] = description
    data["principles"] = principles
    examples = (read_fewshot(few_shot, principles) if few_shot else []) + (
        read_comparison_fewshot(comparison_few_shot) if comparison_few_shot else [])
    if examples:
        data["examples"] = examples
    return data


def write(data: dict, out: str | Path, sources: list[str]) -> Any:
    """Write ``data`` as YAML to ``out`` after loading it back as a constitution (never a bad file)."""
    import yaml

    from .constitution import load_constitution

    out = Path(out)
    text = (f"# Imported by `factory constitution import` from {', '.join(sources)}.\n"
            "# SL principles have critique+revision, RL principles a comparison; examples are few-shot demonstrations.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    try:
        c = load_constitution(tmp)
    except ConfigError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    c._source = str(out)
    return c


app = typer.Typer(no_args_is_help=True, help="Constitutions: import the CAI paper's prompt files.")


@app.command("import")
def import_(
    critiques: Optional[Path] = typer.Option(None, "--critiques", help="critique/revision JSON (SL-CAI): "
                                            '{"name": {"prompt": ["CritiqueRequest: ..."], "edit_request": "RevisionRequest: ..."}}'),
    comparisons: Optional[Path] = typer.Option(None, "--comparisons", help="comparison principles JSON (RL-CAI): "
                                              'a list of "Please choose the response ... Options:" strings'),
    few_shot: Optional[Path] = typer.Option(None, "--few-shot", help="few-shot transcripts JSON: a list of "
                                           '"Human: ... Assistant: ... CritiqueRequest: ... Critique: ... '
                                           'RevisionRequest: ... Revision: ..." strings'),
    comparison_few_shot: Optional[Path] = typer.Option(
        None, "--comparison-few-shot", help='labelled comparison demonstrations JSON: a list of {"prompt": "Human: ... '
        'Assistant:", "corrects": [...], "incorrects": [...]}'),
    name: str = typer.Option(..., "--name", help="the constitution's name"),
    version: str = typer.Option("1", "--version", help="its version (text)"),
    description: str = typer.Option("", "--description", help="one or two sentences on what it is for"),
    output: Path = typer.Option(..., "-o", "--output", help="the YAML file to write"),
):
    """Write a constitution YAML from your copy of the CAI paper's prompt files (critique/revision
    pairs → SL principles, comparisons → RL principles, transcripts → critique examples), e.g.
    `factory constitution import --critiques CritiqueRevisionInstructions.json --comparisons
    RLMadisonInstructions.json --few-shot CritiqueRevisionFewShotPrompts.json --comparison-few-shot
    RLMadisonFewShotPrompts.json --name cai -o constitutions/cai.yaml`."""
    from rich.console import Console

    try:
        data = build(name, version, description, critiques, comparisons, few_shot, comparison_few_shot)
        c = write(data, output, [str(p) for p in (critiques, comparisons, few_shot, comparison_few_shot) if p])
    except ConfigError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    Console().print(f"wrote {output}: {c.counts()} ({c.name} v{c.version}, hash {c.hash})", highlight=False,
                    soft_wrap=True)
