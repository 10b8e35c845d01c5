"""MME reader (four layouts, both subtask shapes) and scorer: LLaVA's convert_answer_to_mme.py
matching + MME's eval_tool/calculation.py, by hand."""

import shutil

import pytest

from alignkd.errors import DataError
from alignkd.eval.benchmarks import MME

Q = "Answer the question using a single word or phrase."
RELEASE = "MME/MME_Benchmark_release_version"


def test_llava_layout(assets):
    items, stats = MME().load(assets)  # finds MME/MME_Benchmark_release_version/
    # 28 perception lines: scene/Places365_val_00000002.txt has no image (2 malformed); artwork/10003.txt
    # has a line without a tab and a "Maybe" answer (2 malformed) -> 24 items
    assert (stats.n_rows, stats.n_malformed, len(items)) == (28, 4, 24)
    assert len(stats.unscored) == 2  # the cognition subtask code_reasoning: known, not scored
    first = items[0]
    # llava_mme.jsonl's question: without "Please answer yes or no.", then the short-answer instruction
    assert first.question == first.prompt == "Is there a train in this image?\n" + Q
    assert first.question_id == "existence/000000006040.jpg"  # the image path in the release, as LLaVA's
    artwork = [it for it in items if it.meta["subtask"] == "artwork"]
    assert {it.question_id for it in artwork} == {"artwork/images/10002.jpg"}  # split subtask: images/
    assert artwork[0].image.endswith("artwork/images/10002.jpg")
    assert {it.question_id for it in items if it.meta["subtask"] == "position"} == {"position/000000057270.png"}


@pytest.mark.parametrize("dest, root", [
    ("MME_Benchmark_release_version", "MME_Benchmark_release_version"),  # the release itself
    ("benchmark_data/mme/images", "benchmark_data"),  # MobileVLM: the release linked as mme/images
    ("hf/MME_Benchmark_release_version/MME_Benchmark", "hf/MME_Benchmark_release_version"),  # Hugging Face copy
])
def test_other_layouts(copy_assets, tmp_path, dest, root):
    copy_assets(RELEASE, dest)
    items, _ = MME().load(tmp_path / root)
    assert len(items) == 24 and items[0].question_id == "existence/000000006040.jpg"


def test_layout_errors(tmp_path, copy_assets):
    with pytest.raises(DataError) as e:
        MME().load(tmp_path)
    msg = str(e.value)
    assert "MME_Benchmark_release_version/{subtask}/NAME.jpg|png + NAME.txt" in msg
    assert "{subtask}/images/ + {subtask}/questions_answers_YN/" in msg and "LLaVA-1.5" in msg
    release = copy_assets(RELEASE, "r")
    (release / "artwork" / "questions_answers_YN").rename(release / "artwork" / "questions_answer_YN")
    with pytest.raises(DataError, match="artwork has images/ but no questions_answers_YN/"):
        MME().load(release)
    shutil.rmtree(release / "landmark")
    with pytest.raises(DataError, match="expected subtask folder.*landmark"):
        MME().load(release)


def rows_for(answer, replies):
    """LLaVA answer-file rows: question_id = image path, prompt = llava_mme.jsonl's question."""
    return [answer(qid, q if q.endswith("no.") else f"{q}\n{Q}", text) for qid, q, text in replies]


REPLIES = [
    # existence: 6040 Yes/No right right; 18150 Yes/No -> Yes, Yes: right wrong
    #   acc 3/4 = 75, acc+ 1/2 = 50 -> 125. The first prompt is the release's own question, which
    #   convert_answer_to_mme.py also finds (it holds "Please answer yes or no." already).
    ("existence/000000006040.jpg", "Is there a train in this image? Please answer yes or no.", "Yes"),
    ("existence/000000006040.jpg", "Is there a bed in this image?", "No"),
    ("existence/000000018150.jpg", "Is there a bus in this image?", "Yes"),
    ("existence/000000018150.jpg", "Is there a cow in this image?", "Yes"),
    # count: "Yes." -> "yes" in its first 4 characters; "no, there are two" -> "no" in "no, ": 200
    ("count/000000041180.jpg", "Are there two dogs in the image?", "Yes."),
    ("count/000000041180.jpg", "Are there three dogs in the image?", "no, there are two"),
    # position: " yes" -> " yes" holds "yes": right; "Yes" on No: wrong -> 50 + 0 = 50
    ("position/000000057270.png", "Is the cat on the left of the sofa?", " yes"),
    ("position/000000057270.png", "Is the cat on the right of the sofa?", "Yes"),
    # color (release lines with two spaces before "Please answer", found by the converter's second try):
    # "I think yes" -> "i th": other, wrong; "No" right -> 50 + 0 = 50
    ("color/000000061418.jpg", "Is there a red umbrella in the image?", "I think yes"),
    ("color/000000061418.jpg", "Is there a green umbrella in the image?", "No"),
    # OCR: right right -> 200
    ("OCR/0001.jpg", 'Is the word in the logo "ACME"?', "yes"),
    ("OCR/0001.jpg", 'Is the word in the logo "ACNE"?', "no"),
    # posters: No No on Yes/No -> 50 + 0 = 50
    ("posters/images/tt0048545.jpg", "Is this movie titled rebel without a cause (1955)?", "No"),
    ("posters/images/tt0048545.jpg", "Is this movie titled the lost world (1925)?", "No"),
    # celebrity (CRLF file): "Yes" right; "Not sure" -> "not " holds "no": right -> 200
    ("celebrity/images/tt0032138_shot_0395_img_0.jpg", "Is the actor inside the red bounding box named Judy Garland?", "Yes"),
    ("celebrity/images/tt0032138_shot_0395_img_0.jpg", "Is the actor inside the red bounding box named Ray Bolger?", "Not sure"),
    # scene: No Yes on Yes/No -> 0 + 0 = 0
    ("scene/images/Places365_val_00000001.jpg", "Is this picture captured in a place of beach?", "No"),
    ("scene/images/Places365_val_00000001.jpg", "Is this picture captured in a place of desert?", "Yes"),
    # landmark: 0001 right right, 0002 right wrong -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125
    ("landmark/images/0001.jpg", "Is this a photo of Big Ben?", "Yes"),
    ("landmark/images/0001.jpg", "Is this a photo of Tower Bridge?", "No"),
    ("landmark/images/0002.png", "Is this a photo of the Eiffel Tower?", "Yes"),
    ("landmark/images/0002.png", "Is this a photo of the Tokyo Tower?", "Yes"),
    # artwork: "Yes", "Nope" ("no" in "nope") right right -> 200
    ("artwork/images/10002.jpg", "Is this artwork created by Leonardo da Vinci?", "Yes"),
    ("artwork/images/10002.jpg", "Is this artwork created by Claude Monet?", "Nope"),
]
# perception = 125 + 200 + 50 + 50 + 200 + 50 + 200 + 0 + 125 + 200 = 1200


def test_score_follows_calculation_py(assets, score_rows, answer):
    bench = MME()
    items, stats = bench.load(assets)
    extra = [
        ("code_reasoning/0001.png", "Is a python code shown in the picture?", "Yes"),  # cognition: not scored
        ("existence/000000006040.jpg", "Is there a plane in this image?", "No"),  # no such question: unknown
    ]
    m, matched = score_rows(bench, items, stats, rows_for(answer, REPLIES + extra))
    assert len(matched.predictions) == 24 and (matched.n_unscored, matched.n_unknown) == (1, 1)
    assert (m["existence_acc"], m["existence_acc_plus"], m["existence_score"]) == (75.0, 50.0, 125.0)
    assert m["count_score"] == 200.0 and m["position_score"] == 50.0
    assert m["color_score"] == 50.0 and m["n_unparsed"] == 1  # "I think yes"
    assert m["celebrity_score"] == 200.0 and m["scene_score"] == 0.0 and m["landmark_score"] == 125.0
    assert m["perception"] == m["score"] == 1200.0
    # the landmark/0002 pair unanswered: both wrong -> landmark acc 2/4 = 50, acc+ 1/2 = 50 -> 100;
    # perception 1200 - 125 + 100 = 1175
    m, _ = score_rows(bench, items, stats, rows_for(answer, REPLIES[:20] + REPLIES[22:]))
    assert m["landmark_score"] == 100.0 and m["perception"] == 1175.0 and m["n_missing"] == 2


def test_limit_counts_images(assets):
    items, stats = MME().load(assets, limit=2)
    assert [it.question_id for it in items] == ["existence/000000006040.jpg"] * 2 + ["existence/000000018150.jpg"] * 2
    assert stats.n_skipped == 28 - 4


def test_a_question_the_converter_cannot_match_back_is_unusable(copy_assets):
    # convert_answer_to_mme.py puts " Please answer yes or no." back behind the prompt's question; a line
    # without it (or a file name with a dot) could never be matched from an answer file
    release = copy_assets(RELEASE, "r")
    shutil.copy(release / "existence" / "000000006040.jpg", release / "existence" / "000000099999.jpg")
    (release / "existence" / "000000099999.txt").write_text("Is there a cat?\tYes\nIs there a dog? Please answer yes or no.\tNo\n")
    items, stats = MME().load(release)
    assert len(items) == 24 + 1 and stats.n_malformed == 4 + 1
    assert any("cannot match 'Is there a cat?'" in m for m in stats.malformed)
