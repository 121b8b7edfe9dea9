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
    except RecursionError:  # PyYAML composes nested lists recursively: 20,000 `[` exhaust the stack
        raise BadInputError(f"recipe {path} nests its values too deeply to read; a recipe is a flat mapping of options.") from None
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
    chosen = {
        key: value for key, value in recipe.items()
        # Compared by name: typer may bring its own copy of click's ParameterSource enum.
        if getattr(ctx.get_parameter_source(key), "name", None) in (None, "DEFAULT", "DEFAULT_MAP")
    }
    return {key: _checked(ctx, path, key, value) for key, value in chosen.items()}


def _checked(ctx, path: Path, key: str, value):
    """A recipe value converted and range-checked as the same flag on the command line would
    be: a recipe is a file like any other, and a wrong type must not reach the code as is."""
    param = next((p for p in ctx.command.params if p.name == key), None)
    if param is None or value is None:
        return value
    multiple = bool(getattr(param, "multiple", False))
    if multiple and isinstance(value, str | int | float):
        value = [value]
    if isinstance(value, list) != multiple or (multiple and not all(isinstance(v, str | int | float) for v in value)):
        raise BadInputError(f"recipe {path}: {key} must be {'a list of values' if multiple else 'a single value'}.")
    try:
        return param.process_value(ctx, value)
    except Exception as err:  # noqa: BLE001 - click's BadParameter, from whichever click typer uses
        message = getattr(err, "message", None) or first_line(err)
        raise BadInputError(f"recipe {path}: {key} {value!r} is not valid ({message}).") from None
