"""UltraEdit (XiaojieGu/UltraEdit, editor/ultraedit.py): lifelong editing with no per-request
optimisation.

Per batch, as its ``sequential_valid`` edits: the requests sorted by length (longest first), in
passes of ``pass_size`` (its dataset.batch_size); each pass one forward and backward of the
current model, teacher-forced, the mean cross-entropy over the pass's answer tokens; at every
edited map and every position that predicts an answer token its input k and the gradient g of
that loss with respect to its output (util.py's Tracer, token "ans"). The normaliser of each
weight shape takes every pass's [k, g] of every map of that shape; then each map gets
Delta = (K^T K + I)^{-1} K^T V, V = -lr ||k^||^2 g^ (ops/ultraedit.py), all maps written
together after the batch. The input is the prompt (its special prefix included) followed by
the answer " target_new" but its last token (data/zsre.py's tok_tuples); the reference has no
CounterFact reader, so the rewrite prompt with its subject is the prompt here.
"""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editors.base import Editor, MasterWeights
from rlsedit_cli.errors import ConfigError, NumericalError
from rlsedit_cli.models.handle import ModelHandle
from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad
from rlsedit_cli.ops.ultraedit import (
    Normaliser,
    normaliser_update,
    ultraedit_delta,
    ultraedit_values,
)
from rlsedit_cli.progress import PhaseClock


def answer_tokens(handle: ModelHandle, request: Record) -> tuple[list[int], list[int]]:
    """The input (prompt, then the answer but its last token) and its labels: at each position
    the next token where that is an answer token, else -100."""
    prompt = encode_prompt(handle.tok, request.rewrite_prompt)
    answer = encode_target(handle.tok, request.target_new)
    return prompt + answer[:-1], [-100] * (len(prompt) - 1) + answer


def answer_rows(handle: ModelHandle, rows: list[tuple[list[int], list[int]]],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids and mask (N, T), right-padded, and labels (N, T) of :func:`answer_tokens`."""
    ids, mask = pad([r for r, _ in rows], handle.tok.pad_token_id, device=handle.device)
    labels, _ = pad([lab for _, lab in rows], -100, device=handle.device)
    return ids, mask, labels


class UltraEdit(Editor):
    def __init__(self, handle, anchor=None, *, name: str = "ultraedit", gate: list[int] = (),
                 up: list[int] = (), down: list[int] = (), lr: float, pass_size: int) -> None:
        del anchor  # UltraEdit keeps no anchor statistics
        modules = {"gate": list(gate), "up": list(up), "down": list(down)}
        if not any(modules.values()):
            raise ConfigError("editor.gate, editor.up and editor.down are all empty: give "
                              "UltraEdit at least one map, e.g. editor.up=[5,6]")
        self.handle, self.name = handle, name
        self.lr, self.pass_size = float(lr), int(pass_size)
        self.maps = [handle.mlp_map(kind, layer) for kind, layers in modules.items()
                     for layer in layers]
        for kind, layers in modules.items():
            if len(set(layers)) < len(layers):
                raise ConfigError(f"editor.{kind}={layers} names a layer twice")
        self.master = MasterWeights(handle)
        self.normalisers: dict[str, Normaliser] = {}
        self._written: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def edited_layers(self) -> list[str]:
        return list(self.maps)

    def _shape(self, name: str) -> str:
        d_out, d_in = self.handle.weight_shape(name)
        return f"{d_in}x{d_out}"

    def gradients(self, rows: list[tuple[list[int], list[int]]]) -> tuple[dict, dict, float]:
        """One teacher-forced pass over :func:`answer_tokens` rows: per map its inputs
        K (m, d_in) and output gradients G (m, d_out) at the answer positions (float32), and
        the pass's loss."""
        ids, mask, labels = answer_rows(self.handle, rows)
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name: str):
            def hook(module, args, output):
                seen[name] = (args[0], output)
            return hook

        modules = {name: self.handle.edited_module(name) for name in self.maps}
        hooks = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
        weights = [m.weight for m in modules.values()]
        try:
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad():
                logits = self.handle.model(input_ids=ids, attention_mask=mask).logits
                picked = labels != -100  # (N, T)
                loss = torch.nn.functional.cross_entropy(logits[picked].float(), labels[picked])
                outputs = [seen[name][1] for name in self.maps]
                grads = torch.autograd.grad(loss, outputs)
        finally:
            for h in hooks:
                h.remove()
            for w in weights:
                w.requires_grad_(False)
        K = {name: seen[name][0].detach()[picked.to(seen[name][0].device)].float()
             for name in self.maps}
        G = {name: g[picked.to(g.device)].float() for name, g in zip(self.maps, grads)}
        return K, G, float(loss.detach())

    def edit(self, batch: list[Record]) -> dict[str, float]:
        clock = PhaseClock(self.handle.device)
        ordered = sorted((answer_tokens(self.handle, r) for r in batch),
                         key=lambda row: len(row[0]), reverse=True)  # stable, as sorted()
        keys = {name: [] for name in self.maps}
        grads = {name: [] for name in self.maps}
        losses = []
        for start in range(0, len(ordered), self.pass_size):
            with clock("gradients"):
                K, G, loss = self.gradients(ordered[start:start + self.pass_size])
            losses.append(loss)
            with clock("update"):
                for name in self.maps:
                    if not (torch.isfinite(K[name]).all() and torch.isfinite(G[name]).all()):
                        raise NumericalError(f"UltraEdit's keys or gradients at {name} are not "
                                             "finite: the model's outputs overflowed; lower "
                                             "editor.lr or edit fewer maps")
                    shape = self._shape(name)
                    state = self.normalisers.get(shape) or Normaliser.empty(
                        K[name].shape[1] + G[name].shape[1], K[name].device)
                    rows = torch.cat([K[name], G[name]], -1).to(state.mean.device)
                    self.normalisers[shape] = normaliser_update(state, rows)  # one per shape,
                    # on the device of the first map of that shape (maps may sit on several)
                    keys[name].append(K[name])
                    grads[name].append(G[name])
        stats = {"ultraedit_loss": sum(losses) / len(losses)}
        self._written = {}
        with clock("update"):
            deltas = {}
            for name in self.maps:
                state = self.normalisers[self._shape(name)]
                K = torch.cat(keys[name]).to(state.mean.device)  # (n, d_in)
                G = torch.cat(grads[name]).to(state.mean.device)  # (n, d_out)
                V = ultraedit_values(state, K, G, self.lr)
                deltas[name] = ultraedit_delta(K, V)  # (d_in, d_out)
                W = self.master.now(name)  # (d_out, d_in), before this batch
                self._written[name] = (K.T, W @ K.T.to(W.device) + V.T.to(W.device))
            for name, delta in deltas.items():
                self.master.add(name, delta.T)
                label = self.handle.map_label(name)
                stats[f"{label}/update_norm"] = float(delta.norm())
        stats["ultraedit_rows"] = float(sum(len(k) for k in keys[self.maps[0]]))
        return stats | clock.seconds()

    def written(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self._written

    def state_dict(self) -> dict:
        return {"normalisers": {shape: s.state_dict() for shape, s in self.normalisers.items()},
                "master": self.master.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        device = self.handle.weight(self.maps[0]).device
        self.normalisers = {shape: Normaliser(**{k: v.to(device) for k, v in s.items()})
                            for shape, s in state.get("normalisers", {}).items()}
        self.master.load_state_dict(state.get("master"))
