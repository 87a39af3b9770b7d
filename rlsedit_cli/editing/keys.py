"""Keys of the edited map and current hidden states at the subject's last token
(docs/design.md section 4.3)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rlsedit_cli.accel.precision import compute_dtype
from rlsedit_cli.accel.prefix import replay_blocks
from rlsedit_cli.datasets.records import Record, fill
from rlsedit_cli.editing.inputs import build_rows, forward_until
from rlsedit_cli.models.handle import ModelHandle, block_hidden


def weighted_keys(keys: torch.Tensor, weights: list[float] | None) -> torch.Tensor:
    """(n, n_ctx, d_in) keys per template -> (d_in, n), their ``weights``-mean (None: alike)."""
    n_ctx = keys.shape[1]
    w = torch.tensor(weights if weights is not None else [1 / n_ctx] * n_ctx,
                     device=keys.device)  # (n_ctx,)
    return torch.einsum("ncd,c->dn", keys, w)


@torch.no_grad()
def template_keys_and_hidden(handle: ModelHandle, requests: list[Record], templates: list[str],
                             layer: int, z_layer: int, dtype: str = "float32",
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the key of every (request, template) pair, (n, n_ctx, d_in) float32,
    and h (n, d_model): the residual stream after block ``z_layer`` at the subject's last token
    of the plain prompt (``dtype``: of the pass's products)."""
    return LayerKeys(handle, requests, templates, z_layer, dtype).read_templates(layer)


def template_rows(handle: ModelHandle, requests: list[Record], templates: list[str]):
    """Rows of every (request, template) prompt, request-major."""
    return build_rows(handle, [(fill(ctx, r.prompt), r.subject, [], i)
                               for i, r in enumerate(requests) for ctx in templates])


class LayerKeys:
    """Keys and h of one batch, read layer after layer as the key-value editors read them:
    lowest layer first, each read after the layers below it were written.

    Blocks below the layer written since the last read are unchanged, and so are their outputs
    on the same rows: where ``replayed_blocks`` runs, a read replays them from the last pass
    (the output of the block below each read layer is kept) and computes only from the written
    layer up: the same numbers as a full pass, a fraction of its work (SmolLM2, layers 4-8:
    23 block passes instead of 45).
    """

    def __init__(self, handle: ModelHandle, requests: list[Record], templates: list[str],
                 z_layer: int, dtype: str = "float32") -> None:
        self.handle, self.z_layer, self.dtype = handle, z_layer, dtype  # dtype: of the products
        self.n, self.n_ctx = len(requests), len(templates)
        self.rows = template_rows(handle, requests, templates)
        self.below: tuple[int, object] | None = None  # (block, its output in the last pass)

    def read(self, layer: int, weights: list[float] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """K (d_in, n): ``layer``'s map input at the subject's last token, the ``weights``-mean
        over the templates (None: alike), and h (n, d_model): the residual stream after
        ``z_layer`` at the subject's last token of the plain prompt (the first template, "{}").
        Between two reads only ``layer``s of the earlier read (or above) may have been
        written."""
        keys, h = self.read_templates(layer)
        return weighted_keys(keys, weights), h

    @torch.no_grad()
    def read_templates(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys per (request, template) (n, n_ctx, d_in) and h (n, d_model), float32."""
        handle, rows, found = self.handle, self.rows, {}
        n_rows = len(rows.lookup)

        def at(x: torch.Tensor):  # (row, subject's last token) indices on x's device
            return torch.arange(n_rows, device=x.device), rows.lookup.to(x.device)

        def take_key(module, args):
            found["k"] = args[0][at(args[0])].float()  # (n * n_ctx, d_in)

        def take_hidden(module, args, output):
            hidden = block_hidden(output)
            found["h"] = hidden[at(hidden)].float()  # (n * n_ctx, d_model)

        def keep_below(module, args, output):
            found["below"] = output

        hooks = [(self.handle.edited_module(layer), "pre", take_key),
                 (self.handle.layer_module(self.z_layer), "post", take_hidden)]
        if layer > 0:
            hooks.append((self.handle.layer_module(layer - 1), "post", keep_below))
        replay = (self.below is not None and self.below[0] < layer
                  and handle.accel.on("replayed_blocks", handle.device))
        replayed = replay_blocks(handle, *self.below) if replay else nullcontext()
        with replayed, compute_dtype(handle, self.dtype):
            forward_until(handle, rows.inputs, max(layer, self.z_layer), hooks)
        self.below = (layer - 1, found["below"]) if layer > 0 else None
        h = found["h"].view(self.n, self.n_ctx, -1)[:, 0]  # (n, d_model)
        return found["k"].view(self.n, self.n_ctx, -1), h


@torch.no_grad()
def keys_of_layers(handle: ModelHandle, requests: list[Record], templates: list[str],
                   layers: list[int], weights: list[float] | None = None,
                   ) -> dict[int, torch.Tensor]:
    """Keys K (d_in, n) of several layers of an unchanging model, from one forward pass."""
    rows = template_rows(handle, requests, templates)
    n, found = len(requests), {}

    def take(layer):
        def hook(module, args):
            x = args[0]
            found[layer] = x[torch.arange(len(rows.lookup), device=x.device),
                             rows.lookup.to(x.device)].float().view(n, len(templates), -1)
        return hook

    forward_until(handle, rows.inputs, max(layers),
                  [(handle.edited_module(layer), "pre", take(layer)) for layer in layers])
    return {layer: weighted_keys(found[layer], weights) for layer in layers}
