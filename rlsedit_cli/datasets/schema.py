"""Types of each dataset's config (conf/dataset/*.yaml holds the values); light, as
editors/schema.py."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rlsedit_cli.settings import DatasetConfig


@dataclass
class CounterFactConfig(DatasetConfig):
    url: str = MISSING  # used when path is null
    snippets: str | None = MISSING  # attribute_snippets.json (null: download, "none": skip)
    idf: str | None = MISSING  # idf.npy
    vocab: str | None = MISSING  # tfidf_vocab.json
    cache: str = MISSING  # where downloaded files are kept


@dataclass
class CounterFactEasyEditConfig(DatasetConfig):
    pass


@dataclass
class ZsREConfig(DatasetConfig):
    pass


@dataclass
class ToyConfig(DatasetConfig):
    num_subjects: int | None = MISSING  # a world of another size (stress tests; facts unknown)
    world_seed: int = MISSING  # of a generated world of num_subjects


SCHEMAS = {"counterfact": CounterFactConfig, "counterfact_easyedit": CounterFactEasyEditConfig,
           "zsre": ZsREConfig, "toy": ToyConfig}
