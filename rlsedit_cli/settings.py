"""Typed schemas of every config section: the types and each value's check beside its field
(the values are in conf/; rlsedit_cli/validate.py applies the checks).

A leaf module: it imports no other module of the package, so config.py, the editors' and the
datasets' schema modules all import it without a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


def checked(default: Any = MISSING, *, low: float | None = None, above: float | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A field with its check: at least ``low``, strictly ``above``, or one of ``choices``
    (a null value passes: the field's type says whether it may be null). Numbers must also be
    finite. validate.py applies it; docs/configuration.md states it."""
    rules = {"low": low, "above": above, "choices": choices}
    return field(default=default, metadata={k: v for k, v in rules.items() if v is not None})


OBJECTIVES = ("hmean", "efficacy", "generalization", "specificity", "efficacy_magnitude",
              "generalization_magnitude", "specificity_magnitude", "fluency", "consistency")
DTYPES = ("float32", "bfloat16")  # of autocast's matrix products
AT = ("every", "ends")  # when a measurement is taken


@dataclass
class ModelConfig:
    """Architecture facts of one model; editors interpolate them."""

    name: str = MISSING  # the model's name (run folders, caches, editor_model files)
    name_or_path: str = MISSING  # hub id, local folder, or pkg:DIST (a GGUF inside a package)
    gguf_file: str | None = None  # a .gguf file (path, or a name inside name_or_path)
    arch: str = MISSING  # gpt2 | gptj | llama | qwen2: selects the module templates' meaning
    dtype: str = "float32"  # float32 | bfloat16 | float16
    revision: str | None = None  # the hub revision (commit or tag) to load
    device_map: str | None = None  # "auto" shards across GPUs (accelerate)
    trust_remote_code: bool = False  # run the hub repository's own model code (a choice to make)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2; None: the default
    num_layers: int = MISSING  # transformer blocks
    layer_template: str = MISSING  # a block; its output is the residual stream
    mlp_out_template: str = MISSING  # the edited linear map (MLP down projection)
    # the MLP's linear maps by kind (gate, up, down), for editors that edit others (UltraEdit)
    mlp_maps: dict[str, str] = field(default_factory=dict)
    weight_transposed: bool = False  # True for GPT-2's Conv1D, which stores W as (d_in, d_out)
    ln_f: str = MISSING  # the final norm's module name
    lm_head: str = MISSING  # the LM head's module name
    mlp_out_is_residual: bool = MISSING  # the edited map's output is added to the stream as is
    logits_are_head_of_norm: bool = MISSING  # logits = lm_head(ln_f(h)), nothing after
    edit_layers: list[int] = MISSING  # layers edited by MEMIT-style editors
    single_layer: int = MISSING  # the layer edited by ROME and FT
    loss_layer: int = MISSING  # layer whose output feeds the target loss (usually the last)
    anchor_corpus: str = "wikitext"  # ordinary text for the anchor statistics
    anchor_samples: int = 10000  # texts of anchor_corpus to read (stats.num_samples)
    anchor_max_length: int = 128  # tokens per text (stats.max_length)


@dataclass
class TargetConfig:
    """Target-value optimisation (docs/design.md section 4), shared by the key-value editors.

    Types only: the values are in conf/target/MODEL.yaml (and an editor_model file may change
    one for one editor).
    """

    steps: int = checked(low=1)  # Adam steps per request at most
    lr: float = checked(above=0)  # Adam's step size
    kl_factor: float = checked(low=0)  # weight of the KL term that keeps the subject's other facts
    weight_decay: float = checked(low=0)  # weight of ||delta||^2 / ||h||^2
    clamp_norm_factor: float = checked(above=0)  # ||delta|| at most this x ||h||
    loss_layer: int = MISSING  # the block whose output feeds the loss (${model.loss_layer})
    early_stop_loss: float = MISSING  # stop a request once its whole loss is below this
    stop_when_top1: bool = MISSING  # ENCORE: stop a request once its target is top-1 everywhere
    # stop a request once its mean target NLL is below this (null: off)
    stop_below_nll: float | None = checked(above=0)
    # [[tokens, count], ...] groups of sampled prefixes; or the templates, [["{}"], [...]];
    # or a JSON file of them (editing/templates.py)
    context_templates: Any = MISSING
    chunk_size: int = checked(low=1)  # requests optimised together; bounds activation memory
    compute_dtype: str = checked(choices=DTYPES)  # the frozen blocks' products (autocast)
    keys_dtype: str = checked(choices=DTYPES)  # the key passes' products (autocast)


@dataclass
class EditorConfig:
    """Fields every editor has."""

    _target_: str = MISSING
    name: str = MISSING  # the editor's name (run folders, logs, reports)


@dataclass
class StreamConfig:
    """Which records are edited, in which order and batches (values: conf/config.yaml)."""

    num_edits: int = checked(low=1)  # records to edit
    batch_size: int = checked(low=1)  # records per batch (one editor update each)
    seed: int = MISSING  # of the shuffle
    shuffle: bool = MISSING  # false: the file's order, as the references edit theirs
    offset: int = checked(low=0)  # skip this many records of the (shuffled) set (held-out tuning)
    stop_on_collapse: bool = MISSING  # end the stream cleanly at measure.collapse_factor's alarm


@dataclass
class StatsConfig:
    """Anchor statistics E[k k^T] of each edited map's input over ordinary text."""

    corpus: str = "${model.anchor_corpus}"  # wikitext | wikipedia | path to .txt/.jsonl(.gz)
    num_samples: int = checked("${model.anchor_samples}", low=1)  # texts
    max_length: int = "${model.anchor_max_length}"  # type: ignore[assignment]  # tokens each
    batch_size: int = checked(low=1)  # texts per forward pass
    precision: str = MISSING  # dtype of the cached C (sums are always float64)
    # the texts read: random (seeded, as the references) or first (the corpus's order)
    sample: str = checked(choices=("random", "first"))
    seed: int = MISSING  # of the random sample


@dataclass
class DatasetConfig:
    _target_: str = MISSING
    name: str = MISSING  # the dataset's name (run folders, reports)
    path: str | None = MISSING  # the records' file (null: the dataset's own default)
    skip_invalid: bool = MISSING  # skip malformed or over-long records instead of stopping


@dataclass
class MeasureConfig:
    """The editing metrics (efficacy ... consistency, retention) and when they are measured.

    Always measured, whatever the ``eval`` group says; values in conf/config.yaml.
    """

    batch_size: int = checked(low=1)  # prompts per forward pass
    pre_edit: bool = MISSING  # measure the edited records before the stream starts
    fluency: bool = MISSING  # generation metrics (fluency, consistency)
    # fluency texts: sample (top-5, seeded: the references') or greedy
    generation: str = checked(choices=("sample", "greedy"))
    max_length: int = checked(low=1)  # tokens of each generated text, its prompt included
    generation_prompts: int | None = checked(low=0)  # per record; None: all of them
    generated_accuracy: bool = MISSING  # efficacy/generalization_generated: greedy answers (WILD)
    retention_edits: int = checked(low=0)  # the first edits of the stream, re-measured ...
    retention_every: int = checked(low=0)  # ... every this many batches (0: never)
    reuse_unedited: bool = MISSING  # the unedited model's figures from paths.cache when cached
    fluency_records: int | None = checked(low=1)  # texts of a seeded subset of N; None: all
    # texts at every point (before, retention points, end) or at the ends (before and end)
    fluency_at: str = checked(choices=AT)
    # greedy answers wherever efficacy is measured (every) or before and at the end (ends)
    generated_at: str = checked(choices=AT)
    compute_dtype: str = checked(choices=DTYPES)  # of the measuring forward passes
    objective_terms: bool = MISSING  # fit, drift, preservation, ||W|| per edited layer per batch
    collapse_factor: float | None = checked(above=0)  # alarm: perplexity above this x unedited


@dataclass
class EvalConfig:
    """General ability through lm-evaluation-harness: which tasks, how often (conf/eval/)."""

    name: str = MISSING  # the suite's name (conf/eval/NAME.yaml)
    tasks: list[str] = MISSING  # lm-eval tasks; [] (eval=none): no general-ability figures
    every_edits: int = checked(0, low=0)  # every this many edits (0: before and after only)
    limit: int | None = checked(None, low=1)  # documents per task (MMLU: per subject); None: all
    limits: dict[str, int] = field(default_factory=dict)  # per task, over limit
    # the documents a limit keeps: seeded (by the run's seed) or first (lm-eval's --limit)
    sample: str = checked("seeded", choices=("seeded", "first"))
    # local: the installed data packages where they hold the task; hub: the Hugging Face hub
    source: str = checked("local", choices=("local", "hub"))
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # over generating tasks' own
    num_fewshot: int | None = None  # few-shot examples per task; None: each task's own
    fewshot: dict[str, int] = field(default_factory=dict)  # per task, over num_fewshot
    lm_batch_size: int = checked(8, low=1)  # a pass holds at most this x 2,048 tokens
    # continuation: the LM head only where lm-eval reads it; all: lm-eval's own path
    logits: str = checked("continuation", choices=("continuation", "all"))
    compute_dtype: str = checked("float32", choices=DTYPES)  # of lm-eval's forward passes
    # of attention in those passes: float32 (the more exact) or bfloat16 (needs compute_dtype
    # bfloat16; faster on CPUs with AMX, docs/benchmarks.md section 5)
    attention_dtype: str = checked("float32", choices=DTYPES)
    # memory for the states below the edited layers that later points replay (unedited_blocks)
    kept_states_mb: int = checked(1024, low=0)
    strict: bool = False  # a task that fails stops the run (else: its line, the others go on)
    allow_code_execution: bool = False  # the code tasks run the model's code (HumanEval, MBPP)
    data_dir: str | None = None  # a datasets cache holding the tasks' data (offline clusters)
    paper_glue_dir: str | None = None  # AlphaEdit's glue_eval/dataset files (eval=paper_glue)


@dataclass
class LoggerConfig:
    _target_: str = MISSING
    name: str = MISSING  # wandb | none


@dataclass
class WandbConfig(LoggerConfig):
    _target_: str = "rlsedit_cli.loggers.wandb.WandbLogger"
    name: str = "wandb"
    mode: str = "offline"  # offline | online | disabled
    project: str = "rlsedit"  # the W&B project
    entity: str | None = None  # the W&B team or user; None: the default
    group: str | None = None  # groups a sweep's runs in W&B
    tags: list[str] = field(default_factory=list)  # W&B tags
    init_timeout: float = 60.0  # seconds to reach W&B online before it logs offline instead


@dataclass
class NoLoggerConfig(LoggerConfig):
    _target_: str = "rlsedit_cli.loggers.base.Tracker"
    name: str = "none"


@dataclass
class PathsConfig:
    output_dir: str = MISSING  # where new run folders go
    cache: str = MISSING  # anchor statistics, de-quantised models, the toy bundle
    run_dir: str | None = "${hydra:runtime.output_dir}"  # None when printing with --cfg


@dataclass
class CheckpointConfig:
    every: int = checked(low=0)  # batches between checkpoints (0: off)


@dataclass
class SpeedConfig:
    """A speed preset (conf/speed/NAME.yaml): the settings that trade exactness for time, read
    by the target settings (conf/target, ROME's) and the measure section through interpolation."""

    name: str = MISSING  # faithful | long_stream | fastest
    target_dtype: str = checked(choices=DTYPES)  # editor.target.compute_dtype
    stop_when_top1: bool = MISSING  # editor.target.stop_when_top1 (ENCORE's stop)
    stop_below_nll: float | None = MISSING  # editor.target.stop_below_nll
    keys_dtype: str = checked(choices=DTYPES)  # editor.target.keys_dtype
    target_lr: float | None = MISSING  # editor.target.lr of MEMIT, AlphaEdit, RLSEdit (None: model)
    measure_dtype: str = checked(choices=DTYPES)  # measure.compute_dtype
    fluency_records: int | None = MISSING  # measure.fluency_records
    fluency_at: str = MISSING  # measure.fluency_at
    generated_at: str = MISSING  # measure.generated_at
    # work skipped or done cheaper, figures unchanged (within float rounding): all, or a list of
    # target_loss, replayed_blocks, shared_prompts, unedited_blocks, lowered_weights,
    # float32_attention, grouped_attention, gqa_passthrough ([]: the plain path everywhere;
    # accel/__init__.py)
    accelerations: list[str] = field(default_factory=lambda: ["all"])


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    editor: Any = MISSING
    dataset: Any = MISSING
    eval: Any = MISSING
    logger: Any = MISSING
    stream: StreamConfig = field(default_factory=StreamConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    seed: int = MISSING  # of everything sampled: templates, texts, document subsets
    resume: str | None = None  # a run folder to continue from its last checkpoint
    resume_jobs: bool = MISSING  # a sweep run again in its hydra.sweep.dir continues its jobs
    overwrite: bool = MISSING  # replace the earlier run in hydra.run.dir (else refused)
    experiment: str | None = None  # name of the experiment preset, set by conf/experiment files
    speed: SpeedConfig = field(default_factory=lambda: SpeedConfig())
    # what a sweep maximises: hmean (of efficacy, generalization, specificity) or any summary
    # metric (efficacy, fluency, ...)
    objective: str = MISSING
