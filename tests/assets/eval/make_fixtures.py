"""Writes the hand-made evaluation fixtures next to this file (see README.md), laid out as LLaVA-1.5's
playground/data/eval folder (gqa/data/, scienceqa/, textvqa/, pope/coco/ + pope/val2014/,
MME/MME_Benchmark_release_version/, mmbench/); the tests derive the release and MobileVLM layouts
from it in temporary folders.

Every question, answer and label below was written by hand for the tests; only the tiny images are
drawn by PIL. Run from the repository root: `.venv/bin/python tests/assets/eval/make_fixtures.py`.
The tests read the written files, not this script.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def img_bytes(color, fmt="PNG", size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt, **({"quality": 30} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_img(path: Path, color, fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    path.write_bytes(img_bytes(color, fmt))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- GQA
def gqa() -> None:
    d = HERE / "gqa" / "data"
    q = {
        "201307251": {"imageId": "n1", "question": "What color is the ball?", "answer": "red",
                      "fullAnswer": "The ball is red.", "isBalanced": True,
                      "types": {"structural": "query", "semantic": "attr", "detailed": "colorObj"}},
        "201307252": {"imageId": "n1", "question": "Is the ball to the left of the box?", "answer": "yes",
                      "fullAnswer": "Yes, the ball is to the left of the box.", "isBalanced": True,
                      "types": {"structural": "verify", "semantic": "rel", "detailed": "relVerify"}},
        "201307253": {"imageId": "n2", "question": "Which kind of animal is it?", "answer": "dog",
                      "fullAnswer": "The animal is a dog.", "isBalanced": True,
                      "types": {"structural": "query", "semantic": "cat", "detailed": "categoryThis"}},
        "201307254": {"imageId": "n3", "question": "Is the sky blue or gray?", "answer": "blue",
                      "fullAnswer": "The sky is blue.", "isBalanced": True,
                      "types": {"structural": "choose", "semantic": "attr", "detailed": "chooseAttr"}},
        # malformed: its image images/n4.jpg does not exist
        "201307255": {"imageId": "n4", "question": "What is on the table?", "answer": "cup",
                      "isBalanced": True, "types": {"structural": "query"}},
        # malformed: no answer
        "201307256": {"imageId": "n2", "question": "Who is standing?", "types": {"structural": "query"},
                      "isBalanced": True},
        # not balanced: known to GQA's eval.py, not scored
        "201307257": {"imageId": "n3", "question": "Is the sky cloudy?", "answer": "no", "isBalanced": False,
                      "types": {"structural": "verify"}},
        "201307258": {"imageId": "n2", "question": "Are the dog and the cat the same color?", "answer": "no",
                      "isBalanced": True, "types": {"structural": "compare", "semantic": "attr"}},
    }
    write_json(d / "testdev_balanced_questions.json", q)
    write_img(d / "images/n1.jpg", (200, 30, 30))
    write_img(d / "images/n2.jpg", (120, 90, 40))
    write_img(d / "images/n3.jpg", (60, 120, 230))


# ---------------------------------------------------------------------------------------- ScienceQA
def sqa() -> None:
    d = HERE / "scienceqa"

    def prob(question, choices, answer, hint="", image="image.png", split="test"):
        return {"question": question, "choices": choices, "answer": answer, "hint": hint,
                "image": image, "task": "closed choice", "grade": "grade4", "subject": "natural science",
                "topic": "geography", "category": "Geography", "skill": "Read a map",
                "lecture": "", "solution": "", "split": split}

    problems = {
        "101": prob("Which of these states is farthest north?",
                    ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], 0),
        "102": prob("Which property do these three objects have in common?", ["shiny", "salty", "hard"], 2,
                    hint="Select the best answer."),
        "103": prob("Which animal's feet are also adapted for walking on snow?", ["lynx", "camel"], 0,
                    hint="Polar bears live in the Arctic."),
        "104": prob("What is the boiling point of water at sea level?", ["100 °C", "50 °C"], 0, image=None),
        "105": prob("Which is a mammal?", ["whale", "shark"], 0, split="val"),
        "106": prob("Which word is a noun?", ["run", "dog"], 5),  # malformed: answer out of range
        # "107" is listed in the test split but missing here (malformed)
        "108": prob("Which city is the capital of Idaho?",
                    ["Salt Lake City", "Provo", "Denver", "Cheyenne", "Boise"], 4),
    }
    write_json(d / "problems.json", problems)
    write_json(d / "pid_splits.json", {"train": [], "val": ["105"],
                                      "test": ["101", "102", "103", "104", "106", "107", "108"]})
    for pid, c in (("101", (10, 10, 200)), ("102", (200, 200, 10)), ("103", (240, 240, 240)),
                   ("105", (0, 90, 200)), ("106", (90, 60, 30)), ("108", (30, 160, 30))):
        write_img(d / f"images/{problems[pid]['split']}/{pid}/image.png", c)


# ------------------------------------------------------------------------------------------ TextVQA
def textvqa() -> None:
    d = HERE / "textvqa"

    def row(qid, img, q, answers):
        return {"question": q, "image_id": img, "image_classes": ["Poster"], "flickr_original_url": "",
                "flickr_300k_url": "", "image_width": 4, "image_height": 4, "answers": answers,
                "question_tokens": q.rstrip("?").split(), "question_id": qid, "set_name": "val"}

    data = [
        row(34602, "t1", "how many dogs are on the sign?",
            ["two dogs", "2 dogs", "2", "2", "2", "2", "2", "2", "2", "2"]),
        row(34603, "t2", "what brand is the phone?",
            ["the nokia", "nokia", "Nokia", "nokia phone", "samsung", "nokia", "nokia.", "NOKIA", "htc", "lg"]),
        row(34604, "t3", "what does the red sign say?",
            ["stop", "stop", "stop", "stop sign", "stop sign", "stop sign", "stop sign", "stop sign",
             "stop sign", "stop sign"]),
        row(34605, "t3", "what does the small print say?",
            ["dont", "no", "no", "no", "no", "no", "no", "no", "no", "no"]),
        row(34606, "t1", "what color is the sign?",  # malformed: 9 answers
            ["red", "red", "red", "red", "red", "red", "red", "red", "red"]),
    ]
    write_json(d / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                             "dataset_version": "0.5.1", "data": data})
    write_json(d / "TextVQA_Rosetta_OCR_v0.2_val.json",
               {"dataset_name": "textvqa", "data": [{"image_id": "t2", "ocr_tokens": ["NOKIA", "3310"]}]})
    # LLaVA's prompt file (question_id = image id); its token list for t2 differs from the Rosetta
    # file's on purpose, so a test can tell which one a prompt came from
    short = "Answer the question using a single word or phrase."
    prompts = [("t1", "how many dogs are on the sign?", ""), ("t2", "what brand is the phone?", "NOKIA, 3310, Phone"),
               ("t3", "what does the red sign say?", "STOP"), ("t3", "what does the small print say?", "")]
    (d / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(
        json.dumps({"question_id": img, "image": f"{img}.jpg", "text": f"{q}\nReference OCR token: {tok}\n{short}",
                    "category": "default"}) + "\n" for img, q, tok in prompts))
    write_img(d / "train_images/t1.jpg", (250, 250, 250))
    write_img(d / "train_images/t2.jpg", (20, 20, 20))
    write_img(d / "train_images/t3.jpg", (220, 0, 0))


# --------------------------------------------------------------------------------------------- POPE
def pope() -> None:
    d = HERE / "pope"
    im1, im2 = "COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"

    def lines(rows):
        return "".join(json.dumps({"question_id": i + 1, "image": im, "text": f"Is there a {obj} in the image?",
                                   "label": lab}) + "\n" for i, (im, obj, lab) in enumerate(rows))

    (d / "coco").mkdir(parents=True, exist_ok=True)
    (d / "coco/coco_pope_random.json").write_text(lines([
        (im1, "dog", "yes"), (im1, "zebra", "no"), (im2, "car", "yes"), (im2, "kite", "no")]))
    (d / "coco/coco_pope_popular.json").write_text(lines([
        (im1, "dog", "yes"), (im1, "person", "yes"), (im2, "chair", "no"), (im2, "cup", "no")]))
    adv = lines([(im1, "dog", "yes"), (im1, "cat", "no"), (im2, "truck", "no"), (im2, "car", "yes")])
    adv += json.dumps({"question_id": 5, "image": im2, "text": "Is there a bus in the image?",
                       "label": "maybe"}) + "\n"  # malformed: label
    adv += '{"question_id": 6, "image": \n'  # malformed: not JSON
    (d / "coco/coco_pope_adversarial.json").write_text(adv)
    write_img(d / "val2014" / im1, (100, 140, 60))
    write_img(d / "val2014" / im2, (60, 60, 140))


# ---------------------------------------------------------------------------------------------- MME
def mme() -> None:
    d = HERE / "MME" / "MME_Benchmark_release_version"
    yn = "Please answer yes or no."

    def flat(sub, name, qa, color, ext=".jpg", sep=" "):
        write_img(d / sub / f"{name}{ext}", color)
        (d / sub / f"{name}.txt").write_text("".join(f"{q}{sep}{yn}\t{a}\n" for q, a in qa))

    def split(sub, name, qa, color, ext=".jpg", crlf=False, write_image=True, raw=None):
        if write_image:
            write_img(d / sub / "images" / f"{name}{ext}", color)
        p = d / sub / "questions_answers_YN" / f"{name}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        nl = "\r\n" if crlf else "\n"
        p.write_bytes((raw if raw is not None else "".join(f"{q} {yn}\t{a}{nl}" for q, a in qa)).encode())

    flat("existence", "000000006040", [("Is there a train in this image?", "Yes"),
                                       ("Is there a bed in this image?", "No")], (90, 90, 90))
    flat("existence", "000000018150", [("Is there a bus in this image?", "Yes"),
                                       ("Is there a cow in this image?", "No")], (200, 160, 0))
    flat("count", "000000041180", [("Are there two dogs in the image?", "Yes"),
                                   ("Are there three dogs in the image?", "No")], (150, 100, 50))
    flat("position", "000000057270", [("Is the cat on the left of the sofa?", "Yes"),
                                      ("Is the cat on the right of the sofa?", "No")], (10, 100, 10), ext=".png")
    # two spaces before "Please answer yes or no.", as some release lines have it
    flat("color", "000000061418", [("Is there a red umbrella in the image?", "Yes"),
                                   ("Is there a green umbrella in the image?", "No")], (220, 10, 10), sep="  ")
    flat("OCR", "0001", [('Is the word in the logo "ACME"?', "Yes"),
                         ('Is the word in the logo "ACNE"?', "No")], (255, 255, 255))
    split("posters", "tt0048545", [("Is this movie titled rebel without a cause (1955)?", "Yes"),
                                   ("Is this movie titled the lost world (1925)?", "No")], (180, 20, 20))
    split("celebrity", "tt0032138_shot_0395_img_0",
          [("Is the actor inside the red bounding box named Judy Garland?", "Yes"),
           ("Is the actor inside the red bounding box named Ray Bolger?", "No")], (240, 200, 180), crlf=True)
    split("scene", "Places365_val_00000001", [("Is this picture captured in a place of beach?", "Yes"),
                                              ("Is this picture captured in a place of desert?", "No")],
          (0, 150, 220))
    # malformed x2: question file without its image
    split("scene", "Places365_val_00000002", [("Is this picture captured in a place of forest?", "Yes"),
                                              ("Is this picture captured in a place of office?", "No")],
          None, write_image=False)
    split("landmark", "0001", [("Is this a photo of Big Ben?", "Yes"),
                               ("Is this a photo of Tower Bridge?", "No")], (120, 110, 100))
    split("landmark", "0002", [("Is this a photo of the Eiffel Tower?", "Yes"),
                               ("Is this a photo of the Tokyo Tower?", "No")], (110, 120, 130), ext=".png")
    split("artwork", "10002", [("Is this artwork created by Leonardo da Vinci?", "Yes"),
                               ("Is this artwork created by Claude Monet?", "No")], (140, 110, 60))
    # malformed x2: a line without a tab, and an answer that is not Yes/No
    split("artwork", "10003", None, (10, 10, 60),
          raw="Is this artwork created by Rembrandt? Please answer yes or no. Yes\n"
              "Is this artwork titled the night watch? Please answer yes or no.\tMaybe\n")
    # a cognition subtask: known (LLaVA's answer files hold it), not part of perception
    flat("code_reasoning", "0001", [("Is a python code shown in the picture?", "Yes"),
                                    ("Is a c++ code shown in the picture?", "No")], (30, 30, 30), ext=".png")


# ------------------------------------------------------------------------------------------ MMBench
def mmbench() -> None:
    d = HERE / "mmbench"
    d.mkdir(parents=True, exist_ok=True)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]

    def b64(color):
        return base64.b64encode(img_bytes(color)).decode()

    red, black, green, blue = b64((220, 0, 0)), b64((0, 0, 0)), b64((0, 200, 0)), b64((0, 0, 200))
    fp = "finegrained_perception (instance-level)"

    def q0(k, opts, ans, image):  # 4 options; its copies refer to row 0's image, as VLMEvalKit's TSVs do
        return [k * 1_000_000, "What is the main color of the square?", "nan", *opts, ans,
                "attribute_recognition", image, "handmade", fp, "nan", "dev"]

    def q1(k, opts, ans):  # 3 options and a hint; every copy holds its image, as the openmmlab TSVs do
        return [k * 1_000_000 + 1, "Which shape is shown?", "The image shows a simple drawing.", *opts, "nan",
                ans, "object_localization", black, "handmade", fp, "nan", "dev"]

    def q2(k, opts, ans):  # 2 options; C is "None" and D empty: both missing for pandas
        return [k * 1_000_000 + 2, "Is the square above the circle?", "nan", *opts, "None", "", ans,
                "spatial_relationship", green if k == 0 else "2", "handmade", "relation_reasoning", "nan", "dev"]

    rows = [
        q0(0, ["red", "green", "blue", "yellow"], "A", red),
        q1(0, ["circle", "triangle", "square"], "C"),
        q2(0, ["yes", "no"], "B"),
        # malformed: answer E with 2 options; its (good) copy goes with it
        [3, "Which is bigger?", "nan", "the square", "the circle", "nan", "nan", "E",
         "attribute_comparison", blue, "handmade", "attribute_reasoning", "nan", "dev"],
        # malformed: the image is not base64
        [4, "What time is it?", "nan", "noon", "midnight", "nan", "nan", "A",
         "physical_property_reasoning", "not base64!", "handmade", "attribute_reasoning", "nan", "dev"],
        # the circular copies: option k of the original shown as A, answer letter moved with it
        q0(1, ["green", "blue", "yellow", "red"], "D", "0"),
        q1(1, ["triangle", "square", "circle"], "B"),
        q2(1, ["no", "yes"], "A"),
        [1_000_003, "Which is bigger?", "nan", "the circle", "the square", "nan", "nan", "B",
         "attribute_comparison", "3", "handmade", "attribute_reasoning", "nan", "dev"],
        q0(2, ["blue", "yellow", "red", "green"], "C", "0"),
        q1(2, ["square", "circle", "triangle"], "A"),
        q0(3, ["yellow", "red", "green", "blue"], "B", "0"),
    ]
    with open(d / "mmbench_dev_20230712.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)


if __name__ == "__main__":
    for folder in ("gqa", "scienceqa", "textvqa", "pope", "MME", "mmbench"):
        shutil.rmtree(HERE / folder, ignore_errors=True)
    for fn in (gqa, sqa, textvqa, pope, mme, mmbench):
        fn()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"fixtures written, {total} bytes")
