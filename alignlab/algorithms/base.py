"""What every alignment LightningModule shares: hyper-parameters, the frozen reference, optimisation,
logging, held-out exact match and export.

A subclass's hyper-parameters are the keys of the conf/algorithm/ file whose `_target_` names it (or
names its nearest base class), with their defaults and comments: written there once, they become
attributes of the module. A subclass says whether it needs a reference model, and implements
`compute(batch) -> (loss, metrics)`; metrics use the field's names and are logged as `train/<name>`
and `eval/<name>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from alignlab.algorithms.reference_scoring import ReferenceScoring
from alignlab.data.vision import select_vision
from alignlab.errors import ConfigError, NonFiniteLossError
from alignlab.models.export import save_model, submodule_state
from alignlab.models.logprobs import architecture, check_answer_logprobs, score_by_forward, scoring_rows
from alignlab.models.modes import disable_dropout
from alignlab.models.reference import ReferenceModel
from alignlab.online.generation import answer_texts, cut_at_stop, exact_match, generate, stop_token_ids
from alignlab.runner import preflight
from alignlab.runner.checks import Checks
from alignlab.runner.resume import rng_state, set_rng_state

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def config_default(key: str) -> Any:
    """The value conf/train.yaml gives a dotted `key`: the one place a default is written, read also by
    modules built without that part of the config (as tests build them). Raises KeyError if it has none."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(preflight.CONFIG_DIR / "train.yaml"), key)
    if value is None:
        raise KeyError(f"conf/train.yaml sets no {key}")
    return value


# Greedy answers' length for a module built without an `evaluation` config.
MAX_NEW_TOKENS: int = config_default("evaluation.max_new_tokens")

# The headline metrics the console's progress shows (prog_bar=True; alignlab.runner.console): the loss and
# each family's own (preference pairs, KTO, RM, SFT, GRPO, PPO; exact_match at validation).
PROGRESS_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "accuracy",
    "mean_token_accuracy",
    "reward",
    "objective/scores",
    "exact_match",
)


class AlignmentModule(L.LightningModule):
    """Base of every algorithm's LightningModule. A subclass defines:

    - its hyper-parameters: the keys of the conf/algorithm/<name>.yaml whose `_target_` names it (they
      become attributes; `hparam_names`), and the class attributes below that apply (`uses_reference`,
      `generates`, `trains_on_images`, `counters`, `reference_folder`, `step_sums`);
    - `compute(batch) -> (loss, metrics)`: the loss of a batch of rows (the step's mean by `step_count`,
      so a step is the same however it is cut) and metrics under the field's names, logged as
      `train/<name>` and `eval/<name>`; or, training itself (online algorithms: OnlineModule),
      `training_step` and `validation_step`;
    - where its keys need more than their YAML types: `check_config(algorithm)`, `check_run(cfg)`
      (settings across config groups) and `check_rows(algorithm, datamodule)`, which raise before any
      model loads, naming the key or row.
    """

    uses_reference: bool = False  # hold a frozen copy of the starting policy (or its disabled adapter)
    generates: bool = True  # a policy that answers prompts (so held-out exact match applies)
    trains_on_images: bool = True  # vision-language rows are handled (PPO's value model: not yet)
    # Every conf/algorithm file sets it (TRL's name and defaults): the policy's dropout probabilities set to 0.
    disable_dropout: bool = False
    # Plain attributes a resumed run must continue from (e.g. PPO's episode count), saved in checkpoints.
    counters: tuple[str, ...] = ()
    # Offline algorithms with a reference make this a hyper-parameter: score every row once (configure_callbacks).
    precompute_ref_log_probs: bool = False
    # The answer-only log-prob path has been compared with the model's own forward (see check_logprobs).
    logprobs_checked: bool = False
    # A folder holding the reference model (PPO's ref_model); None: the starting policy (see ReferenceModel.of).
    reference_folder: str | None = None

    def __init__(self, model: torch.nn.Module, tokenizer: Any, optim: dict, evaluation: dict | None = None, **hparams):
        super().__init__()
        names = self.hparam_names()
        missing, unknown = set(names) - hparams.keys(), hparams.keys() - set(names)
        if missing or unknown:
            raise TypeError(
                f"{type(self).__name__} takes hyper-parameters {names}; "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        for name, value in hparams.items():
            setattr(self, name, value)
        if self.disable_dropout:
            disable_dropout(model)
        self.model = model
        self.tokenizer = tokenizer
        self.optim = dict(optim)
        self.evaluation = dict(evaluation or {})
        self.reference = ReferenceModel.of(model, self.reference_folder) if self.uses_reference else None
        # Models outside the module tree that must follow it to the device (reference, reward model).
        self.frozen: list = [self.reference] if self.reference is not None else []
        self._step_sums: dict = {}  # train metrics over the step's micro-batches so far (see _over_step)
        self.save_hyperparameters(ignore=["model", "tokenizer"])

    @classmethod
    def hparam_names(cls) -> tuple[str, ...]:
        """The keys of conf/algorithm/<name>.yaml whose `_target_` is this class, or else its nearest
        base class's (a subclass given as `algorithm._target_` takes its parent's); () for a class no
        file builds. The constructor takes exactly these, and alignlab.runner.config refuses others."""
        targets = preflight.algorithm_targets()
        for klass in cls.__mro__:
            name = targets.get(f"{klass.__module__}.{klass.__qualname__}")
            if name is not None:
                return tuple(preflight.algorithm_hparams(name))
        return ()

    # -- config checks, run before any model loads -----------------------------------------
    @classmethod
    def check_config(cls, algorithm: DictConfig) -> None:
        """Raise ConfigError naming the key when a hyper-parameter is out of range."""

    @classmethod
    def check_run(cls, cfg: DictConfig) -> None:
        """Raise ConfigError for settings that must agree across groups (e.g. batch sizes)."""

    @classmethod
    def check_rows(cls, algorithm: DictConfig, datamodule) -> None:
        """Raise DataError for data rows this algorithm cannot use that the rows alone show (e.g. a column a
        reward function needs), after the DataModule has read them and before any model loads."""

    @staticmethod
    def check_optim(optim: DictConfig) -> None:
        Checks(optim, "optim").positive("lr").non_negative("weight_decay", "warmup_steps").one_of(
            "scheduler", SCHEDULERS
        )

    # -- modes: the policy trains in training mode; frozen models stay in eval mode --------------
    def on_fit_start(self) -> None:
        """Training mode for everything in the module tree (the policy, PPO's value model), as TRL's
        trainers run: `from_pretrained` returns a model in eval mode, and Lightning keeps each submodule's
        mode, so without this dropout never applies and transformers' gradient checkpointing (applied
        only in training mode) saves nothing. Validation runs in eval mode and returns to this (Lightning's
        evaluation loop). The reference and reward models live outside the tree, in eval mode, and
        Lightning does not move them: this moves them to the module's device."""
        self.train()
        for model in self.frozen:
            model.to(self.device)

    def on_fit_end(self) -> None:
        """Eval mode again, as `from_pretrained` gives a model: what runs on the trained policy after
        fitting (exact match, exports, a later validate) sees no dropout."""
        self.eval()

    def on_validation_start(self) -> None:
        for model in self.frozen:
            model.to(self.device)

    # -- reference log-probs computed once (alignlab.algorithms.reference_scoring) --------------
    def configure_callbacks(self) -> list[L.Callback]:
        """ReferenceScoring with precompute_ref_log_probs, so that every trainer fitting this module
        scores the rows once before the first step, without a callback in its config."""
        return [ReferenceScoring()] if self.precompute_ref_log_probs else []

    def score_reference(self, batch: dict) -> dict[str, torch.Tensor]:
        """The reference's per-row values for a batch ({name: [rows] tensor}), by the names batches
        carry once the DataModule holds them."""
        raise NotImplementedError(f"{type(self).__name__} has no reference values to cache")

    def release_reference(self) -> None:
        """Let a reference copy go once batches carry its values: it is not needed again (a disabled
        adapter costs no memory, so it stays)."""
        if self.reference is not None and self.reference.copy is not None:
            self.frozen = [m for m in self.frozen if m is not self.reference]
            self.reference = None

    # -- log-probs: the answer-only path checked against the model's own forward, once per run ----
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.check_logprobs(batch)

    @torch.no_grad()
    def check_logprobs(self, batch: dict) -> None:
        """On the first batch seen: compare answer_logprobs' answer-only output layer with each causal
        LM's own forward (the policy, and each of scoring_models of another architecture), on every device; where
        they differ beyond rounding, that architecture is scored through its forward from now on, with
        one warning (alignlab.models.logprobs.score_by_forward). Later calls do nothing."""
        if self.logprobs_checked:
            return
        self.logprobs_checked = True
        models = [self.model]
        models += [m for m in self.scoring_models() if architecture(m) is not architecture(self.model)]
        rows = scoring_rows(batch)
        for model in models:
            head = getattr(model, "get_output_embeddings", None)
            if head is None or head() is None:  # a reward model: a score head, no log-probs
                continue
            difference, tolerance = check_answer_logprobs(model, rows)
            # Every device decides alike (max over devices), so all run the same forward passes.
            difference = self.gather_across_devices(torch.tensor([difference], device=self.device)).max().item()
            if not difference <= tolerance:  # NaN included
                score_by_forward(
                    model, f"by up to {difference:.3g} nats on the first batch; rounding allows {tolerance:g}"
                )

    def scoring_models(self) -> list[torch.nn.Module]:
        """The frozen causal LMs scored through answer_logprobs besides the policy, which check_logprobs
        also checks where their architecture differs from the policy's: the reference copy, if any."""
        if self.reference is not None and self.reference.copy is not None:
            return [self.reference.copy]
        return []

    # -- the algorithm ------------------------------------------------------------------------
    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def mean_across_devices(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-device value over all devices (the value itself on one device)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.all_gather(value).mean(0)

    def sum_across_devices(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a per-device value over all devices (the value itself on one device)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.all_gather(value).sum(0)

    def gather_across_devices(self, rows: torch.Tensor) -> torch.Tensor:
        """Every device's rows of a per-row tensor, concatenated in rank order (`rows` on one device)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return rows
        return self.all_gather(rows).flatten(0, 1)

    def rows_in(self, batch: dict) -> int:
        return len(batch["index"])

    # -- one optimizer step is the same step however it is cut ---------------------------------
    def loss_scale(self) -> float:
        """What the training loop divides a micro-batch loss's gradient by before the optimizer step:
        Lightning's automatic optimisation divides each loss by `accumulate_grad_batches`, and DDP
        (FSDP, DeepSpeed) averages gradients over processes. 1 outside a trainer."""
        if self._trainer is None:
            return 1.0
        accumulate = self.trainer.accumulate_grad_batches if self.automatic_optimization else 1
        return float(accumulate * self.trainer.world_size)

    def step_count(self, batch: dict, count: str) -> tuple[int | None, float]:
        """(num_items_in_batch, scale) for the losses' step_mean reduction: the optimizer step's total
        `count` ("rows", or a token count such as "completion_tokens") over every micro-batch and
        process, as the datamodule attaches it to training batches (`step_totals`), and
        loss_scale(); so the gradient Lightning and DDP accumulate is the step's. A batch without step
        totals (validation, a direct call) is its own step: (None, 1)."""
        totals = batch.get("step_totals")
        if totals is None:
            return None, 1.0
        return totals[count], self.loss_scale()

    # Metrics that are shares of the step's mean: summed over a step's micro-batches, not averaged.
    step_sums: tuple[str, ...] = ("loss", "nll_loss")
    # Subset metrics that are the difference of two others' means (name -> (first, second)): over a
    # step, the difference of the step's means (a micro-batch's difference weighs its subsets unevenly).
    step_differences: dict[str, tuple[str, str]] = {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute(batch)
        metrics = {"loss": loss, **metrics}
        if "step_totals" in batch:  # Lightning logs the step's last micro-batch: make its values the step's
            metrics = self._over_step(metrics, self.rows_in(batch))
        self._log("train", metrics, self.rows_in(batch), on_step=True)
        return loss

    def _over_step(self, metrics: dict, rows: int) -> dict:
        """Each metric over the optimizer step's micro-batches so far, on this process: `step_sums`
        (shares of the step's mean) added up ÷ accumulate_grad_batches, so that the mean over processes
        is the step's value (the step's loss, as TRL logs it); `/min` and `/max` over the micro-batches;
        any other the row-weighted mean (a (value, rows) subset metric weighted by its rows)."""
        accumulate = self.trainer.accumulate_grad_batches
        out = {}
        for name, metric in metrics.items():
            value, weight = metric if isinstance(metric, tuple) else (metric, rows)
            value, seen = value.detach(), self._step_sums.get(name)
            if name in self.step_sums:
                self._step_sums[name] = out[name] = value / accumulate + (0.0 if seen is None else seen)
            elif name.endswith(("/min", "/max")):
                pick = torch.minimum if name.endswith("/min") else torch.maximum
                self._step_sums[name] = out[name] = value if seen is None else pick(seen, value)
            else:  # (Σ value·rows, Σ rows) so far; an empty subset (its mean is nan) adds nothing
                if weight:
                    total, count = (0.0, 0) if seen is None else seen
                    self._step_sums[name] = seen = (total + value * weight, count + weight)
                mean = (value, 0) if seen is None else (seen[0] / seen[1], seen[1])
                out[name] = mean if isinstance(metric, tuple) else mean[0]
        for name, (first, second) in self.step_differences.items():  # of the step's means, not a mean of them
            if isinstance(out.get(name), tuple) and out[first][1] and out[second][1]:
                out[name] = (out[first][0] - out[second][0], min(out[first][1], out[second][1]))
        return out

    def on_before_optimizer_step(self, optimizer) -> None:
        self._step_sums = {}  # Lightning logged the step's last micro-batch, with the step's values

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self.compute(batch)
        if self.measures_exact_match(batch):
            metrics["exact_match"] = self.exact_match(batch).mean()
        self._log("eval", {"loss": loss, **metrics}, self.rows_in(batch), on_step=False)

    def on_validation_epoch_end(self) -> None:
        self.validated_at = self.global_step  # lets the runner validate the final model if this is stale

    def _log(self, split: str, metrics: dict, batch_size: int, on_step: bool) -> None:
        """A metric is a tensor over the batch's rows, or (tensor, rows it averages) for a subset."""
        for name, value in metrics.items():
            weight, sync = batch_size, True  # under ddp: the value over every device's rows
            if isinstance(value, tuple):
                value, weight = value
                value, weight = self._subset_mean_across_devices(value.detach().float(), weight)
                if weight == 0:  # e.g. no undesirable rows in this KTO batch: nothing to average
                    continue
                sync = False  # already the mean over every device's rows of the subset
            self.log(
                f"{split}/{name}",
                value.detach().float(),
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=weight,
                reduce_fx=name.rsplit("/", 1)[-1] if name.endswith(("/min", "/max")) else "mean",
                sync_dist=sync,
                prog_bar=name in PROGRESS_METRICS,
            )

    def _subset_mean_across_devices(self, mean: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
        """(mean, rows) of a metric over a subset of each device's rows, combined over all devices.
        Every device takes part even when its share is empty, as collectives need."""
        if self._trainer is None or self.trainer.world_size == 1:
            return mean, rows
        rows_t = torch.tensor(float(rows), device=mean.device)
        total = self.sum_across_devices(rows_t)
        combined = self.sum_across_devices(torch.nan_to_num(mean) * rows_t) / total.clamp(min=1)
        return combined, int(total.item())

    def greedy_answers(self, batch: dict) -> tuple[torch.Tensor, list[str]]:
        """Greedy completions of the batch's prompts: (tokens [B, ≤max_new_tokens] as generated, texts
        before the first stop token: the template's end of turn or any eos id, see stop_token_ids).
        max_new_tokens: evaluation.max_new_tokens (MAX_NEW_TOKENS without an evaluation config)."""
        stops = stop_token_ids(self.model, self.tokenizer)
        tokens = generate(
            self.model,
            self.tokenizer,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            max_new_tokens=self.evaluation.get("max_new_tokens", MAX_NEW_TOKENS),
            stop_ids=stops,
            images=select_vision(batch, slice(0, len(batch["prompt_input_ids"]))),  # the prompts' (the first rows')
        )
        return tokens, answer_texts(self.tokenizer, *cut_at_stop(tokens, stops))

    def measures_exact_match(self, batch: dict) -> bool:
        """Whether held-out exact match is measured on this batch: a generating policy, evaluation.exact_match
        on, and a `solution` column in the data."""
        return self.generates and bool(self.evaluation.get("exact_match")) and "solution" in batch

    def exact_match(self, batch: dict, texts: list[str] | None = None) -> torch.Tensor:
        """[B] 1.0 where the answer to a prompt matches its `solution` column (alignlab.online.generation.
        matches_solution): `texts`, or else the greedy answers to the batch's prompts."""
        texts = self.greedy_answers(batch)[1] if texts is None else texts
        return exact_match(texts, batch["solution"]).to(self.device)

    # -- optimisation ---------------------------------------------------------------------------
    max_grad_norm: float | None = None  # manual optimisation clips itself (set from trainer.gradient_clip_val)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Stop before a NaN or infinite loss reaches the weights (automatic and manual optimisation
        both pass here), so the checkpoints already written stay good."""
        if torch.isfinite(loss).all():
            return
        step, where = 0, ""
        if self._trainer is not None:
            step = self.trainer.global_step
            for callback in self.trainer.callbacks:
                if getattr(callback, "last_model_path", None):
                    where = f"; the last good checkpoint is {callback.last_model_path}"
        raise NonFiniteLossError(
            f"train/loss is {loss.detach().float().sum().item()} at step {step}: training stopped before this "
            f"step changed the weights{where}. Lower optim.lr, or check this batch's data rows"
        )

    def backpropagate(self, loss: torch.Tensor) -> None:
        """Backward through Lightning when attached to a trainer (precision, strategies), else plainly."""
        if self._trainer is not None:
            self.manual_backward(loss)  # Lightning calls on_before_backward
        else:
            self.on_before_backward(loss)
            loss.backward()

    def optimizer_step_manually(self, optimizer, scheduler=None) -> None:
        """One step under manual optimisation: clip the accumulated gradient, step, clear, schedule."""
        if self.max_grad_norm:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()

    def configure_optimizers(self):
        from transformers import get_scheduler

        params = [p for p in self.parameters() if p.requires_grad]  # the policy and any trained head or value model
        optimizer = torch.optim.AdamW(
            params, lr=self.optim["lr"], weight_decay=self.optim["weight_decay"], betas=tuple(self.optim["betas"])
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(
            self.optim["scheduler"], optimizer, num_warmup_steps=self.optim["warmup_steps"], num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- TR-DPO: the reference follows the policy (sync_ref_model; algorithms whose YAML has it) ----
    sync_ref_model: bool = False
    optimizer_steps: int = 0  # optimizer steps taken, for sync_ref_model (a counter where it is used)

    @staticmethod
    def check_sync_ref_model(cfg: DictConfig) -> None:
        """sync_ref_model's keys in range, and no LoRA (its reference, the policy with the adapter disabled,
        has no weights of its own to move). Raises ConfigError naming the key."""
        checks = Checks(cfg.algorithm, "algorithm").at_least(1, "ref_model_sync_steps")
        checks.within("ref_model_mixup_alpha", 0.0, 1.0)
        if cfg.algorithm.sync_ref_model and OmegaConf.select(cfg, "model.lora.enabled", default=False):
            raise ConfigError(
                "algorithm.sync_ref_model=true with model.lora.enabled=true: with LoRA the reference is the policy "
                "with its adapter disabled, whose base weights never move, so it cannot follow the policy; "
                "train without LoRA or set algorithm.sync_ref_model=false"
            )

    def sync_reference(self) -> None:
        """Call after each optimizer step: counts it, and every ref_model_sync_steps steps with
        sync_ref_model the reference becomes α·policy + (1 − α)·reference, α = ref_model_mixup_alpha
        (TR-DPO, Gorbatovski et al., 2024, arXiv:2404.09656; TRL's SyncRefModelCallback)."""
        self.optimizer_steps += 1
        if self.sync_ref_model and self.optimizer_steps % self.ref_model_sync_steps == 0:
            self.reference.mix_in(self.model, self.ref_model_mixup_alpha)

    # -- resume: what a checkpoint needs beyond Lightning's weights, optimizer and loop state ---
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        counters = {name: getattr(self, name) for name in self.counters}
        checkpoint["alignlab"] = {"rng": rng_state(), "counters": counters}
        if self.sync_ref_model:  # the reference has moved: a resumed run must continue from it
            checkpoint["alignlab"]["reference"] = self.reference.copy.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("alignlab")
        if state is None:  # a checkpoint from before alignlab saved its own state
            return
        set_rng_state(state["rng"])
        for name, value in state["counters"].items():
            setattr(self, name, value)
        reference = state.get("reference")
        if reference is not None and self.reference is not None and self.reference.copy is not None:
            self.reference.copy.load_state_dict(reference)

    # -- output ---------------------------------------------------------------------------------
    def save_final(self, run_dir: Path, merge_lora: bool = True, state_dict: dict | None = None) -> Path:
        """Write the trained model in Hugging Face format; returns the folder to load it from.
        `state_dict`: this module's whole weights, when the strategy shards them (see save_model)."""
        return save_model(self.model, self.tokenizer, run_dir, merge_lora, submodule_state(state_dict, "model."))
