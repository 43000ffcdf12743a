"""``SelfDistillTrainer``: a ``transformers.Trainer`` for a multi-exit model and the "Be Your Own Teacher" loss.

The trained module is a :class:`~bitdistill.selfdistill.loss.SelfDistillModel` (exits + hint bottlenecks),
or the plain causal LM for ``exit_variant="none"`` (plain next-token cross-entropy). Everything else
(accelerate/DDP, accumulation, checkpoints and resuming, logging) is the Trainer's.

Logging. Each logging step adds the running mean of every exit's CE (``train_ce_<exit>``) and, when
present, its KL and hint terms. Each evaluation reports, per exit, the mean CE on the held-out blocks
(``<prefix>_loss_<exit>``) and the strided perplexity of the evaluation text (``<prefix>_nll_<exit>``,
``<prefix>_perplexity_<exit>``). Exits are named by the block after which they sit (``block3``); the
concatenation classifier is ``concat``. Plain models are evaluated through their own norm and head after
every block (the "logit lens"), so every run reports the same columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from bitdistill.errors import UserError
from bitdistill.eval.perplexity import strided_perplexities
from bitdistill.runs import RunTrainer
from bitdistill.selfdistill.exits import MultiExitLM
from bitdistill.selfdistill.loss import SelfDistillModel
from bitdistill.state_dict import unique_tensors

__all__ = ["SelfDistillTrainer", "exit_names", "unique_tensors"]


def exit_names(exit_layers: list[int]) -> list[str]:
    """Names of exits from their block indices (``-1``: the concatenation classifier)."""
    return ["concat" if b < 0 else f"block{b}" for b in exit_layers]


class SelfDistillTrainer(RunTrainer):
    """Trainer of a :class:`SelfDistillModel` (or a plain causal LM, trained on next-token CE).

    Args:
        eval_exit_layers: for a plain causal LM, the blocks evaluated through its head (default all).
        **kwargs: :class:`~bitdistill.runs.RunTrainer` arguments (per-exit perplexity settings, ``validation_dataset``:
            held-out blocks for the per-exit eval loss) and ``transformers.Trainer`` ones.
    """

    PART_PREFIX = "train_"
    PARTS_PER_STEP = False  # each exit's terms are micro-batch means

    def __init__(self, *, eval_exit_layers: list[int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eval_exit_layers = eval_exit_layers
        # compute_loss returns a per-micro-batch mean: the Trainer must divide it by the accumulation steps, which it
        # does when the model does not "accept loss kwargs" (the public switch from transformers 4.46 to today)
        self.model_accepts_loss_kwargs = False

    def _multi_exit(self) -> MultiExitLM:
        model = self.accelerator.unwrap_model(self.model)
        return model.multi_exit if isinstance(model, SelfDistillModel) else MultiExitLM(model, self.eval_exit_layers, "shared")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
        if isinstance(self.accelerator.unwrap_model(model), SelfDistillModel):
            loss, parts, out = model(input_ids, attention_mask, labels)
            names = exit_names(out.exit_layers)
            named = {}
            for key, value in parts.items():
                kind, index = key.split("_")
                named[f"{kind}_{names[int(index)]}"] = value
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            blocks = self.accelerator.unwrap_model(model).config.num_hidden_layers
            named = {f"ce_block{blocks - 1}": loss.detach()}
        if model.training:
            self.record_parts(named)
        return (loss, out) if return_outputs else loss

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-exit mean CE on the held-out blocks and per-exit strided perplexity of the evaluation text."""
        mx = self._multi_exit()
        names = exit_names(mx.output_layers)
        metrics: dict[str, float] = {}
        dataset = eval_dataset or self.validation_dataset
        was_training = mx.model.training
        mx.eval()
        try:
            if dataset is not None:
                sums, count = None, 0
                # every process scores all held-out blocks (no sharding), so every process logs the same value
                loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size)
                for batch in loader:
                    ids = batch["input_ids"].to(self.args.device)
                    out = mx(ids)
                    ces = [F.cross_entropy(z[:, :-1].float().reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum").item() for z in out.logits]
                    sums = ces if sums is None else [a + b for a, b in zip(sums, ces, strict=True)]
                    count += ids[:, 1:].numel()
                if sums is None:
                    raise UserError("the held-out validation set is empty; pass --validation_blocks N > 0 or none")
                metrics.update({f"{metric_key_prefix}_loss_{n}": s / count for n, s in zip(names, sums, strict=True)})
            if self.perplexity_ids is not None:
                results = strided_perplexities(lambda ids: mx(ids).logits, mx, self.perplexity_ids,
                                               **self.perplexity_settings)
                for n, r in zip(names, results, strict=True):
                    metrics[f"{metric_key_prefix}_nll_{n}"] = r.nll
                    metrics[f"{metric_key_prefix}_perplexity_{n}"] = r.perplexity
                metrics[f"{metric_key_prefix}_tokens"] = results[0].num_tokens
        finally:
            mx.train(was_training)
        if metrics:
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoint weights; tensors shared by several names (tied embeddings, shared heads) are written once."""
        if state_dict is None and not isinstance(self.model, PreTrainedModel):
            state_dict = unique_tensors(self.accelerator.unwrap_model(self.model).state_dict())
        super()._save(output_dir, state_dict)

    def _issue_warnings_after_load(self, load_result) -> None:
        """A resumed checkpoint lacks only the aliases :meth:`_save` left out; anything else is an error."""
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PreTrainedModel):
            return super()._issue_warnings_after_load(load_result)
        full = model.state_dict()
        aliases = set(full) - set(unique_tensors(full))
        missing = set(load_result.missing_keys) - aliases
        if missing or load_result.unexpected_keys:
            raise UserError(f"the checkpoint does not match the model: missing {sorted(missing)}, "
                            f"unexpected {sorted(load_result.unexpected_keys)}")
