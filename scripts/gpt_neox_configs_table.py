"""Run every YAML under a gpt-neox `configs/` folder through `neoxlab train FILE --dry-run`.

Prints a Markdown table: config -> loads (its parameter count) or refused (neoxlab's message),
the table docs/gpt-neox-configs.md records. Each file is loaded alone, as gpt-neox's own
`configs/README.md` runs them (plus a local setup file, which only adds paths).

    git clone https://github.com/EleutherAI/gpt-neox /tmp/gpt-neox
    python scripts/gpt_neox_configs_table.py /tmp/gpt-neox/configs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

from neoxlab.cli import main

PARAMETERS = re.compile(r"^parameters: ([\d,]+) .*?vocab ([\d,]+) padded", re.MULTILINE)


def dry_run(path: Path) -> tuple[str, str]:
    """(outcome, detail) of `neoxlab train PATH --dry-run`: loads / refused."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(path), "--dry-run"])
    found = PARAMETERS.search(out.getvalue())
    if code == 0 and found:
        return "loads", f"{found[1]} parameters (vocab {found[2]})"
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    message = errors[-1].removeprefix("error: ") if errors else f"exit code {code}"
    return "refused", message.replace("|", "\\|")


def main_table(configs: Path) -> str:
    rows = ["| config | outcome | parameters / message |", "|---|---|---|"]
    for path in sorted(configs.rglob("*.yml")):
        outcome, detail = dry_run(path)
        detail = detail.replace(f"{configs}/", "")  # the table names files as configs/ does
        rows.append(f"| {path.relative_to(configs)} | {outcome} | {detail} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, help="gpt-neox's configs/ folder")
    print(main_table(parser.parse_args().configs))
    sys.exit(0)
