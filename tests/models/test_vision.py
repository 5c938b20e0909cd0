"""Vision-language models: the embedded tiny Qwen2-VL, images through tokenization, collation, log-probs,
the reward model and generation, and what trains (vision tower frozen, LoRA on the language model)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from alignlab.data.collate import select_rows
from alignlab.data.datamodule import LabelledDataModule, PairwiseDataModule, PromptDataModule, SFTDataModule
from alignlab.data.files import FileSource
from alignlab.data.vision import collate_vision, repeat_vision, select_vision
from alignlab.errors import ConfigError, DataError
from alignlab.models.logprobs import answer_logprobs, check_answer_logprobs, scoring_rows
from alignlab.models.reward import RewardModel
from alignlab.models.vision import forward_inputs, is_multimodal, load_image_encoder, vision_modules
from alignlab.online.generation import generate, sample_keys, stop_token_ids
from tests.conftest import ListSource, compose

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]


def picture(i: int, size=(56, 56)) -> Image.Image:
    """A plain image with a coloured square whose colour and place depend on i."""
    from PIL import ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    x = 4 + 7 * (i % 4)
    ImageDraw.Draw(image).rectangle([x, x, x + 20, x + 20], fill=COLOURS[i % 4])
    return image


def rows(n: int = 6) -> list[dict]:
    """Canonical rows: one or two images (of two sizes) per prompt, and one text-only row."""
    out = []
    for i in range(n):
        images = [picture(i, (56, 56) if i % 2 else (84, 56))] + ([picture(i + 1)] if i % 3 == 0 else [])
        text = "".join("<image>" for _ in images) + f"What colour is square {i}?"
        answer = ["red", "green", "blue", "yellow"][i % 4]
        out.append(
            {
                "prompt": [{"role": "user", "content": text}],
                "images": images,
                "completion": answer,
                "chosen": answer,
                "rejected": "purple",
                "label": i % 2 == 0,
                "solution": answer,
            }
        )
    text_only = {"prompt": [{"role": "user", "content": "no picture here"}], "completion": "ok", "solution": "ok"}
    out.append({**text_only, "chosen": "ok", "rejected": "no", "label": True})
    return out


@pytest.fixture(scope="module")
def vl():
    """(model, tokenizer, image encoder, folder) of the embedded tiny Qwen2-VL, loaded through load_model."""
    from alignlab.models.loading import load_model

    cfg = compose(["model=tiny_vl"])
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    model, tokenizer, path = load_model(model_cfg)
    return model, tokenizer, load_image_encoder(model, tokenizer, path), path


def setup(module_class, vl, data=None, **kwargs):
    model, tokenizer, images, _ = vl
    dm = module_class(ListSource(data or rows()), batch_size=4, max_length=128, **kwargs)
    dm.set_tokenizer(tokenizer)
    dm.set_image_encoder(images)
    dm.setup()
    return dm


def test_max_length_auto_counts_each_rows_image_tokens_and_processes_its_images_once(vl):
    from alignlab.data.truncation import model_positions

    model, tokenizer, images, _ = vl
    calls = []

    class Counted:
        def encode(self, pictures):
            calls.append(len(pictures))
            return images.encode(pictures)

    data = rows()
    for row in [r for r in data if r.get("images")]:  # larger pictures: the longest row passes 64 with their tokens
        row["images"] = [picture(0, (112, 112)) for _ in row["images"]]
    dm = PairwiseDataModule(ListSource(data), batch_size=4, max_length="auto")
    dm.set_tokenizer(tokenizer)
    dm.set_image_encoder(Counted())
    dm.set_max_positions(model_positions(model.config))
    dm.setup()
    longest = max(dm.length(ex) for ex in dm.splits["train"])  # its image tokens included
    assert longest > 64 and dm.max_length == -(-longest // 64) * 64  # 95% of 7 rows: all of them
    assert dm.dropped["train"] == 0
    image_rows = sum(1 for r in data if r.get("images"))
    assert len(calls) == 2 * image_rows  # once per row and split (ListSource gives both the same rows)


def float64(model, batch):
    return copy.deepcopy(model).double(), {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()
    }


def own_logps(model, batch) -> torch.Tensor:
    """[N] answer log-probs from log_softmax of the model's own full forward."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        **forward_inputs(model, batch["input_ids"], batch),
    ).logits
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token * batch["loss_mask"][:, 1:]).sum(-1)


def test_tiny_vl_is_a_real_qwen2_vl_with_its_image_processor(vl):
    from transformers import AutoImageProcessor, Qwen2VLForConditionalGeneration

    model, tokenizer, images, path = vl
    assert type(model) is Qwen2VLForConditionalGeneration and is_multimodal(model)
    assert type(AutoImageProcessor.from_pretrained(path)).__name__.startswith("Qwen2VLImageProcessor")
    assert images.image_token == "<|image_pad|>"
    assert (images.before, images.after) == ("<|vision_start|>", "<|vision_end|>")  # as the template writes it
    # 56×56: 4×4 patches of 14 px, 2×2 merged into 4 tokens; 84×56: 6×4 patches, 6 tokens
    inputs, markups = images.encode([picture(0), picture(1, (84, 56))])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert inputs["pixel_values"].shape[0] == 16 + 24
    assert [m.count("<|image_pad|>") for m in markups] == [4, 6]


def test_placeholders_become_the_image_tokens_and_text_rows_are_unchanged(vl):
    model, tokenizer, _, _ = vl
    dm = setup(SFTDataModule, vl)
    first = dm.splits["train"][0]  # two images: 84×56 (6 tokens) and 56×56 (4)
    tokens = tokenizer.convert_ids_to_tokens(first["prompt_ids"])
    assert tokens.count("<|image_pad|>") == 10 and tokens.count("<|vision_start|>") == 2
    assert first["vision"]["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]]
    # the text after the images is encoded as text, as in a text row
    start = tokens.index("<|vision_end|>", tokens.index("<|vision_end|>") + 1) + 1
    assert tokenizer.decode(first["prompt_ids"][start:]).startswith("What colour is square 0?")
    text_row = dm.splits["train"][-1]
    assert "vision" not in text_row
    from alignlab.data.tokenize import encode_prompts

    assert text_row["prompt_ids"] == encode_prompts(tokenizer, [rows()[-1]["prompt"]])[0]


def test_a_literal_image_token_in_text_stays_text(vl):
    """`<|image_pad|>` typed in a message is characters, never the image token (no image to fill it)."""
    _, tokenizer, _, _ = vl
    data = [{"prompt": [{"role": "user", "content": "say <|image_pad|>"}], "completion": "ok"}]
    dm = setup(SFTDataModule, vl, data)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") not in dm.splits["train"][0]["prompt_ids"]


def test_logprobs_with_images_equal_the_models_own_forward_in_float64(vl):
    model, _, _, _ = vl
    for module_class in (SFTDataModule, PairwiseDataModule, LabelledDataModule):
        dm = setup(module_class, vl)
        batch = dm.collate(dm.splits["train"], with_prompts=False)
        assert batch["pixel_values"].shape[0] == int(batch["image_pixel_rows"].sum())
        m64, b64 = float64(model, batch)
        fast = answer_logprobs(m64, b64).logps
        torch.testing.assert_close(fast, own_logps(m64, b64), rtol=0, atol=1e-9)
        assert check_answer_logprobs(m64, b64)[0] < 1e-9
        assert check_answer_logprobs(m64, scoring_rows(b64))[0] < 1e-9


def test_the_images_change_the_numbers(vl):
    """Other pixels, other log-probs: the model reads the images (and a batch without them fails)."""
    model, _, _, _ = vl
    dm = setup(SFTDataModule, vl)
    batch = dm.collate(dm.splits["train"][:4], with_prompts=False)
    other = {**batch, "pixel_values": batch["pixel_values"].flip(0)}
    with torch.no_grad():
        assert not torch.allclose(answer_logprobs(model, batch).logps, answer_logprobs(model, other).logps)
        with pytest.raises(ValueError, match="no images"):
            answer_logprobs(model, {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")})


def test_selected_rows_keep_their_own_images(vl):
    """Micro-batches (select_rows) and repeated prompts carry exactly their rows' images."""
    model, _, _, _ = vl
    dm = setup(PairwiseDataModule, vl)
    batch = dm.collate(dm.splits["train"], with_prompts=False)
    m64, b64 = float64(model, batch)
    whole = answer_logprobs(m64, b64).logps
    for picked in (slice(1, 5), [6, 0, 9], torch.tensor([3, 3, 12])):
        part = answer_logprobs(m64, select_rows(b64, picked)).logps
        torch.testing.assert_close(part, whole[picked], rtol=0, atol=1e-9)
    repeated = repeat_vision(batch, 3)
    assert repeated["images_per_row"].tolist() == batch["images_per_row"].repeat_interleave(3).tolist()
    assert select_vision(batch, slice(6, 7)) == {}  # the text row: no images
    assert collate_vision([None, None]) == {}


def test_rejected_images_follow_the_rejected_answer(vl):
    data = [
        {**r, "rejected_images": [picture(i + 2, im.size) for im in r["images"]]} for i, r in enumerate(rows(4)[:-1])
    ]
    dm = setup(PairwiseDataModule, vl, data)
    batch = dm.collate(dm.splits["train"], with_prompts=False)
    n = len(data)
    chosen, rejected = select_vision(batch, slice(0, n)), select_vision(batch, slice(n, 2 * n))
    assert torch.equal(chosen["image_grid_thw"], rejected["image_grid_thw"])
    assert not torch.equal(chosen["pixel_values"], rejected["pixel_values"])
    wrong = [{**data[0], "rejected_images": [picture(0, (112, 112)) for _ in data[0]["images"]]}]
    with pytest.raises(DataError, match="rejected_images"):
        setup(PairwiseDataModule, vl, wrong)


def test_the_same_answer_about_other_images_is_a_pair_that_trains(vl, tmp_path):
    """ms-swift's image preference pair: one answer text, `rejected_images` the pictures it is wrong about
    (with the text repeated or left out). It is kept, not dropped as identical, and unpaired for KTO."""
    for i, name in enumerate(("right", "wrong")):
        picture(i, (56, 56)).save(tmp_path / f"{name}.png")
    conversation = [{"role": "user", "content": "<image>Which colour?"}, {"role": "assistant", "content": "red"}]
    raw = [
        {"messages": conversation, "images": ["right.png"], "rejected_images": ["wrong.png"]},
        {
            "messages": conversation,
            "images": ["right.png"],
            "rejected_images": ["wrong.png"],
            "rejected_response": "red",
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    model, tokenizer, images, _ = vl
    for module, kwargs in ((PairwiseDataModule, {}), (LabelledDataModule, {"unpair": True})):
        dm = module(FileSource(str(path), eval_fraction=0), batch_size=2, max_length=128, **kwargs)
        dm.set_tokenizer(tokenizer)
        dm.set_image_encoder(images)
        dm.setup()
        assert dm.dropped == {"train": 0, "eval": 0} and len(dm.splits["train"]) == 2 * (1 + kwargs.get("unpair", 0))
        batch = dm.collate(dm.splits["train"][:2], with_prompts=False)
        halves = select_vision(batch, slice(0, 2)), select_vision(batch, slice(2, 4))
        if module is PairwiseDataModule:  # the same tokens, other pixels
            assert torch.equal(batch["input_ids"][:2], batch["input_ids"][2:])
            assert not torch.equal(halves[0]["pixel_values"], halves[1]["pixel_values"])
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({**raw[0], "rejected_images": ["right.png"]}) + "\n")
    with pytest.raises(
        DataError, match=r"field 'rejected_images': identical to the chosen answer and `rejected_images`"
    ):
        FileSource(str(same)).load("pairwise")


def test_images_need_a_vision_language_model(tiny):
    model, tokenizer = tiny
    dm = SFTDataModule(ListSource(rows(2)), batch_size=2, max_length=128)
    dm.set_tokenizer(tokenizer)
    dm.set_image_encoder(load_image_encoder(model, tokenizer, "unused"))  # a text model: None
    with pytest.raises(ConfigError, match="model=tiny_vl"):
        dm.setup()


def test_reward_model_reads_the_images(vl):
    model, _, _, _ = vl
    dm = setup(PairwiseDataModule, vl)
    batch = dm.collate(dm.splits["train"], with_prompts=False)
    reward = RewardModel(copy.deepcopy(model)).double()
    _, b64 = float64(model, batch)
    with torch.no_grad():
        scores = reward(b64["input_ids"], b64["attention_mask"], b64["loss_mask"], b64)
        other = {**b64, "pixel_values": b64["pixel_values"].flip(0)}
        moved = reward(b64["input_ids"], b64["attention_mask"], b64["loss_mask"], other)
        part = reward(
            *(select_rows(b64, slice(0, 3))[k] for k in ("input_ids", "attention_mask", "loss_mask")),
            select_rows(b64, slice(0, 3)),
        )
    assert scores.shape == (len(batch["input_ids"]),) and not torch.allclose(scores, moved)
    torch.testing.assert_close(part, scores[:3], rtol=0, atol=1e-9)


def test_keyed_generation_with_images_is_the_same_alone_or_batched(vl):
    """Left-padded prompts with images of different sizes: each row samples what it samples alone, and
    never an image placeholder."""
    model, tokenizer, _, _ = vl
    dm = setup(PromptDataModule, vl)
    batch = dm.collate(dm.splits["train"][:6], with_prompts=True)
    keys = sample_keys(0, 0, batch["index"])
    stops = stop_token_ids(model, tokenizer)
    args = dict(max_new_tokens=12, do_sample=True, temperature=1.0, stop_ids=stops)
    together = generate(
        model, tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"], keys=keys, images=batch, **args
    )
    for i in range(6):
        width = int(batch["prompt_attention_mask"][i].sum())
        alone = generate(
            model,
            tokenizer,
            batch["prompt_input_ids"][i : i + 1, -width:],
            batch["prompt_attention_mask"][i : i + 1, -width:],
            keys=keys[i : i + 1],
            images=select_vision(batch, [i]),
            **args,
        )
        assert together[i, : alone.shape[1]].tolist() == alone[0].tolist()
    vision_ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    assert not torch.isin(together, torch.tensor(vision_ids)).any()


def test_vision_tower_frozen_and_lora_on_the_language_model_only():
    from alignlab.models.loading import load_model

    def loaded(*overrides):
        cfg = compose(["model=tiny_vl", *overrides])
        return load_model(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)))[0]

    model = loaded()
    tower = vision_modules(model)
    assert list(tower) == ["model.visual"]
    assert not any(p.requires_grad for m in tower.values() for p in m.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("model.visual."))
    lora = loaded("model.lora.enabled=true")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert adapted and not any(".visual." in n for n in adapted)
    assert any(".language_model." in n for n in adapted)
    trained = loaded("model.freeze_vision=false")
    assert all(p.requires_grad for p in trained.parameters())


def test_generate_cli_answers_prompts_with_images(vl, tmp_path, tiny_model_dir):
    """`python -m alignlab.generate` reads image rows (paths relative to the input file) and answers them
    as `complete` does with the images themselves; a text model refuses them naming the cause."""
    import json

    from alignlab.generate import complete, main

    model, tokenizer, images, path = vl
    pictures = [picture(i) for i in range(3)]
    for i, image in enumerate(pictures):
        image.save(tmp_path / f"p{i}.png")
    question = "<image>What colour is the square?"
    lines = [{"messages": [{"role": "user", "content": question}], "images": [f"p{i}.png"]} for i in range(3)]
    lines.append({"prompt": "no picture"})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["--model", str(path), "--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 0
    written = [json.loads(line)["completion"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": question}]] * 3 + [[{"role": "user", "content": "no picture"}]]
    direct = complete(model.eval(), tokenizer, prompts, images=[[p] for p in pictures] + [None], image_encoder=images)
    assert written == direct and len(written) == 4
    code = main(["--model", str(tiny_model_dir), "--input", str(source), "--output", str(tmp_path / "text.jsonl")])
    assert code == 1 and not (tmp_path / "text.jsonl").exists()


def test_reward_scorer_refuses_a_vision_language_reward_model(vl, tmp_path):
    """RewardScorer scores text prompts: with a vision-language reward model it would leave the images
    out, so it says so instead of scoring."""
    from alignlab.models.reward import RewardScorer

    model, tokenizer, _, _ = vl
    reward = RewardModel(copy.deepcopy(model))
    reward.backbone.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward.save_value_head(tmp_path)
    assert is_multimodal(RewardModel.from_pretrained(tmp_path).backbone)  # the folder loads as saved
    with pytest.raises(ValueError, match="vision-language reward model"):
        RewardScorer(tmp_path)


def test_ppo_refuses_rows_with_images_before_writing(vl, tmp_path):
    from alignlab.train import train

    model, tokenizer, _, _ = vl
    reward = RewardModel(copy.deepcopy(model))
    reward.backbone.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward.save_value_head(tmp_path / "rm")
    run = tmp_path / "run"
    overrides = ["model=tiny_vl", "algorithm=ppo", f"algorithm.reward_model={tmp_path / 'rm'}", "data=shapes_prompts"]
    small = ["data.source.n_train=8", "data.source.n_eval=4", "logger=none"]
    with pytest.raises(ConfigError, match="algorithm=ppo does not train on rows with images"):
        train(compose([*overrides, *small], run))
    assert not (run / "config.yaml").exists()
