"""rm: a reward model trained on preference pairs (LLaMA-Factory's stage rm).

The causal LM gets a value head (trainer/model/value_head.py); a sequence's score is the head's value at its last
token (the reply format's last: its stop token, or what the template writes after it, as LLaMA-Factory scores it), and a pair's loss is -log sigma(r_chosen - r_rejected) (Ouyang et al. 2022). The
pair's two sequences go through the model in the same padding-free forward as every other pair, and the head
computes no logits. Logged: accuracy (r_chosen > r_rejected) and margin (r_chosen - r_rejected), plus each side's
mean score; eval gives eval_accuracy over the whole eval set, as LLaMA-Factory's rm does.
"""

from __future__ import annotations

from trainer.stages.base import StageOutput, register
from trainer.stages.pairs import PairOptions, Pairwise


class WithValueHead:
    """A stage that trains a value head on the causal LM (rm's scorer, ppo's critic): `self.head`, written as
    value_head.safetensors with every save and read back on resume."""
    head = None
    head_role = "reward"  # what the saved head is (value_head.ROLES): the rm stage's scorer

    def attach_head(self, model):
        """The head of the model's last adapter or model folder if one holds it (an earlier rm run), else a new one."""
        from trainer.model import value_head

        m = self.config.model if self.config is not None else None
        adapters = m.adapters if m else []
        saved_in = [*reversed(adapters), m.model_name_or_path] if m is not None else []  # the last adapter's first
        self.head = value_head.attach(model, [p for p in saved_in if p])
        self.head.requires_grad_(self.config is None or self.config.training.do_train)
        return self.head

    def save_extra(self, folder: str, state_dict: dict | None) -> None:
        from trainer.model import value_head

        if self.head is not None:
            value_head.save(self.head, folder, state_dict, role=self.head_role)

    def load_extra(self, folder: str) -> None:
        import os

        from trainer.model import value_head

        path = os.path.join(folder, value_head.FILE)
        if self.head is not None and os.path.isfile(path):
            value_head.load_into(self.head, path)


def _freeze_unused_lm_head(model) -> None:
    """A reward model never computes logits, so an untied output head gets no gradient: left trainable (full
    fine-tuning) it would only make DDP stop at its unused-parameter check (find_unused_parameters is off, as it
    should be) and hold optimizer state for nothing. A head tied to the input embeddings is used and stays."""
    import logging

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embed is None or head.weight is embed.weight:
        return
    trained = [p for p in head.parameters() if p.requires_grad]
    if trained:
        for p in trained:
            p.requires_grad_(False)
        logging.getLogger(__name__).info("rm: the output head (lm_head, %d parameters) is frozen: a reward model "
                                         "computes no logits, so it would get no gradient.",
                                         sum(p.numel() for p in trained))


@register
class RM(WithValueHead, Pairwise):
    name = "rm"
    sequence_parallel = "rows"  # each sequence's last-token score: whole rows of token values (WholeRows)
    options = PairOptions

    def extend_model(self, model):
        model = super().extend_model(model)
        self.attach_head(model)
        _freeze_unused_lm_head(model)
        return model

    def compute(self, wrapper, model, batch: dict) -> StageOutput:
        import torch

        from trainer.model.preference_losses import reward_model

        values = wrapper.token_values(model, batch, self.head)
        last = batch["cu_seq_lens_q"][1:].to(values.device, torch.long) - 1  # each sequence's last token
        scores = values[0, last].float()
        chosen, rejected = scores[0::2], scores[1::2]
        losses = reward_model(chosen, rejected)
        one = torch.ones_like(losses)
        stats = {"loss": (losses.detach(), one),
                 "accuracy": ((chosen > rejected).to(losses.dtype), one),
                 "margin": ((chosen - rejected).detach(), one),
                 "scores/chosen": (chosen.detach(), one), "scores/rejected": (rejected.detach(), one)}
        return StageOutput(loss_sum=losses.sum(), items=one.sum(), stats=self.by_item(stats, batch),
                           head_tokens=one.new_zeros(()))
