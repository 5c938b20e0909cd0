"""GRPO's reward functions: math-verify's `accuracy` (and the exact comparison it keeps for plain
numbers), the format rewards, the cosine length schedule and the repetition penalty (float64 references
written from Yeo et al. 2025), async reward functions and their timing."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from alignlab.data.arith import ArithTask
from alignlab.errors import ConfigError
from alignlab.online.rewards import (
    REGISTRY,
    REWARD_FUNCTIONS,
    CosineReward,
    RepetitionPenalty,
    RewardFunctionError,
    accuracy,
    build_reward_function,
    call_reward_function,
    cosine_scaled,
    exact_match,
    score_completions,
    think_format,
)


def user(text):
    return [{"role": "user", "content": text}]


def scores(fn, completions, **columns):
    return fn([user("q")] * len(completions), completions, **columns)


# -- accuracy ------------------------------------------------------------------------------------------
def test_accuracy_agrees_with_the_exact_comparison_on_every_bundled_arithmetic_answer():
    """Every solution of the bundled task (train and held out), its right answer written as the model
    writes it, and wrong answers (the task's own and others): old (`exact_match`) and new scores are
    the same, so GRPO on the bundled task is unchanged."""
    rows = ArithTask().load("pairwise")
    rows = rows["train"] + rows["eval"]
    solutions = [r["solution"] for r in rows]
    rng = random.Random(0)
    answers = {
        "right": solutions,
        "rejected": [r["rejected"] for r in rows],
        "off_by_one": [str(int(s) + 1) for s in solutions],
        "off_by_ten": [str(int(s) - 10) for s in solutions],
        "random": [str(rng.randint(-20, 120)) for _ in solutions],
        "spaced": [f" {s}\n" for s in solutions],
        "decimal": [f"{s}.0" for s in solutions],
        "leading_zero": [f"0{s}" for s in solutions],
        "digits_reversed": [s[::-1] for s in solutions],
        "two_numbers": [f"{s} {s}" for s in solutions],
        "empty": [""] * len(solutions),
    }
    for kind, given in answers.items():
        old = exact_match(None, given, solution=solutions)
        assert accuracy(None, given, solution=solutions) == old, kind
    assert sum(exact_match(None, answers["right"], solution=solutions)) == len(rows)
    assert sum(exact_match(None, answers["rejected"], solution=solutions)) == 0


@pytest.mark.parametrize(
    ("answer", "solution", "right"),
    [
        ("12", "12", 1.0),
        ("12345678901234567890", "12345678901234567891", 0.0),  # plain numbers: exact, not math-verify's 15 digits
        ("5", 5.0, 1.0),
        ("12", r"\boxed{12}", 1.0),
        (r"\boxed{12}", r"\boxed{12}", 1.0),
        ("12.0", r"\boxed{12}", 1.0),
        ("24/2", r"\boxed{12}", 1.0),
        (r"$\frac{24}{2}$", r"\boxed{12}", 1.0),
        ("The answer is $12$", r"\boxed{12}", 1.0),
        ("The answer is 12", r"\boxed{12}", 0.0),  # free text without a marked answer (TRL: LaTeX only)
        ("12 12", "12", 0.0),  # a plain-number solution: exact unless the answer is marked
        ("40x7", "40", 0.0),  # math-verify alone would read 40
        ("24/2", "12", 0.0),
        (r"\boxed{12}", "12", 1.0),
        ("so $x = 12$", "12", 1.0),
        ("13", r"\boxed{12}", 0.0),
        ("112", r"\boxed{12}", 0.0),
        ("1.5", r"\frac{3}{2}", 1.0),
        ("3/2", r"\frac{3}{2}", 1.0),
        (r"\boxed{\frac{3}{2}}", r"\frac{3}{2}", 1.0),
        ("2", r"\frac{3}{2}", 0.0),
        ("#### 42", "42", 1.0),  # GSM8K's final-answer marker
        ("so she has 42 left.\n#### 42", "#### 42", 1.0),
        ("#### 41", "42", 0.0),
        ("Paris.", "paris", 1.0),  # not mathematics: normalised text
        ("London", "Paris", 0.0),
        ("5", None, 0.0),
    ],
)
def test_accuracy_reads_mathematics_with_math_verify(answer, solution, right):
    assert scores(accuracy, [answer], solution=[solution]) == [right]


def test_latex_arithmetic_variant_scores_equivalent_forms_right():
    """conf/data/arith_prompts_latex.yaml: the same problems, solutions as \\boxed{n}."""
    plain, latex = ArithTask().load("prompt"), ArithTask(solution_format="latex").load("prompt")
    assert [r["prompt"] for r in latex["eval"]] == [r["prompt"] for r in plain["eval"]]
    for row, original in list(zip(latex["eval"], plain["eval"]))[:16]:
        n = int(original["solution"])
        assert row["solution"] == rf"\boxed{{{n}}}"
        right = [str(n), rf"\boxed{{{n}}}", f"{n}.0", f"{2 * n}/2", rf"\frac{{{2 * n}}}{{2}}"]
        wrong = [str(n + 1), rf"\boxed{{{n - 1}}}", f"{n}.5", f"{2 * n + 1}/2", ""]
        assert scores(accuracy, right, solution=[row["solution"]] * 5) == [1.0] * 5, row
        assert scores(accuracy, wrong, solution=[row["solution"]] * 5) == [0.0] * 5, row
        assert scores(exact_match, right[:1], solution=[row["solution"]]) == [0.0]  # text differs: exact says no
    with pytest.raises(ValueError, match="solution_format"):
        ArithTask(solution_format="markdown")


def test_exact_match_keeps_todays_comparison():
    assert REGISTRY["exact_match"] is exact_match
    assert scores(exact_match, ["5.0", "1/2", "Five"], solution=["5", 0.5, "five"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="solution"):
        scores(exact_match, ["5"])


# -- format --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "right"),
    [
        ("<think>2+3 is 5</think>5", 1.0),
        ("<think>\nadd\n</think>\nThe answer is 5.\n", 1.0),
        ("  <think>a</think> b", 1.0),  # white space before the tag
        ("<think>a</think>", 0.0),  # no answer
        ("<think>a</think>  \n", 0.0),
        ("5 <think>a</think> 5", 0.0),  # text before the reasoning
        ("<think>a 5", 0.0),  # never closed
        ("<think><think>a</think>5", 0.0),
        ("<think>a</think>5</think>", 0.0),
        ("<think>a</think>5<think>b</think>6", 0.0),
        ("5", 0.0),
    ],
)
def test_think_format(completion, right):
    assert scores(think_format, [completion]) == [right]
    assert REGISTRY["think_format"] is think_format


def test_regex_format_takes_its_pattern_and_mode_from_the_config():
    name, fn = build_reward_function({"_target_": "alignlab.online.rewards.regex_format", "pattern": r"<a>\d+</a>"})
    assert name == "regex_format"
    assert scores(fn, ["<a>12</a>", " <a>12</a>\n", "x<a>12</a>", "<a>x</a>"]) == [1.0, 1.0, 0.0, 0.0]
    _, search = build_reward_function(
        {"_target_": "alignlab.online.rewards.regex_format", "pattern": r"<a>\d+</a>", "mode": "search", "name": "tag"}
    )
    assert scores(search, ["x<a>12</a>y", "<a></a>"]) == [1.0, 0.0]
    assert scores(REGISTRY["format"], ["12", "-3", "1 2"]) == [1.0, 1.0, 0.0]  # today's `format`: an integer
    with pytest.raises(ConfigError, match="not a regular expression"):  # a bad pattern fails at config time
        build_reward_function({"_target_": "alignlab.online.rewards.regex_format", "pattern": "(<a>"})
    with pytest.raises(ConfigError, match="mode"):
        build_reward_function({"_target_": "alignlab.online.rewards.regex_format", "pattern": "a", "mode": "any"})


# -- cosine (Yeo et al. 2025, eq. 1 and appendix C.1) -------------------------------------------------------
def paper_cosine(t: float, T: float, eta_min: float, eta_max: float) -> float:
    """CosFn(t, T, η_min, η_max) = η_min + ½(η_max − η_min)(1 + cos(tπ/T)), the paper's schedule."""
    return eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos(t * math.pi / T))


def test_cosine_hand_checked():
    defaults = dict(
        max_len=100, min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0
    )
    values = tuple(defaults.values())
    assert cosine_scaled(0, True, *values) == 1.0  # a correct answer of length 0: max_value_correct
    assert cosine_scaled(100, True, *values) == 0.5  # at max_len: min_value_correct
    assert cosine_scaled(50, True, *values) == pytest.approx(0.75, abs=1e-15)  # half way: the mean
    assert cosine_scaled(0, False, *values) == -1.0  # short and wrong: the largest penalty
    assert cosine_scaled(100, False, *values) == -0.5
    assert cosine_scaled(50, False, *values) == pytest.approx(-0.75, abs=1e-15)
    assert cosine_scaled(250, True, *values) == 0.5  # past max_len: max_len's value, not cos climbing back up
    # 25 of 100: ½·(1 + cos(π/4)) = 0.853553... of the way from 0.5 to 1.0
    assert cosine_scaled(25, True, *values) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + 2**-0.5), abs=1e-15)
    fn = CosineReward(max_len=4)
    assert scores(fn, ["12", "12", "13", "1300"], solution=["12", r"\boxed{12}", "12", "12"]) == [
        pytest.approx(0.75, abs=1e-15),  # 2 of 4 characters, right
        pytest.approx(0.75, abs=1e-15),  # right by math-verify
        pytest.approx(-0.75, abs=1e-15),
        -0.5,
    ]


def test_cosine_random_against_the_paper():
    rng = random.Random(0)
    for _ in range(200):
        max_len = rng.randint(1, 300)
        v = sorted(rng.uniform(-10, 10) for _ in range(4))
        min_wrong, max_wrong, min_correct, max_correct = v[0], v[1], v[2], v[3]
        length, correct = rng.randint(0, 400), rng.random() < 0.5
        t = min(length, max_len)
        # paper: correct CosFn(t, L, r_L^c, r_0^c), wrong CosFn(t, L, r_L^w, r_0^w)
        expected = (
            paper_cosine(t, max_len, min_correct, max_correct)
            if correct
            else paper_cosine(t, max_len, max_wrong, min_wrong)
        )
        got = cosine_scaled(length, correct, max_len, min_wrong, max_wrong, min_correct, max_correct)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_cosine_checks_its_arguments_at_config_time():
    name, fn = build_reward_function({"_target_": "alignlab.online.rewards.CosineReward", "max_len": 8})
    assert name == "cosine" and fn.max_len == 8
    with pytest.raises(ConfigError, match="max_len"):
        build_reward_function({"_target_": "alignlab.online.rewards.CosineReward", "max_len": 0})


# -- repetition (Yeo et al. 2025, appendix C.2; open-r1 / ms-swift n-grams of words) ------------------------
def reference_repetition(text: str, n: int, max_penalty: float) -> float:
    words = text.lower().split()
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (1 - len(set(grams)) / len(grams)) * max_penalty


def test_repetition_hand_checked():
    fn = RepetitionPenalty(ngram_size=2, max_penalty=-1.0)
    # "a b a b a": bigrams ab ba ab ba → 2 unique of 4: −0.5; "a a a a a": 1 of 4: −0.75
    assert scores(fn, ["a b a b a", "a a a a a", "a b c d", "a", ""]) == [-0.5, -0.75, 0.0, 0.0, 0.0]
    assert scores(fn, ["A b a B"]) == [pytest.approx(-1 / 3, abs=1e-15)]  # lower-cased: ab ba ab, 2 unique of 3
    default = REGISTRY["repetition"]
    assert (default.ngram_size, default.max_penalty) == (3, -1.0)  # TRL's, open-r1's and ms-swift's defaults
    assert scores(default, ["the cat sat the cat sat"]) == [pytest.approx(-0.25, abs=1e-15)]  # 3 unique of 4
    assert math.copysign(1, scores(default, ["a b c d"])[0]) == 1  # 0.0, not −0.0


def test_repetition_random_against_the_reference():
    rng = random.Random(1)
    for _ in range(200):
        n, penalty = rng.randint(1, 4), -rng.uniform(0, 3)
        text = " ".join(rng.choice("ab cd Ab xyz".split()) for _ in range(rng.randint(0, 30)))
        got = scores(RepetitionPenalty(n, penalty), [text])[0]
        assert got == pytest.approx(reference_repetition(text, n, penalty), rel=1e-12, abs=1e-15)
        assert penalty <= got <= 0


def test_repetition_checks_its_arguments_at_config_time():
    with pytest.raises(ConfigError, match="max_penalty"):
        build_reward_function({"_target_": "alignlab.online.rewards.RepetitionPenalty", "max_penalty": 0.5})
    with pytest.raises(ConfigError, match="ngram_size"):
        build_reward_function({"_target_": "alignlab.online.rewards.RepetitionPenalty", "ngram_size": 0})


# -- async functions and timing --------------------------------------------------------------------------
async def async_length(prompts, completions, **columns):
    await asyncio.sleep(0.2)
    return [float(len(c)) for c in completions]


async def async_accuracy(prompts, completions, solution=None, **columns):
    await asyncio.sleep(0.2)
    return accuracy(prompts, completions, solution)


async def async_broken(prompts, completions, **columns):
    raise RuntimeError("judge offline")


class AsyncJudge:
    async def __call__(self, prompts, completions, **columns):
        return [1.0] * len(completions)


def test_async_reward_functions_run_concurrently_and_give_what_sync_ones_give():
    completions, columns = ["12", "13", r"\boxed{12}"], {"solution": ["12", "12", "12"]}
    prompts = [user("q")] * 3
    functions = [
        ("accuracy", accuracy),
        ("async_accuracy", async_accuracy),
        ("length", lambda p, c, **k: [float(len(x)) for x in c]),
        ("async_length", async_length),
        ("judge", AsyncJudge()),
    ]
    values, seconds = score_completions(functions, prompts, completions, columns)
    assert list(values) == [name for name, _ in functions]  # in the configured order
    assert values["async_accuracy"] == values["accuracy"] == [1.0, 0.0, 1.0]
    assert values["async_length"] == values["length"] == [2.0, 2.0, 10.0]
    assert values["judge"] == [1.0] * 3
    assert set(seconds) == set(values) and all(s >= 0 for s in seconds.values())
    assert 0.2 <= seconds["async_length"] < 0.4  # the two 0.2 s sleeps overlapped: concurrent
    assert call_reward_function("async_length", async_length, prompts, completions, columns) == [2.0, 2.0, 10.0]
    with pytest.raises(RewardFunctionError, match="'async_broken' raised RuntimeError: judge offline"):
        score_completions([("async_broken", async_broken)], prompts, completions, columns)


def test_async_reward_functions_run_inside_a_running_event_loop():
    async def inside():
        return score_completions([("async_length", async_length)], [user("q")], ["abc"], {})[0]

    assert asyncio.run(inside()) == {"async_length": [3.0]}


def test_a_partial_of_an_async_function_is_awaited():
    name, fn = build_reward_function({"_target_": "tests.online.test_rewards.async_length"})
    assert call_reward_function(name, fn, [user("q")], ["ab"], {}) == [2.0]


# -- the registry -------------------------------------------------------------------------------------------
def test_built_in_reward_functions_are_registry_entries_that_names_resolve_to(monkeypatch):
    """REWARD_FUNCTIONS holds the built-ins; REGISTRY (the older name) maps each name to the same function;
    a function registered with the decorator is one `reward_funcs` may name."""
    assert set(REWARD_FUNCTIONS) == {
        "accuracy",
        "exact_match",
        "format",
        "think_format",
        "length",
        "soft_overlong",
        "cosine",
        "repetition",
    }
    assert dict(REGISTRY) == {name: REWARD_FUNCTIONS[name].fn for name in REWARD_FUNCTIONS}
    assert build_reward_function("accuracy") == ("accuracy", accuracy)
    monkeypatch.setattr(REWARD_FUNCTIONS, "_entries", dict(REWARD_FUNCTIONS._entries))  # undone after the test

    @REWARD_FUNCTIONS.register("shouting")
    def shouting(prompts, completions, **columns):
        return [float(c.isupper()) for c in completions]

    assert build_reward_function("shouting") == ("shouting", shouting) and REGISTRY["shouting"] is shouting
    with pytest.raises(ConfigError, match="unknown reward function 'shoutin': use one of"):
        build_reward_function("shoutin")


# -- wired into GRPO ---------------------------------------------------------------------------------------
async def async_half(prompts, completions, **columns):
    return [0.5] * len(completions)


def test_grpo_logs_each_reward_functions_time_and_takes_async_ones(tmp_path):
    """Two steps on the LaTeX arithmetic prompts with `accuracy`, `cosine`, `think_format` and an async
    function: every function's `timing/reward/<name>` is logged, in seconds."""
    from alignlab.train import train
    from tests.conftest import QUIET, compose

    overrides = [
        "algorithm=grpo",
        "data=arith_prompts_latex",
        "data.source.n_train=8",
        "data.source.n_eval=4",
        "algorithm.reward_funcs=[accuracy,cosine,think_format,{_target_:tests.online.test_rewards.async_half}]",
        "algorithm.max_completion_length=4",
        "algorithm.num_generations=2",
        "batch_size=4",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "evaluation.at_start=false",
        *QUIET,
    ]
    result = train(compose(overrides, tmp_path))
    assert result["steps"] == 2
    for name in ("accuracy", "cosine", "think_format", "async_half"):
        seconds = result["metrics"][f"train/timing/reward/{name}"]
        assert 0 <= seconds < 60, (name, seconds)
    assert result["metrics"]["train/rewards/async_half/mean"] == 0.5
    assert not [k for k in result["metrics"] if k.startswith("eval/timing")]  # timed in training only


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("myrewards_nowhere.sometimes_nan", "there is no module 'myrewards_nowhere'; run from the folder that holds"),
        ("alignlab.online.rewards.no_such_reward", "'alignlab.online.rewards' has no 'no_such_reward'"),
    ],
)
def test_a_reward_function_that_does_not_import_says_what_is_missing(target, message):
    with pytest.raises(ConfigError, match=f"reward function '{target}' could not be imported") as err:
        build_reward_function({"_target_": target})
    assert message in str(err.value)
