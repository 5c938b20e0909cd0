"""LightningDataModules for the data kinds, over one shared base.

The base reads rows from a source (bundled task or files), encodes them once the tokenizer is
known, drops rows that `max_length` leaves meaningless (a prompt that alone does not fit; a pair
whose two answers are the same tokens once cut) and says how many for each reason, and serves
shuffled, per-batch padded loaders. A subclass says which data kind it reads, how a row is
encoded and how examples are collated.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from alignlab.data.collate import collate_answers, collate_extras, collate_prompts, scored_tokens
from alignlab.data.formats import ROW_CONVERTERS
from alignlab.data.mixture import MixtureSource
from alignlab.data.options import OPTION_CHECKS, TRAIN_ON, Check, check_options, one_of
from alignlab.data.order import GlobalBatchSampler, ResumableLoader, process_group
from alignlab.data.rows import NUMERIC_COLUMNS, mismatch_partners, unpair
from alignlab.data.streaming import RowStream, StreamLoader, StreamOrder
from alignlab.data.tokenize import (
    TemplateRefusal,
    encode_conversations,
    encode_turns,
    fit_answer,
    template_writes_tools,
)
from alignlab.data.truncation import AUTO_COVERAGE, AUTO_LENGTH, auto_max_length, shorten_prompt
from alignlab.data.vision import IMAGE_COLUMNS, ImageEncoder, collate_vision
from alignlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)
ANSWER_COLUMNS = ("completion", "chosen", "rejected")  # canonical answers; one that calls tools is a message

PLAN_EPOCHS = 32  # epochs whose steps set the micro-batch count under a token budget (later ones reuse it)


# Why setup leaves a row out (the keys of `dropped_by_reason`), as the log and errors say it.
DROP_REASONS = {
    "prompt_too_long": "whose prompt alone does not fit max_length={max_length}",
    "identical_after_truncation": "whose chosen and rejected answers are the same tokens once cut to "
    "max_length={max_length} (they differ only after it)",
}


class AlignmentDataModule(L.LightningDataModule):
    """The base of every data kind's DataModule: reads rows from `source`, encodes them once the
    tokenizer is known, leaves out what max_length makes meaningless, and serves the loaders.

    A subclass defines:
        kind: the data kind it reads (alignlab.data.rows.KINDS); the source's rows come in that form.
        encode(rows): one dict per canonical row, `prompt_ids` and the ids under each of `answer_keys`
            (`encode_rows` does the chat template), or None for a row that does not fit max_length.
        collate(examples, with_prompts): a padded batch from encoded rows (alignlab.data.collate).
        answer_keys, answer_columns: the encoded and the canonical answer columns, e.g.
            ("chosen_ids", "rejected_ids") and ("chosen", "rejected"); sequences_per_row: the sequences
            a row puts through the trained forward (2 for a pair).
    and may override `drop_reasons` (what else truncation makes meaningless, a DROP_REASONS key),
    `step_counts` (per-row counts the loss averages over), `passthrough`, `numeric_columns` and
    `drop_last_train`. Its constructor takes its own keys and passes the rest (`**kwargs`) here; the
    check of an own key goes into `option_checks` (as SFTDataModule's `train_on`: alignlab.data.options),
    which its constructor runs through `check_options` and the config check runs before a model loads. The
    data config names it with `_target_` (conf/data/). `source` is any object with `load(kind,
    on_bad_row)` (and `columns`, `row_converter` where it reads files), as alignlab.data.files.FileSource
    describes.
    """

    kind: str = ""  # the data kind this module reads (see alignlab.data.rows.KINDS)
    # Text columns that travel with eval batches (for exact-match and reward functions).
    passthrough: tuple[str, ...] = ("solution",)
    # Per-row numbers of the data that travel with every batch as float tensors (e.g. a reward-model
    # margin); a row without one counts as 0. Values computed later join them (add_row_values).
    numeric_columns: tuple[str, ...] = ()
    # Online algorithms split each batch into mini-batches, so a short last batch is dropped.
    drop_last_train: bool = False
    # The check of each setting (data.<key>) this module takes (alignlab.data.options); a subclass adds its own.
    option_checks: dict[str, Check] = OPTION_CHECKS

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Check the settings `options` gives (the constructor's arguments, or the composed `cfg.data`):
        the one check of each `data.<key>`, run by the constructor and, before any model loads, by
        alignlab.runner.config.check_config. Raises ConfigError naming the key (alignlab.data.options)."""
        check_options(options, cls.option_checks)

    def __init__(
        self,
        source: Any,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_length: int | str | None = 128,
        seed: int = 0,
        num_workers: int = 0,
        on_bad_row: str = "error",
        shuffle: bool = True,
        group_by_length: bool = False,
        system_prompt: str = "keep",
        max_tokens_per_micro_batch: int | None = None,
        sources: Sequence | None = None,
        columns: dict[str, str] | None = None,
        system: str | None = None,
        truncation: str = "drop_row",
        row_converter: Any = None,
    ):
        """`sources` (data.sources): data set specs to mix by weight in place of `source` alone, whose
        settings are their defaults (alignlab.data.mixture). `max_length` "auto" or None: chosen at setup
        from the train rows' token counts and the model's positions (`set_max_positions`, see
        `alignlab.data.truncation.auto_max_length`). `row_converter` (data.row_converter): the user's
        function, by dotted path or `{_target_: ..., **kwargs}`, that each file row goes through first.
        Raises ConfigError for a setting out of range (`check_options`, naming `data.<key>`)."""
        super().__init__()
        self.check_options({k: v for k, v in locals().items() if k in self.option_checks})  # the arguments
        if sources:
            source = MixtureSource.from_specs(sources, base=source)
        self.row_converter = ROW_CONVERTERS.resolve(row_converter) if row_converter is not None else None
        # data.system: the system message of rows that have none
        self.system_prompt, self.truncation, self.system = system_prompt, truncation, system
        self.columns = dict(columns) if columns else None  # data.columns: {the file's column name: alignlab's}
        self.shuffle, self.group_by_length, self.on_bad_row = shuffle, group_by_length, on_bad_row
        self.auto_length = max_length in AUTO_LENGTH
        max_length = int(max_length) if isinstance(max_length, float) else max_length  # checked: a whole number
        self.max_positions: int | None = None  # the model's positions (set_max_positions)
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.source, self.batch_size, self.eval_batch_size = source, batch_size, eval_batch_size
        # None until setup chooses it when auto
        self.max_length, self.seed, self.num_workers = (None if self.auto_length else max_length), seed, num_workers
        self._start_empty()

    def _start_empty(self) -> None:
        """What setup and the loaders fill in later, empty: the tokenizer and image processor, the splits
        and what setup left out of them or shortened, a stream's state and the training order."""
        self.tokenizer = None
        self.images: ImageEncoder | None = None  # a vision-language model's image processor (set_image_encoder)
        # id(row), and (id(row), "rejected") for rejected_images → the images' inputs and markup, until setup
        self._vision: dict[int | tuple[int, str], tuple[dict, list[str]]] = {}
        self.splits: dict[str, list[dict]] = {}
        self.dropped: dict[str, int] = {}  # split → rows left out by setup, all reasons together
        self.dropped_by_reason: dict[str, dict[str, int]] = {}  # split → DROP_REASONS key → rows
        self._tools_warned: set[str] = set()  # the tool warnings given (_warn_tools), each said once
        self.shortened: dict[str, int] = {}  # split → rows whose prompt data.truncation shortened
        self._shortened = 0
        self._rows: dict[str, list[dict]] | None = None
        self.stream: RowStream | None = None  # the train split when streamed (data.source.streaming=true)
        self.stream_usable_rows: int | None = None  # a stream read whole when opened: the rows setup keeps
        self._derived: dict[int, dict] = {}  # id(row made from another row, e.g. unpaired) → that row
        self.row_values: dict[str, None] = {}  # names given by add_row_values, in order: numbers batches carry
        self.order: GlobalBatchSampler | None = None  # the training order, once a train loader exists
        self._accumulate: int | None = None  # trainer.accumulate_grad_batches as configured
        self._val_check_interval: int | float | None = None  # trainer.val_check_interval as configured

    # -- subclasses ----------------------------------------------------------------------------
    def encode(self, rows: list[dict]) -> list[dict | None]:
        """Token ids per row; None for a row that cannot fit max_length."""
        raise NotImplementedError

    def collate(self, examples: list[dict], with_prompts: bool) -> dict:
        raise NotImplementedError

    def drop_reasons(self, encoded: list[dict | None]) -> list[str | None]:
        """Why setup leaves each row out (a DROP_REASONS key), None for a row it keeps: here, a row
        `encode` could not fit. Subclasses add what truncation makes meaningless for their kind."""
        return ["prompt_too_long" if ex is None else None for ex in encoded]

    # -- shared ---------------------------------------------------------------------------------
    def encode_rows(self, rows: list[dict], answer_keys: tuple[str, ...]) -> list[tuple[list[int], list[list[int]]]]:
        """(prompt ids, [ids of each answer column]) per row, through the chat template (see
        alignlab.data.tokenize); no answer columns: prompts only. A prompt that leaves no room for an
        answer token is shortened, or refused, as data.truncation says (alignlab.data.truncation); the
        row's `prompt` is then the shortened one.

        Raises:
            DataError: the template refuses a row (e.g. a system role it does not support), naming the
                file, row, field and the template's reason; or (data.truncation=error) a prompt does not fit.
        """
        return [(p, a) for p, _, a in self.encode_turn_rows(rows, answer_keys, all_turns=False)]

    def encode_turn_rows(self, rows: list[dict], answer_keys: tuple[str, ...], all_turns: bool) -> list[tuple]:
        """As `encode_rows`, with the mask of each prompt's trained earlier assistant turns: (prompt ids, mask
        or None, [answer ids]) (alignlab.data.tokenize.encode_turns). `all_turns`: a turn without its own
        `loss` is trained (data.train_on=all_assistant); else only turns marked `loss: true` are."""
        encoded = self._encode_rows(rows, answer_keys, all_turns)
        if self.truncation == "drop_row":
            return encoded
        for i, (row, (prompt_ids, _, answers)) in enumerate(zip(rows, encoded)):
            if len(prompt_ids) < self.max_length:
                continue
            if self.truncation == "error":
                raise self._too_long(row, len(prompt_ids))
            if row.get("images"):  # placeholders must keep matching the images: left out as with drop_row
                continue
            shorter = shorten_prompt(
                row["prompt"],
                self.truncation,
                lambda m, row=row: len(self._encode_rows([{**row, "prompt": m}], (), False)[0][0]),
                max((len(a) for a in answers), default=0),
                self.max_length,
                _shared_start(answers) + 1 if len(answers) > 1 else 0,
            )
            if shorter is not None:
                row["prompt"] = shorter
                encoded[i] = self._encode_rows([row], answer_keys, all_turns)[0]
                self._shortened += 1
        return encoded

    def _encode_rows(self, rows: list[dict], answer_keys: tuple[str, ...], all_turns: bool) -> list[tuple]:
        prompts = [r["prompt"] for r in rows]
        answers = [[r[k] for k in answer_keys] for r in rows] if answer_keys else None
        markups = [(self._vision.get(id(r)) or (None, None))[1] for r in rows]
        tools = [r.get("tools") for r in rows]
        tools = tools if any(tools) else None
        self._warn_tools(rows, tools is not None)
        marked = any(m.get("loss") for p in prompts for m in p)  # a turn marked `loss: true` (ms-swift)
        try:
            if all_turns or marked:
                return encode_turns(
                    self.tokenizer, prompts, answers, self.system_prompt, markups, tools, default=all_turns
                )
            encoded = encode_conversations(self.tokenizer, prompts, answers, self.system_prompt, markups, tools)
            return [(p, None, a) for p, a in encoded]
        except TemplateRefusal as e:
            raise self._refused(rows[e.index], e.reason) from None

    def _warn_tools(self, rows: list[dict], schemas: bool) -> None:
        """Warn once when rows give tool schemas the chat template does not write (the model never sees
        them), or tool calls it does not write (they are trained as Hermes `<tool_call>` blocks instead,
        alignlab.data.tokenize.hermes_calls: GRPO with tools then needs algorithm.tool_call_format=hermes)."""
        calls = any(
            m.get("tool_calls")
            for r in rows
            for v in (r["prompt"], *(r.get(k) for k in ANSWER_COLUMNS))
            for m in (v if isinstance(v, list) else [v])
            if isinstance(m, dict)
        )
        if not (schemas or calls):
            return
        writes_schemas, writes_calls = template_writes_tools(self.tokenizer)
        describe = getattr(self.source, "describe", lambda: "data")()
        warned = self._tools_warned
        if schemas and not writes_schemas and "schemas" not in warned:
            warned.add("schemas")
            log.warning(
                "%s: rows give `tools`, but the model's chat template does not write tool schemas, so the model "
                "never sees them; set model.chat_template to a template with tools support "
                "(docs/data.md#tools-and-tool-calls)",
                describe,
            )
        if calls and not writes_calls and "calls" not in warned:
            warned.add("calls")
            log.warning(
                "%s: the model's chat template writes no tool calls; assistant turns that call tools are trained "
                "as Hermes blocks (<tool_call>{json}</tool_call>), so GRPO with tools needs "
                "algorithm.tool_call_format=hermes (docs/data.md#tools-and-tool-calls)",
                describe,
            )

    def _too_long(self, row: dict, length: int) -> DataError:
        origin = getattr(self.source, "origin", lambda _: None)(self._derived.get(id(row), row))
        source, index, field = origin or (getattr(self.source, "describe", lambda: "data")(), None, "prompt")
        return DataError(
            source,
            f"the prompt takes {length} tokens, which leaves no room for an answer at max_length={self.max_length} "
            "(data.truncation=error); raise max_length, shorten the prompt, or set data.truncation to drop_row, "
            "keep_end (drop the oldest turns) or keep_start (cut the last user message)",
            row=index,
            field=field,
        )

    def _refused(self, row: dict, reason: str) -> DataError:
        origin = getattr(self.source, "origin", lambda _: None)(self._derived.get(id(row), row))
        source, index, field = origin or (getattr(self.source, "describe", lambda: "data")(), None, "prompt")
        problem = f'the model\'s chat template refuses this conversation, saying "{reason}".'
        if any(m["role"] == "system" for m in row["prompt"]) and self.system_prompt == "keep":
            problem += (
                " To put the system text before the first user message instead (as Gemma and Mistral v0.1 users"
                " do), set data.system_prompt=merge; or remove the system message"
            )
        else:
            problem += (
                " Change the row so that the template accepts it (data.system_prompt=merge folds system messages in)"
            )
        return DataError(source, problem, row=index, field=field)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def set_tokenizer(self, tokenizer) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer needs both a pad token and an eos token")
        self.tokenizer = tokenizer

    def set_max_positions(self, positions: int | None) -> None:
        """The model's positions (`alignlab.data.truncation.model_positions`; None: unknown): the most that
        max_length=auto chooses; a max_length given above them is warned about once, here."""
        self.max_positions = positions
        if positions and self.max_length is not None and self.max_length > positions:
            log.warning(
                "max_length=%d is more than the model's %d positions (max_position_embeddings): rows longer than %d "
                "tokens go past what the model was built for; set max_length=%d or less (or max_length=auto)",
                self.max_length,
                positions,
                positions,
                positions,
            )

    def set_image_encoder(self, images: ImageEncoder | None) -> None:
        """The vision-language model's image processor (None: a text model, whose data must have no images)."""
        self.images = images

    def _encode_images(self, split: str, rows: list[dict]) -> None:
        """Process each row's images once (model inputs and the markup its `<image>` placeholders become).

        Raises:
            ConfigError: rows have images but the model is a text model.
            DataError: a pair's `rejected_images` take other token counts than its `images`.
        """
        for row in rows:
            images = row.get("images")
            if not images or id(row) in self._vision:  # none, or processed already (max_length=auto measured it)
                continue
            if self.images is None:
                describe = getattr(self.source, "describe", lambda: "data")()
                raise ConfigError(
                    f"{describe}: the {split} rows have images, but the model has no image processor (a text "
                    "model). Use a vision-language model (e.g. model=tiny_vl, or a Qwen2-VL folder)."
                )
            self._vision[id(row)] = self.images.encode(images)
            if row.get("rejected_images"):
                rejected = self.images.encode(row["rejected_images"])
                if rejected[1] != self._vision[id(row)][1]:
                    origin = getattr(self.source, "origin", lambda _: None)(row)
                    source, index, _ = origin or (getattr(self.source, "describe", lambda: "data")(), None, None)
                    raise DataError(
                        source,
                        "the rejected answer's images take other numbers of tokens than `images` (other sizes), "
                        "so the two answers would follow different prompts; give images of the same sizes",
                        row=index,
                        field="rejected_images",
                    )
                self._vision[id(row), "rejected"] = rejected

    answer_keys: tuple[str, ...] = ()  # the encoded answers of a row, e.g. ("chosen_ids", "rejected_ids")
    sequences_per_row: int = 1  # sequences a row puts through the trained forward (a pair: chosen and rejected)

    def length(self, ex: dict) -> int:
        """Tokens an encoded row takes in a batch (its longest sequence): for grouping by length."""
        return len(ex["prompt_ids"]) + max((len(ex[k]) for k in self.answer_keys), default=0)

    def step_counts(self, ex: dict) -> dict[str, int]:
        """Per-row counts of the items the losses average over, besides rows (e.g. answer tokens),
        added up per optimizer step into the `step_totals` of every training batch."""
        return {}

    def rows(self) -> dict[str, list[dict]]:
        """Canonical rows of both splits (no tokenizer needed)."""
        return self.load(self.kind)

    def read(self) -> dict[str, list[dict]]:
        """Read and check every row once; the runner calls this before it writes or loads anything,
        so bad data stops the run while the run folder is untouched."""
        if self._rows is None:
            self._rows = self.rows()
        return self._rows

    def load(self, kind: str) -> dict[str, list[dict]]:
        """Canonical rows of `kind` from the source, `data.row_converter` and `data.columns` applied while
        reading, `data.system` added to rows without a system message."""
        given = {"columns": self.columns, "row_converter": self.row_converter}
        reading = {k: v for k, v in given.items() if v}
        for key in reading:
            if key not in inspect.signature(self.source.load).parameters:
                what = "renames the columns" if key == "columns" else "converts the rows"
                raise ConfigError(
                    f"data.{key} {what} of data files, but {type(self.source).__name__} reads no files; "
                    f"remove data.{key}"
                )
        splits = self.source.load(kind, on_bad_row=self.on_bad_row, **reading)
        if self.system is not None:
            for rows in splits.values():
                for row in rows:  # the same dict (its origin is looked up by id), a new prompt list
                    if not any(m["role"] == "system" for m in row["prompt"]):
                        row["prompt"] = [{"role": "system", "content": self.system}, *row["prompt"]]
        return splits

    @property
    def skipped(self) -> dict[str, int]:
        """Rows the source left out as bad (data.on_bad_row=skip), by split (train is the whole train
        file: a held-out fraction is split off after the bad rows are left out)."""
        return dict(getattr(self.source, "skipped", {}))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            raise RuntimeError("call set_tokenizer() before setup()")
        describe = getattr(self.source, "describe", lambda: type(self.source).__name__)()
        if self.max_length is None:
            self.max_length = self._choose_max_length()
        for split, rows in self.read().items():
            if not rows:  # no held-out rows: the run trains without validation (alignlab.train)
                self.splits[split], self.dropped[split], self.dropped_by_reason[split] = [], 0, {}
                continue
            if isinstance(rows, RowStream):  # encoded as it is read (alignlab.data.streaming)
                self.stream, self.splits[split], self.dropped[split], self.dropped_by_reason[split] = rows, [], 0, {}
                continue
            self._shortened = 0
            kept, reasons = self._encode_split(split, rows)
            self.shortened[split] = self._shortened
            if self._shortened:
                log.warning(
                    "%s split: shortened the prompt of %d of %d rows to fit max_length=%d (data.truncation=%s)",
                    split,
                    self._shortened,
                    len(rows),
                    self.max_length,
                    self.truncation,
                )
            for i, ex in enumerate(kept):
                ex["index"] = i  # its position among the kept rows, which the loaders' order indexes
            counts = Counter(why for why in reasons if why is not None)
            self.dropped[split], self.dropped_by_reason[split] = sum(counts.values()), dict(counts)
            for text in self._dropped_texts(counts, len(rows)):
                log.warning("%s split: dropped %s", split, text)
            if not kept and rows:
                raise self.unusable(split, counts, len(rows))
            self.splits[split] = kept
        if not self.splits.get("train") and self.stream is None:
            raise DataError(describe, "the train split is empty")
        if self.stream is not None and self.stream.whole:  # the stream's rows were all read to check them
            self._check_stream_rows()

    answer_columns: tuple[str, ...] = ()  # the canonical row's answer columns, e.g. ("chosen", "rejected")

    def _choose_max_length(self) -> int:
        """max_length=auto: what the train rows need (a stream: the rows read when it opened), at most the
        model's positions; said once in the log."""
        split = "train" if self.read().get("train") else "eval"  # alignlab.evaluate may read held-out rows only
        rows = self.read().get(split) or []
        streamed = isinstance(rows, RowStream)
        sample = rows.head if streamed else rows
        if not sample:
            raise DataError(getattr(self.source, "describe", lambda: "data")(), "the train split is empty")
        self._encode_images(split, sample)
        encoded = self._encode_rows(sample, self.answer_columns, all_turns=False)
        if streamed:  # a stream's rows are encoded again as they are read: keep no images of these
            for row in sample:
                self._vision.pop(id(row), None)
                self._vision.pop((id(row), "rejected"), None)
        # prompt-only rows: room for one generated token (PPO/GRPO bound completions by their own settings)
        lengths = [len(p) + max((len(a) for a in answers), default=1) for p, _, answers in encoded]
        length, needed = auto_max_length(lengths, self.max_positions)
        whole = sum(n <= length for n in lengths)
        rows_said = f"the first {len(sample)} streamed rows" if streamed else f"the {len(sample)} {split} rows"
        said = (
            f"max_length=auto: {length} tokens; {AUTO_COVERAGE:.0%} of {rows_said} need at most {needed} (prompt and "
            f"{'longest answer' if self.answer_columns else 'one generated token'}), and {whole} of them fit whole"
        )
        if length < needed:
            log.warning(
                "%s. It is capped at the model's %d positions (max_position_embeddings): longer answers are cut "
                "from the end, and prompts that do not fit are handled by data.truncation=%s%s",
                said,
                self.max_positions,
                self.truncation,
                " (left out; keep_end or keep_start shorten them instead)" if self.truncation == "drop_row" else "",
            )
        else:
            log.info("%s (set max_length=N to choose)", said)
        return length

    def _dropped_texts(self, counts: dict[str, int], total: int | None) -> list[str]:
        of = "" if total is None else f" of {total}"
        return [f"{n}{of} rows " + DROP_REASONS[why].format(max_length=self.max_length) for why, n in counts.items()]

    def unusable(self, split: str, counts: dict[str, int], total: int | None) -> DataError:
        """The error for a split of which `max_length` leaves no row (`counts`: rows dropped by reason, of
        `total`; None: a stream's epoch, whose size is not known), naming max_length and what to do."""
        describe = getattr(self.source, "describe", lambda: type(self.source).__name__)()
        if self.stream is not None and split == "train":
            describe = self.stream.describe()
        if not counts and self.skipped.get(split):  # every row was bad, none too long
            return DataError(
                describe,
                f"no {split} row is usable: all {self.skipped[split]} rows were left out as bad (data.on_bad_row=skip; "
                "the log names the first); fix the rows",
            )
        said = self._dropped_texts(counts, total) or ["every row was left out"]
        hint = "raise max_length" + (
            ", or shorten what the two answers share" if "identical_after_truncation" in counts else ""
        )
        usable = f"no {split} row is usable at max_length={self.max_length}"
        return DataError(describe, f"{usable}: {'; '.join(said)}; {hint}")

    def _check_stream_rows(self) -> None:
        """A stream short enough to have been read whole when its first rows were checked: its rows
        through the chat template and max_length now, so a stream with no usable row stops before the
        run writes anything, as a file does."""
        rows = self.stream.head
        shortened = self._shortened
        _, reasons = self._encode_split("train", rows, list(range(len(rows))))
        self._shortened = shortened
        self.stream_usable_rows = sum(why is None for why in reasons)  # all the stream holds (it was read whole)
        if rows and all(why is not None for why in reasons):
            raise self.unusable("train", dict(Counter(reasons)), len(rows))

    def _encode_split(self, split: str, rows: list[dict], index: list[int] | None = None) -> tuple[list[dict], list]:
        """The encoded rows `max_length` leaves usable, in order, and each row's drop reason (None: kept).
        `index`: each row's `index` (set before its columns, as the batches list them); None: set later."""
        self._encode_images(split, rows)
        encoded = self.encode(rows)
        reasons = self.drop_reasons(encoded)
        kept = []
        for i, (row, ex, why) in enumerate(zip(rows, encoded, reasons)):
            vision, rejected = self._vision.pop(id(row), None), self._vision.pop((id(row), "rejected"), None)
            if why is not None:
                continue
            if vision is not None:
                ex["vision"] = vision[0]
            if rejected is not None:
                ex["rejected_vision"] = rejected[0]
            ex["index"] = None if index is None else index[i]
            ex.update({k: row[k] for k in (*self.passthrough, *self.numeric_columns) if k in row})
            kept.append(ex)
        return kept, reasons

    def encode_stream_rows(self, rows: list[dict], positions: list[int], count: bool) -> list[tuple[int, dict]]:
        """(position, encoded row) of the streamed rows `max_length` leaves usable, each row's `index` its
        stream position; `count`: add the rows left out to `dropped` / `dropped_by_reason` (the first epoch)."""
        kept, reasons = self._encode_split("train", rows, positions)
        if count:
            by_reason = self.dropped_by_reason.setdefault("train", {})
            for why in reasons:
                if why is not None:
                    by_reason[why] = by_reason.get(why, 0) + 1
            self.dropped["train"] = sum(by_reason.values())
        return [(ex["index"], ex) for ex in kept]

    @property
    def has_images(self) -> bool:
        """Whether any row kept by setup has images."""
        return any("vision" in ex for rows in self.splits.values() for ex in rows)

    @property
    def has_eval_rows(self) -> bool:
        """Whether any row is held out for validation (eval_fraction=0 or a one-row file hold none)."""
        return bool(self.read().get("eval"))

    def train_dataloader(self) -> DataLoader:
        rows = self.splits["train"]
        trainer = self.trainer
        if self._accumulate is None:  # the configured value: under a token budget the trainer's is replaced
            self._accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        if self.stream is not None:
            if self.max_tokens_per_micro_batch is not None:
                log.warning(
                    "data.max_tokens_per_micro_batch=%d is not applied to a stream (it plans micro-batches from "
                    "every row's length); micro-batches hold batch_size=%d rows",
                    self.max_tokens_per_micro_batch,
                    self.batch_size,
                )
            self.order = StreamOrder()
            return StreamLoader(self, self.order, self._accumulate)
        budget = self.max_tokens_per_micro_batch
        grouped = self.group_by_length or budget is not None
        self.order = GlobalBatchSampler(
            len(rows),
            self.batch_size,
            self.seed,
            drop_last=self.drop_last_train,
            shuffle=self.shuffle,
            lengths=[self.length(ex) * self.sequences_per_row for ex in rows] if grouped else None,
            accumulate=self._accumulate,
            counts=self._step_counts(rows),
            token_budget=budget,
        )
        if budget is not None and trainer is not None:
            self._fit_micro_batches(trainer, len(rows))
        return ResumableLoader(rows, self.order, **self._loader_args(with_prompts=False))

    def _fit_micro_batches(self, trainer, n_rows: int) -> None:
        """Under a token budget: plan the micro-batches per step over the epochs the run will train (up to
        PLAN_EPOCHS), and make Lightning accumulate that many (as its GradientAccumulationScheduler sets
        `accumulate_grad_batches`). val_check_interval counts micro-batches of `batch_size` rows, so
        it is rescaled to validate at the same optimizer steps."""
        _, world = process_group()
        rows_per_step = self.batch_size * self._accumulate * world
        steps_per_epoch = max(1, -(-n_rows // rows_per_step))
        epochs = -(-trainer.max_steps // steps_per_epoch) if trainer.max_steps > 0 else (trainer.max_epochs or 1)
        micro = self.order.plan_micro_batches(world, min(max(epochs, 1), PLAN_EPOCHS))
        if self._val_check_interval is None:
            self._val_check_interval = trainer.val_check_interval
        if isinstance(self._val_check_interval, int):
            trainer.val_check_interval = max(1, round(self._val_check_interval * micro / self._accumulate))
        trainer.accumulate_grad_batches = micro
        log.info(
            "micro-batches by tokens (data.max_tokens_per_micro_batch=%d): %d per optimizer step of %d rows",
            self.max_tokens_per_micro_batch,
            micro,
            rows_per_step,
        )

    def _step_counts(self, rows: list[dict]) -> dict[str, list[int]]:
        per_row = [self.step_counts(ex) for ex in rows]
        return {name: [c[name] for c in per_row] for name in (per_row[0] if per_row else {})}

    def val_dataloader(self) -> DataLoader:
        args = self._loader_args(with_prompts=True)
        return DataLoader(self.splits["eval"], batch_size=self.eval_batch_size, shuffle=False, **args)

    def _loader_args(self, with_prompts: bool) -> dict:
        # A loader's own generator: creating its iterator then draws no number from the global RNG,
        # so validating (or resuming) does not change what training samples afterwards.
        return {
            "collate_fn": partial(self.collate, with_prompts=with_prompts),
            "num_workers": self.num_workers,
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and isinstance(self.order, StreamOrder):
            self.order.advance(batch.pop("stream_position"))  # step_totals came with the batch
            return batch
        if self.trainer is not None and self.trainer.training and self.order is not None:
            # Its optimizer step's totals over every micro-batch and process ("num_items_in_batch"), which
            # the losses divide by (alignlab.losses.reduction), so accumulation, length grouping and the
            # process count leave the step unchanged.
            batch["step_totals"] = self.order.step_totals(self.order.consumed, batch["index"].tolist())
            self.add_step_batches(batch, self.order.step_rows(self.order.consumed))
            self.order.step()  # the batch is about to be trained on: a checkpoint from now on counts it
        return batch

    def add_step_batches(self, batch: dict, step_rows: list[list[int]]) -> None:
        """Hook for a loss that needs every row of its optimizer step in the step's first micro-batch
        (KTO's z₀); `step_rows`: this process's rows in each micro-batch of the step. Nothing here."""

    # -- values computed from the rows once, carried by every batch afterwards ------------------
    def scoring_batches(self) -> list[tuple[str, list[int]]]:
        """Every row of every split once, as (split, positions in that split) batches of `batch_size`
        rows (training's micro-batch: known to fit in memory), each split's rows in order of length so
        that batches pad little and long rows do not meet in large batches (attention is quadratic).
        Collate one with `collate_rows`; give values back with `add_row_values`."""
        batches = []
        for split, rows in self.splits.items():
            order = sorted(range(len(rows)), key=lambda i: self.length(rows[i]))
            batches += [
                (split, order[start : start + self.batch_size]) for start in range(0, len(order), self.batch_size)
            ]
        return batches

    def collate_rows(self, split: str, positions: list[int]) -> dict:
        """The answer batch (no prompts) of some rows of a split, by their positions in it."""
        rows = self.splits[split]
        return self.collate([rows[i] for i in positions], with_prompts=False)

    def add_row_values(
        self, split: str, positions: list[int], values: dict[str, Sequence[float] | torch.Tensor]
    ) -> None:
        """Keep per-row numbers computed outside the data (e.g. a frozen reference's log-probs, see
        alignlab.algorithms.reference_scoring): `values[name][j]` belongs to the row at `positions[j]`
        of `split`. From then on every batch carries each name as a float32 [rows] tensor (a row not
        given one counts as 0), as it does the data's numeric columns."""
        rows = self.splits[split]
        for name, column in values.items():
            column = column.tolist() if torch.is_tensor(column) else list(column)
            if len(column) != len(positions):
                raise ValueError(f"{name}: {len(column)} values for {len(positions)} rows")
            for i, value in zip(positions, column):
                rows[i][name] = value
            self.row_values[name] = None

    def _extras(self, examples: list[dict], with_prompts: bool) -> dict:
        keys = dict.fromkeys(k for e in examples for k in e)  # a column only some rows give is the batch's
        numeric = [k for k in keys if k in self.numeric_columns or k in self.row_values]
        text = [k for k in self.passthrough if k in keys] if with_prompts else []
        out = collate_prompts([e["prompt_ids"] for e in examples], self.pad_id) if with_prompts else {}
        return {**out, **collate_extras(examples, numeric, text)}


def _shared_start(answers: list[list[int]]) -> int:
    """How many first tokens all `answers` share."""
    n = 0
    for tokens in zip(*answers):
        if any(t != tokens[0] for t in tokens):
            break
        n += 1
    return n


class SFTDataModule(AlignmentDataModule):
    """(prompt, completion) rows; the loss covers the completion tokens and, with
    `train_on="all_assistant"` (default), every earlier assistant turn of a multi-turn prompt (its
    content and end of turn, as `alignlab.data.tokenize.encode_turns` finds them); `"last_assistant"`:
    the completion only. System, user and tool tokens never count."""

    kind = "sft"
    answer_keys = ("completion_ids",)
    answer_columns = ("completion",)

    option_checks = {**OPTION_CHECKS, "train_on": one_of("train_on", TRAIN_ON)}

    def __init__(self, source, train_on: str = "all_assistant", **kwargs):
        super().__init__(source, **kwargs)
        self.check_options({"train_on": train_on})
        self.train_on = train_on

    def step_counts(self, ex: dict) -> dict[str, int]:
        earlier = sum(ex["prompt_mask"][1:]) if "prompt_mask" in ex else 0  # position 0 is predicted by nothing
        return {"completion_tokens": scored_tokens(len(ex["prompt_ids"]), len(ex["completion_ids"])) + earlier}

    def encode(self, rows: list[dict]) -> list[dict | None]:
        out = []
        turns = self.encode_turn_rows(rows, ("completion",), self.train_on == "all_assistant")
        for row, (p, mask, (a,)) in zip(rows, turns):
            a = fit_answer(len(p), a, self.max_length)
            ex = None if a is None else {"prompt_ids": p, "completion_ids": a, "prompt": row["prompt"]}
            if ex is not None and mask is not None and any(mask):
                ex["prompt_mask"] = mask
            out.append(ex)
        return out

    def collate(self, examples: list[dict], with_prompts: bool) -> dict:
        batch = collate_answers(
            [e["prompt_ids"] for e in examples],
            [e["completion_ids"] for e in examples],
            self.pad_id,
            [e.get("prompt_mask") for e in examples],
        )
        batch.update(collate_vision([e.get("vision") for e in examples]))
        if with_prompts:  # the prompts' messages, as the data gave them (GKD's sample tables)
            batch["prompt_messages"] = [e["prompt"] for e in examples]
        return {**batch, **self._extras(examples, with_prompts)}


class PairwiseDataModule(AlignmentDataModule):
    """(prompt, chosen, rejected) rows; one batch holds B chosen then B rejected sequences."""

    kind = "pairwise"
    answer_keys = ("chosen_ids", "rejected_ids")
    answer_columns = ("chosen", "rejected")
    sequences_per_row = 2
    numeric_columns = NUMERIC_COLUMNS

    def __init__(self, source, unpair: bool = False, **kwargs):
        """`unpair` (data.unpair) is the pairwise configs' switch to KTO's labelled rows, which
        alignlab.runner.config.check_config turns into LabelledDataModule: pairs read as pairs refuse it."""
        if unpair:
            raise ConfigError(
                "data.unpair=true splits each pair into a desirable and an undesirable row for a labelled-data "
                "algorithm (algorithm=kto); a pairwise algorithm trains on the pairs: drop data.unpair"
            )
        super().__init__(source, **kwargs)

    def step_counts(self, ex: dict) -> dict[str, int]:
        return {"chosen_tokens": scored_tokens(len(ex["prompt_ids"]), len(ex["chosen_ids"]))}  # the NLL's

    def encode(self, rows: list[dict]) -> list[dict | None]:
        out = []
        for row, (p, (c, r)) in zip(rows, self.encode_rows(rows, ("chosen", "rejected"))):
            c, r = fit_answer(len(p), c, self.max_length), fit_answer(len(p), r, self.max_length)
            ex = None if c is None else {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            if ex is not None and "rejected_images" in row:  # the answers follow other images (rows.py)
                ex["distinct_images"] = True
            out.append(ex)
        return out

    def drop_reasons(self, encoded: list[dict | None]) -> list[str | None]:
        """Also a pair whose chosen and rejected are the same tokens once cut to max_length (and follow
        the same images: a pair may be the same answer about other images, ms-swift's `rejected_images`)."""
        reasons = super().drop_reasons(encoded)
        same = [
            ex is not None and ex["chosen_ids"] == ex["rejected_ids"] and not ex.get("distinct_images")
            for ex in encoded
        ]
        return ["identical_after_truncation" if s and why is None else why for s, why in zip(same, reasons)]

    def collate(self, examples: list[dict], with_prompts: bool) -> dict:
        prompts = [e["prompt_ids"] for e in examples]
        answers = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        batch = collate_answers(prompts + prompts, answers, self.pad_id)
        visions = [e.get("vision") for e in examples]
        batch.update(collate_vision(visions + [e.get("rejected_vision", e.get("vision")) for e in examples]))
        return {**batch, **self._extras(examples, with_prompts)}


class LabelledDataModule(AlignmentDataModule):
    """(prompt, completion, label) rows for KTO. A batch holds B matched sequences, then B mismatched
    ones (each row's prompt with its fixed partner's answer, see `mismatch_partners`) for KTO's KL
    reference point, and a bool `label` [B]. The partner is fixed per row, not drawn per batch, so a
    row's reference log-probs (matched and mismatched) can be computed once before training.

    `unpair=True` reads a pairwise source and splits each pair into a desirable (chosen) and an
    undesirable (rejected) row.
    """

    kind = "labelled"
    answer_keys = ("completion_ids", "kl_completion_ids")
    answer_columns = ("completion",)

    def __init__(self, source, unpair: bool = False, **kwargs):
        super().__init__(source, **kwargs)
        self.unpair = unpair
        self._step_with_batches: tuple | None = None  # the last step whose first micro-batch got step_batches

    def rows(self) -> dict[str, list[dict]]:
        if not self.unpair:
            return self.load("labelled")
        out = {}
        for split, pairs in self.load("pairwise").items():
            out[split] = []
            for pair in pairs:
                for row in unpair(pair):
                    self._derived[id(row)] = pair  # a template error names the pair's file row
                    out[split].append(row)
        return out

    def add_step_batches(self, batch: dict, step_rows: list[list[int]]) -> None:
        """The first micro-batch of each optimizer step this process trains (the first after a restart
        too) carries `step_batches`: the step's micro-batches of this process, collated (same sizes), so
        KTO estimates z₀ over the whole step, whatever its cut."""
        key = (self.order.epoch, tuple(map(tuple, step_rows)))
        if key != self._step_with_batches:
            self._step_with_batches = key
            batch["step_batches"] = [self.collate_rows("train", rows) for rows in step_rows]

    def label_counts(self, split: str) -> tuple[int, int]:
        """(desirable, undesirable) rows of a split, after setup."""
        desirable = sum(ex["label"] for ex in self.splits[split])
        return desirable, len(self.splits[split]) - desirable

    def encode(self, rows: list[dict]) -> list[dict | None]:
        encoded = self.encode_rows(rows, ("completion",))
        answers = [a for _, (a,) in encoded]
        partners = mismatch_partners(len(rows), self.seed)
        out = []
        for row, (p, _), a, partner in zip(rows, encoded, answers, partners):
            a = fit_answer(len(p), a, self.max_length)
            if a is None:
                out.append(None)
                continue
            kl = fit_answer(len(p), answers[partner], self.max_length)  # the partner's answer after this prompt
            out.append({"prompt_ids": p, "completion_ids": a, "kl_completion_ids": kl, "label": bool(row["label"])})
            if "rejected_images" in self._derived.get(id(row), {}):  # unpaired from a pair about other images
                out[-1]["distinct_images"] = True
        return out

    def drop_reasons(self, encoded: list[dict | None]) -> list[str | None]:
        """With `unpair`, also both rows of a pair (rows 2k and 2k+1, see `rows`) whose answers are
        the same tokens once cut to max_length: one text labelled both desirable and undesirable."""
        reasons = super().drop_reasons(encoded)
        if self.unpair:
            for i in range(0, len(encoded) - 1, 2):
                a, b = encoded[i], encoded[i + 1]
                if a is None or b is None or a.get("distinct_images"):
                    continue
                if a["completion_ids"] == b["completion_ids"]:
                    reasons[i] = reasons[i + 1] = "identical_after_truncation"
        return reasons

    def collate(self, examples: list[dict], with_prompts: bool) -> dict:
        prompts = [e["prompt_ids"] for e in examples]
        answers = [e["completion_ids"] for e in examples] + [e["kl_completion_ids"] for e in examples]
        batch = collate_answers(prompts + prompts, answers, self.pad_id)
        batch.update(collate_vision([e.get("vision") for e in examples] * 2))  # both halves follow the row's prompt
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        return {**batch, **self._extras(examples, with_prompts)}


class PromptDataModule(AlignmentDataModule):
    """Prompt-only rows for online algorithms (PPO, GRPO). Batches hold left-padded prompts, ready to
    generate from, and every extra column of the rows (`columns`, e.g. `solution`) for reward functions."""

    kind = "prompt"
    drop_last_train = True

    def encode(self, rows: list[dict]) -> list[dict | None]:
        out = []
        for row, (p, _) in zip(rows, self.encode_rows(rows, ())):
            fits = len(p) < self.max_length  # room for at least one generated token
            columns = {k: v for k, v in row.items() if k not in ("prompt", *IMAGE_COLUMNS)}  # images travel as pixels
            out.append({"prompt_ids": p, "prompt": row["prompt"], "columns": columns} if fits else None)
        return out

    def draw_prompts(self, count: int, seed: int, exclude: set[int], world: int = 1, rank: int = 0) -> dict | None:
        """`count` training prompts for process `rank` of `world`, collated as a training batch: a draw by
        `seed` (the same on every process) of rows whose `index` is not in `exclude`, of which each process
        takes its own slice of count × world. None when fewer rows are left (GRPO's dynamic sampling)."""
        rows = self.splits["train"]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        free = [i for i in order if rows[i]["index"] not in exclude][: count * world]
        if len(free) < count * world:
            return None
        return self.collate([rows[i] for i in free[rank * count : (rank + 1) * count]], with_prompts=True)

    def collate(self, examples: list[dict], with_prompts: bool) -> dict:
        batch = self._extras(examples, with_prompts=True)
        batch.update(collate_vision([e.get("vision") for e in examples]))  # the prompts' images
        keys = dict.fromkeys(k for e in examples for k in e["columns"])  # a row without a column gets None
        batch["columns"] = {k: [e["columns"].get(k) for e in examples] for k in keys}
        batch["prompt_messages"] = [e["prompt"] for e in examples]  # what reward functions receive
        return batch
