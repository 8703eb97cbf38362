"""The benchmarks' tables: their cells, markdown, and publishing them (printed, and written into a documentation
file between the markers `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, with the command and the machine)."""
import datetime
import os
import platform
import shlex
from collections import namedtuple

import torch

from benchmarks.runs import read_text
from files import atomic_write

# a table of the results: `name` (its markers in --docs), `title` (the line above it), column titles, rows of cells
Table = namedtuple("Table", "name title header rows")


def cell(value, unit="", digits=0, scale=1):
    """A table cell: `value` times `scale` with `digits` decimals and `unit`, or - when it is missing."""
    return "-" if value is None else f"{scale * value:.{digits}f}{unit}"


def markdown_table(header, rows):
    """A markdown table of the column titles `header` and `rows` (lists of cells as long as it); a | in a cell is
    escaped."""
    lines = [[str(c).replace("|", "\\|") for c in cells] for cells in (header, *rows)]
    return "\n".join(["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cells) + " |" for cells in lines[1:])])


def replace_section(text, name, body):
    """`text` with what lies between the lines `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` replaced by
    `body`; without those markers, `text` with a `## NAME` section holding them and `body` appended. Raises
    ValueError for an opening marker without its closing one."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    before, found, after = text.partition(start)
    if not found:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"## {name}\n\n{block}\n"
    if end not in after:
        raise ValueError(f"{start} has no closing {end}")
    return before + block + after.split(end, 1)[1]


def provenance(argv, gpu=False):
    """The line beneath a table in the documentation: the command, the date and the machine (the CPU model, cores,
    torch version; with `gpu` the GPU)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: platform's name stands
    machine = [cpu, f"{os.cpu_count()} CPU cores", f"torch {torch.__version__}",
               *([torch.cuda.get_device_name()] if gpu else [])]
    return f"`{shlex.join(['python', 'bench.py', *argv])}` on {datetime.date.today()}: {', '.join(machine)}"


def publish(table, docs="", note=""):
    """Print `table` (its title, then the markdown) and, with `docs`, write it with `note` beneath into that file
    in place of its section (atomically; a missing file is created)."""
    text = f"{table.title}\n\n{markdown_table(table.header, table.rows)}"
    print(f"\n{text}", flush=True)
    if docs:
        new = replace_section(read_text(docs), table.name, f"{text}\n\n{note}")
        atomic_write(docs, lambda f: f.write(new), mode="w")
