"""Score only the labelled positions on CPU, where TRL's fused LM head scores every one.

TRL's SFT and DPO trainers patch the model's ``forward`` with a fused LM head
(``fused_lm_head=True``: per-token log-probabilities without materializing the logits).
On CUDA it projects only the positions that carry a label. Elsewhere it projects every
position of the batch, in fp32 vocabulary tiles, and the backward projects them all again.
In agent trajectories most positions are prompt, tool descriptions and observations,
which carry no loss: on a 1.2M-parameter controller trained on CPU that projection was
about a third of every step.

:func:`score_labelled_only` wraps the patched ``forward``: off CUDA/XPU it runs the
backbone, projects only the positions whose next-token label is set (a few hundred of a
batch's thousands, so the logits are small) and returns the same output fields. Anything
it does not handle (a temperature other than 1, logit soft-capping or scaling, MoE router
losses) goes to TRL's head unchanged, as does everything on CUDA/XPU.
"""

from __future__ import annotations

import functools
import types
from typing import Any

_SCALED = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
"""Text-config fields that change the logits after the projection (handled by TRL only)."""


def score_labelled_only_in(trainer: Any) -> int:
    """Apply :func:`score_labelled_only` to a TRL trainer's patched models; how many it wrapped."""
    from peft import PeftModel

    model = trainer.model
    models = [model.get_base_model() if isinstance(model, PeftModel) else model]
    if getattr(trainer, "ref_model", None) is not None:
        models.append(trainer.ref_model)
    return sum(score_labelled_only(m) for m in models)


def score_labelled_only(model: Any) -> bool:
    """Wrap ``model``'s TRL fused forward (see the module docstring); False if not patched.

    ``model`` is the module TRL patched: the trainer's model, or the base model under PEFT.
    The wrapper assumes TRL's default temperature of 1, which its SFT and DPO trainers use.
    """
    fused = model.__dict__.get("forward")
    if fused is None or getattr(fused, "_tracetune_compact", False):
        return False
    text_config = model.config.get_text_config()
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _SCALED):
        return False

    def forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: Any = None,
        shift_labels: Any = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        head = self.get_output_embeddings()
        moe = kwargs.get("output_router_logits") or getattr(
            text_config, "output_router_logits", False
        )
        if not fused_lm_head or head.weight.device.type in ("cuda", "xpu") or moe:
            return fused(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        return _scored(head, hidden, labels, num_items_in_batch)

    # The model's own signature, as TRL keeps it: `generate` checks its kwargs against it.
    forward = functools.wraps(type(model).forward)(forward)
    forward._tracetune_compact = True  # type: ignore[attr-defined]
    model.forward = types.MethodType(forward, model)
    return True


def _scored(head: Any, hidden: Any, labels: Any, num_items_in_batch: Any) -> Any:
    """TRL's fused-head output fields, from the logits of the labelled positions only."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    mask = labels != -100
    targets = labels[mask]
    logits = head(hidden[mask]).float()
    log_probs_all = torch.log_softmax(logits, dim=-1)
    token = log_probs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = log_probs_all.exp()
    entropy = -(probs * log_probs_all).sum(-1)
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * log_probs_all, dim=-1)
        mean_logits = logits.mean(-1)
        top1 = logits.argmax(-1) == targets

    def spread(values: Any) -> Any:
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = spread(token)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=spread(entropy),
        log_sum_sq_probs=spread(log_sum_sq),
        mean_logits=spread(mean_logits),
        is_top1=spread(top1),
        label_mask=mask,
    )
