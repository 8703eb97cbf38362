"""Command-line overrides for the constants at the top of train.py, test.py and predict.py.

    python train.py [CONFIG.py ...] [--name=value ...]

Every constant is a flag of the same name. Config files (small Python files that assign some of the
constants) are applied first, in order; flags win over them. A name that is not a constant, or a value
of the wrong type, is an error that says which and what was expected. A bool constant may be given as a
bare flag: `--verify` is `--verify=true`; only true/false words (true, false, yes, no, on, off, 1, 0) are
taken as its value when one follows it, so `--verify a.jpg` keeps a.jpg an input.

A script declares the allowed values of a constant once, `parse(globals(), choices={"device": (...)})`;
every value is checked right after parsing, matched case-insensitively and stored in the declared spelling.

A script whose positional arguments are inputs rather than config files (predict.py PHOTO ...) passes
`positional=(name, METAVAR, help)`: the arguments, in any order among the flags, are returned as a list
under `name`, and there are no config files.
"""
import argparse
import os
import runpy
import sys
import tokenize

CONSTANT_TYPES = (bool, int, float, str, tuple)
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
TRISTATE = ("auto", "true", "false")  # choices of an option that is decided automatically unless given


class ConfigError(ValueError):
    """A constant's value is not acceptable. `flag` is the constant's name; str() is "--flag: message"."""

    def __init__(self, flag, message):
        super().__init__(flag, message)  # both in args, so the error pickles and copies
        self.flag, self.message = flag, message

    def __str__(self):
        return f"--{self.flag}: {self.message}"


def constants(namespace):
    """The overridable constants of a script: its public globals of a plain type, lower-case names (an
    upper-case name, such as an imported OBJECTIVES, is a fixed value, not a setting)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, CONSTANT_TYPES)}


def constant_notes(path):
    """{name: the comment that ends its line} of the top-level assignments of the script at `path`: each
    constant is documented once, beside its value, and --help shows it. A note too long for one line goes on in
    comment lines indented by three spaces ("#   ...") right below."""
    with open(path, "rb") as f:
        tokens = list(tokenize.tokenize(f.readline))
    names = {a.start[0]: a.string for a, b in zip(tokens, tokens[1:])
             if a.type == tokenize.NAME and a.start[1] == 0 and b.string == "="}
    notes, last = {}, None  # last: (the constant whose note a continuation extends, the line it ended on)
    for t in (t for t in tokens if t.type == tokenize.COMMENT):
        line = t.start[0]
        if line in names:
            notes[names[line]], last = t.string.lstrip("# "), (names[line], line)
        elif last and line == last[1] + 1 and t.start[1] == 0 and t.string.startswith("#   "):
            notes[last[0]] += " " + t.string.lstrip("# ")
            last = (last[0], line)
    return notes


def convert(name, default, value):
    """`value` (a string from the command line, or any object from a config file) as the type of `default`.
    Raises ConfigError naming `name` and the expected type."""
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
        raise ConfigError(name, f"expected {expected}, got {value!r}") from None


def normalize_choices(values, choices):
    """`values` ({name: value}, e.g. the config saved in a checkpoint) with each value that has `choices`
    ({name: tuple of allowed values}) replaced by the allowed value it matches, compared case-insensitively as
    text (so a bool True matches "true"). Names absent from `values` are skipped. Returns a new dict; raises
    ConfigError for the first value that matches none of its choices."""
    values = dict(values)
    for name, allowed in choices.items():
        if name in values:
            word = str(values[name]).strip().lower()
            matches = [choice for choice in allowed if str(choice).lower() == word]
            if not matches:
                raise ConfigError(name, f"{values[name]!r} is not one of {', '.join(map(str, allowed))}")
            values[name] = matches[0]
    return values


def expand_bool_flags(argv, names):
    """`argv` with each bare `--name` of a bool constant in `names` made explicit: `--name=WORD` when a true/false
    word follows it (that word is consumed), else `--name=true`. Every other argument, such as an input file
    after the flag, stays where it is. Nothing after `--` is touched."""
    out, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return out + [arg] + rest
        if arg.startswith("--") and arg[2:] in names:
            value = rest.pop(0) if rest and rest[0].lower() in TRUE_WORDS | FALSE_WORDS else "true"
            arg = f"{arg}={value}"
        out.append(arg)
    return out


def build_parser(defaults, description, positional, choices, notes):
    """The argparse parser of a script's constants: one flag per constant, its help showing its note (the
    comment beside it), its default and any choices; the positional arguments are config files, or the script's
    inputs with `positional`."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    if positional:
        parser.add_argument(positional[0], nargs="*", metavar=positional[1], help=positional[2])
    else:
        parser.add_argument("config_files", nargs="*", metavar="CONFIG.py",
                            help="python files of constant overrides, applied in order before the flags")
    for name, default in defaults.items():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        if name in choices:
            shown += f"; choices: {', '.join(map(str, choices[name]))}"
        bare = dict(nargs="?", const="true") if isinstance(default, bool) else {}  # usage: --name [BOOL]
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=type(default).__name__.upper(),
                            help=f"{notes.get(name, '')} (default: {shown})".lstrip().replace("%", "%%"),
                            **bare)  # help is %-formatted
    return parser


def read_config_files(parser, paths, defaults):
    """{name: value} assigned by the config files at `paths`, later files winning; a missing file or a name
    that is not a constant is a parser error."""
    overrides = {}
    for path in paths:
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
    return overrides


def parse(namespace, argv=None, description=None, positional=None, choices=None):
    """Apply config files and --name=value flags from `argv` (default sys.argv[1:]) to the constants in
    `namespace` (a script's globals()), in place. Returns the resulting {name: value} of every constant.
    With `positional=(name, metavar, help)` the positional arguments are not config files: the result holds
    them too, as a list of strings (empty when none) under `name`.
    `choices` ({name: tuple of allowed values}) are checked after parsing (see normalize_choices). Errors in
    the arguments are parser errors (exit status 2) naming the flag; a choice for a name that is not a
    constant, or a default outside its choices, is a ValueError (a mistake of the script)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults, choices = constants(namespace), choices or {}
    if set(choices) - set(defaults):
        raise ValueError(f"choices for {sorted(set(choices) - set(defaults))}: not constants of this script")
    normalize_choices(defaults, choices)  # the script's own defaults must be among their choices
    notes = constant_notes(namespace["__file__"]) if namespace.get("__file__") else {}
    parser = build_parser(defaults, description, positional, choices, notes)
    argv = expand_bool_flags(argv, {name for name, value in defaults.items() if isinstance(value, bool)})
    # inputs may come before, between and after the flags; config files keep their original parsing
    args, unknown = (parser.parse_known_intermixed_args if positional else parser.parse_known_args)(argv)
    if unknown:
        parser.error(f"unknown option {unknown[0]!r}: not a constant of this script "
                     f"(run with --help for the list)")
    inputs = {positional[0]: vars(args).pop(positional[0])} if positional else {}
    files = vars(args).pop("config_files", [])
    script = os.path.realpath(namespace.get("__file__") or "")
    if any(os.path.realpath(path) == script for path in files):  # it would run itself, again and again
        parser.error(f"{script} is the script itself, not a config file")
    overrides = read_config_files(parser, files, defaults)
    overrides.update(vars(args))
    try:
        values = normalize_choices({**defaults, **{name: convert(name, defaults[name], value)
                                                   for name, value in overrides.items()}}, choices)
    except ConfigError as err:
        parser.error(str(err))
    namespace.update(values)
    return dict(values, **inputs)
