"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`): `neoxlab eval
--tasks` and `eval-tasks` during training. neoxlab scores nothing itself: lm-eval's tasks, its
model code and its metrics do all of it.

How a model reaches lm-eval: `hf.transformers_model` builds in memory the transformers model
that `neoxlab export` writes (the same config.json, tokenizer files and weights, through
transformers' own loading), and lm-eval scores it with its own HFLM. So tokenization, batching,
truncation of documents longer than the context (from the left) and rolling windows are
lm-eval's, the scores equal `lm_eval --model hf --model_args pretrained=<export>`
(tests/test_benchmarks.py checks it to 1e-4), and every architecture hf.py exports is
benchmarked the same way. An `LM` of our own over model.py would be faster on long rolling
windows (KV cache), but it would copy HFLM's request handling, and miss its later fixes, for
scores that could drift from everybody else's.

A LoRA model is scored with its adapters merged (adapters.merged_weights), as its export holds
it. Under torchrun, rank 0 evaluates (on gathered weights when the model is sharded) while the
other ranks wait for its results or its error, so nothing is evaluated or logged twice.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neoxlab import distributed
from neoxlab.adapters import merged_weights
from neoxlab.benchmark_results import (
    TABLE_COLUMNS,
    metric_values,
    results_path,
    table_rows,
    write_results,
)
from neoxlab.checkpoint import TrainedModel
from neoxlab.errors import NeoxlabError
from neoxlab.hf import transformers_model

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from tokenizers import Tokenizer

    from neoxlab.config import Config
    from neoxlab.model import GPTNeoX

# lm-eval computes bootstrap standard errors in this process when this variable is set
SERIAL_BOOTSTRAP = "DISABLE_MULTIPROC"
INSTALL_HINT = 'pip install "neoxlab[eval]" (EleutherAI\'s lm-eval)'
OFFLINE_TASKS = "neoxlab's offline tasks are in the repository's benchmarks/ folder"
HUB_DATA_HINT = (
    "lm-eval's own tasks download their datasets once into the Hugging Face cache "
    "(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets); on a machine without the "
    "network fill that cache elsewhere and set HF_DATASETS_OFFLINE=1; "
    f"{OFFLINE_TASKS} (--include-path benchmarks)"
)


@dataclass(frozen=True)
class BenchmarkOptions:
    """What to evaluate: lm-eval task names (globs and .yaml files too) and lm-eval's knobs."""

    tasks: tuple[str, ...]
    include_path: str | None = None  # a folder of task YAMLs, as lm-eval's --include_path
    limit: float | None = None  # documents per task (< 1: a fraction), as lm-eval's --limit
    num_fewshot: int | None = None
    batch_size: int | str = 1  # or "auto", as lm-eval's

    @classmethod
    def from_config(cls, config: Config, batch_size: int) -> BenchmarkOptions:
        return cls(
            task_names(config.eval_tasks or []),
            config.eval_tasks_include_path,
            config.eval_tasks_limit,
            batch_size=batch_size,
        )


def task_names(items: Sequence[str]) -> tuple[str, ...]:
    """Task names from `T1,T2` arguments or a config list (commas split, as lm-eval does)."""
    return tuple(name.strip() for item in items for name in item.split(",") if name.strip())


def import_lm_eval() -> ModuleType:
    try:
        import lm_eval
    except ImportError:
        raise NeoxlabError(
            "benchmarks need lm-eval, which is not installed", hint=INSTALL_HINT
        ) from None
    return lm_eval


@functools.cache
def task_manager(include_path: str | None, lm_eval_tasks: bool = True) -> TaskManager:
    """lm-eval's index of the tasks of `include_path` and, with `lm_eval_tasks`, of its own.
    Indexing lm-eval's ~15,000 task files takes seconds: a process does it once."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise NeoxlabError(
            f"include path {include_path} is not a folder",
            hint=f"give the folder holding the task YAML files; {OFFLINE_TASKS}",
        )
    return TaskManager(include_path=include_path, include_defaults=lm_eval_tasks)


def _manager_for(options: BenchmarkOptions) -> TaskManager:
    """The index of the include path alone when each task asked for is a plain task there (as
    neoxlab's offline tasks are), else lm-eval's full index. Both build the same tasks: one in
    the include path replaces lm-eval's of the same name; groups, tags and .yaml files may
    gather tasks from both, so they take the full index."""
    if options.include_path is not None:
        local = task_manager(options.include_path, lm_eval_tasks=False)
        plain_tasks = set(local.all_subtasks)

        def is_local(spec: str) -> bool:
            matches = set(local.match_tasks([spec]))
            return bool(matches) and matches <= plain_tasks

        if all(is_local(spec) for spec in options.tasks):
            return local
    return task_manager(options.include_path)


def resolve_tasks(options: BenchmarkOptions) -> list[str]:
    """The task names to run: names and glob patterns matched against lm-eval's index, paths to
    .yaml files kept as they are. An unknown name is a NeoxlabError naming close matches."""
    if not options.tasks:
        raise NeoxlabError("no benchmark task given", hint="e.g. --tasks shakespeare_last_word")
    manager = _manager_for(options)
    names: list[str] = []
    for spec in options.tasks:
        if spec.endswith(".yaml"):
            if not Path(spec).is_file():
                raise NeoxlabError(f"task file {spec} does not exist")
            matches = [str(Path(spec).resolve())]
        else:
            matches = manager.match_tasks([spec])
        if not matches:
            raise _unknown_task(spec, manager)
        names.extend(match for match in matches if match not in names)
    return names


def _unknown_task(name: str, manager: TaskManager) -> NeoxlabError:
    close = difflib.get_close_matches(name, manager.all_tasks, n=4)
    found = f"; close matches: {', '.join(close)}" if close else ""
    return NeoxlabError(
        f"unknown lm-eval task {name!r}{found}",
        hint="tasks of your own (a folder of task YAML files) need --include-path DIR "
        f"(eval-tasks-include-path in a config); {OFFLINE_TASKS}; `lm-eval ls tasks` lists "
        "lm-eval's",
    )


def load_tasks(names: Sequence[str], options: BenchmarkOptions) -> None:
    """Build each task, its documents included, before any model runs: a task whose YAML lm-eval
    refuses, or whose dataset cannot be had, is one NeoxlabError naming it."""
    import yaml

    manager = _manager_for(options)
    for name in names:
        try:
            with _library_output(quiet=False):
                manager.load([name])
        except OSError as err:  # Hub unreachable (ConnectionError), dataset not found
            raise NeoxlabError(
                f"lm-eval task {name}: its dataset cannot be had: {_first_line(err)}",
                hint=HUB_DATA_HINT,
            ) from None
        except (ValueError, KeyError, TypeError, yaml.YAMLError) as err:
            raise NeoxlabError(
                f"lm-eval cannot build task {name}: {_first_line(err)}",
                hint="check the task's YAML file against lm-eval's task guide",
            ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_options(options: BenchmarkOptions) -> None:
    """lm-eval's knobs within what they mean: it would read a limit of 0 as no limit at all."""
    limit = options.limit
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise NeoxlabError(
            f"--limit must be a positive number of documents (or a fraction < 1), got {limit:g}",
            hint="leave --limit out to score every document",
        )
    if options.num_fewshot is not None and options.num_fewshot < 0:
        raise NeoxlabError(f"--num-fewshot must be 0 or more, got {options.num_fewshot}")


def prepare_tasks(options: BenchmarkOptions) -> list[str]:
    """The names `options.tasks` stand for, each task built once (see load_tasks)."""
    check_options(options)
    names = resolve_tasks(options)
    load_tasks(names, options)
    return names


def evaluate_model(
    trained: TrainedModel,
    options: BenchmarkOptions,
    names: Sequence[str],
    *,
    weights: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    quiet: bool = False,
    in_training: bool = False,
) -> dict[str, Any]:
    """lm-eval's results (the dict its CLI writes as JSON) for `trained` on tasks `names`
    (from prepare_tasks).

    `weights` replaces the model's own tensors (a sharded run's gathered copy), `device` is
    where the model evaluates (default: where its weights are); `quiet` keeps lm-eval's progress
    bars and prints off the console. `in_training`: inside a training process, whose threads
    (W&B's, TensorBoard's) can make the worker processes lm-eval forks for its bootstrap
    standard errors hang: they are computed in this process instead (the same numbers)."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    # simple_evaluate seeds Python's, numpy's and torch's generators (as lm-eval's CLI does);
    # a training run's own streams must go on as if no benchmark had run.
    with _library_output(quiet), _bootstrap_here(in_training), _generators_kept():
        model, tokenizer = transformers_model(trained, weights)
        if device is not None:
            model.to(device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            num_fewshot=options.num_fewshot,
            batch_size=options.batch_size,
            limit=options.limit,
            task_manager=_manager_for(options),
            log_samples=False,
        )
    assert results is not None  # a single process is rank 0
    return results


@contextlib.contextmanager
def _library_output(quiet: bool) -> Iterator[None]:
    """lm-eval's and transformers' warnings off (they address their own users: a model passed
    in memory, custom datasets, each document longer than the context, which lm-eval truncates
    from the left as it should); with `quiet`, their progress bars and prints too."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        if quiet:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
        else:
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _bootstrap_here(enabled: bool) -> Iterator[None]:
    """lm-eval's switch (read at each bootstrap) from a multiprocessing pool to this process."""
    previous = os.environ.get(SERIAL_BOOTSTRAP)
    if enabled:
        os.environ[SERIAL_BOOTSTRAP] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SERIAL_BOOTSTRAP, None)
        else:
            os.environ[SERIAL_BOOTSTRAP] = previous


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def results_json(results: dict[str, Any]) -> str:
    """The results as lm-eval's CLI writes them (its serializer for what JSON lacks)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's table of the results (and of their groups), as its CLI prints it."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def summary_line(results: dict[str, Any]) -> str:
    """One line for a training log: each task's metrics, stderr left out."""
    by_task: dict[str, list[str]] = {}
    for task, metric, value, _ in table_rows(results):
        by_task.setdefault(task, []).append(f"{metric} {value:.4g}")
    return " | ".join(f"{task}: {', '.join(metrics)}" for task, metrics in by_task.items())


class TrainingBenchmarks:
    """`eval-tasks` during training: at every `eval-tasks-interval` steps and at the last step of
    training, log `benchmarks/<task>/<metric>` and a W&B table, and save the step's results
    JSON. The tasks are resolved and built when the run starts, so that a wrong name or data
    that cannot be had stops it at once, not at its first benchmark."""

    def __init__(
        self, config: Config, world: distributed.World, device: torch.device, batch_size: int
    ) -> None:
        self.config = config
        self.world = world
        self.device = device
        self.options = BenchmarkOptions.from_config(config, batch_size)
        self.names: list[str] = []
        if self.options.tasks:
            self.names = distributed.decided_by_main(lambda: prepare_tasks(self.options), world)

    def due(self, step: int) -> bool:
        if not self.names:
            return False
        interval = self.config.eval_tasks_interval
        return step == self.config.train_iters or bool(interval and step % interval == 0)

    def run(
        self,
        model: GPTNeoX,
        tokenizer: Tokenizer,
        *,
        run_dir: Path,
        step: int,
        tokens: int,
        tracker: Any,  # rank 0's Tracker; the other ranks' stand-in ignores every call
        write: Callable[[str], None],
    ) -> None:
        """Benchmark `model` at `step` (every rank calls this; rank 0 evaluates)."""
        weights = self._weights(model)

        def evaluate() -> tuple[dict[str, float], list[list[Any]], str]:
            trained = TrainedModel(model, tokenizer, self.config, run_dir, {"step": step})
            results = evaluate_model(
                trained,
                self.options,
                self.names,
                weights=weights,
                device=self.device,
                quiet=True,
                in_training=True,
            )
            write_results(results_path(run_dir, step), results_json(results))
            return metric_values(results), table_rows(results), summary_line(results)

        metrics, rows, line = distributed.decided_by_main(evaluate, self.world)
        tracker.log({"step": step, "tokens": tokens, **metrics})
        tracker.log_table("benchmarks/table", TABLE_COLUMNS, rows, step)
        write(f"step {step}: benchmarks {line}")

    def _weights(self, model: GPTNeoX) -> dict[str, torch.Tensor] | None:
        """The weights to evaluate where they are not the model's own tensors: a sharded
        model's, gathered (every rank joins; rank 0 alone receives them), or a LoRA model's
        with the adapters added, as its export holds them."""
        if self.world.distributed and self.config.distributed_mode() == "fsdp":
            return distributed.full_weights(model)
        if self.config.lora_rank:
            return merged_weights(model) if self.world.is_main else None
        return None
