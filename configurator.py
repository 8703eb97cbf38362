"""Command-line overrides for the constants at the top of train.py and test.py.

    python train.py [CONFIG.py ...] [--name=value ...]

Every constant is a flag of the same name. Config files (small Python files that assign some of the
constants) are applied first, in order; flags win over them. A name that is not a constant, or a value
of the wrong type, is an error that says which and what was expected.

A script whose positional arguments are inputs rather than config files (predict.py PHOTO ...) passes
`positional=(name, METAVAR, help)`: the arguments, in any order among the flags, are returned as a list
under `name`, and there are no config files.
"""
import argparse
import runpy
import sys

CONSTANT_TYPES = (bool, int, float, str, tuple)
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def constants(namespace):
    """The overridable constants of a script: its public globals of a plain type."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, CONSTANT_TYPES)}


def convert(name, default, value):
    """`value` (a string from the command line, or any object from a config file) as the type of `default`."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in TRUE_WORDS | FALSE_WORDS:
                return word in TRUE_WORDS
            raise ValueError
        if kind is tuple:
            element = type(default[0]) if default else str
            if isinstance(value, str):  # "112,96"; for numbers "112x96" too
                value = [v for v in (value.replace("x", ",") if element is int else value).split(",") if v.strip()]
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            return tuple(convert(name, element(), v) for v in items)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number",
                    tuple: "a comma-separated list, e.g. 112,96"}.get(kind, "a string")
        raise ValueError(f"--{name}: expected {expected}, got {value!r}") from None


def parse(namespace, argv=None, description=None, positional=None):
    """Apply config files and --name=value flags from `argv` to the constants in `namespace` (a script's
    globals()), in place. Returns the resulting {name: value} of every constant.
    With `positional=(name, metavar, help)` the positional arguments are not config files: the result holds
    them too, as a list of strings (empty when none) under `name`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = constants(namespace)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if positional:
        parser.add_argument(positional[0], nargs="*", metavar=positional[1], help=positional[2])
    else:
        parser.add_argument("config_files", nargs="*", metavar="CONFIG.py",
                            help="python files of constant overrides, applied in order before the flags")
    for name, default in defaults.items():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=type(default).__name__.upper(),
                            help=f"default: {shown}")
    # inputs may come before, between and after the flags; config files keep their original parsing
    args, unknown = (parser.parse_known_intermixed_args if positional else parser.parse_known_args)(argv)
    if unknown:
        parser.error(f"unknown option {unknown[0]!r}: not a constant of this script "
                     f"(run with --help for the list)")
    inputs = {positional[0]: vars(args).pop(positional[0])} if positional else {}
    overrides = {}
    for path in vars(args).pop("config_files", []):
        try:
            values = runpy.run_path(path)
        except FileNotFoundError:
            parser.error(f"config file not found: {path}")
        for name, value in values.items():
            if name.startswith("_") or type(value).__name__ == "module":
                continue
            if name not in defaults:
                parser.error(f"{path}: {name!r} is not a constant of this script")
            overrides[name] = value
    overrides.update(vars(args))
    for name, value in overrides.items():
        try:
            namespace[name] = convert(name, defaults[name], value)
        except ValueError as err:
            parser.error(str(err))
    return dict(constants({k: namespace[k] for k in defaults}), **inputs)
