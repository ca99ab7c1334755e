"""make_batches / make_prompts on every tiny family: labels cover exactly the answer, losses are finite
and differentiable, text batches carry no pixels, generation prompts are left padded, errors name rows."""
import dataclasses

import pytest
import torch
from PIL import Image

from mmedit import zoo
from mmedit.arch import model_map
from mmedit.data.batches import FORMS, IGNORE, make_batches, make_prompts
from mmedit.data.rows import Row
from mmedit.errors import MmeditError
from mmedit.loading import load

TEXT_KEYS = {"input_ids", "attention_mask", "labels"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    made = []
    for i, (answer, size) in enumerate([("glassblower", (40, 30)), ("a pilot", (24, 48)), ("judge", (33, 33))]):
        Image.new("RGB", size, (60 * i, 200 - 50 * i, 90)).save(folder / f"p{i}.png")
        made.append(
            Row(id=f"p{i}", entity=f"Person {i}", image=folder / f"p{i}.png", question="What is this person's job?",
                text_question=f"What is Person {i}'s job?", answer=answer, where=f"rows.jsonl:{i + 1}")
        )
    return made


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def loaded(request, tmp_path_factory):
    return load(zoo.tiny(request.param, root=tmp_path_factory.getbasetemp() / "zoo"), device="cpu")


@pytest.mark.parametrize("form", FORMS)
def test_labels_cover_exactly_the_answer_and_train(loaded, rows, form):
    model, processor = loaded
    batches = list(make_batches(rows, processor, form, batch_size=2))
    assert [len(batch.rows) for batch in batches] == [2, 1] and all(batch.form == form for batch in batches)
    tokenizer = processor.tokenizer
    for batch in batches:
        inputs = batch.inputs
        if form == "text":
            assert set(inputs) == TEXT_KEYS
        else:
            assert len(set(inputs) - TEXT_KEYS) >= 1  # pixel values and their companions
        assert inputs["attention_mask"][:, 0].all()  # right padded
        for i, row in enumerate(batch.rows):
            labelled = inputs["labels"][i] != IGNORE
            assert torch.equal(inputs["labels"][i][labelled], inputs["input_ids"][i][labelled])
            assert tokenizer.decode(inputs["input_ids"][i][labelled]) == row.answer + tokenizer.eos_token
            # the labelled span is contiguous and ends the real tokens
            real = int(inputs["attention_mask"][i].sum())
            assert labelled.nonzero().flatten().tolist() == list(range(real - int(labelled.sum()), real))
    model.zero_grad()
    output = model(**batches[0].inputs)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    if form == "multimodal":  # the image reaches the loss
        assert any(grads[name].abs().sum() > 0 for name in model_map(model).parameters("vision") if name in grads)
    model.zero_grad()


@pytest.mark.parametrize("form", FORMS)
def test_prompts_are_left_padded_and_generate(loaded, rows, form):
    model, processor = loaded
    batch = next(make_prompts(rows, processor, form, batch_size=3))
    assert "labels" not in batch.inputs
    assert batch.inputs["attention_mask"][:, -1].all()
    if form == "text":
        assert set(batch.inputs) == TEXT_KEYS - {"labels"}
    with torch.no_grad():
        generated = model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[0] == 3
    # the prompt is a prefix of make_batches' input (same processor path, answer appended)
    full = next(make_batches(rows[:1], processor, form, batch_size=1)).inputs
    prompt = next(make_prompts(rows[:1], processor, form, batch_size=1)).inputs["input_ids"][0]
    assert torch.equal(full["input_ids"][0][: len(prompt)], prompt)


def test_with_answer_false_has_no_labels(loaded, rows):
    _, processor = loaded
    batch = next(make_batches(rows, processor, "multimodal", batch_size=3, with_answer=False))
    assert "labels" not in batch.inputs


def test_bad_images_and_options_are_one_line_errors(loaded, rows, tmp_path):
    _, processor = loaded
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(MmeditError, match=f"rows.jsonl:1: cannot read image {broken}"):
        list(make_batches([dataclasses.replace(rows[0], image=broken)], processor))
    with pytest.raises(MmeditError, match="rows.jsonl:2: row 'p1' has no image"):
        list(make_batches([rows[0], dataclasses.replace(rows[1], image=None)], processor))
    assert list(make_batches([dataclasses.replace(rows[1], image=None)], processor, "text"))
    with pytest.raises(MmeditError, match="unknown form"):
        list(make_batches(rows, processor, "audio"))
    with pytest.raises(MmeditError, match="batch size"):
        list(make_batches(rows, processor, batch_size=0))


def test_prompt_not_a_prefix_is_an_error(rows):
    _, processor = zoo.build("llava")
    # a template that writes the question differently once an answer follows
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% endfor %}{% if add_generation_prompt %}!{% endif %}"
    )
    with pytest.raises(MmeditError, match="rows.jsonl:1: the chat template's prompt is not a prefix"):
        list(make_batches(rows, processor, "text"))


def test_device_moves_every_tensor(loaded, rows):
    _, processor = loaded
    batch = next(make_batches(rows, processor, "multimodal", device="cpu"))
    assert all(value.device.type == "cpu" for value in batch.inputs.values())


QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_HF_TEMPLATE = (  # llava-1.5-hf's: a trailing space after each turn, no eos
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize(
    "family, template, labelled",
    [("qwen2_vl", QWEN_TEMPLATE, "{answer}<|im_end|>"), ("llava", LLAVA_HF_TEMPLATE, " {answer}</s>")],
)
def test_real_style_templates_label_the_answer_and_one_end_token(rows, family, template, labelled):
    _, processor = zoo.build(family)
    processor.chat_template = template
    for form in FORMS:
        inputs = next(make_batches(rows, processor, form, batch_size=3)).inputs
        for i, row in enumerate(rows):
            ids = inputs["input_ids"][i][inputs["labels"][i] != IGNORE]
            assert processor.tokenizer.decode(ids) == labelled.format(answer=row.answer)


def test_a_processor_without_chat_template_is_an_error(rows):
    _, processor = zoo.build("llava")
    processor.chat_template = None
    with pytest.raises(MmeditError, match="LlavaProcessor has no chat template"):
        list(make_batches(rows, processor))


def test_paligemma_without_template_follows_its_processor_layout(rows):
    _, processor = zoo.build("paligemma")
    processor.chat_template = None  # as released: PaliGemma has none
    decode = processor.tokenizer.decode
    for form, prefix in (("multimodal", "<image>" * 4 + "<bos>"), ("text", "<bos>")):
        inputs = next(make_batches(rows[:1], processor, form, batch_size=1)).inputs
        question = rows[0].question if form == "multimodal" else rows[0].text_question
        assert decode(inputs["input_ids"][0]) == f"{prefix}{question}\n{rows[0].answer}<eos>"
        assert decode(inputs["input_ids"][0][inputs["labels"][0] != IGNORE]) == rows[0].answer + "<eos>"
