"""Types of each editor's config (conf/editor/*.yaml holds the values).

Light on purpose: composing a config imports this module, never an editor's code (torch and
the editor are imported when the editor is built), so `rlsedit ls` and `--cfg job` stay fast
and one broken editor module cannot break another editor's config.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rlsedit_cli.settings import EditorConfig, TargetConfig, checked


@dataclass
class NoEditConfig(EditorConfig):
    pass


@dataclass
class RLSEditConfig(EditorConfig):
    layers: list[int] = MISSING  # the layers whose MLP output map is edited
    lam: float = checked(low=0)  # weight of ||W - W_0||^2
    mu: float = checked(low=0)  # weight of ||W K_0 - W_0 K_0||^2
    n_anchor: float = checked(low=0)  # K_0 K_0^T = n_anchor * E[k k^T]
    precision: str = checked(choices=("float32", "float64"))  # of P and the master weights
    reset_each_batch: bool = MISSING  # the published code's behaviour (P_0 every batch)
    target: TargetConfig = MISSING  # the target optimisation (editor.target)
    seed: int = MISSING  # of the context templates' sampling


@dataclass
class MEMITConfig(EditorConfig):
    layers: list[int] = MISSING  # the layers whose MLP output map is edited
    n_anchor: float = checked(low=0)  # MEMIT's mom2_update_weight
    target: TargetConfig = MISSING  # the target optimisation (editor.target)
    seed: int = MISSING  # of the context templates' sampling


@dataclass
class AlphaEditConfig(EditorConfig):
    layers: list[int] = MISSING  # the layers whose MLP output map is edited
    threshold: float = checked(above=0)  # eigenvalues of C below it span the null space
    l2: float = checked(low=0)  # AlphaEdit's L2 term on the update
    target: TargetConfig = MISSING  # the target optimisation (editor.target)
    seed: int = MISSING  # of the context templates' sampling


@dataclass
class ROMEConfig(EditorConfig):
    layer: int = MISSING  # the layer whose MLP output map is edited
    target: TargetConfig = MISSING  # the target optimisation (editor.target)
    seed: int = MISSING  # of the context templates' sampling
    mom2_adjustment: bool = MISSING  # the write's direction is C^-1 k (true) or k (false)


@dataclass
class FTConfig(EditorConfig):
    layer: int = MISSING  # the layer whose MLP output map is fine-tuned
    steps: int = checked(low=1)  # epochs over the batch at most
    lr: float = checked(above=0)  # Adam's step size
    norm_constraint: float | None = checked(above=0)  # L-inf bound on each weight's change
    batch_size: int = checked(low=1)  # requests per optimiser step
    weight_decay: float = checked(low=0)  # Adam's


@dataclass
class UltraEditConfig(EditorConfig):
    gate: list[int] = MISSING  # layers whose MLP gate map is edited (model.mlp_maps)
    up: list[int] = MISSING  # ... whose up map (GPT-2's c_fc, GPT-J's fc_in)
    down: list[int] = MISSING  # ... whose down map (the key-value editors' map)
    lr: float = checked(above=0)  # v = -lr ||k^||^2 g^
    pass_size: int = checked(low=1)  # requests per forward/backward pass (its batch_size)


SCHEMAS = {"none": NoEditConfig, "rlsedit": RLSEditConfig, "memit": MEMITConfig,
           "alphaedit": AlphaEditConfig, "rome": ROMEConfig, "ft": FTConfig, "ft_m": FTConfig,
           "ultraedit": UltraEditConfig}
