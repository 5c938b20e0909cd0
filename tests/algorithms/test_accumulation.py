"""One optimizer step is the same step however it is cut (issue 16 §1): micro-batches (gradient
accumulation), length-grouped micro-batches and processes all give the gradient of the whole batch,
because every loss term divides its sums by the optimizer step's totals (alignlab.losses.reduction).

Rows of very different lengths (1-token and ~60-token answers), float64, one step: the gradient of one
batch of 8 equals that of 2 and 4 accumulated micro-batches (with and without data.group_by_length) and
of 2 processes, to 1e-6 relative. With the datamodule's own micro-batches, Lightning and DDP are
emulated as they act on gradients (each micro-batch loss ÷ accumulate_grad_batches, the processes'
gradients averaged), then checked with 2 real gloo processes (slow); the case `ga_sft_scaling/` (SFT),
DPO, KTO and RM also run through `train()`; PPO and GRPO (every loss_type) through their update loops.
Token-budget micro-batches (data.max_tokens_per_micro_batch) are one more cut. KTO's z₀ is estimated
over the whole step (its first micro-batch scores every mismatched pair of the step), tested with z₀ ≠ 0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from alignlab.data import LabelledDataModule, PairwiseDataModule, SFTDataModule
from alignlab.losses import kto_kl_estimate, nll_loss, step_mean
from alignlab.losses.grpo import GRPO_LOSS_TYPES, grpo_loss
from alignlab.losses.reward import bradley_terry_loss
from tests.conftest import QUIET, ListSource, build_module, compose

# shared/cases/ga_sft_scaling/sft.jsonl: 4 rows with 1-token answers, 4 with ~60-token answers
SPELL = "one two three four five six seven eight nine ten one two thr"
CASE_ROWS = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(1, 5)] + [
    {"prompt": f"Spell {i} in words, slowly.", "completion": SPELL[:49] if i == 1 else SPELL} for i in range(1, 5)
]
LONG = "one two three four five six seven eight nine ten eleven twelve"  # 62 tokens with eos (bytes)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- the pure reduction, float64 ---------------------------------------------------------------------
def test_step_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert step_mean(values, mask).item() == pytest.approx((1 + 2 + 4) / 3, rel=1e-15)  # own count
    assert step_mean(values, mask, 7).item() == pytest.approx(7 / 7, rel=1e-15)  # the step holds 7 tokens
    assert step_mean(values, mask, 7, scale=4).item() == pytest.approx(4.0, rel=1e-15)
    assert step_mean(values[0], None, 10).item() == pytest.approx(6 / 10, rel=1e-15)  # rows: 3 of 10
    assert step_mean(values, torch.zeros_like(mask), 0).item() == 0.0  # an empty step: 0, not 0/0


def test_micro_batch_shares_add_up_to_the_step_mean_for_every_term():
    """Random rows cut into uneven micro-batches: the shares (each divided by the scale the loop
    divides by) sum to the whole step's token or row mean, for NLL, Bradley-Terry and every GRPO
    loss_type."""
    g = torch.Generator().manual_seed(0)
    n, t = 10, 7
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=g) > 0.5).double()
    mask[3] = 0  # a row whose answer is all masked out
    cuts = [slice(0, 1), slice(1, 5), slice(5, 10)]
    tokens, scale = mask.sum(), 3.0
    whole = nll_loss(logps, mask)
    assert whole.item() == pytest.approx((-(logps * mask).sum() / mask.sum()).item(), rel=1e-15)
    parts = sum(nll_loss(logps[c], mask[c], tokens, scale) / scale for c in cuts)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)
    old = sum(nll_loss(logps[c], mask[c]) for c in cuts) / len(cuts)  # the equal-weight mean it replaces
    assert abs(old.item() - whole.item()) > 1e-3
    rc, rr = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    whole = bradley_terry_loss(rc, rr, center_rewards_coefficient=0.1)
    parts = sum(bradley_terry_loss(rc[c], rr[c], None, 0.1, n, scale) / scale for c in cuts)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)
    adv, old_logps = torch.randn(n, generator=g, dtype=torch.float64), logps + 0.1 * torch.randn(n, t, generator=g)
    ref = logps - 0.2
    for loss_type in GRPO_LOSS_TYPES:
        args = dict(epsilon=0.2, beta=0.04, loss_type=loss_type, max_completion_length=t)
        whole = grpo_loss(logps, old_logps, adv, mask, ref_logprobs=ref, **args).loss
        parts = sum(
            grpo_loss(logps[c], old_logps[c], adv[c], mask[c], ref_logprobs=ref[c], **args,
                      num_items_in_batch=tokens, num_completions=n, scale=scale).loss / scale
            for c in cuts
        )  # fmt: skip
        assert parts.item() == pytest.approx(whole.item(), rel=1e-13), loss_type


# -- the step totals the training order attaches --------------------------------------------------------
def test_step_totals_cover_every_micro_batch_and_process_of_the_step(monkeypatch):
    """10 rows, 2 processes × batch 2 × accumulate 2: steps of 8 rows and then the short last step of
    2 rows; every global batch of a step carries the step's totals, grouped by length or not."""
    from alignlab.data.order import GlobalBatchSampler

    tokens = [1, 60, 2, 59, 3, 58, 4, 57, 5, 56]
    for group in (None, tokens):
        monkeypatch.setattr("alignlab.data.order.process_group", lambda: (0, 2))
        order = GlobalBatchSampler(10, 2, 0, False, shuffle=False, lengths=group, accumulate=2, counts={"t": tokens})
        first = {"rows": 8, "t": sum(tokens[:8])}
        assert [order.step_totals(i) for i in range(3)] == [first, first, {"rows": 2, "t": 61}]
        assert order.step_totals(2, rows=[8]) == {"rows": 2, "t": 61}
        with pytest.raises(RuntimeError, match="batch 2 of epoch 0 holds rows outside"):
            order.step_totals(2, rows=[0])


@pytest.mark.parametrize("kind", ["sft", "pairwise", "labelled"])
def test_step_totals_count_the_tokens_the_losses_score(tiny, kind):
    """A whole-batch step's totals are its rows and the answer tokens its loss mask scores (SFT: the
    completions'; pairwise: the chosen answers', which the NLL terms cover)."""
    from alignlab.data.collate import scored_tokens

    _, tokenizer = tiny
    dm = DATA[kind](ListSource({kind: rows_of(kind)}), batch_size=8, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    dm.trainer = SimpleNamespace(accumulate_grad_batches=1, training=True)
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    scored = batch["loss_mask"][:, 1:].sum(1)
    expected = {"sft": {"completion_tokens": int(scored.sum())}, "pairwise": {"chosen_tokens": int(scored[:8].sum())}}
    assert batch["step_totals"] == {"rows": 8, **expected.get(kind, {})}
    assert scored_tokens(0, 5) == 4 and scored_tokens(3, 5) == 5  # with no prompt, nothing predicts token 0


# -- every offline algorithm: whole batch = accumulated micro-batches = 2 processes -----------------
def rows_of(kind: str, n: int = 8) -> list[dict]:
    """n rows whose answers alternate between 1 token and ~60 tokens (+ eos)."""
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"{i}+{i}="}]
        short, long = str(2 * i), LONG[: 50 + i]
        a, b = (short, long) if i % 2 else (long, short)
        if kind == "sft":
            out.append({"prompt": prompt, "completion": a})
        elif kind == "pairwise":
            out.append({"prompt": prompt, "chosen": a, "rejected": b})
        else:
            out.append({"prompt": prompt, "completion": a, "label": i % 3 != 0})
    return out


DATA = {"sft": SFTDataModule, "pairwise": PairwiseDataModule, "labelled": LabelledDataModule}
KIND = {"sft": "sft", "kto": "labelled", **{n: "pairwise" for n in ("dpo", "cpo", "orpo", "simpo", "rm")}}
HPARAMS = {"rm": {"center_rewards_coefficient": 0.1}, "simpo": {"cpo_alpha": 0.5}}


def step_gradient(
    module,
    tokenizer,
    kind,
    batch_size,
    accumulate=1,
    world=1,
    group=False,
    n=8,
    budget=None,
    ref=None,
    monkeypatch=None,
):
    """The gradient of the first optimizer step, as Lightning (÷ accumulate_grad_batches per micro-batch)
    and DDP (mean over processes) compute it, with the datamodule's own micro-batches and step totals.
    `budget`: data.max_tokens_per_micro_batch (then the datamodule sets the micro-batch count);
    `ref`: per-row values given to the datamodule (precomputed reference log-probs)."""
    module.zero_grad()
    for rank in range(world):
        monkeypatch.setattr("alignlab.data.order.process_group", lambda rank=rank: (rank, world))
        monkeypatch.setattr("alignlab.data.datamodule.process_group", lambda rank=rank: (rank, world))
        dm = DATA[kind](
            ListSource({kind: rows_of(kind, n)}),
            batch_size=batch_size,
            shuffle=False,
            group_by_length=group,
            max_tokens_per_micro_batch=budget,
        )
        dm.set_tokenizer(tokenizer)
        dm.setup()
        if ref is not None:
            dm.add_row_values("train", list(range(n)), ref)
        dm.trainer = SimpleNamespace(
            accumulate_grad_batches=accumulate, training=True, max_steps=1, max_epochs=-1, val_check_interval=250
        )
        loader = dm.train_dataloader()
        micro = dm.trainer.accumulate_grad_batches  # the budget's count, under a budget
        module.loss_scale = lambda micro=micro: float(micro * world)
        for _, batch in zip(range(micro), loader):
            loss, _ = module.compute(dm.on_before_batch_transfer(batch, 0))
            (loss / micro).backward()
    return torch.cat([p.grad.flatten() / world for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("name", ["sft", "dpo", "cpo", "orpo", "simpo", "kto", "rm"])
def test_every_cut_of_a_step_gives_the_whole_batch_gradient(tiny, monkeypatch, name):
    """Row-count micro-batches, length-grouped ones, token-budget ones (data.max_tokens_per_micro_batch)
    and processes. KTO: at the first step policy = reference, so z₀ = 0; see the next test for z₀ ≠ 0."""
    model, tokenizer = tiny
    module = build_module(name, copy.deepcopy(model).double(), tokenizer, **HPARAMS.get(name, {})).double()
    kind = KIND[name]
    whole = step_gradient(module, tokenizer, kind, 8, monkeypatch=monkeypatch)
    assert whole.norm() > 1e-3
    cuts = {
        "2 micro-batches": dict(batch_size=4, accumulate=2),
        "4 micro-batches": dict(batch_size=2, accumulate=4),
        "2 grouped by length": dict(batch_size=4, accumulate=2, group=True),
        "4 grouped by length": dict(batch_size=2, accumulate=4, group=True),
        "2 processes": dict(batch_size=4, world=2),
        "2 processes × 2 grouped": dict(batch_size=2, accumulate=2, world=2, group=True),
        "by tokens, 150 a micro-batch": dict(batch_size=8, budget=150),
        "by tokens, 1 a micro-batch (a row each)": dict(batch_size=8, budget=1),
        "by tokens, 2 processes": dict(batch_size=2, accumulate=2, world=2, budget=150),
    }
    for cut, kwargs in cuts.items():
        assert relative(step_gradient(module, tokenizer, kind, monkeypatch=monkeypatch, **kwargs), whole) < 1e-6, cut
    # 6 rows in micro-batches of 4 and 2: row-level means weigh each row once, not each micro-batch
    whole = step_gradient(module, tokenizer, kind, 6, n=6, monkeypatch=monkeypatch)
    short = step_gradient(module, tokenizer, kind, 4, accumulate=2, n=6, monkeypatch=monkeypatch)
    assert relative(short, whole) < 1e-6


def test_kto_reference_point_is_the_whole_steps_whatever_the_cut(tiny, monkeypatch):
    """KTO's z₀ away from 0 (precomputed reference log-probs below the policy's, so z₀ ≈ 1 nat): the
    step's first micro-batch scores every mismatched pair of the step, so micro-batches of rows and of
    tokens take the whole batch's step. With z₀ per micro-batch (the estimate
    TRL makes) the cuts' gradients differ from it by more than 1e-3, so the test can tell."""
    from alignlab.data.collate import select_rows
    from alignlab.models.logprobs import answer_logprobs

    model, tokenizer = tiny
    module = build_module("kto", copy.deepcopy(model).double(), tokenizer).double()
    dm = LabelledDataModule(ListSource({"labelled": rows_of("labelled")}), batch_size=8, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    batch = dm.collate_rows("train", list(range(8)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        matched = answer_logprobs(module.model, select_rows(batch, slice(0, 8))).logps
        mismatched = answer_logprobs(module.model, select_rows(batch, slice(8, 16))).logps
    ref = {
        "ref_logps": matched - 0.5 * torch.randn(8, generator=g, dtype=torch.float64),
        "ref_kl_logps": mismatched - 1.0 - torch.rand(8, generator=g, dtype=torch.float64),
    }
    whole = step_gradient(module, tokenizer, "labelled", 8, ref=ref, monkeypatch=monkeypatch)
    cuts = {
        "4 micro-batches": dict(batch_size=2, accumulate=4),
        "by tokens": dict(batch_size=8, budget=150),
    }  # processes: z₀ sums over them with an all-gather, which the sequential emulation here cannot do
    for cut, kwargs in cuts.items():
        got = step_gradient(module, tokenizer, "labelled", ref=ref, monkeypatch=monkeypatch, **kwargs)
        assert relative(got, whole) < 1e-6, cut
    module.reference_point = lambda b: kto_kl_estimate(*module._mismatched_logps(b))  # per micro-batch
    per_micro_batch = step_gradient(module, tokenizer, "labelled", 2, accumulate=4, ref=ref, monkeypatch=monkeypatch)
    assert relative(per_micro_batch, whole) > 1e-3


def test_a_token_budget_cuts_each_step_into_equal_micro_batches_of_the_same_rows(tiny):
    """8 pairs (answers of 1 and ~60 tokens), budget 150 padded tokens (a pair counts twice): every
    step's micro-batches hold the step's rows once, each within the budget unless it is one row
    longer than it, and the trainer accumulates their count; val_check_interval follows."""
    _, tokenizer = tiny
    dm = PairwiseDataModule(
        ListSource({"pairwise": rows_of("pairwise", 16)}), batch_size=4, max_tokens_per_micro_batch=150
    )
    dm.set_tokenizer(tokenizer)
    dm.setup()
    dm.trainer = SimpleNamespace(
        accumulate_grad_batches=2, training=True, max_steps=6, max_epochs=-1, val_check_interval=10
    )
    loader = dm.train_dataloader()
    micro = dm.trainer.accumulate_grad_batches
    assert micro > 2 and dm.trainer.val_check_interval == round(10 * micro / 2)
    batches = list(dm.order)  # the row indices of each micro-batch
    assert len(batches) == len(loader) == 2 * micro  # 16 rows: 2 steps of 8
    cost = {ex["index"]: 2 * dm.length(ex) for ex in dm.splits["train"]}
    for position, b in enumerate(batches):
        step = batches[position // micro * micro : position // micro * micro + micro]
        assert sorted(i for piece in step for i in piece) == sorted(sum(dm.order.step_rows(position), []))
        assert dm.order.step_totals(position, b)["rows"] == 8
        assert len(b) * max(cost[i] for i in b) <= 150 or len(b) == 1
    assert sorted(i for b in batches for i in b) == list(range(16))


def _offline_on_two_processes(rank: int, folder: str, model_dir: str, names: list[str]):
    """Each process: its share of the step (2 micro-batches of 2 rows, grouped by length), gradients
    averaged over the processes with a real all-reduce, as DDP does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for name in names:
        torch.manual_seed(0)  # RM's value head starts random: the same in every process
        module = build_module(name, copy.deepcopy(model).double(), tokenizer, **HPARAMS.get(name, {})).double()
        module.loss_scale = lambda: 4.0  # accumulate_grad_batches × processes
        kind = KIND[name]
        dm = DATA[kind](ListSource({kind: rows_of(kind)}), batch_size=2, shuffle=False, group_by_length=True)
        dm.set_tokenizer(tokenizer)
        dm.setup()
        dm.trainer = SimpleNamespace(accumulate_grad_batches=2, training=True)
        for _, batch in zip(range(2), dm.train_dataloader()):
            loss, _ = module.compute(dm.on_before_batch_transfer(batch, 0))
            (loss / 2).backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        torch.distributed.all_reduce(grads)
        torch.save(grads / 2, f"{folder}/{name}.rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # starts two processes
def test_every_offline_step_on_two_gloo_processes_is_the_whole_batch_step(tiny, tiny_model_dir, tmp_path, monkeypatch):
    """The same as above with real processes: the order shards each global batch by the process group's
    rank, and the gradients are all-reduced over gloo."""
    names = list(KIND)
    torch.multiprocessing.spawn(_offline_on_two_processes, args=(str(tmp_path), str(tiny_model_dir), names), nprocs=2)
    model, tokenizer = tiny
    for name in names:
        torch.manual_seed(0)
        module = build_module(name, copy.deepcopy(model).double(), tokenizer, **HPARAMS.get(name, {})).double()
        whole = step_gradient(module, tokenizer, KIND[name], 8, monkeypatch=monkeypatch)
        for rank in (0, 1):
            assert relative(torch.load(tmp_path / f"{name}.rank{rank}.pt"), whole) < 1e-6, (name, rank)


# -- through the real Trainer ------------------------------------------------------------------------
class SaveGradients(L.Callback):
    """Writes the first optimizer step's accumulated gradient (before clipping) and its logged train metrics."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
            torch.save(grads, self.path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1 and not Path(f"{self.path}.json").exists():
            logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            logged["micro_batches"] = trainer.accumulate_grad_batches
            Path(f"{self.path}.json").write_text(json.dumps(logged))


def trained_step(tmp_path: Path, name: str, *overrides: str) -> tuple[torch.Tensor, dict[str, float]]:
    from alignlab.train import train

    path = tmp_path / f"{name}.grad"
    common = [
        "trainer.max_steps=1",
        "trainer.precision=64-true",
        "evaluation.at_start=false",
        "evaluation.exact_match=false",
        "data.shuffle=false",
        f"+callbacks.grads._target_={__name__}.SaveGradients",
        f"+callbacks.grads.path={path}",
        *QUIET,
    ]
    train(compose([*common, *overrides], tmp_path / name))
    return torch.load(path), json.loads(Path(f"{path}.json").read_text())


@pytest.mark.parametrize(
    "cut",
    [
        ["batch_size=4", "trainer.accumulate_grad_batches=2", "max_tokens_per_micro_batch=null"],
        [
            "batch_size=4",
            "trainer.accumulate_grad_batches=2",
            "max_tokens_per_micro_batch=null",
            "data.group_by_length=true",
        ],
        ["batch_size=8", "max_tokens_per_micro_batch=160"],
    ],
    ids=["rows", "grouped", "tokens"],
)
def test_case_ga_sft_scaling_accumulation_takes_the_whole_batch_step(tmp_path, cut):
    """shared/cases/ga_sft_scaling: 8 SFT rows, 4 with 1-token and 4 with ~60-token answers. One batch of
    8 and 2 accumulated micro-batches of 4 (length-grouped or not) take the same step (the equal-weight
    mean of micro-batch token means was 99% off), and log the same step metrics (loss: the step's
    token mean, mean_token_accuracy, num_tokens)."""
    case = tmp_path / "sft.jsonl"
    case.write_text("".join(json.dumps(row) + "\n" for row in CASE_ROWS))
    data = ["algorithm=sft", "data=custom_sft", f"data.source.path={case}", f"data.source.eval_path={case}"]
    whole, whole_logged = trained_step(tmp_path, "whole", *data, "batch_size=8", "max_tokens_per_micro_batch=null")
    split, split_logged = trained_step(tmp_path, "split", *data, *cut)
    assert whole_logged.pop("micro_batches") == 1 and split_logged.pop("micro_batches") >= 2
    assert relative(split, whole) <= 1e-6
    assert split_logged.keys() == whole_logged.keys() >= {"train/loss", "train/mean_token_accuracy", "train/num_tokens"}
    assert split_logged == pytest.approx(whole_logged, rel=1e-9)


@pytest.mark.parametrize(
    ("algorithm", "logged"),
    [
        (["algorithm=dpo"], {"train/loss", "train/nll_loss", "train/rewards/margins"}),
        (["algorithm=kto", "data=arith_kto"], {"train/loss", "train/kl", "train/rewards/chosen"}),
        (["algorithm=rm"], {"train/loss", "train/accuracy", "train/reward/min", "train/reward/max"}),
    ],
    ids=["dpo", "kto", "rm"],
)
@pytest.mark.parametrize(
    "cut",
    [
        ["batch_size=2", "trainer.accumulate_grad_batches=4", "max_tokens_per_micro_batch=null"],
        ["batch_size=8", "max_tokens_per_micro_batch=60"],
    ],
    ids=["rows", "tokens"],
)
def test_trainer_accumulation_takes_the_whole_batch_step_and_logs_its_metrics(tmp_path, algorithm, logged, cut):
    """Through train(): DPO at its default rpo_alpha=1 (pair mean + chosen-token NLL), KTO (at the first
    step z₀ = 0 in every micro-batch), RM: the same gradient, and every logged train metric is the
    step's (loss and nll_loss its sums, min and max over it, the others means over its rows)."""
    whole, whole_logged = trained_step(tmp_path, "whole", *algorithm, "batch_size=8", "max_tokens_per_micro_batch=null")
    split, split_logged = trained_step(tmp_path, "split", *algorithm, *cut)
    assert whole_logged.pop("micro_batches") == 1 and split_logged.pop("micro_batches") >= 2
    assert relative(split, whole) <= 1e-6
    assert split_logged.keys() == whole_logged.keys() >= logged
    # KTO's z₀ is 0 only up to the float32 reference (scored once, outside the float64 module): the
    # clamped estimate of a micro-batch may be 4e-8 where the whole batch's is 0
    kl = [logged.pop("train/kl", 0.0) for logged in (split_logged, whole_logged)]
    assert kl[0] == pytest.approx(kl[1], abs=1e-6)
    assert split_logged == pytest.approx(whole_logged, rel=1e-9)


# -- PPO and GRPO: micro-batches and processes within their manual optimizer steps ------------------
class CaptureStep:
    """An optimizer stand-in: averages each step's gradient over the processes (as DDP does) and keeps it."""

    def __init__(self, module, world: int):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.param_groups, self.world, self.steps = [{"params": self.params}], world, []

    def step(self) -> None:
        grads = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in self.params])
        if self.world > 1:
            torch.distributed.all_reduce(grads)
        self.steps.append(grads / self.world)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def online_module(name: str, model_dir: str, reward_folder: str, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.online.rewards import length_reward

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    if name == "grpo":
        module = build_module("grpo", model.double(), tokenizer, num_generations=4, beta=0.04, max_completion_length=6)
        module.rewards, module.weights = [("length", lambda p, c, **kw: length_reward(p, c, target=3))], [1.0]
    else:
        module = build_module("ppo", model.double(), tokenizer, reward_model=reward_folder, response_length=6)
    for key, value in overrides.items():
        setattr(module, key, value)
    return module.double(), tokenizer


def update_gradient(module, samples: dict, world: int) -> torch.Tensor:
    """The first optimizer step's gradient of grpo_update / ppo_update on these rows."""
    optimizer = CaptureStep(module, world)
    if hasattr(module, "grpo_update"):
        module.grpo_update(samples, optimizer)
    else:
        module.ppo_update(samples, optimizer, generator=torch.Generator().manual_seed(0))
    return optimizer.steps[0]


def rows(samples: dict, part: slice) -> dict:
    return {k: (v[part] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in samples.items()}


def _update_on_two_processes(rank: int, folder: str, name: str, model_dir: str, reward_folder: str, cases: list):
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)

    def total(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        torch.distributed.all_reduce(value)
        return value

    samples = torch.load(f"{folder}/samples.pt")
    half = samples["input_ids"].shape[0] // 2  # each process its contiguous share of the prompts (and groups)
    for i, overrides in enumerate(cases):
        module, _ = online_module(name, model_dir, reward_folder, **overrides, micro_batch_size=2)
        module.sum_across_devices, module.mean_across_devices = total, lambda v: total(v) / 2
        module.loss_scale = lambda: 2.0  # what DDP divides by (manual optimisation: no accumulation factor)
        grads = update_gradient(module, rows(samples, slice(rank * half, (rank + 1) * half)), world=2)
        torch.save(grads, f"{folder}/grads{i}.rank{rank}.pt")
    torch.distributed.destroy_process_group()


ONLINE = {"grpo": [{"loss_type": t} for t in GRPO_LOSS_TYPES], "ppo": [{"num_mini_batches": 1}]}


@pytest.mark.slow  # starts two processes
@pytest.mark.parametrize("name", ONLINE)
def test_online_steps_are_the_same_however_cut(tiny_model_dir, tmp_path, name):
    """GRPO under every loss_type (bnpo too: here it is the step's token mean, as dapo) and PPO: the
    step's gradient on the whole batch = micro-batches of 2 = 2 processes (gloo) with micro-batches of 2.
    GRPO's advantages are per generation batch and PPO's whitening per rollout, both before the step,
    so they are computed once here, as every process sees them."""
    from alignlab.data.collate import collate_prompts
    from alignlab.data.tokenize import encode_prompts

    reward_folder = ""
    if name == "ppo":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rm = build_module(
            "rm", AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
        )
        reward_folder = str(rm.save_final(tmp_path / "rm"))
    module, tokenizer = online_module(name, str(tiny_model_dir), reward_folder, **ONLINE[name][0])
    prompts = [[{"role": "user", "content": "12+345=" if i % 2 else "1="}] for i in range(4)]
    batch = {**collate_prompts(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id), "index": torch.arange(4)}
    batch["prompt_messages"], batch["columns"] = prompts, {}
    torch.manual_seed(0)
    samples = module.generate_batch(batch) if name == "grpo" else module.rollout(batch)
    samples = {k: v for k, v in samples.items() if torch.is_tensor(v) or v is None}
    # the untrained model never ends early: cut the answers to 1 and 6 tokens (of 6) in turn
    n, length = samples["mask"].shape
    keep = torch.tensor([1 if i % 3 else length for i in range(n)]).unsqueeze(1)
    samples["mask"] = samples["mask"] * (torch.arange(length) < keep)
    torch.save(samples, tmp_path / "samples.pt")
    args = (str(tmp_path), name, str(tiny_model_dir), reward_folder, ONLINE[name])
    torch.multiprocessing.spawn(_update_on_two_processes, args=args, nprocs=2)
    for i, overrides in enumerate(ONLINE[name]):
        for key, value in {**overrides, "micro_batch_size": None}.items():
            setattr(module, key, value)
        whole = update_gradient(module, samples, world=1)
        assert whole.norm() > 1e-6
        module.micro_batch_size = 2
        assert relative(update_gradient(module, samples, world=1), whole) < 1e-6, overrides
        for rank in (0, 1):
            assert relative(torch.load(tmp_path / f"grads{i}.rank{rank}.pt"), whole) < 1e-6, (overrides, rank)
