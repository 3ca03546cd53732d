"""`generate --image` and chat's `/image`, run as a user types them (subprocess)."""

from __future__ import annotations

import json

import pytest

from clirun import one_error_line, run_cli, start_serve
from step35_mlx.vision.synthetic import (
    sample_image, step3p7_config, tiny_vision_config, write_step3p7_checkpoint, write_vision_tokenizer,
)

GLOBAL = 49  # image tokens of a 728 view at patch 28


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm_cli")
    ids = write_vision_tokenizer(path)
    cfg = step3p7_config(tiny_vision_config(width=16, layers=1, patch_size=28), image_token_id=ids["<im_patch>"],
                         vocab_size=2056, num_mtp=0, num_layers=2)
    write_step3p7_checkpoint(path, cfg, seed=1)
    sample_image(160, 120, seed=2).save(path / "photo.png")
    (path / "notes.txt").write_text("not a picture")
    return path


def test_generate_with_image(vlm_dir, tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    r = run_cli(["generate", "-p", "Describe it.", "--model", str(vlm_dir), "-n", "3", "-t", "0", "--json",
                 "--image", str(vlm_dir / "photo.png")], tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    template = load_tokenizer(vlm_dir).apply_chat_template(msgs, add_generation_prompt=True)
    # the template's one <im_patch> became <im_start> + 49 image tokens + <im_end> (160x120: no crops)
    assert out["stats"]["prompt_tokens"] == len(template) - 1 + GLOBAL + 2
    assert out["stats"]["generation_tokens"] == 3


@pytest.mark.parametrize("extra,expected", [
    (["--image", "missing.png"], "does not exist"),
    (["--image", "notes.txt"], "is not an image"),
    (["--image", "photo.png", "--raw"], "cannot be combined with --raw"),
    (["--image", "photo.png", "--no-vision"], "drop --no-vision"),
])
def test_generate_image_mistakes(vlm_dir, tmp_path, extra, expected):
    extra = [str(vlm_dir / e) if e.endswith((".png", ".txt")) else e for e in extra]
    r = run_cli(["generate", "-p", "hi", "--model", str(vlm_dir), "-n", "2", *extra], tmp_path)
    assert expected in one_error_line(r)


def test_text_model_refuses_image(vlm_dir, tmp_path):
    r = run_cli(["generate", "-p", "hi", "--model", "demo", "-n", "2", "--image", str(vlm_dir / "photo.png")],
                tmp_path)
    assert "has no vision tower" in one_error_line(r)


def test_chat_image_command(vlm_dir, tmp_path):
    lines = [f"/image {vlm_dir / 'nothing.png'}", f"/image {vlm_dir / 'photo.png'}", "What is it?", "/stats",
             "Anything else?", "/stats", "/exit"]
    r = run_cli(["chat", "--model", str(vlm_dir), "-n", "2", "-t", "0"], tmp_path, input="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "error: image file" in out and "does not exist" in out
    assert "attached" in out and "1 picture(s)" in out
    assert "Traceback" not in out + r.stderr
    prefilled = [int(line.split(" tokens prefilled")[0].rsplit(" ", 1)[1]) for line in out.splitlines()
                 if "tokens prefilled in this session" in line]
    assert len(prefilled) == 2
    assert prefilled[0] > GLOBAL  # the first turn prefilled the image
    assert prefilled[1] - prefilled[0] < GLOBAL  # the second reused it from the cache


def test_serve_with_local_images(vlm_dir, tmp_path):
    import urllib.error
    import urllib.request

    srv = start_serve(["--model", str(vlm_dir), "--allow-local-images", "--max-images", "1"], tmp_path)
    base = srv.base
    try:
        part = {"type": "image_url", "image_url": {"url": str(vlm_dir / "photo.png")}}
        body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [part, part]}]}
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400 and "more than 1 images" in e.value.read().decode()
        body["messages"][0]["content"] = [part, {"type": "text", "text": "What is it?"}]
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 1
    finally:
        srv.stop()


def test_serve_image_option_mistake(vlm_dir, tmp_path):
    r = run_cli(["serve", "--model", str(vlm_dir), "--max-image-size", "lots"], tmp_path)
    assert "--max-image-size" in one_error_line(r)


def test_info_shows_the_tower(vlm_dir, tmp_path):
    r = run_cli(["info", str(vlm_dir)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "vision tower: width 16, 1 layers" in r.stdout and "(49 / 25 tokens), image token id 11" in r.stdout
