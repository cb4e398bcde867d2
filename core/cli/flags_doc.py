"""docs/flags.md, generated from the scripts' parsers so that it cannot go stale:
``python -m core.cli.flags_doc > docs/flags.md`` (a test compares the page with the parsers)."""

import sys

from .parsers import DEFAULT_NOTE, script_parsers


def _markdown_cell(text):
    """One table cell: on one line, with the characters Markdown would read as markup escaped."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default_cell(action):
    if action.default is None:
        return ""
    if action.nargs == 0:  # a switch
        return "on" if action.default else "off"
    return _markdown_cell(action.default)


def _value_cell(action):
    """The value a flag takes, as --help spells it."""
    if action.nargs == 0:  # a switch
        return ""
    if action.metavar is not None:
        value = action.metavar
    elif action.choices is not None:
        value = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        value = action.dest.upper()
    if action.nargs == "?":
        return _markdown_cell(f"[{value}]")
    if action.nargs == "+":
        return _markdown_cell(f"{value} [{value} ...]")
    return _markdown_cell(value)


def _help_text(action):
    """The help as --help prints it, less the default it adds: the page has a column for that."""
    return (action.help or "").removesuffix(DEFAULT_NOTE)


def flags_markdown(parsers):
    """One table per script: each flag's spellings, value, default and --help text; then which
    flags --resume takes from the command line."""
    lines = ["# Flags", "", "Every flag of every script, as its `--help` prints it. Generated from the parsers by",
             "`python -m core.cli.flags_doc > docs/flags.md`; a test fails when this page and the parsers disagree.",
             "What the flags do, at more length: [training.md](training.md).", ""]
    for script, parser in parsers.items():
        lines += [f"## `{script}`", "", _markdown_cell(parser.description), "",
                  "| flag | value | default | meaning |", "|---|---|---|---|"]
        for flag in parser.flags:
            action = flag.action
            names = action.option_strings or [action.metavar or action.dest]  # a positional: its metavar
            lines.append(f"| {', '.join(f'`{o}`' for o in names)} | {_value_cell(action)} "
                         f"| {_default_cell(action)} | {_markdown_cell(_help_text(action))} |")
        lines.append("")
    return "\n".join(lines + resume_section(parsers))


def resume_section(parsers):
    """Which flags ``--resume`` takes from the command line: those the parsers mark as saying
    where and how to run; every other flag comes from the checkpoint."""
    train = next(parser for script, parser in parsers.items() if script.startswith("train_"))
    taken = [flag.action.option_strings[0] for flag in train.flags if flag.resumable]
    return ["## Resume", "", "`--resume` takes from the command line only the flags that say where and how to run: "
            + ", ".join(f"`{flag}`" for flag in taken) + ". Every other flag comes from the checkpoint; one given "
            "with another value than the run's is refused in one line.", ""]


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python -m core.cli.flags_doc > docs/flags.md")
    print(flags_markdown(script_parsers()), end="")
