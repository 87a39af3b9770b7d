"""FT-M: FT-L's loop (rlsedit_cli/editors/ft.py) on a teacher-forced loss, as EasyEdit's FT-M:
the target tokens are scored one after another after the prompt (token j at the position of
token j-1), not all at the prompt's last token."""

from __future__ import annotations

import torch

from rlsedit_cli.datasets.records import Record
from rlsedit_cli.editors.ft import FT
from rlsedit_cli.models.tokens import encode_prompt, encode_target, pad


class FTM(FT):
    def loss(self, requests: list[Record]) -> torch.Tensor:
        """Mean over ``requests`` of the mean teacher-forced NLL of the target tokens."""
        tok = self.handle.tok
        seqs, spans = [], []
        for r in requests:
            p, t = encode_prompt(tok, r.rewrite_prompt), encode_target(tok, r.target_new)
            seqs.append(p + t)
            spans.append((len(p), len(t)))
        ids, mask = pad(seqs, tok.pad_token_id, device=self.handle.device)
        labels = torch.full_like(ids, -100)
        for i, (p_len, t_len) in enumerate(spans):
            labels[i, p_len : p_len + t_len] = ids[i, p_len : p_len + t_len]
        logits = self.handle.model(input_ids=ids, attention_mask=mask).logits
        logp = logits[:, :-1].float().log_softmax(-1)
        tgt = labels[:, 1:]
        nll = -logp.gather(2, tgt.clamp(min=0)[..., None])[..., 0] * (tgt >= 0)
        return (nll.sum(1) / (tgt >= 0).sum(1)).mean()
