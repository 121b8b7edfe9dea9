"""Recipes: YAML files whose keys give a command's defaults; flags on the command line win.

    # recipes/paper-tts.yaml
    schedule: tts
    stage1_epochs: 5
    epochs: 95

Keys are the command's option names with dashes as underscores (`stage1_epochs` for
`--stage1-epochs`). An unknown key is an error rather than silently ignored: a typo in a recipe
would otherwise train with a default nobody chose.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mishield.errors import BadInputError, UsageError, first_line


def load_recipe(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe {path} does not exist or is not a file.")
    try:
        recipe = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BadInputError(f"recipe {path} is not valid YAML ({first_line(err)}).") from err
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise BadInputError(f"recipe {path} must be a mapping of option names to values.")
    return recipe


def recipe_defaults(ctx, path: Path | None, allowed: tuple[str, ...]) -> dict:
    """The recipe's values for the options that were not given on the command line."""
    if path is None:
        return {}
    recipe = load_recipe(path)
    unknown = sorted(set(recipe) - set(allowed))
    if unknown:
        raise UsageError(
            f"recipe {path} has unknown key(s) {', '.join(unknown)}; recipes may set: {', '.join(allowed)}."
        )
    return {
        key: value for key, value in recipe.items()
        # Compared by name: typer may bring its own copy of click's ParameterSource enum.
        if getattr(ctx.get_parameter_source(key), "name", None) in (None, "DEFAULT", "DEFAULT_MAP")
    }
