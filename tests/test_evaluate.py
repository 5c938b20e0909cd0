"""`python -m alignlab.evaluate`: each number of the report equals its direct computation on the
held-out rows (exact match, preference accuracy, DPO implicit reward accuracy and log-ratio to a
reference, win rate under a reward model), errors say what to change, and the documented commands
parse and compose."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from alignlab.evaluate import build_parser, evaluate, main
from alignlab.generate import complete, load_policy
from alignlab.online.generation import matches_solution
from tests.conftest import ROOT, build_module, compose
from tests.test_generate import noisy_copy, write_rows

PAIRS = [
    {"prompt": "3+4=", "chosen": "7", "rejected": "8"},
    {"prompt": "10+25=", "chosen": "35", "rejected": "36 or so"},
    {
        "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": "0+0="}],
        "chosen": "0",
        "rejected": "1",
    },
    {"prompt": "40+9=", "chosen": "49", "rejected": "94"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "fourteen"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "22"},
]


def messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict:
    """A policy and a reference: two noisy copies of the tiny model."""
    root = tmp_path_factory.mktemp("evaluate")
    return {
        "policy": noisy_copy(tiny_model_dir, root / "policy", seed=0),
        "reference": noisy_copy(tiny_model_dir, root / "reference", seed=1),
    }


def on_file(kind: str, path: Path) -> list[str]:
    """Overrides that evaluate on every row of `path` (it is also the held-out file)."""
    return [f"data=custom_{kind}", f"data.source.path={path}", f"data.source.eval_path={path}"]


def sequence_logps(model, tokenizer, rows: list[dict], key: str) -> torch.Tensor:
    """[N] log π(row[key] | prompt) summed over the answer tokens, one row at a time from the full
    forward: the direct computation the report's numbers are checked against."""
    from alignlab.data.tokenize import encode_conversations

    out = []
    for row in rows:
        ((prompt, (answer,)),) = encode_conversations(tokenizer, [messages(row["prompt"])], [[row[key]]])
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        out.append(logp[len(prompt) - 1 :].gather(1, ids[0, len(prompt) :, None]).sum())
    return torch.stack(out)


def test_exact_match_equals_the_share_of_greedy_answers_that_match(folders, tmp_path):
    model, tokenizer = load_policy(folders["policy"])
    prompts = [messages(r["prompt"]) for r in PAIRS]
    answers = complete(model, tokenizer, prompts)  # greedy, evaluation.max_new_tokens
    # the model's own answer is the solution of rows 0, 2 and 3; the others ask for something else
    solutions = [answers[0], "7", answers[2], f"  {answers[3]}  ", "fourteen", "4"]
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "solution": s} for r, s in zip(PAIRS, solutions)]
    report = evaluate(folders["policy"], on_file("sft", write_rows(tmp_path / "sft.jsonl", rows)))
    by_hand = sum(matches_solution(a, s) for a, s in zip(answers, solutions)) / len(rows)
    assert report["metrics"] == {"exact_match": pytest.approx(by_hand)} and by_hand == 3 / 6
    assert report["counts"] == {"exact_match": 6} and report["rows"] == 6
    assert report["data"]["kind"] == "sft" and report["data"]["source"]["path"] == str(tmp_path / "sft.jsonl")


def test_preference_accuracy_and_implicit_reward_equal_direct_log_probs(folders, tmp_path):
    policy, _ = load_policy(folders["policy"])
    reference, tokenizer = load_policy(folders["reference"])
    overrides = on_file("pairs", write_rows(tmp_path / "pairs.jsonl", PAIRS))
    report = evaluate(folders["policy"], [*overrides, "eval_batch_size=4"], ref_model=str(folders["reference"]))
    chosen, rejected = (sequence_logps(policy, tokenizer, PAIRS, k) for k in ("chosen", "rejected"))
    ref_chosen, ref_rejected = (sequence_logps(reference, tokenizer, PAIRS, k) for k in ("chosen", "rejected"))
    metrics = report["metrics"]
    assert metrics["preference_accuracy"] == pytest.approx((chosen > rejected).double().mean().item())
    implicit = (chosen - ref_chosen) > (rejected - ref_rejected)
    assert metrics["implicit_reward_accuracy"] == pytest.approx(implicit.double().mean().item())
    assert metrics["chosen_logratio"] == pytest.approx((chosen - ref_chosen).mean().item(), abs=1e-4)
    tokens = sum(len(r["chosen"]) + 1 for r in PAIRS)  # a byte per character, then <|im_end|>
    assert metrics["chosen_logratio_per_token"] == pytest.approx((chosen - ref_chosen).sum().item() / tokens, abs=1e-5)
    assert report["counts"] == {"pairs": 6} and "exact_match" not in metrics  # these rows have no solution
    assert 0 < metrics["preference_accuracy"] < 1 or 0 < metrics["implicit_reward_accuracy"] < 1  # not a constant


def test_the_bundled_task_gives_exact_match_and_preference_accuracy(folders):
    report = evaluate(folders["policy"], ["data=arith_pairs", "data.source.n_train=4", "data.source.n_eval=6"])
    assert report["rows"] == 6 and report["counts"] == {"exact_match": 6, "pairs": 6}
    assert set(report["metrics"]) == {"exact_match", "preference_accuracy"}
    assert report["data"]["source"]["n_eval"] == 6 and report["data"]["module"] == "alignlab.data.PairwiseDataModule"


def test_win_rate_under_a_reward_model(folders, tiny, tmp_path):
    from alignlab.models.reward import RewardScorer

    build_module("rm", *tiny).save_final(tmp_path / "rm")
    rm_folder = tmp_path / "rm" / "model"
    overrides = on_file("pairs", write_rows(tmp_path / "pairs.jsonl", PAIRS))
    report = evaluate(folders["policy"], overrides, reward_model=str(rm_folder))
    prompts = [messages(r["prompt"]) for r in PAIRS]
    answers = complete(*load_policy(folders["policy"]), prompts)
    scorer = RewardScorer(rm_folder)
    ours, theirs = scorer.score(prompts, answers), scorer.score(prompts, [r["chosen"] for r in PAIRS])
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)]
    assert report["metrics"]["win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert report["baseline"] == "chosen" and sum(report["counts"][k] for k in ("wins", "ties", "losses")) == 6
    # against a baseline model that is the policy itself every prompt is a tie
    same = evaluate(folders["policy"], overrides, reward_model=str(rm_folder), baseline_model=str(folders["policy"]))
    assert same["metrics"]["win_rate"] == 0.5 and same["counts"]["ties"] == 6


def test_command_prints_and_writes_the_report(folders, tmp_path, capsys):
    path = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    args = ["--model", str(folders["policy"]), *on_file("pairs", path)[:2], "--output", str(tmp_path / "r.json")]
    assert main([*args, f"data.source.eval_path={path}"]) == 0  # overrides before and after the options
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["model"] == str(folders["policy"]) and printed["data"]["overrides"][0] == "data=custom_pairs"


@pytest.mark.parametrize(
    ("overrides", "options", "message"),
    [
        (["data=custom_pairs"], [], "required config value(s) not set: data.source.path"),
        (["data=no_such_data"], [], "do not compose"),
        (["data=custom_sft", "data.source.path=missing.jsonl"], [], "missing.jsonl: no such file"),
        (["data=arith_prompts", "data.source.n_train=4"], ["--reward-model", "rm"], "give --baseline-model"),
        (
            ["algorithm=grpo", "data=arith_tools_prompts", "algorithm.tools=[alignlab.tools.calculator]"],
            ["--reward-model", "rm"],
            "--reward-model and --ref-model are for single answers",
        ),
        (["algorithm=grpo", "data=arith_tools_prompts", "algorithm.tools=[nowhere.tool]"], [], "algorithm.tools[0]"),
    ],
)
def test_errors_say_what_to_change(folders, overrides, options, message, capsys):
    assert main(["--model", str(folders["policy"]), *options, *overrides]) == 1
    assert message in capsys.readouterr().err


def test_data_without_held_out_rows_is_refused(folders, tmp_path, capsys):
    path = write_rows(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 3)
    args = ["--model", str(folders["policy"]), "data=custom_sft", f"data.source.path={path}"]
    assert main([*args, "data.source.eval_fraction=0"]) == 1
    assert f"{path}: has no held-out rows to evaluate on" in capsys.readouterr().err


TOOLS = [
    "algorithm=grpo",
    "data=arith_tools_prompts",
    "data.source.n_eval=6",
    "eval_batch_size=4",
    "algorithm.tools=[alignlab.tools.calculator]",
    "algorithm.tool_call_format=hermes",
    "algorithm.max_turns=3",
    "algorithm.max_completion_length=160",
]


def test_tool_episodes_are_measured_as_grpo_evaluates_them(folders, monkeypatch):
    """A scripted greedy policy (byte-level tokens) calls the calculator on the question, then answers the
    tool's result when the first number is even and one more when it is odd: the report counts each."""
    import alignlab.online.multiturn
    from alignlab.data.arith_tools import tool_call_text

    seen = []

    def scripted(model, tokenizer, stops):
        def sampler(ids, attn, n, max_new, keys):
            rows = []
            for row, mask in zip(ids, attn):
                text = bytes(t for t in row[mask.bool()].tolist() if t < 256).decode()
                a, b = (int(x) for x in re.search(r"(\d+)\+(\d+)=", text).groups())
                result = re.search(r"tool\n(\d+)", text)
                if result is None:
                    turn = tool_call_text(a, b)
                else:
                    seen.append(a)
                    turn = str(int(result.group(1)) + a % 2)
                rows.append(list(turn.encode()) + [stops[0]])
            width = max(map(len, rows))
            return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

        return sampler

    monkeypatch.setattr(alignlab.online.multiturn, "greedy_sampler", scripted)
    report = evaluate(str(folders["policy"]), TOOLS)
    metrics = report["metrics"]
    assert len(seen) == 6 and report["counts"] == {"episodes": 6, "exact_match": 6}
    assert metrics["exact_match"] == pytest.approx(sum(a % 2 == 0 for a in seen) / 6)
    assert metrics["tool_result_matches"] == 1.0  # every call was right, whatever the answer made of it
    assert (metrics["num_turns"], metrics["tools/call_frequency"], metrics["tools/failure_frequency"]) == (2, 1, 0)
    assert metrics["max_turns_ratio"] == 0 and report["max_turns"] == 3 and "max_new_tokens" not in report


def test_the_untrained_model_plays_real_episodes(folders):
    """The model's own greedy turns: it cannot call the calculator, so no answer is right."""
    report = evaluate(str(folders["policy"]), [*TOOLS, "algorithm.max_completion_length=24"])
    metrics = report["metrics"]
    assert report["counts"]["episodes"] == 6 and 1.0 <= metrics["num_turns"] <= 3.0
    assert metrics["exact_match"] == 0.0 and metrics["tool_result_matches"] == 0.0


def documented(module: str) -> list[str]:
    """The `python -m alignlab.<module>` command lines of docs/usage.md and README.md."""
    lines = []
    for page in (ROOT / "docs" / "usage.md", ROOT / "README.md"):
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            lines += [line for line in block.splitlines() if line.startswith(f"python -m alignlab.{module} ")]
    return lines


def test_documented_commands_parse_and_compose(tmp_path):
    from alignlab.generate import build_parser as generate_parser

    assert documented("evaluate") and documented("generate")
    for line in documented("evaluate"):
        argv = shlex.split(re.sub(r"<[^>]+>", "placeholder", line), comments=True)[3:]
        compose(build_parser().parse_intermixed_args(argv).overrides, output_dir=tmp_path)
    for line in documented("generate"):
        generate_parser().parse_args(shlex.split(re.sub(r"<[^>]+>", "placeholder", line), comments=True)[3:])
