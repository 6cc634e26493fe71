"""``kind: recipe`` in the run-kind registry (factory.kinds.KINDS): a recipe is not one run
but many, so it brings its own lifecycle (``standalone``) instead of the single-run one."""

from __future__ import annotations

from pathlib import Path


class RecipeKind:
    name = "recipe"
    tables: tuple[str, ...] = ()
    standalone = True  # factory.kinds.run and `factory validate` hand the whole file to this kind

    def run_path(self, path: str | Path, *, quiet: bool = False, retry_failed: bool = False, **_: object):
        from .execute import run_recipe

        return run_recipe(path, quiet=quiet, retry_failed=retry_failed)

    def validate_path(self, path: str | Path) -> str:
        from .execute import validate_recipe

        return validate_recipe(path)

    def load(self, path: str | Path):
        from .spec import load_recipe

        return load_recipe(path)


KIND = RecipeKind()
