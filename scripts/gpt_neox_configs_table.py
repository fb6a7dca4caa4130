"""Run every YAML under a gpt-neox `configs/` folder through `neoxlab train FILE --dry-run`.

Prints a Markdown table: config -> loads (its parameter count) or refused (neoxlab's message),
the table docs/gpt-neox-configs.md records. Each file is loaded alone, as gpt-neox's own
`configs/README.md` runs them (plus a local setup file, which only adds paths). `--only` keeps
the files matching some glob, `--after` gives more files after each one (a model config's
training file, as gpt-neox's llama README does) and `--set` adds `key=value` overrides.

    git clone https://github.com/EleutherAI/gpt-neox /tmp/gpt-neox
    python scripts/gpt_neox_configs_table.py /tmp/gpt-neox/configs
    python scripts/gpt_neox_configs_table.py /tmp/gpt-neox/configs --only 'llama*/*B.yml' \
      --after /tmp/gpt-neox/configs/llama/train_config.yml --set finetune=false vocab-size=32000
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


def dry_run(path: Path, after: list[str] = (), overrides: list[str] = ()) -> tuple[str, str]:
    """(outcome, detail) of `neoxlab train PATH [AFTER...] [OVERRIDES...] --dry-run`: loads /
    refused."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(path), *after, *overrides, "--dry-run"])
    found = PARAMETERS.search(out.getvalue())
    if code == 0 and found:
        return "loads", f"{found[1]} parameters (vocab {found[2]})"
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    message = errors[-1].removeprefix("error: ") if errors else f"exit code {code}"
    return "refused", message.replace("|", "\\|")


def main_table(
    configs: Path, only: list[str] = (), after: list[str] = (), overrides: list[str] = ()
) -> str:
    rows = ["| config | outcome | parameters / message |", "|---|---|---|"]
    for path in sorted(configs.rglob("*.yml")):
        name = path.relative_to(configs)
        if only and not any(name.match(pattern) for pattern in only):
            continue
        outcome, detail = dry_run(path, after, overrides)
        detail = detail.replace(f"{configs}/", "")  # the table names files as configs/ does
        rows.append(f"| {name} | {outcome} | {detail} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, help="gpt-neox's configs/ folder")
    parser.add_argument("--only", nargs="+", default=[], help="globs of the files to run")
    parser.add_argument("--after", nargs="+", default=[], help="files given after each one")
    parser.add_argument("--set", nargs="+", default=[], help="key=value overrides")
    args = parser.parse_args()
    print(main_table(args.configs, args.only, args.after, args.set))
    sys.exit(0)
