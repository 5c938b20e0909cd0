"""A reward model: a causal LM backbone plus a scalar value head read at the last answer token.

Saved as the backbone in Hugging Face format (or its LoRA adapter) with `value_head.safetensors`
beside it; `RewardModel.from_pretrained` restores both. It also reads (and `save_seq_cls` writes) the
format TRL, ms-swift, OpenRLHF and the Hub ship reward models in: an `AutoModelForSequenceClassification`
folder with one label, whose score is the classifier's logit at the last non-pad token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignlab.data.collate import collate_answers
from alignlab.data.tokenize import encode_conversations, fit_answer
from alignlab.models.vision import forward_inputs, is_multimodal, trunk

VALUE_HEAD_FILE = "value_head.safetensors"
LEGACY_VALUE_HEAD_FILE = "value_head.bin"  # what older tools (TRL's AutoModelForCausalLMWithValueHead) write


def is_reward_model_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a saved reward model: a value head beside the backbone, or a one-label
    sequence classifier (`is_seq_cls_folder`)."""
    has_head = any((Path(folder) / name).exists() for name in (VALUE_HEAD_FILE, LEGACY_VALUE_HEAD_FILE))
    return has_head or is_seq_cls_folder(folder)


def is_seq_cls_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a model saved as `*ForSequenceClassification` with exactly one label (a
    reward model as TRL, ms-swift, OpenRLHF and the Hub save them); its config.json says so."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return False
    labels = (
        len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    )  # transformers' default: 2
    return labels == 1


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] the rightmost position whose token is not `pad_token_id`: where transformers'
    *ForSequenceClassification reads its logits. Without a pad token (which transformers refuses for
    batches of more than one row), each row's last attended position."""
    if pad_token_id is None:
        return last_token_index(torch.zeros_like(attention_mask), attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def last_token_index(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] position of each sequence's last answer token (its last real token if it has no answer)."""
    mask = torch.where(loss_mask.any(-1, keepdim=True), loss_mask, attention_mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(-1)


class RewardModel(torch.nn.Module):
    """`backbone`: a causal LM (or its transformer alone, as a sequence classifier's base model);
    `value_head`: Linear(hidden, 1), a new one when None (`bias=False`: without a bias, as
    transformers' classifiers have none, so that `save_seq_cls` writes exactly this model).
    `pad_token_id`: None reads the reward at the last answer token; an id (a sequence classifier's)
    reads it where transformers does, at the last token that is not that id (`last_non_pad_index`)."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        value_head: torch.nn.Linear | None = None,
        bias: bool = True,
        pad_token_id: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        hidden = getattr(config, "text_config", config).hidden_size  # a vision-language model's language model's
        if value_head is None:
            value_head = torch.nn.Linear(hidden, 1, bias=bias)
            torch.nn.init.normal_(value_head.weight, std=1 / (hidden + 1) ** 0.5)
            if bias:
                torch.nn.init.zeros_(value_head.bias)
        self.value_head = value_head
        self.pad_token_id = pad_token_id

    @property
    def config(self):
        return self.backbone.config

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict | None = None) -> torch.Tensor:
        """[N, T] the value head at every position (PPO's value model reads these). `images`: a batch's
        vision inputs for a vision-language backbone (alignlab.data.vision; None: a text batch)."""
        extra = forward_inputs(self.backbone, input_ids, images or {})
        hidden = trunk(self.backbone)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
        ).last_hidden_state  # the transformer without its LM head (LoRA layers, when present, sit inside it)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, images: dict | None = None
    ) -> torch.Tensor:
        """[N] scalar rewards, read at each sequence's last answer token (never at padding)."""
        values = self.values(input_ids, attention_mask, images)
        if self.pad_token_id is None:
            last = last_token_index(loss_mask, attention_mask)
        else:  # a sequence classifier: read where transformers reads it
            last = last_non_pad_index(input_ids, self.pad_token_id, attention_mask)
        return values[torch.arange(values.shape[0], device=values.device), last]

    def save_value_head(self, folder: str | Path, state_dict: dict | None = None) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.value_head.state_dict()).items()}
        save_file(state, str(Path(folder) / VALUE_HEAD_FILE))

    @staticmethod
    def load_value_head(folder: str | Path) -> torch.nn.Linear:
        folder = Path(folder)
        if (folder / VALUE_HEAD_FILE).exists():
            state = load_file(str(folder / VALUE_HEAD_FILE))
        elif (folder / LEGACY_VALUE_HEAD_FILE).exists():
            state = torch.load(folder / LEGACY_VALUE_HEAD_FILE, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(
                f"{folder} has no {VALUE_HEAD_FILE} (or {LEGACY_VALUE_HEAD_FILE}); is it a reward model?"
            )
        # Other tools prefix the head's keys (e.g. v_head.summary.weight); keep the last part.
        state = {k.rsplit(".", 1)[-1]: v for k, v in state.items()}
        weight = state["weight"].reshape(1, -1)
        head = torch.nn.Linear(weight.shape[1], 1, bias="bias" in state, dtype=weight.dtype)
        head.load_state_dict({"weight": weight, **({"bias": state["bias"].reshape(1)} if "bias" in state else {})})
        return head

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> RewardModel:
        """Backbone (full model, or a LoRA adapter over its base) and value head from a reward-model
        folder; from a one-label sequence classifier, its base model and its `score` layer (read at
        the last non-pad token, as transformers reads it)."""
        from alignlab.models.loading import auto_model_class

        if is_seq_cls_folder(folder) and not (Path(folder) / VALUE_HEAD_FILE).exists():
            from transformers import AutoModelForSequenceClassification

            classifier = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, use_safetensors=True)
            base = getattr(classifier, classifier.base_model_prefix)
            pad = classifier.config.get_text_config().pad_token_id
            return cls(base, classifier.score, pad_token_id=pad)
        backbone = auto_model_class(folder).from_pretrained(folder, dtype=dtype, use_safetensors=True)
        return cls(backbone, cls.load_value_head(folder).to(dtype))

    def save_seq_cls(self, folder: str | Path, tokenizer, state_dict: dict | None = None) -> None:
        """Write this reward model as a one-label `AutoModelForSequenceClassification` into `folder`,
        which must hold its backbone saved as a (merged, full) causal LM: its weights are replaced by the
        classifier's (the backbone's transformer, `score` = the value head) and config.json says so,
        with the tokenizer's pad token, where transformers reads the score.

        The classifier reads at the last non-pad token and alignlab at the last answer token: the same
        token when the pad token is not the answer's last (eos) token.

        Raises:
            ValueError: the value head has a non-zero bias (transformers' `score` has none: train with
                algorithm.export_format=seq_cls, which leaves it out), or the tokenizer's pad token is
                its eos token (the classifier would read before the answer's end).
        """
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        head = {k: v.detach().cpu() for k, v in (state_dict or self.value_head.state_dict()).items()}
        if "bias" in head and head["bias"].abs().max() > 0:
            raise ValueError(
                "this reward model's value head has a bias, which a sequence classifier's `score` layer cannot hold; "
                "train it with algorithm.export_format=seq_cls"
            )
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                "a sequence classifier reads the last token that is not padding: the tokenizer needs a pad token "
                "other than its eos token"
            )
        folder = Path(folder)
        causal = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        config = causal.config
        config.architectures, config.num_labels = None, 1
        config.pad_token_id = tokenizer.pad_token_id
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
        prefix = classifier.base_model_prefix + "."
        weights = {k: v for k, v in causal.state_dict().items() if k.startswith(prefix)}
        weights["score.weight"] = head["weight"].reshape(1, -1).to(causal.dtype)
        classifier.load_state_dict(weights, strict=True)
        for old in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
            old.unlink()  # the causal LM's shards
        classifier.save_pretrained(folder, safe_serialization=True)


class RewardScorer:
    """One float per (prompt, answer), batched, on any device; prompts are text or message lists.

    The answer is tokenised exactly as in training (chat-template prompt, answer + eos) and the
    reward is read at its last token.

    It is a reward function (`__call__`), so GRPO and PPO take it wherever they take one (a folder in
    algorithm.reward_funcs, or `{_target_: alignlab.models.reward.RewardScorer, folder: ...}`). A scorer
    of your own, e.g. one served elsewhere, defines the same `__call__(prompts, completions, **columns)`
    returning one float per completion; the columns (the data's extra columns, `completion_ids`) are as
    alignlab.online.rewards describes them.
    """

    def __init__(
        self,
        folder: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        from alignlab.models.loading import tokenizer_from_pretrained

        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.tokenizer = tokenizer_from_pretrained(folder)
        self.model = RewardModel.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        if is_multimodal(self.model.backbone):  # its prompts are text: it would score without the images
            raise ValueError(
                f"{folder} is a vision-language reward model; scoring answers with it (win rates, a reward model "
                "as a GRPO reward) does not pass images yet"
            )

    @torch.no_grad()
    def score(self, prompts: Sequence[str | list[dict]], answers: Sequence[str]) -> list[float]:
        """The reward of each answer to its prompt, `batch_size` at a time.

        Raises:
            ValueError: as many prompts as answers are needed.
        """
        if len(prompts) != len(answers):
            raise ValueError(f"got {len(prompts)} prompts and {len(answers)} answers")
        messages = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        scores: list[float] = []
        for start in range(0, len(messages), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            encoded = encode_conversations(self.tokenizer, messages[chunk], [[a] for a in answers[chunk]])
            p_ids, a_ids = [p for p, _ in encoded], [a for _, (a,) in encoded]
            if self.max_length:
                a_ids = [fit_answer(len(p), a, self.max_length) or a[:1] for p, a in zip(p_ids, a_ids)]
            batch = collate_answers(p_ids, a_ids, self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores += self.model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).float().tolist()
        return scores

    def score_messages(self, conversations: Sequence[list[dict]]) -> list[float]:
        """Conversations that end in the assistant answer to score."""
        return self.score([c[:-1] for c in conversations], [c[-1]["content"] for c in conversations])

    def __call__(self, prompts: Sequence[str | list[dict]], completions: Sequence[str], **columns) -> list[float]:
        """The reward-function signature: extra data columns are accepted and ignored."""
        return self.score(prompts, completions)
