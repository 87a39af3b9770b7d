"""Accelerations: work skipped or done cheaper than the plain path, none of it part of the
mathematics. Each one is switched by ``speed.accelerations`` (all of them by default; ``[]``: the
plain path everywhere), serves the devices named below (elsewhere the plain path runs), and has
a test holding it equal to the plain path (bit for bit where the same products run in the same
order, else within float rounding).

=================== ========= ============================================ =====================
name                devices   what it does (module)                        plain path
=================== ========= ============================================ =====================
target_loss         cpu, cuda the target step runs only what the deltas    one full forward of
                              change: prefixes once into a key/value cache every prompt per step
                              (a context template's shared tokens once per (editing/reference.py
                              chunk), blocks below z replayed, MLPs only   FullForwardLoss)
                              where the loss reads, one LM-head pass
                              (target_loss.py, prefix.py)
replayed_blocks     cpu, cuda a key read replays the blocks below the      a full pass per read
                              layers written since the last read
                              (editing/keys.py with prefix.py)
shared_prompts      cpu, cuda measuring: pairs that share a prompt run it   each pair run whole
                              once into a key/value cache, the LM head     (eval/scoring.py)
                              only where read (prefix.py read_states)
unedited_blocks     cpu, cuda general ability: a run's later points      every block at every
                              replay the blocks below the edited layers    point
                              from an earlier point's passes (lower.py;
                              memory: eval.kept_states_mb)
lowered_weights     cpu, cuda bfloat16 passes: frozen weights cast once     autocast casts them
                              for many passes (precision.py)               every pass
float32_attention   cpu       bfloat16 passes: attention on float32 inputs autocast's attention
                              (bfloat16 attention backward is several      (bfloat16 inputs)
                              times slower on the CPU; precision.py);
                              general-ability points follow the named
                              setting eval.attention_dtype instead
grouped_attention   cpu       the target step's short queries: two batched torch's SDPA kernel
                              products per key/value head group
                              (attention.py)
gqa_passthrough     cpu       grouped key/value heads handed to torch's    transformers repeats
                              SDPA as they are (attention.py)              them per query head
=================== ========= ============================================ =====================

transformers internals relied on: ``DynamicCache(kv pairs, config=)``, its ``layers[i].keys``/
``.values`` and ``batch_select_indices`` (prefix.py); a block's output being a tensor or a tuple
starting with the hidden states, and instance-level ``forward`` replacement (prefix.py); the
environment switch TRANSFORMERS_SDPA_FORCE_GQA read at every call (attention.py);
``scaled_dot_product_attention`` reached through torch's function dispatch (precision.py).
lm-eval's shared contexts are the eval settings' ``eval.logits=continuation`` (eval/lm.py).

Imports no torch: composing and checking a config reads :data:`ACCELERATIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlsedit_cli.errors import ConfigError

ACCELERATIONS: dict[str, tuple[str, ...]] = {  # name -> device types it serves
    "target_loss": ("cpu", "cuda"),
    "replayed_blocks": ("cpu", "cuda"),
    "shared_prompts": ("cpu", "cuda"),
    "unedited_blocks": ("cpu", "cuda"),
    "lowered_weights": ("cpu", "cuda"),
    "float32_attention": ("cpu",),
    "grouped_attention": ("cpu",),
    "gqa_passthrough": ("cpu",),
}


@dataclass(frozen=True)
class Accelerations:
    """Which accelerations a model's passes may take (a :class:`ModelHandle` carries one)."""

    names: frozenset[str] = field(default_factory=lambda: frozenset(ACCELERATIONS))

    @classmethod
    def parse(cls, names) -> Accelerations:
        """From ``speed.accelerations``: a list of names, "all" for every one, [] for none;
        an unknown name is a one-line :class:`ConfigError`."""
        if bad := [n for n in names if n != "all" and n not in ACCELERATIONS]:
            raise ConfigError(f"speed.accelerations names {bad[0]!r}: use all, [] or any of "
                              f"{', '.join(ACCELERATIONS)}")
        return cls(frozenset(ACCELERATIONS) if "all" in names else frozenset(names))

    def on(self, name: str, device) -> bool:
        """Whether ``name`` runs on ``device`` (a torch.device or its name)."""
        kind = getattr(device, "type", str(device).split(":")[0])
        return name in self.names and kind in ACCELERATIONS[name]
