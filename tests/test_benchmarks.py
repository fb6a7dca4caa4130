"""Benchmarks through lm-evaluation-harness: `neoxlab eval --tasks` agrees with `lm_eval` run
on the export, the shipped offline tasks, eval-tasks during training (metrics.jsonl,
TensorBoard, W&B, compare, model card), and the mistakes that get one line.

lm-eval is slow to import and to index its tasks (seconds), so one tiny trained run serves the
module and every evaluation keeps to a few documents per task.
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from test_tracking import leet, wandb_home  # noqa: F401 (a fixture)

from neoxlab import cli
from neoxlab.config import load_config
from neoxlab.data.benchmark_data import shakespeare_last_word
from neoxlab.errors import NeoxlabError
from neoxlab.hf import load_trained, transformers_model
from neoxlab.tokenizer import load_tokenizer
from neoxlab.tracking import display_path, read_metrics

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "benchmarks"
SHIPPED = ("shakespeare_last_word", "shakespeare_next_line", "python_stdlib_perplexity")
# The context, 64 tokens, is shorter than many documents (lm-eval truncates them from the left)
# and longer than every answer (it refuses to score an answer longer than the context).
TRAIN = [*TINY_MODEL, "seq-length=64", "train-iters=4", "save-interval=4", "eval-interval=4"]
TRAIN += ["sample-tokens=0"]


def train_argv(corpus: Path, *extra: str) -> list[str]:
    return ["train", *TRAIN, f"data-path={corpus}", "device=cpu", *extra, "--no-progress"]


def only_run(folder: Path) -> Path:
    (run,) = (folder / "runs").iterdir()
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_corpus) -> Path:
    folder = tmp_path_factory.mktemp("benchmarked")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert cli.main(train_argv(tiny_corpus, "--name", "tiny")) == 0
    return only_run(folder)


def benchmark_argv(run: Path, tasks: str, *extra: str) -> list[str]:
    return ["eval", str(run), "--tasks", tasks, "--include-path", str(TASKS_DIR), *extra]


def close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))


def test_scores_equal_lm_eval_run_on_the_export(tiny_run, tmp_path, monkeypatch, capsys):
    ours = tmp_path / "ours.json"
    tasks = ",".join(SHIPPED)
    # 8 rolling windows per forward pass: the stdlib files are many 64-token windows
    options = ("--limit", "3", "--batch-size", "8", "--device", "cpu", "--output", ours)
    argv = benchmark_argv(tiny_run, tasks, *options)
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "|shakespeare_next_line" in printed and "acc_norm" in printed  # lm-eval's table
    assert f"wrote {display_path(ours)}" in printed  # relative to the working directory

    export = tmp_path / "export"
    assert cli.main(["export", str(tiny_run), "--out", str(export)]) == 0
    # lm-eval's own command line (the `lm_eval` console script's function), in this process
    theirs_folder = tmp_path / "theirs"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "lm_eval",
            *("--model", "hf", "--model_args", f"pretrained={export},dtype=float32"),
            *("--device", "cpu", "--tasks", tasks, "--include_path", str(TASKS_DIR)),
            *("--limit", "3", "--batch_size", "8", "--output_path", str(theirs_folder)),
        ],
    )
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
    (theirs_file,) = theirs_folder.rglob("results_*.json")
    ours_json, theirs_json = json.loads(ours.read_text()), json.loads(theirs_file.read_text())
    assert set(ours_json["results"]) == set(theirs_json["results"]) == set(SHIPPED)
    assert {"configs", "versions", "n-shot", "higher_is_better", "config"} <= set(ours_json)
    assert ours_json["max_length"] == theirs_json["max_length"] == 64  # the model's context
    for task, metrics in theirs_json["results"].items():
        assert set(ours_json["results"][task]) == set(metrics)
        for key, value in metrics.items():
            if isinstance(value, float):
                assert close(ours_json["results"][task][key], value), (task, key)
    # the documents scored were longer than the context: lm-eval cut them from the left
    tokenizer = load_tokenizer(tiny_run / "tokenizer.json")
    contexts = shakespeare_last_word()["test"][:3]["context"]
    assert max(len(tokenizer.encode(context).ids) for context in contexts) > 64
    rolling = ours_json["results"]["python_stdlib_perplexity"]
    assert 0 < rolling["bits_per_byte,none"] < 20 and math.isfinite(rolling["byte_perplexity,none"])


def test_results_go_to_the_run_by_default_and_options_need_tasks(tiny_run, capsys):
    assert cli.main(benchmark_argv(tiny_run, "shakespeare_next_line", "--limit", "2")) == 0
    saved = tiny_run / "benchmarks" / "step_0000004.json"
    assert f"wrote {display_path(saved)}" in capsys.readouterr().out
    results = json.loads(saved.read_text())["results"]["shakespeare_next_line"]
    assert set(results) >= {"acc,none", "acc_norm,none", "acc_stderr,none"}

    assert cli.main(["eval", str(tiny_run), "--limit", "2"]) == 2
    assert "--limit go with --tasks" in capsys.readouterr().err
    tasks_and_data = benchmark_argv(tiny_run, "shakespeare_next_line", "seq-length=16")
    assert cli.main(tasks_and_data) == 2
    assert "give one or the other" in capsys.readouterr().err


def test_a_task_of_your_own_over_a_local_jsonl(tiny_run, tmp_path):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    documents = [{"text": "ROMEO:\nGood", "choices": [" morrow", " zzz"], "label": 0}] * 2
    (folder / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    (folder / "my_choice.yaml").write_text(
        "task: my_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {folder / 'test.jsonl'}}}, "
        f"cache_dir: {tmp_path / 'hf-cache'}}}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: text\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    output = tmp_path / "mine.json"
    argv = ["eval", str(tiny_run), "--tasks", "my_choice", "--include-path", str(folder)]
    assert cli.main([*argv, "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["n-samples"]["my_choice"]["effective"] == 2
    assert results["results"]["my_choice"]["acc,none"] in (0.0, 1.0)


def test_unknown_task_is_one_line_naming_close_matches(tiny_run, capsys):
    assert cli.main(benchmark_argv(tiny_run, "shakespeare_last_wrd")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown lm-eval task")
    assert "close matches: shakespeare_last_word" in err and "--include-path" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--limit", "0"), "--limit must be a positive number of documents"),
        (("--limit", "-2"), "--limit must be a positive number of documents"),
        (("--num-fewshot", "-1"), "--num-fewshot must be 0 or more"),
        (("--include-path", "no-such-folder"), "include path no-such-folder is not a folder"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(tiny_run, extra, message, capsys):
    saved_before = sorted((tiny_run / "benchmarks").glob("*"))
    argv = ["eval", str(tiny_run), "--tasks", "shakespeare_next_line"]
    if "--include-path" not in extra:
        argv += ["--include-path", str(TASKS_DIR)]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}")
    assert sorted((tiny_run / "benchmarks").glob("*")) == saved_before


def test_a_model_whose_tokenizer_does_not_fit_is_one_line(tiny_run, tmp_path, capsys):
    from neoxlab.tokenizer import save_tokenizer, train_bpe

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(next((tiny_run / "checkpoints").iterdir()), checkpoint)
    text = (REPO / "README.md").read_text(encoding="utf-8")
    save_tokenizer(train_bpe([text], 600), checkpoint)  # more tokens than the model has rows
    argv = benchmark_argv(checkpoint, "shakespeare_next_line", "--output", tmp_path / "out.json")
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different model shape or tokenizer" in err, err
    assert not (tmp_path / "out.json").exists()


def test_hub_task_without_its_data_is_one_line(tiny_run, monkeypatch, capsys):
    import datasets
    import huggingface_hub.constants

    # as HF_DATASETS_OFFLINE=1 with an empty cache (the variables are read at import)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(benchmark_argv(tiny_run, "lambada_openai")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "lm-eval task lambada_openai: its dataset cannot be had" in err
    assert "HF_DATASETS_OFFLINE=1" in err and "--include-path benchmarks" in err


def test_a_benchmark_killed_while_writing_leaves_no_half_json(tiny_run, tmp_path, monkeypatch):
    output = tmp_path / "results" / "results.json"
    output.parent.mkdir()
    output.write_text('{"results": "of an earlier benchmark"}')

    def killed(*args):
        raise KeyboardInterrupt  # what SIGINT does between the write and the rename

    monkeypatch.setattr(os, "replace", killed)
    argv = benchmark_argv(tiny_run, "shakespeare_next_line", "--limit", "1", "--output", output)
    assert cli.main([str(a) for a in argv]) == 130
    assert output.read_text() == '{"results": "of an earlier benchmark"}'
    assert all(".tmp-" in p.name for p in output.parent.iterdir() if p != output)


@pytest.mark.usefixtures("wandb_home")
def test_eval_tasks_while_training(tiny_corpus, tmp_path, monkeypatch):
    benchmarked = [
        "eval-tasks=shakespeare_next_line,shakespeare_last_word",
        "eval-tasks-interval=2",
        "eval-tasks-limit=2",
        f"eval-tasks-include-path={TASKS_DIR}",
        "use-tensorboard=true",
    ]
    # dropout draws from torch's generator, which lm-eval seeds: the run must not notice
    dropout = ["hidden-dropout=0.1", "log-interval=1"]
    argv = train_argv(tiny_corpus, *dropout, *benchmarked, "--wandb", "--name", "bench")
    assert cli.main(argv) == 0
    run = only_run(tmp_path)
    metrics = read_metrics(run)
    key = "benchmarks/shakespeare_next_line/acc"
    logged = {m["step"]: m for m in metrics if key in m}
    assert sorted(logged) == [2, 4]
    assert "benchmarks/shakespeare_last_word/perplexity_stderr" in logged[4]
    for step, record in logged.items():
        saved = json.loads((run / "benchmarks" / f"step_{step:07d}.json").read_text())
        assert saved["results"]["shakespeare_next_line"]["acc,none"] == record[key]

    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert cli.main(train_argv(tiny_corpus, *dropout, "--name", "plain")) == 0
    assert train_losses(run) == train_losses(only_run(plain))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars(key)] == [2, 4]

    (folder,) = (run / "wandb").glob("offline-run-*")
    summary = json.loads(leet("--summary", "--json", folder))["summary"]
    assert summary[key] == logged[4][key]
    table = json.loads((folder / "files" / summary["benchmarks/table"]["path"]).read_text())
    assert table["columns"] == ["task", "metric", "value", "stderr"]
    assert ["shakespeare_next_line", "acc", logged[4][key]] in [row[:3] for row in table["data"]]

    assert cli.main(["compare", str(run), "--metric", key, "--out", "compare.png"]) == 0
    assert (plain / "compare.png").stat().st_size > 0

    export = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(export)]) == 0
    card = (export / "README.md").read_text()
    assert "## Benchmarks" in card and "at step 4, 0-shot, at most 2 documents per task" in card
    assert f"| shakespeare_next_line | acc | {logged[4][key]:.4f} |" in card


def train_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run) if "train/loss" in m}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval-tasks-interval=5", "eval-tasks-interval is set but eval-tasks is not"),
        ("eval-tasks-limit=0", "eval-tasks-limit must be a positive number"),
    ],
)
def test_eval_task_keys_are_checked(override, message):
    extra = ["eval-tasks=piqa"] if "limit" in override else []
    with pytest.raises(NeoxlabError, match=message):
        load_config([], [override, *extra])


def test_two_ranks_benchmark_once_and_do_not_hang(tiny_corpus, tmp_path):
    # FSDP2 on gloo: every rank joins the gather of the sharded weights, rank 0 evaluates
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "neoxlab", *train_argv(tiny_corpus, "distributed=fsdp", "eval-tasks-limit=2")),
        *("eval-tasks=shakespeare_next_line", f"eval-tasks-include-path={TASKS_DIR}"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step 4: benchmarks shakespeare_next_line: acc") == 1
    run = only_run(tmp_path)
    benchmarked = [m for m in read_metrics(run) if "benchmarks/shakespeare_next_line/acc" in m]
    assert [m["step"] for m in benchmarked] == [4]
    assert [p.name for p in (run / "benchmarks").iterdir()] == ["step_0000004.json"]


def test_a_lora_run_is_benchmarked_with_its_adapters_merged(tmp_path, monkeypatch):
    """eval-tasks while LoRA trains scores the merged weights (the training model untouched),
    and `neoxlab eval RUN --tasks` on the finished run (adapters merged on loading) agrees."""
    pytest.importorskip("peft")
    from test_finetune import CHAT_LORA, LORA
    from test_hf import CHAT_EXAMPLE, finetune_overrides, make_tiny_pythia

    shutil.copyfile(CHAT_EXAMPLE, tmp_path / CHAT_EXAMPLE.name)
    base = make_tiny_pythia(tmp_path / "tiny-pythia")
    tasks = "shakespeare_last_word"  # its perplexity moves with every weight
    benchmarked = [f"eval-tasks={tasks}", "eval-tasks-limit=2"]
    benchmarked += [f"eval-tasks-include-path={TASKS_DIR}"]
    steps = ["train-iters=2", "eval-interval=2", "save-interval=2", "sample-tokens=0"]
    overrides = finetune_overrides(base, *LORA, *steps, *benchmarked)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", str(CHAT_LORA), *overrides, "--no-progress"]) == 0
    run = only_run(tmp_path)
    in_training = json.loads((run / "benchmarks" / "step_0000002.json").read_text())

    output = tmp_path / "after.json"
    argv = ["eval", str(run), "--tasks", tasks, "--include-path", str(TASKS_DIR)]
    assert cli.main([*argv, "--limit", "2", "--device", "cpu", "--output", str(output)]) == 0
    after = json.loads(output.read_text())
    perplexity = after["results"]["shakespeare_last_word"]["perplexity,none"]
    assert in_training["results"]["shakespeare_last_word"]["perplexity,none"] == pytest.approx(
        perplexity, rel=1e-5
    )


def test_merged_weights_are_peft_merge_and_unload_s(tmp_path):
    pytest.importorskip("peft")
    from test_hf import make_tiny_pythia

    from neoxlab.adapters import LoraSpec, add_lora, merged, merged_weights

    pythia = make_tiny_pythia(tmp_path / "tiny-pythia")
    trained = load_trained(pythia, torch.device("cpu"))
    model = trained.model
    lora = add_lora(model, LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=None))
    # its own tensors (LoRA's names) are refused, not loaded into a half-random model
    with pytest.raises(NeoxlabError, match="do not fit GPTNeoXForCausalLM: missing_keys"):
        transformers_model(trained)
    with torch.no_grad():  # B starts at zero: the adapters would add nothing
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights = merged_weights(model)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # untouched
    expected = merged(copy.deepcopy(lora)).state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
