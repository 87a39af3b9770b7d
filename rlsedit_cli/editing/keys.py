"""Keys of the edited map and current hidden states at the subject's last token
(docs/design.md section 4.3)."""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editing.inputs import build_rows, forward_until
from rlsedit_cli.models.handle import ModelHandle, block_hidden


@torch.no_grad()
def keys_and_hidden(handle: ModelHandle, requests: list[Record], templates: list[str],
                    layer: int, z_layer: int, weights: list[float] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of ``layer``'s edited map and the residual stream after ``z_layer``.

    Args:
        weights: of each template's key (summing to 1; :func:`template_weights`); None: alike.

    Returns:
        K: the map's input at the subject's last token, a weighted mean over the context
            templates. (d_in, n) float32
        h: the residual stream after block ``z_layer`` at the subject's last token of the plain
            prompt (the first template, "{}"). (n, d_model) float32
    """
    keys, h = template_keys_and_hidden(handle, requests, templates, layer, z_layer)
    return weighted_keys(keys, weights), h


def weighted_keys(keys: torch.Tensor, weights: list[float] | None) -> torch.Tensor:
    """(n, n_ctx, d_in) keys per template -> (d_in, n), their ``weights``-mean (None: alike)."""
    n_ctx = keys.shape[1]
    w = torch.tensor(weights if weights is not None else [1 / n_ctx] * n_ctx,
                     device=keys.device)  # (n_ctx,)
    return torch.einsum("ncd,c->dn", keys, w)


@torch.no_grad()
def template_keys_and_hidden(handle: ModelHandle, requests: list[Record], templates: list[str],
                             layer: int, z_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the key of every (request, template) pair, (n, n_ctx, d_in) float32,
    and h as in :func:`keys_and_hidden`."""
    n, n_ctx = len(requests), len(templates)
    items = [(ctx.format(r.prompt), r.subject, [], i)
             for i, r in enumerate(requests) for ctx in templates]
    rows = build_rows(handle, items)
    found: dict[str, torch.Tensor] = {}

    def at(x: torch.Tensor):  # (row, subject's last token) indices on x's device
        return torch.arange(len(items), device=x.device), rows.lookup.to(x.device)

    def take_key(module, args):
        found["k"] = args[0][at(args[0])].float()  # (n * n_ctx, d_in)

    def take_hidden(module, args, output):
        hidden = block_hidden(output)
        found["h"] = hidden[at(hidden)].float()  # (n * n_ctx, d_model)

    forward_until(handle, rows.inputs, max(layer, z_layer),
                  [(handle.edited_module(layer), "pre", take_key),
                   (handle.layer_module(z_layer), "post", take_hidden)])
    h = found["h"].view(n, n_ctx, -1)[:, 0]  # (n, d_model)
    return found["k"].view(n, n_ctx, -1), h
