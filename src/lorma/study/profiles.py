"""What the reproduction study runs, at which scale: small typed records, one profile per scale.

A profile names the models, the data, the methods, the seeds and the settings of each family of experiments; the
plan (:mod:`lorma.study.plan`) expands it into runs. Three profiles:

- ``cpu`` (the default): what this project's 2-core machines can run in about 8 hours. all-MiniLM-L6-v2 (the paper
  adapts RoBERTa's query and value; so do we) on the real classification sets of
  :mod:`lorma.tasks.readers.packaged_data`, and SmolLM2-135M (the packaged real causal LM, standing in for GPT-2 M)
  on E2E, trained on the E2E development set (4,672 pairs: the 42k training set is not reachable offline) and
  scored on the official 630-MR test set by the official scorer.
- ``paper``: the paper's own models and settings (RoBERTa base / large on GLUE, Table 14; GPT-2 M on E2E, WebNLG
  and DART with beam 10, Table 16; Llama-3-8B on MetaMathQA-40K, Table 17), read from the YAML presets under
  ``configs/``; for a user with GPUs, the data on disk and the models (hub names or local paths).
- ``tiny``: the plumbing only (tiny models built from configs, a few steps): what the tests run.

Costs: ``seconds_per_step`` are CPU seconds per optimizer step of one process on one thread, measured on this
project's machine (an idle 2-core x86 VM; recorded with the command in REPRODUCTION.md), so ``--plan`` can say what a
study costs before it runs. They are estimates for planning, not benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorma.plumbing.errors import InputError

__all__ = ["PROFILES", "AblationSetup", "NlgSetup", "NluSetup", "Profile", "get_profile"]


@dataclass(frozen=True)
class NluSetup:
    """Sequence classification: every dataset x method x seed (claims 1, 3, 8, 9)."""

    model: str
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    #: settings shared by every run (``lorma train`` YAML keys; ``training`` holds TrainingArguments)
    settings: dict[str, Any]
    #: ``"auto"``: each method's rate from a range test on its first seed (later seeds reuse it), on the training
    #: data only; ``"preset"``: the YAML preset's rate (the paper's Table 14)
    learning_rate: str = "auto"
    #: ``paper`` profile: ``configs/glue/<model>/<task>-<method>.yaml`` gives each run's settings
    preset_dir: str | None = None
    #: LoRMA runs log the rank of every I(BA) this often (steps; Fig. 7)
    track_rank_every: int = 25
    #: CPU cost of a step (training, evaluation, range test) on each dataset relative to the profile's ``nlu-*``
    #: seconds: mostly the length of its texts. Missing datasets count 1.0.
    relative_cost: dict[str, float] = field(default_factory=dict)
    #: the model and adapter settings in a few words, for the verdict table's "our setting" column
    summary: str = ""


@dataclass(frozen=True)
class AblationSetup:
    """Claims 4-7 on a subset of the NLU datasets, every setting but the one studied kept as in the main runs (the
    paper's Tables 6-8 and 10 do the same: "all the hyperparameters ... kept exactly the same")."""

    datasets: tuple[str, ...]
    #: claim 4 (Table 6): LoRMA without rank inflation
    inflation_methods: tuple[str, ...] = ("lorma-none",)
    #: claim 5 (Table 7): post-multiplication
    side_methods: tuple[str, ...] = ("lorma-plus", "lorma-pi")
    #: claim 6 (Table 8, Fig. 5): ranks, alpha = r; the main runs' r is not run again
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    rank_methods: tuple[str, ...] = ("lora", "lorma-plus", "lorma-pi")
    rank_datasets: tuple[str, ...] | None = None  # None: ``datasets``
    #: claims 6 and 7 (Tables 8 and 10): target matrices at a fixed budget (r per set, alpha = r)
    target_sets: tuple[tuple[tuple[str, ...], int], ...] = (
        (("query",), 8), (("query", "key"), 4), (("query", "value"), 4), (("query", "key", "value", "dense"), 2))
    target_methods: tuple[str, ...] = ("lorma-plus",)
    #: the learning rates the study leans on: the family default (no choice) on ``datasets`` for these methods, and
    #: ``lorma train --tune learning_rate`` (k-fold on the training data) on ``tune_datasets`` for ``tune_methods``;
    #: both against the range test's rate of the main runs
    default_rate_methods: tuple[str, ...] = ("lora", "lorma-plus", "lorma-pi")
    default_rate_datasets: tuple[str, ...] | None = None  # None: ``datasets``
    tune_datasets: tuple[str, ...] = ()
    tune_methods: tuple[str, ...] = ("lora", "lorma-plus")
    tune_folds: int = 3


@dataclass(frozen=True)
class NlgSetup:
    """Data-to-text generation (claim 2): every method x seed, decoded and scored by the official scorer."""

    model: str
    task: str
    train_file: str
    eval_file: str
    methods: tuple[str, ...]
    settings: dict[str, Any]
    #: MRs decoded per run (for the cost); inputs of the eval file
    eval_inputs: int
    note: str = ""
    #: methods run a second time at their own learning rate (a range test on the training data on the first seed,
    #: reused by the later seeds), beside the one rate of ``settings`` that every method shares (the paper's way)
    own_rate_methods: tuple[str, ...] = ()
    #: the model, targets, data and decoding in a few words, for the verdict table's "our setting" column
    summary: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seeds: int
    nlu: NluSetup | None
    ablation: AblationSetup | None
    nlg: tuple[NlgSetup, ...] = ()
    #: CPU seconds per optimizer step (one process, one thread) by run kind: "nlu-adapter", "nlu-full",
    #: "nlg-train", per range-test step: "range-test" (NLU), "nlg-range-test"; per decoded input and beam:
    #: "nlg-decode"; per evaluated row: "nlu-eval"; per held-out pair: "nlg-loss"; per measurement: "analysis"
    seconds: dict[str, float] = field(default_factory=dict)
    #: claims this profile cannot test, with why (REPRODUCTION.md says so)
    untested: dict[int, str] = field(default_factory=dict)


# --- cpu: this machine --------------------------------------------------------------------------------------------

#: all-MiniLM-L6-v2 (BERT: query / key / value / attention.output.dense)
MINILM = "minilm"
SMOLLM2 = "smollm2"
#: the NLU datasets of the cpu profile, all packaged (lorma.tasks.readers.packaged_data): sentiment (tweets, Rotten
#: Tomatoes sentences: SST-2's source), conversation topics, SMS spam, TREC question types, and a sentence-pair set
#: (movie replies, QNLI-like). Left out for time: the two other tweet sets (they repeat tweets-small's domain) and
#: bbc-imbalanced (long articles, and every method already reaches 0.95 macro-F1 there: docs/main-job.md).
CPU_NLU_DATASETS = ("tweets-small", "chatterbot-topics", "rt-polarity", "movie-replies", "sms-spam",
                    "trec-questions")
#: the ablations run where the main results are neither saturated nor at chance, with room below full fine-tuning,
#: and the steps are cheap: tweet sentiment (3 classes, the corpus's own balance; LoRA 0.64 against full 0.72 on
#: seed 0) and TREC question types (6 classes, skewed; LoRA 0.76 against full 0.94; a step costs 0.4 of the
#: average). Conversation topics was the first choice, dropped after seed 0: every method is within 0.01 of full
#: fine-tuning there (saturated) and its steps cost 1.75 times the average.
CPU_ABLATION_DATASETS = ("tweets-small", "trec-questions")

CPU_NLU_SETTINGS: dict[str, Any] = {
    "r": 8, "alpha": 8, "target_modules": ["query", "value"], "max_seq_length": 128,
    "training": {"max_steps": 200, "per_device_train_batch_size": 16, "eval_strategy": "epoch",
                 "save_strategy": "no", "logging_steps": 5, "report_to": "none"},
}
# E2E on SmolLM2: Table 16's adapter settings (r = 4, alpha = 32, dropout 0.1, label smoothing 0.1, weight decay 0.01,
# linear schedule) for a budget of 100 steps of 8 pairs (800 pairs, a sixth of the 4,672) instead of 5 epochs of
# 42k: a training step of SmolLM2 costs about 9 CPU seconds here. The rate is raised from 2e-4 to 2e-3 to learn in
# that budget (docs/generation.md's real run), the same for every method as in the paper's table. Decoding: greedy
# with no_repeat_ngram_size 4 (the paper: beam 10, length penalty 0.9): greedy decoding of the 630 test MRs costs
# about 5 CPU minutes a run (measured), beam 10 carries ten sequences per MR through the same steps, which the
# 9 runs cannot afford here. The held-out loss is taken on the first 640 test pairs.
CPU_E2E_SETTINGS: dict[str, Any] = {
    "r": 4, "alpha": 32, "dropout": 0.1, "max_seq_length": 96,
    "training": {"max_steps": 100, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 10,
                 "lr_scheduler_type": "linear", "label_smoothing_factor": 0.1, "weight_decay": 0.01,
                 "eval_strategy": "no", "save_strategy": "steps", "save_steps": 50, "save_total_limit": 1,
                 "logging_steps": 5, "report_to": "none", "use_cpu": True},
    "task_options": {"num_beams": 1, "no_repeat_ngram_size": 4, "max_new_tokens": 64, "generation_batch_size": 16,
                     "max_loss_samples": 640},
}

CPU = Profile(
    name="cpu",
    description="all-MiniLM-L6-v2 on the packaged classification sets, SmolLM2-135M on E2E: 2 CPU cores",
    seeds=3,
    nlu=NluSetup(model=MINILM, datasets=CPU_NLU_DATASETS, methods=("lora", "lorma-plus", "lorma-pi", "full"),
                 settings=CPU_NLU_SETTINGS, summary="all-MiniLM-L6-v2, q and v, r = 8",
                 # measured on the LoRA runs of seed 0 (train_runtime less the evaluations, per step, over 0.85 s)
                 relative_cost={"chatterbot-topics": 1.75, "movie-replies": 0.75, "rt-polarity": 0.85,
                                "sms-spam": 1.0, "trec-questions": 0.4, "tweets-small": 0.9}),
    # the sweeps thinned to fit the budget: ranks 1, 4, 16 beside the main runs' 8; three target sets at the
    # budget of {q, v} r = 4 (Table 10's points: one matrix, two, four)
    ablation=AblationSetup(datasets=CPU_ABLATION_DATASETS, ranks=(1, 4, 16), rank_datasets=("tweets-small",),
                           target_sets=((("query",), 8), (("query", "value"), 4),
                                        (("query", "key", "value", "dense"), 2)),
                           default_rate_methods=("lora", "lorma-plus"),
                           # movie replies beside the ablation sets: its range test chose a rate at which nothing
                           # was learned (seeds 0-1), which the default rate tests
                           default_rate_datasets=(*CPU_ABLATION_DATASETS, "movie-replies"),
                           tune_datasets=("tweets-small",),
                           tune_methods=("lorma-plus",)),
    nlg=(NlgSetup(model=SMOLLM2, task="e2e", train_file="{nlg_data}/e2e_devset.csv",
                  eval_file="{nlg_data}/e2e_testset_w_refs.csv", methods=("lora", "lorma-plus", "lorma-pi"),
                  settings=CPU_E2E_SETTINGS, eval_inputs=630,
                  note="trained on the E2E development set (4,672 pairs; the 42k training set is not reachable)",
                  # the shared rate is raised 10x for the short budget, and LoRMA_pi's loss spiked at it (seed 0)
                  own_rate_methods=("lorma-pi",),
                  summary="SmolLM2-135M on E2E (dev set for training; up, down, o, gate, r = 4), 630 test MRs, greedy "
                          "decoding, official scorer"),),
    # measured here, on the study's own finished steps (cost.json beside each result; REPRODUCTION.md's status
    # table): nlu-eval per evaluated row, nlg-decode per input and beam (merge and official scorer included),
    # nlg-loss per held-out pair; a range-test step also takes the loss of a fixed 64-row probe batch
    seconds={"nlu-adapter": 0.85, "nlu-full": 1.15, "nlu-eval": 0.03, "nlg-train": 9.1, "nlg-decode": 0.45,
             "nlg-loss": 0.45, "range-test": 1.5, "nlg-range-test": 33.0, "analysis": 60.0,
             # LoRMA_pi applies a dense d x d map per module: on SmolLM2's MLP (d = 1536) a step costs twice LoRA's
             "nlg-train:lorma-pi": 18.6},
    untested={
        2: "WebNLG and DART are not run (budget); E2E only",
    },
)

# --- paper: the paper's models and settings (GPUs) ------------------------------------------------------------------

GLUE_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
PAPER = Profile(
    name="paper",
    description="the paper's own models and settings (Tables 14, 16, 17): RoBERTa base on GLUE, GPT-2 M on E2E; "
                "needs GPUs, GLUE's task folders (--glue-dir) and the models (hub names, or local copies)",
    seeds=3,
    nlu=NluSetup(model="roberta-base", datasets=GLUE_TASKS, methods=("lora", "lorma-plus", "lorma-pi"),
                 settings={}, learning_rate="preset", preset_dir="configs/glue/roberta-base", track_rank_every=200,
                 summary="RoBERTa base, q and v, Table 14's settings per task"),
    ablation=AblationSetup(datasets=("mrpc", "stsb"), ranks=(1, 2, 4, 8, 64),
                           target_sets=((("query",), 8), (("key",), 8), (("value",), 8), (("query", "value"), 4),
                                        (("query", "key"), 4), (("query", "key", "value", "dense"), 2))),
    nlg=(NlgSetup(model="gpt2-medium", task="e2e", train_file="{nlg_data}/e2e/train.csv",
                  eval_file="{nlg_data}/e2e/test.csv", methods=("lora", "lorma-plus", "lorma-pi"),
                  settings={"preset": "configs/nlg/gpt2-medium-e2e-plus.yaml"}, eval_inputs=630,
                  summary="GPT-2 M on E2E (q and v, Table 16's settings), 630 test MRs, beam 10, official scorer"),),
    untested={2: "WebNLG and DART: configs/nlg/ presets, run them with lorma train"},
)

# --- tiny: the plumbing (tests) ------------------------------------------------------------------------------------

TINY = Profile(
    name="tiny",
    description="tiny models built from configs and a few steps: the study's plumbing, not a result",
    seeds=2,
    nlu=NluSetup(model="tiny-bert", datasets=("tiny-a",), methods=("lora", "lorma-plus", "lorma-pi", "full"),
                 settings={"r": 2, "alpha": 2, "target_modules": ["query", "value"], "max_seq_length": 16,
                           "training": {"max_steps": 4, "per_device_train_batch_size": 4, "eval_strategy": "epoch",
                                        "save_strategy": "no", "logging_steps": 1, "report_to": "none",
                                        "use_cpu": True}},
                 track_rank_every=2),
    ablation=AblationSetup(datasets=("tiny-a",), ranks=(1, 2), rank_methods=("lorma-plus",),
                           target_sets=((("query",), 2), (("query", "key"), 1)),
                           side_methods=("lorma-plus",), default_rate_methods=("lora",), tune_datasets=("tiny-a",),
                           tune_methods=("lora",), tune_folds=2),
    nlg=(NlgSetup(model="tiny-llama", task="e2e", train_file="{nlg_data}/e2e_devset.csv",
                  eval_file="{nlg_data}/e2e_testset_w_refs.csv", methods=("lora", "lorma-plus"),
                  own_rate_methods=("lorma-plus",),
                  settings={"r": 2, "alpha": 4, "max_seq_length": 48, "max_train_samples": 16, "max_eval_samples": 4,
                            "training": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                                         "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1,
                                         "report_to": "none", "use_cpu": True},
                            "task_options": {"num_beams": 2, "max_new_tokens": 6, "generation_batch_size": 4,
                                             "scorer": "approximate"}},
                  eval_inputs=4),),
    seconds={"nlu-adapter": 0.05, "nlu-full": 0.05, "nlu-eval": 0.001, "nlg-train": 0.05, "nlg-decode": 0.05,
             "nlg-loss": 0.01, "range-test": 0.05, "analysis": 2.0},
)

PROFILES: dict[str, Profile] = {p.name: p for p in (CPU, PAPER, TINY)}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; an unknown name lists the known ones."""
    if name not in PROFILES:
        raise InputError(f"unknown study profile '{name}'; expected one of: {', '.join(PROFILES)}")
    return PROFILES[name]
