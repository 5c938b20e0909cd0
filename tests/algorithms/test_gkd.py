"""GKD's module: the step's loss from the teacher's and student's own forwards, the answers each step
trains on (lmbda, seq_kd), the frozen teacher, the tokenizer check before any model loads, and a short
run through train()."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from alignlab.data import SFTDataModule
from alignlab.errors import ConfigError
from alignlab.losses.gkd import gkd_loss
from alignlab.models.logprobs import answer_logits, answer_logprobs
from alignlab.online.rollout import sample
from alignlab.runner.config import check_config
from tests.conftest import QUIET, ListSource, build_module, compose


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights moved at random: a teacher that disagrees with the student."""
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    folder = tmp_path_factory.mktemp("teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    model.save_pretrained(folder)
    tokenizer_from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def student(tiny_model_dir, teacher_dir, **overrides):
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()  # the teacher loads in float64 too
    tokenizer = tokenizer_from_pretrained(tiny_model_dir)
    args = {"teacher_model_name_or_path": str(teacher_dir), "max_new_tokens": 5, **overrides}
    return build_module("gkd", model, tokenizer, **args), tokenizer


def sft_batch(tokenizer, n: int = 6, with_prompts: bool = False) -> dict:
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{3 * i}="}], "completion": str(4 * i)} for i in range(n)]
    dm = SFTDataModule(ListSource({"sft": rows}), batch_size=n, shuffle=False)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm.collate(dm.splits["train"], with_prompts=with_prompts)


class Capture:
    """An optimizer stand-in that keeps the step's gradient."""

    def __init__(self, module):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.param_groups, self.grads = [{"params": self.params}], []

    def step(self):
        self.grads.append(torch.cat([p.grad.flatten() for p in self.params]))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def test_answer_logits_are_the_forward_logits_at_answer_positions(tiny):
    model, tokenizer = tiny
    batch = sft_batch(tokenizer)
    logits, rows = answer_logits(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["loss_mask"][:, 1:].bool()
    assert torch.allclose(logits, full[mask], atol=1e-5)
    assert rows.tolist() == mask.nonzero()[:, 0].tolist()
    targets = batch["input_ids"][:, 1:][mask]
    token_logps = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(token_logps, answer_logprobs(model, batch).token_logps[mask], atol=1e-5)
    assert torch.allclose(answer_logits(model, batch, temperature=2.0)[0], logits / 2)


def test_a_step_is_the_jsd_of_the_two_forwards_whatever_the_micro_batches(tiny_model_dir, teacher_dir):
    module, tokenizer = student(tiny_model_dir, teacher_dir, lmbda=0.0, beta=0.3)
    batch = sft_batch(tokenizer)
    teacher = module.teacher.module
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(name.startswith("teacher") for name in module.state_dict())  # never trained or checkpointed
    before = [p.clone() for p in teacher.parameters()]
    mask = batch["loss_mask"][:, 1:].bool()
    student_logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = gkd_loss(student_logits[:, :-1][mask], teacher_logits[:, :-1][mask], 0.3)
    whole = torch.autograd.grad(expected.loss, [p for p in module.parameters() if p.requires_grad])
    whole = torch.cat([g.flatten() for g in whole])
    for budget in (None, 40):  # one micro-batch, or about one row each
        module.max_tokens_per_micro_batch = budget
        optimizer = Capture(module)
        metrics, rows = module.train_on(batch, optimizer, None)
        assert metrics["loss"].item() == pytest.approx(expected.loss.item(), rel=1e-10)
        assert torch.allclose(optimizer.grads[0], whole, rtol=1e-8, atol=1e-12)
        assert metrics["num_tokens"].item() == mask.sum().item() and metrics["on_policy"].item() == 0.0
        assert rows == 6
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_lmbda_draws_on_policy_steps_alike_on_every_call(tiny_model_dir, teacher_dir):
    module, _ = student(tiny_model_dir, teacher_dir, lmbda=0.3)
    draws = []
    for step in range(300):
        module.rollouts = step
        draws.append(module.on_policy_step())
    assert 0.22 < sum(draws) / 300 < 0.38  # three standard deviations
    module.rollouts = 7
    assert module.on_policy_step() == draws[7]
    for lmbda, share in ((0.0, 0), (1.0, 100)):
        module.lmbda = lmbda
        count = 0
        for step in range(100):
            module.rollouts = step
            count += module.on_policy_step()
        assert count == share


def test_the_answers_each_step_trains_on(tiny_model_dir, teacher_dir):
    module, tokenizer = student(tiny_model_dir, teacher_dir, lmbda=1.0)
    batch = sft_batch(tokenizer)
    prompts = module.prompts_of(batch)
    with_prompts = sft_batch(tokenizer, with_prompts=True)
    assert torch.equal(prompts["prompt_input_ids"], with_prompts["prompt_input_ids"])
    assert torch.equal(prompts["prompt_attention_mask"], with_prompts["prompt_attention_mask"])
    # on-policy: the student's keyed samples, the same ones the online path gives
    seqs, on_policy = module.answers_for(batch)
    assert on_policy and torch.equal(seqs["input_ids"], module.sample_answers(prompts, 5, 256).seqs["input_ids"])
    # off-policy: the data's answers, or with seq_kd the teacher's samples
    module.lmbda = 0.0
    seqs, on_policy = module.answers_for(batch)
    assert not on_policy and torch.equal(seqs["input_ids"], batch["input_ids"])
    module.seq_kd = True
    seqs, _ = module.answers_for(batch)
    by_teacher = sample(module.teacher.module, tokenizer, prompts, 5, module.temperature, 256, step=0)
    by_student = module.sample_answers(prompts, 5, 256)
    assert torch.equal(seqs["input_ids"], by_teacher.seqs["input_ids"])
    assert not torch.equal(seqs["input_ids"], by_student.seqs["input_ids"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.lmbda=1.5", "algorithm.lmbda must be in [0.0, 1.0], got 1.5"),
        ("algorithm.beta=-0.1", "algorithm.beta must be in [0.0, 1.0], got -0.1"),
        ("algorithm.temperature=0", "algorithm.temperature must be > 0, got 0"),
        ("algorithm.max_new_tokens=0", "algorithm.max_new_tokens must be a whole number >= 1"),
        ("algorithm.seq_kd=1", "algorithm.seq_kd must be true or false, got 1"),
        ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 does not apply to algorithm=gkd"),
    ],
)
def test_out_of_range_options_are_refused_by_name(teacher_dir, override, message):
    cfg = compose(["algorithm=gkd", f"algorithm.teacher_model_name_or_path={teacher_dir}", override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_config(cfg)


def test_the_teacher_is_checked_before_any_model_loads(teacher_dir, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignlab.models.loading import tokenizer_from_pretrained

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    check_config(compose(["algorithm=gkd", f"algorithm.teacher_model_name_or_path={teacher_dir}"]))  # the same one
    with pytest.raises(ConfigError, match="algorithm.teacher_model_name_or_path is not set"):
        check_config(compose(["algorithm=gkd"]))
    with pytest.raises(ConfigError, match="algorithm.teacher_model_name_or_path=/no/such/teacher: no such folder"):
        check_config(compose(["algorithm=gkd", "algorithm.teacher_model_name_or_path=/no/such/teacher"]))
    # a teacher whose tokenizer has one token more
    other = tmp_path / "other"
    tokenizer = tokenizer_from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    (other / "config.json").write_text((teacher_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"teacher's tokenizer differs from the student's .*'<extra>': student none"):
        check_config(compose(["algorithm=gkd", f"algorithm.teacher_model_name_or_path={other}"]))
    # the same tokenizer, a config with a wider output layer
    wider = tmp_path / "wider"
    tokenizer_from_pretrained(tiny_model_dir).save_pretrained(wider)
    text = (teacher_dir / "config.json").read_text()
    (wider / "config.json").write_text(text.replace('"vocab_size": 259', '"vocab_size": 300'))
    with pytest.raises(ConfigError, match="the teacher's config has vocab_size 300, the student's 259"):
        check_config(compose(["algorithm=gkd", f"algorithm.teacher_model_name_or_path={wider}"]))


class BatchRows(L.Callback):
    """Records the rows of every training batch."""

    seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        BatchRows.seen.append(len(batch["index"]))


def test_a_short_run_distils_through_train(teacher_dir, tmp_path):
    from alignlab.train import train

    overrides = [
        "algorithm=gkd",
        f"algorithm.teacher_model_name_or_path={teacher_dir}",
        "algorithm.lmbda=0.5",
        "algorithm.max_new_tokens=4",
        "algorithm.num_sample_generations=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.source.n_eval=32",
        "batch_size=8",
        "max_tokens_per_micro_batch=100",  # the data's budget too: set aside, GKD cuts its steps itself
        "evaluation.at_start=false",
        "+callbacks.batch_rows._target_=tests.algorithms.test_gkd.BatchRows",
        *QUIET,
    ]
    BatchRows.seen.clear()
    result = train(compose(overrides, tmp_path))
    assert result["steps"] == 2 and BatchRows.seen == [8, 8]  # each step's rows whole, not the data's micro-batches
    metrics = result["metrics"]
    assert 0 < metrics["train/loss"] < 1 and 0 < metrics["eval/loss"] < 1  # JSD(0.5) is at most ln 2
    assert {"train/num_tokens", "train/on_policy", "eval/exact_match"} <= metrics.keys()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 16 and set(samples[0]) == {"step", "prompt", "answer", "score", "solution"}
    assert samples[0]["prompt"][0]["role"] == "user"  # the data's messages
    assert (tmp_path / "model" / "config.json").exists()


def test_the_first_step_loss_is_trls_on_the_same_models_and_batch(tiny_model_dir, teacher_dir, monkeypatch):
    """TRL's GKDTrainer.compute_loss on data answers: both models' full logits shifted by one, labels −100
    outside the answers, generalized_jsd_loss at its default temperature 1."""
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    module, tokenizer = student(tiny_model_dir, teacher_dir, lmbda=0.0, beta=0.7)
    batch = sft_batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    with torch.no_grad():
        student_logits, teacher_logits = module.model(**inputs).logits, module.teacher.module(**inputs).logits
    trl = GKDTrainer.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:], beta=0.7)
    metrics, _ = module.train_on(batch, Capture(module), None)
    assert metrics["loss"].item() == pytest.approx(trl.item(), rel=1e-10)
