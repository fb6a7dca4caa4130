"""The command line, in-process through cli.main (plus one real subprocess)."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import SEED_YAML

from neoxlab.cli import main


def trained_run(tiny_overrides, capsys) -> Path:
    assert main(["train", *tiny_overrides, "--name", "cli", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "best val loss" in out
    return next((Path.cwd() / "runs").glob("cli-*"))


def test_seed_yaml_trains_from_another_directory(tmp_path, monkeypatch, capsys):
    """The Shakespeare seed config, verbatim, prepares its data and trains (short)."""
    config_dir = tmp_path / "project"
    config_dir.mkdir()
    (config_dir / "seed.yml").write_text(SEED_YAML)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = [
        "train",
        str(config_dir / "seed.yml"),
        "train-iters=20",
        "eval-interval=10",
        "save-interval=10",
        "eval-iters=2",
        "sample-tokens=16",
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sample at step 20" in out
    # data and tokenizer were prepared beside the config, the run landed in the cwd
    assert (config_dir / "shakespeare.jsonl").is_file()
    assert list(config_dir.glob("shakespeare.*.train.bin"))
    run_dir = next((elsewhere / "runs").iterdir())
    assert (run_dir / "checkpoints" / "step_0000020" / "model.safetensors").is_file()


def test_generate_and_eval(tiny_overrides, capsys):
    run_dir = trained_run(tiny_overrides, capsys)
    argv = [
        "generate",
        str(run_dir),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]
    assert main(argv) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("ROMEO:") and len(greedy) > len("ROMEO:\n")
    assert main(argv) == 0
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    sampled = [
        "generate",
        str(run_dir / "checkpoints" / "step_0000020"),
        "--seed",
        "3",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "12",
    ]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    assert main(["eval", str(run_dir), "--eval-iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "perplexity" in out

    # a newest checkpoint cut short (a copy that stopped) is skipped, and the user is told so
    weights = run_dir / "checkpoints" / "step_0000020" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    skipped = (
        f"note: skipping {weights.parent}: its model.safetensors is 100 bytes, state.json says "
        f"{size:,} (cut short); using step_0000010\n"
    )
    assert main([*argv[:2], "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == skipped
    assert main(["eval", str(run_dir), "--eval-iters", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == skipped and "step_0000010 (step 10)" in out


def test_generate_into_a_closed_pipe_stops_quietly(tiny_overrides, capsys):
    """`neoxlab generate ... | head`: when the reader has gone, no traceback; SIGPIPE's status,
    as the shell reports for `cat` in the same place."""
    run_dir = trained_run(tiny_overrides, capsys)
    command = [sys.executable, "-m", "neoxlab", "generate", str(run_dir), "--prompt", "ROMEO:"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first token is written
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGPIPE, err.decode()
    assert err == b""


def test_eval_on_other_text_names_the_tokenizer_to_use(tiny_overrides, shakespeare_text, capsys):
    from neoxlab.data.corpora import write_shakespeare_jsonl

    run_dir = trained_run(tiny_overrides, capsys)
    text = shakespeare_text
    other = write_shakespeare_jsonl(text[-60_000:], Path("other.jsonl"))
    argv = ["eval", str(run_dir), f"data-path={other}", "--eval-iters", "2"]
    assert main(argv) == 2  # a tokenizer trained on the other text is not the model's
    err = capsys.readouterr().err
    tokenizer = run_dir / "checkpoints" / "step_0000020" / "tokenizer.json"
    assert "differs from the checkpoint's" in err and f"add vocab-file={tokenizer}" in err
    assert main([*argv, f"vocab-file={tokenizer}"]) == 0  # the hint, followed
    assert "validation loss" in capsys.readouterr().out


def test_prompt_longer_than_context_is_exit_2(tiny_overrides, capsys):
    run_dir = trained_run(tiny_overrides, capsys)
    assert main(["generate", str(run_dir), "--prompt", "word " * 400]) == 2
    err = capsys.readouterr().err
    assert "longer than" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message", "next_step"),
    [
        (["train", "missing.yml"], "does not exist", "neoxlab train configs/shakespeare.yml"),
        (["train"], "no config file", "neoxlab train configs/shakespeare.yml"),
        (["train", "hiden-size=3"], "unknown config key 'hiden-size'", "'hidden-size'"),
        (["generate", "nowhere"], "does not exist", "ls runs"),
        (["eval", "."], "neither a neoxlab run", ""),
        (["train", "--resume", "latest"], "no runs", "neoxlab train configs/shakespeare.yml"),
        (["train", "--resume", "runs/nope"], "run runs/nope does not exist", "ls runs"),
        (["train", "--resume", "."], "not a neoxlab run directory (no config.yml)", "ls runs"),
        (["train", "data-path=data/python_stdlib.jsonl"], "does not exist", "neoxlab prepare"),
        (["train", "data-path=data/c4_text_document"], "not found", "neoxlab prepare jsonl"),
        (["train", "data-path=corpus.jsonl"], "does not exist", "line to the current folder"),
        (["frobnicate"], "invalid choice", "neoxlab --help"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message, next_step, capsys):
    """One line, exit 2, and a hint that tells a newcomer what to type next."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and next_step in err.partition("(hint: ")[2]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_prepare_shakespeare_from_source_and_offline_error(
    tmp_path, monkeypatch, capsys, shakespeare_mirror
):
    source = shakespeare_mirror / "tinyshakespeare" / "input.txt"
    assert main(["prepare", "shakespeare", "--source", str(source), "--out", "d"]) == 0
    assert (tmp_path / "d" / "shakespeare.jsonl").is_file()
    monkeypatch.delenv("NEOXLAB_DATA_MIRROR")
    monkeypatch.setenv("NEOXLAB_CACHE", str(tmp_path / "empty-cache"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    assert main(["prepare", "shakespeare", "--out", "e"]) == 2
    err = capsys.readouterr().err
    assert "--source" in err and "NEOXLAB_DATA_MIRROR" in err


def test_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "hidden-size" in out and "lr-decay-style" in out


def test_python_dash_m_and_version():
    result = subprocess.run(
        [sys.executable, "-m", "neoxlab", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("neoxlab ")
    bad = subprocess.run(
        [sys.executable, "-m", "neoxlab", "train", "nope.yml"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sample-prompt=ROMEO:"], ["--prompt", "ROMEO:"]),
        (
            ["sample-prompt=def f(x):\n    return 'a\\\\b'\n"],
            ["--prompt", "def f(x):\n    return 'a\\\\b'\n"],
        ),
        ([], []),  # the default prompt, a newline, is not worth a --prompt
        (["data-format=chat"], ["--chat"]),
    ],
)
def test_generate_hint_fits_the_run_and_is_valid_bash(overrides, expected):
    from neoxlab.cli import _generate_hint
    from neoxlab.config import load_config

    hint = _generate_hint(load_config([], overrides), Path("runs/my run"))
    assert "\n" not in hint
    # bash parses the hint back into exactly the arguments meant
    words = subprocess.run(
        [
            "bash",
            "-c",
            f'for word in {hint.removeprefix("neoxlab ")}; do printf "%s\\0" "$word"; done',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")[:-1]
    tail = ["--max-new-tokens", "200"] if expected != ["--chat"] else []
    assert words == ["generate", "runs/my run", *expected, *tail]
